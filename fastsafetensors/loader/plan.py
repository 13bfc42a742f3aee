"""Plans of reads: pure data, built from headers, tested without files or devices.

A plan turns the tensors wanted from each file into a few large positioned reads. Neighbouring
tensors are merged (a small gap costs less to read than a second request), long ranges are cut
into chunks so several threads can work on one file, and with O_DIRECT every read is widened to
block boundaries. Each read names where its bytes land in its destination buffer (the file's, or
its group of nearby tensors'), which mirrors the file from ``Extent.base``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..format import Header, TensorInfo

__all__ = ["Read", "Extent", "merge_ranges", "split_range", "plan_extent", "plan_reads"]


@dataclass(frozen=True, slots=True)
class Read:
    """Read ``length`` bytes at file ``offset`` into the destination at ``offset - base``."""

    file: int
    offset: int
    length: int
    direct: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class Extent:
    """The destination buffer of one file: it holds file bytes ``[base, base + size)``."""

    base: int
    size: int


def merge_ranges(ranges: Iterable[tuple[int, int]], *, max_gap: int = 0) -> list[tuple[int, int]]:
    """Sort ``(begin, end)`` ranges and merge those closer than ``max_gap`` bytes.

    >>> merge_ranges([(10, 20), (0, 5), (6, 8)], max_gap=1)
    [(0, 8), (10, 20)]
    """
    merged: list[tuple[int, int]] = []
    for begin, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and begin - merged[-1][1] <= max_gap:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((begin, end))
    return merged


def split_range(begin: int, end: int, chunk: int, *, align: int = 1) -> list[tuple[int, int]]:
    """Cut ``[begin, end)`` into pieces of at most ``chunk`` bytes whose inner boundaries are
    multiples of ``align``.

    >>> split_range(0, 10, 4)
    [(0, 4), (4, 8), (8, 10)]
    """
    if chunk < align:
        chunk = align
    chunk -= chunk % align
    pieces = []
    position = begin
    while position < end:
        stop = min(end, (position // align) * align + chunk)
        pieces.append((position, stop))
        position = stop
    return pieces


def _align_out(begin: int, end: int, align: int) -> tuple[int, int]:
    return begin - begin % align, -(-end // align) * align


#: Wanted ranges closer than this are read as one (reading the gap costs less than another
#: request) and share one buffer; farther apart, each group gets its own.
MAX_GAP = 1 << 20


def group_tensors(tensors: Sequence[TensorInfo]) -> list[list[TensorInfo]]:
    """``tensors`` in file order, in runs whose gaps are at most MAX_GAP: a subset of a large
    file (its first and last tensor) must not need a buffer spanning everything between."""
    groups: list[list[TensorInfo]] = []
    end = 0
    for info in sorted(tensors, key=lambda t: t.data_offsets):
        begin, stop = info.data_offsets
        if groups and begin - end <= MAX_GAP:
            groups[-1].append(info)
            end = max(end, stop)
        else:
            groups.append([info])
            end = stop
    return groups


def plan_extent(header: Header, tensors: Sequence[TensorInfo] | None = None, *,
                align: int = 1) -> Extent:
    """The file range a destination buffer must mirror to hold ``tensors`` (default: all)."""
    if tensors is None:
        begin, end = header.data_start, header.file_size
    else:
        spans = [(header.data_start + t.data_offsets[0], header.data_start + t.data_offsets[1])
                 for t in tensors]
        begin = min((s[0] for s in spans), default=header.data_start)
        end = max((s[1] for s in spans), default=begin)
    begin, end = _align_out(begin, end, align)
    return Extent(begin, end - begin)


def plan_reads(file: int, header: Header, tensors: Sequence[TensorInfo] | None = None, *,
               chunk: int, direct: bool = False, align: int = 4096, max_gap: int = MAX_GAP
               ) -> list[Read]:
    """Reads that fetch ``tensors`` (default: the whole data region) of one file, in file order.

    With ``direct``, reads start and end on ``align`` boundaries (the last may run past the end
    of the file; the kernel stops it there), and the caller's buffer must be ``align``-aligned
    at ``plan_extent(..., align=align).base``.
    """
    start = header.data_start
    if tensors is None:
        ranges = [(start, header.file_size)]
    else:
        ranges = [(start + t.data_offsets[0], start + t.data_offsets[1]) for t in tensors]
    if direct:
        ranges = [_align_out(b, e, align) for b, e in ranges]
    reads = []
    for begin, end in merge_ranges(ranges, max_gap=max_gap):
        for b, e in split_range(begin, end, chunk, align=align if direct else 1):
            reads.append(Read(file, b, e - b, direct))
    return reads
