"""Fresh host memory that is cheap to fault in.

A loader that returns tensors it owns writes into fresh pages, and on virtual machines the
first-touch page faults cost more than the copy itself. Asking for transparent huge pages
(madvise MADV_HUGEPAGE) before the first touch cuts the fault count 512-fold where the kernel
runs THP in "madvise" mode; it is opt-in (``huge_pages="on"``) because of the VM caveat below.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

from .. import config

__all__ = ["advise_huge_pages", "HUGE_PAGE", "HUGE_MIN"]

HUGE_PAGE = 2 << 20
#: Below this a buffer gains little and may share pages with other allocations.
HUGE_MIN = 4 << 20

_madvise = None
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _madvise = _libc.madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        _madvise = None


def advise_huge_pages(address: int, nbytes: int) -> bool:
    """Advise huge pages for the whole 2 MiB pages inside ``[address, address + nbytes)`` when
    the ``huge_pages`` option is on. Returns whether the advice was given (never raises).

    Off by default: on a VM with free page reporting (virtio-balloon), free 2 MiB blocks go
    back to the host within seconds and faulting them in again stalls the guest, so a first
    load after an idle spell ran at half the speed of 4 KiB pages (docs/benchmarks.md)."""
    if _madvise is None or nbytes < HUGE_MIN or config.get("huge_pages") != "on":
        return False
    start = -(-address // HUGE_PAGE) * HUGE_PAGE
    end = (address + nbytes) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return False
    return _madvise(ctypes.c_void_p(start), end - start, _MADV_HUGEPAGE) == 0
