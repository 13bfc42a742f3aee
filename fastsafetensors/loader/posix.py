"""Positioned reads into caller-owned memory, with the counters tests use to prove laziness.

``pread_into`` loops until the range is full: the kernel may return short reads (signals, huge
requests), and only end of file makes a read legitimately short, which is then a ReadError.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass

from ..errors import ReadError
from ..forking import renew_lock

__all__ = ["IOStats", "STATS", "pread_into", "pread_runs", "open_direct", "close_fds",
           "DIRECT_ALIGN"]

#: O_DIRECT needs buffer address, file offset and length aligned to the logical block size;
#: 4096 covers every disk and filesystem we expect (512-byte sectors included).
DIRECT_ALIGN = 4096
# Linux caps one read at 0x7ffff000 bytes; ask for less so the loop never sees that cap.
_MAX_READ = 1 << 30


@dataclass
class IOStats:
    """Process-wide counters of the data this package read (header reads not included)."""

    bytes_read: int = 0
    reads: int = 0
    direct_reads: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, nbytes: int, *, direct: bool, reads: int = 1) -> None:
        with self._lock:
            self.bytes_read += nbytes
            self.reads += reads
            self.direct_reads += direct * reads

    def reset(self) -> None:
        with self._lock:
            self.bytes_read = self.reads = self.direct_reads = 0

    def snapshot(self) -> tuple[int, int, int]:
        with self._lock:
            return self.bytes_read, self.reads, self.direct_reads


STATS = IOStats()
renew_lock(STATS)   # every read takes it: a forked child must not find it held


def pread_into(fd: int, dest: memoryview, offset: int, *, path: str, direct: bool = False,
               allow_eof: bool = False) -> int:
    """Fill ``dest`` from ``offset``. Returns the bytes read; a short file raises ReadError
    unless ``allow_eof`` (O_DIRECT reads rounded up past the end of the file)."""
    done = 0
    size = len(dest)
    while done < size:
        got = os.preadv(fd, [dest[done:done + _MAX_READ]], offset + done)
        if got == 0:
            if allow_eof:
                break
            raise ReadError(path, offset, size, done)
        done += got
        if direct and allow_eof and got % DIRECT_ALIGN:
            # Less than whole blocks: the end of the file. Another read from that unaligned
            # offset would be refused (EINVAL) by some file systems, not answered with 0.
            break
    STATS.add(done, direct=direct)
    return done


def pread_runs(fd: int, dest: memoryview, runs: list[tuple[int, int]], base: int, *,
               path: str) -> None:
    """Each ``(offset, length)`` of ``runs`` (offsets from ``base``) read back to back into
    ``dest``, one positioned read per run. The loop is kept tight: a column shard of a large
    matrix is thousands of runs of a few KiB, where pread_into's bookkeeping per call cost
    as much as the read itself (8,192 cached runs of 2 KiB on the 2-core VM, medians of 20
    interleaved rounds: 16.8 ms that way, 10.0 ms this way)."""
    at = 0
    counted = 0   # bytes pread_into counted itself (the rest of a short read)
    preadv = os.preadv
    for offset, length in runs:
        piece = dest[at:at + length]
        got = preadv(fd, [piece], base + offset)
        if got != length:   # short (a signal, or the file shrank): the careful loop
            counted += pread_into(fd, piece[got:], base + offset + got, path=path)
        at += length
    STATS.add(at - counted, direct=False, reads=len(runs))


def open_direct(fd: int, path: str) -> int | None:
    """An O_DIRECT descriptor of the file open as ``fd``, or None where the filesystem refuses
    it (tmpfs, some FUSE), at the open or at a first read. Reopened through /proc, not by
    path: the path may name another file by now (a checkpoint replaced while it was open),
    whose bytes must not be read as this one's; by path, the file it names is checked to be
    the same one (else None)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    flags = os.O_RDONLY | os.O_NONBLOCK | flag | getattr(os, "O_CLOEXEC", 0)
    for source in (f"/proc/self/fd/{fd}", path):
        try:
            direct = os.open(source, flags)
        except OSError:
            continue
        try:
            mine, theirs = os.fstat(fd), os.fstat(direct)
            usable = ((mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)
                      and _reads(direct, theirs.st_dev))
        except BaseException:
            # A Ctrl-C lands right after a call returns: the caller never gets the number.
            os.close(direct)
            raise
        if usable:
            return direct
        os.close(direct)
    return None


#: Whether O_DIRECT reads work, by file system (st_dev): asked once each, since a load to a
#: GPU opens every file again, and a read with O_DIRECT goes to the disk (tens of us).
_DIRECT_READS: dict[int, bool] = {}


def _reads(direct: int, device: int) -> bool:
    """Whether an O_DIRECT descriptor reads: some file systems (FUSE, network ones) open with
    O_DIRECT and then refuse every read (EINVAL). One aligned block from the start, where the
    header lies, once per file system."""
    import mmap

    known = _DIRECT_READS.get(device)
    if known is not None:
        return known
    block = mmap.mmap(-1, DIRECT_ALIGN)   # page-aligned, as O_DIRECT wants
    try:
        os.preadv(direct, [block], 0)
        works = True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            return False   # this file's trouble (EIO, ...), not the file system's answer
        works = False
    finally:
        block.close()
    _DIRECT_READS[device] = works
    return works


def close_fds(*fds: int | None) -> None:
    """Close each open descriptor; None and negative values (already closed) are skipped. The
    rest are closed even when one close is interrupted (Ctrl-C between two of them)."""
    if not fds:
        return
    try:
        if fds[0] is not None and fds[0] >= 0:
            os.close(fds[0])
    finally:
        close_fds(*fds[1:])
