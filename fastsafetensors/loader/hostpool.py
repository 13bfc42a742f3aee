"""Pinned staging on huge pages, kept for the process (``huge_pages="on"``).

A process's first load to a GPU pins its staging, and on the H200 machine torch's pinned
allocator pinned new memory at about 1.5 GB/s (256 MiB of staging: 0.17 s of a 0.5-0.9 s warm
load), close to the rate at which that VM family faults in fresh 4 KiB pages. With the option on,
a staging buffer is instead anonymous memory advised ``MADV_HUGEPAGE`` and then registered with
CUDA (``cudaHostRegister``, which faults it in): 512 times fewer faults. Whether that pins
faster there is for a GPU run to say (``benchmarks/probe_register.py`` times both ways).

Buffers are registered once and kept, as torch keeps the blocks of its pinned cache: a reader
takes one for a load and gives it back when its copies have completed. A buffer that cannot be
registered is unmapped and the caller falls back to torch's pinned memory.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Block", "take", "give", "held"]

logger = logging.getLogger(__name__)

#: ``register(address, nbytes)``: 0 on success, else the CUDA error number.
Register = Callable[[int, int], int]


#: Mappings are whole huge pages: a partial one at the end would stay on 4 KiB pages.
HUGE_PAGE = 2 << 20


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


def take(nbytes: int, register: Register) -> Block | None:
    """A registered buffer of ``nbytes`` (a kept one when free), or None where one cannot be
    made here (the caller then pins with torch)."""
    global _registered
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
    import torch

    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    try:
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as exc:
        logger.info("no anonymous mapping of %d bytes for staging (%s); using torch's pinned "
                    "memory", nbytes, exc)
        return None
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)   # before the first touch: registering faults it in
        except OSError:
            pass   # THP off: 4 KiB pages, still registered
    anchor = ctypes.c_char.from_buffer(mm)
    address = ctypes.addressof(anchor)
    del anchor   # an exported buffer would keep mm.close() from unmapping
    err = register(address, size)
    if err:
        mm.close()
        logger.info("cudaHostRegister of %d bytes of staging failed (CUDA error %s); using "
                    "torch's pinned memory", size, err)
        return None
    tensor = torch.frombuffer(mm, dtype=torch.uint8)[:nbytes]
    return Block(mm, address, nbytes, tensor, tensor.numpy().data.cast("B"))


def _after_fork() -> None:
    # A child has no CUDA context of its parent: its registrations mean nothing there. The
    # mappings stay (copy-on-write) until the child exits; the pool starts empty.
    global _lock, _free, _lent
    _lock = threading.Lock()
    _free = defaultdict(list)
    _lent = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
