"""How much of a file range sits in the page cache, from mincore(2) on a throwaway mapping.

This decides buffered against O_DIRECT reads: cached pages are copied by the kernel at memory
speed (O_DIRECT would go back to the disk), uncached ones stream faster without the cache.
Where mincore is unavailable the answer is None and callers read buffered.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from typing import Any

__all__ = ["resident_fraction", "resident_map", "map_file", "munmap"]

_PAGE = mmap.PAGESIZE
_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.c_long]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        _libc = None
_MAP_FAILED = ctypes.c_void_p(-1).value
#: munmap(address, length) itself, for a caller that must not start a Python function between
#: taking a mapping off its holder and dropping it (where a Ctrl-C could come); None without
#: libc (then nothing is ever mapped).
munmap: Any = None if _libc is None else _libc.munmap


def resident_map(fd: int, offset: int, length: int, *, mapping: int | None = None
                 ) -> bytes | None:
    """One byte per page of ``[offset, offset + length)`` (rounded out to pages): bit 0 set
    where the page is cached. None where mincore cannot be used. ``mapping``: the address of
    a mapping of the whole file (:func:`map_file`) to look in, instead of making and dropping
    one for this lookup (each munmap interrupts every core running the process's threads)."""
    if _libc is None or length <= 0:
        return None
    start = offset - offset % _PAGE
    span = offset + length - start
    if mapping is not None:
        vec = ctypes.create_string_buffer((span + _PAGE - 1) // _PAGE)
        if _libc.mincore(ctypes.c_void_p(mapping + start), span, vec) != 0:
            return None
        return vec.raw
    # A PROT_READ, MAP_SHARED mapping of a file costs no I/O and faults nothing in.
    addr = _libc.mmap(None, span, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr in (None, _MAP_FAILED):
        return None
    try:
        vec = ctypes.create_string_buffer((span + _PAGE - 1) // _PAGE)
        if _libc.mincore(ctypes.c_void_p(addr), span, vec) != 0:
            return None
        return vec.raw
    finally:
        _libc.munmap(ctypes.c_void_p(addr), span)


def resident_fraction(fd: int, offset: int = 0, length: int | None = None) -> float | None:
    """Fraction of the range's pages in the page cache, or None where unknown."""
    if length is None:
        length = os.fstat(fd).st_size - offset
    pages = resident_map(fd, offset, length)
    if pages is None:
        return None
    if not pages:
        return 1.0
    # Only bit 0 is defined (the rest are reserved and zero), so a count of zeros is exact.
    return 1.0 - pages.count(0) / len(pages)


def map_file(fd: int, length: int) -> int | None:
    """The address of a read-only shared mapping of the file's first ``length`` bytes, or None
    where it cannot be made. Mapping faults nothing in; the caller unmaps it (:data:`munmap`)."""
    if _libc is None or length <= 0:
        return None
    addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    return None if addr in (None, _MAP_FAILED) else int(addr)


