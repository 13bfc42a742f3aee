"""Pinned staging on huge pages, kept for the process (``huge_pages="on"``).

A process's first load to a GPU pins its staging, and on the H200 machine torch's pinned
allocator pinned new memory at about 1.5 GB/s (256 MiB of staging: 0.17 s of a 0.5-0.9 s warm
load), close to the rate at which that VM family faults in fresh 4 KiB pages. With the option on,
a staging buffer is instead anonymous memory advised ``MADV_HUGEPAGE`` and then registered with
CUDA (``cuMemHostRegister``, which faults it in): 512 times fewer faults. Whether that pins
faster there is for a GPU run to say (``benchmarks/probe_register.py`` times both ways).

Buffers are registered once and kept, as torch keeps the blocks of its pinned cache: a reader
takes one for a load and gives it back when its copies have completed. A buffer that cannot be
registered is unmapped and the caller falls back to torch's pinned memory, and so does every
later request of the process (a refusal is not tried again for each buffer of each load).

Registration goes through the CUDA driver (``cuMemHostRegister`` in ``libcuda.so.1``), not
torch's ``cudaHostRegister`` binding: a refused runtime call leaves the thread's last CUDA error
set, and torch's next kernel launch on that thread would raise it as its own.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..forking import in_child

__all__ = ["Block", "take", "give", "held", "register", "unregister"]

logger = logging.getLogger(__name__)

#: ``register(address, nbytes)``: 0 on success, else the CUDA error number.
Register = Callable[[int, int], int]

#: Buffers of a huge page or more are mapped in whole huge pages (a partial one at the end would
#: stay on 4 KiB pages); smaller ones in whole pages, so that small staging pins no more than
#: asked. (Kernels since 6.7 start such mappings on a huge-page boundary; on older ones the
#: first and last huge page of a buffer may stay on 4 KiB pages.)
HUGE_PAGE = 2 << 20
#: cuMemHostRegister flags: pinned for every context, not only the current one's (a kept buffer
#: may serve a later load to another GPU).
PORTABLE = 0x01
#: cuMemHostRegister flags: the device only reads the memory, which lets a read-only file
#: mapping be registered at all (CUDA 11.1+).
READ_ONLY = 0x08
#: The CUDA error a missing driver library is reported as (CUDA_ERROR_NOT_FOUND).
NOT_FOUND = 500
#: CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED: part of the range is registered already.
ALREADY_REGISTERED = 712


@dataclass(eq=False)
class Block:
    """One registered buffer: ``tensor`` (uint8) and ``view`` (bytes) over its first
    ``nbytes``."""

    mm: mmap.mmap
    address: int
    nbytes: int
    tensor: Any
    view: memoryview


_lock = threading.Lock()
_free: dict[int, list[Block]] = defaultdict(list)
_lent: dict[int, Block] = {}       # id(tensor) -> block, while a reader holds it
_registered = 0                    # buffers registered since import (tests count them)
_refused: int | None = None        # the CUDA error of a refused registration, once there was one
_driver: Any = None                # libcuda, once loaded (False: not there)


def register(address: int, nbytes: int, flags: int = PORTABLE) -> int:
    """Pin ``[address, address + nbytes)`` (for every device by default), through the CUDA
    driver; 0 or the CUDA error. Needs a context current on this thread (TorchCudaSink binds
    one first; else the error is CUDA_ERROR_INVALID_CONTEXT)."""
    lib = _libcuda()
    if lib is None:
        return NOT_FOUND
    return int(lib.cuMemHostRegister_v2(ctypes.c_void_p(address), nbytes, flags))


def unregister(address: int) -> int:
    """Undo :func:`register` (benchmarks/probe_register.py; the pool keeps what it registers)."""
    lib = _libcuda()
    return NOT_FOUND if lib is None else int(lib.cuMemHostUnregister(ctypes.c_void_p(address)))


def _libcuda() -> Any:
    global _driver
    if _driver is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            lib.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            lib.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
            lib.cuMemHostRegister_v2.restype = lib.cuMemHostUnregister.restype = ctypes.c_int
            _driver = lib
        except (OSError, AttributeError):
            _driver = False
    return _driver or None


def take(nbytes: int, register: Register) -> Block | None:
    """A registered buffer of ``nbytes`` (a kept one when free), or None where one cannot be
    made here (the caller then pins with torch)."""
    global _registered
    if _refused is not None:
        return None
    with _lock:
        free = _free.get(nbytes)
        block = free.pop() if free else None
        if block is not None:
            _lent[id(block.tensor)] = block
            return block
    block = _make(nbytes, register)
    if block is None:
        return None
    with _lock:
        _registered += 1
        _lent[id(block.tensor)] = block
    return block


def give(tensor: Any) -> bool:
    """Return the buffer whose tensor is ``tensor`` (its copies completed); False if it is not
    one of this pool's."""
    with _lock:
        block = _lent.pop(id(tensor), None)
        if block is None:
            return False
        _free[block.nbytes].append(block)
        return True


def held() -> tuple[int, int]:
    """(buffers registered since import, buffers free now)."""
    with _lock:
        return _registered, sum(len(v) for v in _free.values())


def _make(nbytes: int, register: Register) -> Block | None:
    global _refused
    import torch

    unit = HUGE_PAGE if nbytes >= HUGE_PAGE else mmap.PAGESIZE
    size = -(-nbytes // unit) * unit
    try:
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as exc:
        logger.info("no anonymous mapping of %d bytes for staging (%s); using torch's pinned "
                    "memory", nbytes, exc)
        return None
    # Before the first touch (registering faults it in): huge pages where THP allows them, and
    # not inherited by a forked child, where copy-on-write could give the parent a new page in
    # place of the pinned one the GPU reads.
    for advice in ("MADV_HUGEPAGE", "MADV_DONTFORK"):
        if hasattr(mmap, advice):
            try:
                mm.madvise(getattr(mmap, advice))
            except OSError:
                pass   # THP off: 4 KiB pages, still registered
    anchor = ctypes.c_char.from_buffer(mm)
    address = ctypes.addressof(anchor)
    del anchor   # an exported buffer would keep mm.close() from unmapping
    err = register(address, size)
    if err:
        mm.close()
        _refused = err
        logger.warning("huge_pages=\"on\": registering %d bytes of staging with CUDA failed "
                       "(CUDA error %s); this process pins its staging with torch instead",
                       size, err)
        return None
    tensor = torch.frombuffer(mm, dtype=torch.uint8)[:nbytes]
    return Block(mm, address, nbytes, tensor, tensor.numpy().data.cast("B"))


def _after_fork() -> None:
    # A child has no CUDA context of its parent, and no mapping of the pool's buffers either
    # (MADV_DONTFORK): the pool starts empty, and freeing the parent's blocks here unmaps
    # address ranges the child never had (a no-op).
    global _lock, _free, _lent, _refused
    _lock = threading.Lock()
    _free = defaultdict(list)
    _lent = {}
    _refused = None


in_child(_after_fork)
