"""Whole files into host memory: a thread pool reads a plan straight into one buffer per file
(for a subset of tensors, one per group of nearby tensors, gaps up to 1 MiB), then tensors are
views of those buffers (copies only for tensors whose offset is misaligned).

Reads go straight into the memory the returned tensors use: no staging and no second copy. The
page faults of that fresh memory are taken by the reader threads in parallel, which on virtual
machines is most of the cost of a warm load (see docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from .. import config
from ..errors import UnsupportedDTypeError
from ..format import Header, TensorInfo, header_of, open_readonly
from ..frameworks import Framework
from . import threads as pool
from .pagecache import resident_map
from .plan import Extent, Read, group_tensors, plan_extent, plan_reads
from .posix import DIRECT_ALIGN, close_fds, open_direct, pread_into

__all__ = ["FileJob", "load_host", "IOPolicy", "tensors_from_buffer"]

logger = logging.getLogger(__name__)

#: The page-cache residency map has one entry per page of this size.
PAGE = mmap.PAGESIZE
#: Under auto, a read goes through the page cache when at least this share of its pages is
#: cached: copying cached pages beats the disk even when a few must still be fetched.
CACHED_ENOUGH = 0.5


@dataclass
class FileJob:
    """One file to load: its path, its validated header and the tensors wanted (None: all)."""

    path: str
    header: Header
    tensors: Sequence[TensorInfo] | None = None
    fd: int = -1
    direct_fd: int | None = None
    extent: Extent | None = field(default=None, repr=False)

    def wanted(self) -> Sequence[TensorInfo]:
        return list(self.header.tensors.values()) if self.tensors is None else self.tensors


@dataclass(frozen=True)
class IOPolicy:
    """Which reads bypass the page cache. ``mode`` is the io option: auto, buffered or direct."""

    mode: str

    def resident(self, job: FileJob) -> bytes | None:
        if self.mode != "auto" or job.direct_fd is None or job.extent is None:
            return None
        return resident_map(job.fd, job.extent.base, job.extent.size)

    def direct(self, job: FileJob, read: Read, resident: bytes | None) -> bool:
        if job.direct_fd is None or not read.direct:
            return False
        assert job.extent is not None
        return self.direct_range(resident, job.extent.base, read.offset, read.end)

    def cached_range(self, resident: bytes | None, base: int, begin: int, end: int) -> bool:
        """Whether every page of bytes ``[begin, end)`` is in the page cache (False where
        unknown), given the residency map of the file from ``base``."""
        pages = _pages(resident, base, begin, end)
        return bool(pages) and pages.count(0) == 0

    def direct_range(self, resident: bytes | None, base: int, begin: int, end: int) -> bool:
        """Whether bytes ``[begin, end)`` should bypass the page cache, given the residency map
        of the file from ``base`` (page-aligned)."""
        if self.mode == "direct":
            return True
        if self.mode != "auto":
            return False
        pages = _pages(resident, base, begin, end)
        return bool(pages) and 1.0 - pages.count(0) / len(pages) < CACHED_ENOUGH


def _pages(resident: bytes | None, base: int, begin: int, end: int) -> bytes:
    """The entries of ``resident`` (a residency map from ``base``) for bytes ``[begin, end)``;
    empty where the map is unknown."""
    if resident is None:
        return b""
    # The map has one entry per page from the page holding ``base`` (mmap.PAGESIZE: 64 KiB on
    # some aarch64 kernels, not the 4 KiB block of O_DIRECT).
    first = base - base % PAGE
    return resident[(begin - first) // PAGE:-(-(end - first) // PAGE)]

def open_job(path: str | os.PathLike[str], tensors: Sequence[str] | None = None,
             header: Header | None = None) -> FileJob:
    """Open ``path``, validate its header (unless the caller already holds it) and pick the
    tensors named (None: all)."""
    fd = open_readonly(path)
    try:
        header = header_of(fd, path, header)
        infos = None if tensors is None else header.select(tensors)
        return FileJob(os.fspath(path), header, infos, fd)
    except BaseException:
        os.close(fd)
        raise


def close_job(job: FileJob) -> None:
    fds = job.fd, job.direct_fd
    job.fd, job.direct_fd = -1, None   # first: an interrupted close is not closed twice
    close_fds(*fds)


def tensors_from_buffer(framework: Framework, buffer: Any, job: FileJob) -> dict[str, Any]:
    """Views of ``buffer`` (which mirrors ``job.extent``) for each wanted tensor. A tensor whose
    start is not a multiple of its element size is copied into fresh aligned memory, so no
    tensor ever has a misaligned data pointer."""
    assert job.extent is not None
    base = job.header.data_start - job.extent.base
    out: dict[str, Any] = {}
    source: memoryview | None = None
    view_of = framework.viewer(buffer)
    try:
        for info in job.wanted():
            start = base + info.data_offsets[0]
            if start % info.itemsize:
                if source is None:
                    source = _byte_view(framework, buffer)
                fresh, view = framework.alloc(info.nbytes)
                view[:] = source[start:start + info.nbytes]
                out[info.name] = framework.view(fresh, 0, info)
            else:
                out[info.name] = view_of(start, info)
    except UnsupportedDTypeError as exc:
        raise exc.in_file(job.path) from None
    return out


def _byte_view(framework: Framework, buffer: Any) -> memoryview:
    array = buffer.numpy() if framework.name == "pt" else buffer
    return memoryview(array).cast("B")


def load_host(jobs: Sequence[FileJob], framework: Framework, *, threads: int | None = None,
              io: str | None = None, chunk: int | None = None) -> list[dict[str, Any]]:
    """Read every job's tensors into host memory; one dict of tensors per job, in job order.
    Either everything is returned or an error is raised (no partial result)."""
    policy = IOPolicy(config.get("io", io))
    nthreads = config.get("threads", threads)
    chunk_bytes = config.get("chunk_bytes", chunk)
    started = time.perf_counter()
    parts: list[list[tuple[FileJob, Any]]] = []   # per job: (part, its buffer)
    work: list[tuple[FileJob, Read, memoryview, bool]] = []
    for job in jobs:
        if policy.mode != "buffered" and job.direct_fd is None:
            job.direct_fd = open_direct(job.fd, job.path)
            if job.direct_fd is None and policy.mode == "direct":
                logger.warning("%s: O_DIRECT is not supported here; reading through the page "
                               "cache", job.path)
        direct = job.direct_fd is not None
        parts.append([])
        for part in _parts(job):
            part.extent = plan_extent(part.header, part.tensors, align=DIRECT_ALIGN)
            buffer, view = framework.alloc(part.extent.size, align=DIRECT_ALIGN)
            parts[-1].append((part, buffer))
            resident = policy.resident(part)
            for read in plan_reads(0, part.header, part.tensors, chunk=chunk_bytes,
                                   direct=direct):
                dest = view[read.offset - part.extent.base:read.end - part.extent.base]
                work.append((part, read, dest, policy.direct(part, read, resident)))
    direct_reads = sum(w[3] for w in work)
    if threads is None and not config.is_set("threads") and direct_reads * 2 > len(work):
        # A disk keeps more requests in flight than cached data needs threads.
        nthreads = config.get("direct_threads")
    total = _run(work, nthreads)
    out = [{name: tensor for part, buf in file_parts
            for name, tensor in tensors_from_buffer(framework, buf, part).items()}
           for file_parts in parts]
    seconds = time.perf_counter() - started
    logger.info("loaded %d files, %.1f MB in %.3f s (%.2f GB/s), %d threads, io=%s, %d direct "
                "reads of %d", len(jobs), total / 1e6, seconds, total / 1e9 / max(seconds, 1e-9),
                nthreads, policy.mode, direct_reads, len(work))
    return out


def _parts(job: FileJob) -> list[FileJob]:
    """The job itself for a whole file; for a subset, one part (sharing its descriptors) per
    group of nearby tensors, each read into a buffer of its own."""
    if job.tensors is None:
        return [job]
    return [replace(job, tensors=group) for group in group_tensors(job.tensors)]


def _read_one(job: FileJob, read: Read, dest: memoryview, direct: bool) -> int:
    fd = job.direct_fd if direct else job.fd
    assert fd is not None
    # Reads widened to block boundaries may run past the end of the file; the header was
    # validated against the file size, so only the bytes after the last tensor can be missing.
    tail = read.end > job.header.file_size
    got = pread_into(fd, dest, read.offset, path=job.path, direct=direct, allow_eof=tail)
    if tail and read.offset + got < job.header.file_size:
        from ..errors import ReadError

        raise ReadError(job.path, read.offset, job.header.file_size - read.offset, got)
    return got


def _run(work: list[tuple[FileJob, Read, memoryview, bool]], threads: int) -> int:
    if len(work) <= 1 or threads <= 1:
        return sum(_read_one(*w) for w in work)
    # On pooled threads, with nothing a Ctrl-C in the caller's waits can leave locked
    # (threads.run_all).
    return sum(pool.run_all([partial(_read_one, *w) for w in work], threads,
                            "fastsafetensors-read"))
