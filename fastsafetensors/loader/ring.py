"""A GPU load's reads and copies in C threads, with no Python per chunk (``cuda_calls="ring"``).

On the H200 machine the engine's Python readers moved 21-23 GB/s to the GPU with 8 threads,
while InstantTensor reached 34-36 GB/s with about 12 reads in flight into a 96 MiB ring of
pinned windows and one stream copying them in file order; more Python readers helped only with
more pinned staging, which slowed a process's first load (docs/benchmarks.md, section 2). Here
``ring.c`` has that shape with threads: ``readers`` C threads read the chunks, in order, into a
ring of pinned windows, and one C thread queues each chunk's copies on one stream as soon as
its read is done. Timed there in the eighteenth session: 12 readers with 32 windows of 8 MiB
moved 36.9 GB/s, the Python readers 25.7 and InstantTensor 37.2 in the same run, so it is the
default since.

The engine's planner hands over a file's tensors at a time (:meth:`Ring.submit_file`), which
``ring.c`` cuts into chunks, and one Python thread takes the reports (:meth:`Ring.next`), each
saying how many tensors are complete: the Python is per tensor and per report, none per chunk.
(Until the twenty-second session the planner cut the chunks in Python, some 20 us each on the
2-core VM: beside transformers' thread, which holds the GIL half the time or more, it fed the
readers too slowly, and on the H200 machine they waited for chunks, runs 8-10.)

Built and loaded as ``readcopy.c`` is (loader/native.py): compiled on first use with the
system's C compiler into the cache folder, the CUDA driver's functions handed in as addresses.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from . import driver, native

__all__ = ["Report", "Ring", "RingFailure", "available"]

SOURCE = Path(__file__).with_name("ring.c")
#: ring.c's failed steps, by number (driver_calls.h's enum).
STEPS = native.STEPS
READ, SHORT = STEPS.index("pread"), STEPS.index("short read")
#: ring.c's limit on reader threads.
MAX_READERS = 64
#: The most chunks one report hands over.
REPORT = 64
#: ring.c's numbers for the io option, and what it says of each chunk reported (describe()).
MODES = {"buffered": 0, "direct": 1, "auto": 2}
INFO = 5
#: What ring.c's spent[] counts, as PHASES names it (seconds, summed over threads).
SPENT = ("ring: readers reading", "ring: readers waiting for a chunk or a free window",
         "ring: copier waiting for a read", "ring: copier queuing copies",
         "ring: copier waiting for a window's copies")

_state: dict[str, Any] = {}   # "lib" and "calls" once loaded, or "missing": why not

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "fst_ring_open": (_P, [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, ctypes.c_uint,
                           ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]),
    "fst_ring_submit_file": (_I64, [_P, _P, _I64, _P, _P, _P, _P, _I64, _I64, _I64,
                                    ctypes.c_int, ctypes.POINTER(_I64)]),
    "fst_ring_end": (None, [_P]),
    "fst_ring_cancel": (None, [_P]),
    "fst_ring_next": (ctypes.c_int, [_P, _I64, ctypes.POINTER(_I64), ctypes.POINTER(_I64),
                                     _P, _P, ctypes.POINTER(_P), ctypes.POINTER(ctypes.c_int)]),
    "fst_ring_failed": (ctypes.c_int, [_P]),
    "fst_ring_count_with_mincore": (None, [ctypes.c_int]),
    "fst_ring_spent": (None, [_P, ctypes.POINTER(ctypes.c_double)]),
    "fst_ring_close": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_int)]),
}


def _load() -> dict[str, Any]:
    state = native.load_into(_state, SOURCE, _SIGNATURES)
    if "lib" in state and "held" not in state:
        # The same library called keeping the GIL, for a submit that does not wait.
        held = ctypes.PyDLL(state["lib"]._name)
        function = held.fst_ring_submit_file
        function.restype, function.argtypes = _SIGNATURES["fst_ring_submit_file"]
        state["held"] = held
    return state


def available() -> str | None:
    """None when the ring can run here, else why not."""
    return _load().get("missing")


def forget() -> None:
    """Load again on next use (tests that swap the driver library)."""
    with native._lock:
        _state.clear()
        _not_here()


def _not_here() -> None:
    if sys.platform != "linux":   # pread and the driver's calls as used here: Linux only
        _state["missing"] = f"the ring is built for Linux, not {sys.platform}"


class RingFailure(Exception):
    """Chunk ``index`` failed at ``step`` (STEPS) with ``code`` (an errno for a read, else a
    CUDA code) after ``got`` bytes were read from ``begin`` of file ``file_no`` (the bytes
    wanted ending at ``end``); the engine turns it into its public error."""

    def __init__(self, index: int, step: int, code: int, got: int, file_no: int = -1,
                 begin: int = 0, end: int = 0):
        super().__init__(index, step, code, got, file_no, begin, end)
        self.index, self.step, self.code, self.got = index, step, code, got
        self.file_no, self.begin, self.end = file_no, begin, end


class Report(NamedTuple):
    """Chunks whose copies are queued, from number ``first``: the bytes read of each, the
    event after the last one's copies (so after all of theirs: one stream, chunk order), each
    one's file number, whether each was read with O_DIRECT, and how many of the submitted
    tensors are complete once those copies ran."""

    first: int
    got: list[int]
    event: driver.Event
    files: list[int]
    direct: list[int]
    done: int


class Ring:
    """One load's ring. Made unopened; :meth:`open` starts its threads on pinned memory, and
    until then :meth:`submit_file` waits for it. Thread-safe: :meth:`cancel` may come from any
    thread at any time, and :meth:`close` waits for calls still inside the C code."""

    def __init__(self, device: int, *, readers: int, windows: int, stride: int,
                 capacity: int, batch: int = 1, blocking: bool = False):
        self.device, self.windows = device, windows
        self.readers = min(readers, MAX_READERS)
        self.stride, self.capacity = stride, capacity
        # Chunks a report waits for, and slots a submit waiting for room waits for (ring.c):
        # each wake of the caller's threads needs the GIL back.
        self.batch = max(1, min(batch, capacity))
        self.flags = driver.DISABLE_TIMING | (driver.BLOCKING_SYNC if blocking else 0)
        # cancel() takes the lock alone, with `with` (see cancel); the rest wait on the
        # Condition, polling.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._handle: int | None = None
        # The library (twice: calls that release the GIL, and that keep it) and the driver's
        # addresses the C side holds: kept with the ring, so that a forget() meanwhile does not
        # free them under its threads.
        self._lib: Any = None
        self._held: Any = None
        self._calls: Any = None
        self._inside = 0              # submit/next calls inside the C code
        self._ended = self._cancelled = self._closed = False
        self.submitted = 0
        self.room_waits = 0           # submits that found every slot taken and waited
        # Called before a submit waits for room (stream.AheadGate lets the reports go then).
        self.on_full: Callable[[], None] | None = None

    @property
    def opened(self) -> bool:
        """Whether :meth:`open` started the threads (a submit before then waits for it)."""
        return self._handle is not None

    @property
    def nbytes(self) -> int:
        """Pinned bytes :meth:`open` needs at its address."""
        return self.windows * self.stride

    def open(self, stream: int, address: int) -> None:
        """Start the threads: ``address`` holds :attr:`nbytes` of pinned memory, aligned for
        O_DIRECT, and copies go on ``stream`` (a driver handle)."""
        state = _load()
        if "missing" in state:
            from ..errors import CudaError

            raise CudaError("dlopen", -1, f"the ring cannot be used ({state['missing']})")
        lib, held, calls = state["lib"], state["held"], state["calls"]
        code, step = ctypes.c_int(), ctypes.c_int()
        with self._cond:
            if self._closed:   # closed before it opened: nothing to start
                return
            # Under the lock: a close() from another thread waits for it, then stops it.
            handle = lib.fst_ring_open(
                ctypes.byref(calls), driver._context(self.device), stream, address,
                self.stride, self.windows, self.readers, self.capacity, self.batch, self.flags,
                ctypes.byref(code), ctypes.byref(step))
            if not handle:
                if step.value:
                    driver._check(code.value, STEPS[step.value])
                raise OSError(code.value, f"the ring's threads cannot start: "
                                          f"{os.strerror(code.value)}")
            self._handle, self._lib, self._held, self._calls = handle, lib, held, calls
            if self._ended:
                lib.fst_ring_end(handle)
            if self._cancelled:
                lib.fst_ring_cancel(handle)
            self._cond.notify_all()

    def _enter(self, wait: bool) -> int | None:
        with self._cond:
            while wait and self._handle is None and not (self._cancelled or self._closed):
                self._cond.wait(0.1)
            if self._handle is None or self._closed:
                return None
            self._inside += 1
            return self._handle

    def _leave(self) -> None:
        with self._cond:
            self._inside -= 1
            self._cond.notify_all()

    def submit_file(self, file: tuple[int, int, int | None, int | None, str],
                    begin: array[int], end: array[int], dst: array[int], allocated: Any,
                    limit: int, gap: int, done_before: int, *, align: int,
                    cached: float) -> int | None:
        """Read tensors ``[begin[i], end[i])`` (file offsets, in file order) of ``file``,
        ``(number, descriptor, O_DIRECT descriptor or None, address of a mapping of the whole
        file or None, io mode)``, into device addresses ``dst[i]``, after ``allocated`` (a
        driver event, or None), in chunks of at most ``limit`` bytes, a tensor joining the one
        before when at most ``gap`` bytes lie between them. Under io "auto" a chunk is read
        with O_DIRECT when less than ``cached`` of its pages are in the page cache as its
        reader starts; an O_DIRECT read is widened to multiples of ``align``. Tensor i is
        number ``done_before + i`` of the load, as reports count them. With the chunks not
        fitting in the free slots, calls :attr:`on_full` and waits for room. Returns the
        number of chunks, or None once the ring stopped (the reason comes from
        :meth:`next`)."""
        handle = self._enter(wait=True)
        if handle is None:
            return None
        number, fd, direct_fd, mapping, mode = file
        head = array("q", (number, fd, -1 if direct_fd is None else direct_fd, mapping or 0,
                           MODES[mode], align, int(cached * 1000)))
        event = None if allocated is None else allocated.handle
        placed = _I64()
        try:
            args = (handle, head.buffer_info()[0], len(begin), begin.buffer_info()[0],
                    end.buffer_info()[0], dst.buffer_info()[0], event, limit, gap, done_before)
            taken = self._held.fst_ring_submit_file(*args, 0, ctypes.byref(placed))
            if taken == -4:   # full: wait for room without the GIL
                self.room_waits += 1
                if self.on_full is not None:
                    self.on_full()
                taken = self._lib.fst_ring_submit_file(*args, 1, ctypes.byref(placed))
        finally:
            self._leave()
        self.submitted += placed.value
        if taken == -2:
            raise MemoryError("no memory for a chunk's pieces")
        if taken == -3:
            raise ValueError(f"tensors out of file order, or chunks of {limit} bytes (with "
                             f"{align} more at each end) that do not fit in the ring's "
                             f"windows of {self.stride} bytes")
        return None if taken < 0 else int(taken)

    def end(self) -> None:
        """No more chunks: :meth:`next` ends once every one was reported."""
        with self._cond:
            self._ended = True
            if self._handle is not None and not self._closed:
                self._lib.fst_ring_end(self._handle)
            self._cond.notify_all()

    def cancel(self) -> None:
        # The caller of a load cancels in its cleanup, where a Ctrl-C can come: the C lock
        # taken by `with` cannot be left held (loader/waiting.py), a Condition's could. Nobody
        # is notified (notify is Python code too): a submit waiting for the ring to open
        # looks again within 0.1 s, and the C ring wakes its own waiters.
        with self._lock:
            self._cancelled = True
            if self._handle is not None and not self._closed:
                self._lib.fst_ring_cancel(self._handle)

    def failed(self) -> bool:
        """Whether a chunk failed (:meth:`next` raises once it reaches it)."""
        handle = self._enter(wait=False)
        if handle is None:
            return False
        try:
            return bool(self._lib.fst_ring_failed(handle))
        finally:
            self._leave()

    def next(self) -> Report | None:
        """The next chunks whose copies are queued, in order, all that are ready once
        :attr:`batch` are (or every chunk submitted, if fewer); None at the end or once
        cancelled. Raises RingFailure."""
        handle = self._enter(wait=False)
        if handle is None:
            return None
        try:
            first, count, step, event = _I64(), _I64(), ctypes.c_int(), _P()
            got = (_I64 * REPORT)()
            info = (_I64 * (INFO * REPORT))()
            code = self._lib.fst_ring_next(handle, REPORT, ctypes.byref(first),
                                           ctypes.byref(count), got, info,
                                           ctypes.byref(event), ctypes.byref(step))
        finally:
            self._leave()
        if code == 1 and step.value == 0:
            return None
        if code:
            raise RingFailure(first.value, step.value, code, got[0], info[0], info[3],
                              info[4])
        n = count.value
        if not event.value:   # reported done, yet no event after its copies
            last = INFO * (n - 1)
            raise RingFailure(first.value + n - 1, STEPS.index("cuEventRecord"), 1,
                              got[n - 1], info[last], info[last + 3], info[last + 4])
        # Adopted (destroyed with its object) before anything else can raise.
        adopted = driver.Event.adopt(self.device, event)
        described = info[:INFO * n]
        return Report(first.value, got[:n], adopted, described[0::INFO], described[2::INFO],
                      described[INFO * (n - 1) + 1])

    def close(self) -> dict[str, float]:
        """Stop the threads and wait until no copy can touch the windows or the tensors any
        more; returns the seconds of SPENT. Raises CudaError if that wait fails (the windows
        must then never be reused)."""
        with self._cond:
            self._cancelled = True
            # Taken once: a second close() finds nothing, and nothing else touches the C ring
            # once _closed is set and the calls inside it have left.
            handle, self._handle = self._handle, None
            if handle is not None and not self._closed:
                self._lib.fst_ring_cancel(handle)
            self._closed = True
            self._cond.notify_all()   # a submit waiting for the ring to open returns now
            while self._inside:
                self._cond.wait(0.1)
        if handle is None:
            return {}
        spent = (ctypes.c_double * len(SPENT))()
        self._lib.fst_ring_spent(handle, spent)
        step = ctypes.c_int()
        code = self._lib.fst_ring_close(handle, ctypes.byref(step))
        if code:
            # The C ring is kept (its threads have ended): freed, it could let a copy still
            # queued write into memory handed out again.
            driver._check(code, STEPS[step.value] if step.value < len(STEPS) else "ring")
        return dict(zip(SPENT, spent))


_not_here()
