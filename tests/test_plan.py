"""Plans of reads (fastsafetensors.loader.plan): pure functions, tested without files."""

from __future__ import annotations

from typing import Any

import pytest
from builders import header_bytes, layout
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsafetensors.format import Header, parse_header
from fastsafetensors.loader.plan import (
    Extent,
    Read,
    merge_ranges,
    plan_extent,
    plan_reads,
    split_range,
)

SETTINGS = settings(max_examples=100, deadline=None)


def test_merge_ranges_examples() -> None:
    assert merge_ranges([(10, 20), (0, 5), (6, 8)], max_gap=1) == [(0, 8), (10, 20)]
    assert merge_ranges([(10, 20), (0, 5), (6, 8)]) == [(0, 5), (6, 8), (10, 20)]
    assert merge_ranges([(0, 5), (5, 9)]) == [(0, 9)]  # touching ranges always merge
    assert merge_ranges([(0, 10), (2, 4)]) == [(0, 10)]  # contained
    assert merge_ranges([(0, 10), (5, 15)]) == [(0, 15)]  # overlapping
    assert merge_ranges([(3, 3), (7, 7)]) == []  # empty ranges are dropped
    assert merge_ranges([]) == []
    assert merge_ranges([(0, 4), (100, 104)], max_gap=96) == [(0, 104)]
    assert merge_ranges([(0, 4), (100, 104)], max_gap=95) == [(0, 4), (100, 104)]


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 500), st.integers(0, 60)), max_size=12),
       st.integers(0, 40))
def test_merge_ranges_properties(spans: list[tuple[int, int]], max_gap: int) -> None:
    ranges = [(b, b + n) for b, n in spans]
    merged = merge_ranges(ranges, max_gap=max_gap)
    wanted = {i for b, e in ranges for i in range(b, e)}
    covered = {i for b, e in merged for i in range(b, e)}
    assert wanted <= covered
    assert all(b < e for b, e in merged)
    for (_, e1), (b2, _) in zip(merged, merged[1:]):
        assert b2 - e1 > max_gap  # sorted, and too far apart to merge
    # merging only fills gaps of at most max_gap bytes between wanted bytes
    for i in covered - wanted:
        assert any(e <= i for _, e in ranges) and any(b > i for b, _ in ranges)


def test_split_range_examples() -> None:
    assert split_range(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert split_range(5, 5, 4) == []
    assert split_range(100, 10_000, 4096, align=4096) == [(100, 4096), (4096, 8192),
                                                          (8192, 10_000)]
    assert split_range(0, 10, 3, align=4) == [(0, 4), (4, 8), (8, 10)]  # chunk rounds up
    assert split_range(0, 20, 10, align=4) == [(0, 8), (8, 16), (16, 20)]  # and down


@SETTINGS
@given(st.integers(0, 10_000), st.integers(0, 50_000), st.integers(1, 9000),
       st.sampled_from([1, 2, 512, 4096]))
def test_split_range_properties(begin: int, length: int, chunk: int, align: int) -> None:
    end = begin + length
    pieces = split_range(begin, end, chunk, align=align)
    limit = max(align, chunk - chunk % align)
    assert (pieces[0][0], pieces[-1][1]) == (begin, end) if pieces else length == 0
    for (_, e1), (b2, _) in zip(pieces, pieces[1:]):
        assert e1 == b2 and e1 % align == 0  # contiguous; inner boundaries aligned
    for b, e in pieces:
        assert 0 < e - b <= limit


def _header(sizes: list[int], header_pad: int = 0) -> Header:
    entries = layout([(f"t{i}", "U8", (n,)) for i, n in enumerate(sizes)])
    raw = header_bytes(entries) + b" " * header_pad
    return parse_header(raw, file_size=8 + len(raw) + sum(sizes))


def test_plan_extent() -> None:
    header = _header([10, 5000, 3])
    assert plan_extent(header) == Extent(header.data_start, header.data_size)
    whole = plan_extent(header, align=4096)
    assert whole.base == 0 and whole.size == 8192
    t1 = header.tensors["t1"]
    sub = plan_extent(header, [t1])
    assert sub == Extent(header.data_start + 10, 5000)
    assert plan_extent(header, []).size == 0


def test_plan_reads_examples() -> None:
    header = _header([100, 200_000, 50])
    reads = plan_reads(0, header, chunk=1 << 16)
    assert reads[0].offset == header.data_start and reads[-1].end == header.file_size
    assert all(isinstance(r, Read) and not r.direct and r.file == 0 for r in reads)
    assert sum(r.length for r in reads) == header.data_size
    direct = plan_reads(3, header, chunk=1 << 16, direct=True)
    assert all(r.direct and r.file == 3 for r in direct)
    assert all(r.offset % 4096 == 0 and r.length % 4096 == 0 for r in direct)


@SETTINGS
@given(st.lists(st.integers(0, 20_000), min_size=1, max_size=8), st.data(),
       st.sampled_from([4096, 8192, 10_000, 1 << 16]), st.booleans(), st.integers(0, 40),
       st.sampled_from([0, 4096, 1 << 20]))
def test_plan_reads_cover_what_is_wanted(sizes: list[int], data: Any, chunk: int, direct: bool,
                                         header_pad: int, max_gap: int) -> None:
    header = _header(sizes, header_pad)
    infos = list(header.tensors.values())
    subset = data.draw(st.none() | st.lists(st.sampled_from(infos), unique_by=lambda t: t.name))
    reads = plan_reads(0, header, subset, chunk=chunk, direct=direct, max_gap=max_gap)
    wanted = infos if subset is None else subset
    extent = plan_extent(header, subset, align=4096 if direct else 1)
    for r1, r2 in zip(reads, reads[1:]):
        assert r1.end <= r2.offset  # file order, no overlap
    for r in reads:
        assert 0 < r.length <= max(chunk, 4096)
        assert extent.base <= r.offset and r.end <= extent.base + extent.size
        if direct:
            assert r.offset % 4096 == 0 and r.length % 4096 == 0
        else:
            assert header.data_start <= r.offset and r.end <= header.file_size
    for info in wanted:
        begin = header.data_start + info.data_offsets[0]
        end = header.data_start + info.data_offsets[1]
        covered = sum(max(0, min(end, r.end) - max(begin, r.offset)) for r in reads)
        assert covered == end - begin


def test_read_end() -> None:
    assert Read(0, 10, 5).end == 15
    with pytest.raises(AttributeError):
        Read(0, 10, 5).offset = 3  # type: ignore[misc]
