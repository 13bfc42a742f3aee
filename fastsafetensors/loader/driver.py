"""Copies, events and stream waits through the CUDA driver with the GIL held
(``cuda_calls="driver"``).

Each torch call that queues GPU work (``copy_``, ``Event.record``, ``Stream.wait_event``)
releases Python's GIL around its driver call and takes it back after. A reader thread of the
engine makes several per chunk besides its read (a copy per piece, an event recorded, a stream
wait); with 8 readers, a planner and a consumer in one process, taking the GIL back means
waiting for the other threads' Python work, once per call. On the H100 machine the readers
spent 0.3-0.5 thread-seconds per 8 GB load queuing copies (about 0.6-1.1 ms a chunk for calls
that return in microseconds) and 1.4-1.6 with 16 readers, which points at that wait (or at the
driver's own; docs/benchmarks.md, section 2).

These calls queue work and return without waiting for it, so here they are made through
``ctypes.PyDLL``, which keeps the GIL for their few microseconds: no hand-over. Only
:meth:`Event.synchronize`, which waits for the GPU, goes through ``ctypes.CDLL`` and releases
it. Each call runs with the device's primary context pushed (the context torch's runtime uses),
so it does not depend on what the calling thread made current, and a stream handle of 0 means
that device's default stream.

Only pinned (page-locked or registered) host memory may be a copy's source: from pageable
memory ``cuMemcpyHtoDAsync`` copies synchronously, and would hold the GIL meanwhile. The risk
that stays: CUDA says any call may block on the driver's own resources (another thread inside
``cudaMalloc``, ``cudaFree`` or ``cuMemHostRegister``, a full command queue), and such a wait
here holds every Python thread of the process. No deadlock follows (nothing holds a driver lock
while it waits for the GIL), but it is a risk to take only for a gain, and on the H200 machine
there was none (20.47 against 21.32 GB/s with torch's calls): opt-in.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ..errors import CudaError
from ..forking import in_child

__all__ = ["Event", "available", "copy_to_device", "stream_wait"]

#: cuEventCreate flags.
BLOCKING_SYNC = 0x1
DISABLE_TIMING = 0x2

_lock = threading.Lock()
_libs: tuple[Any, Any] | None = None     # (calls keeping the GIL, calls releasing it)
_missing: str | None = None              # why the driver cannot be used, once known
_contexts: dict[int, ctypes.c_void_p] = {}   # device ordinal -> its primary context

_HANDLE = ctypes.c_void_p
T = TypeVar("T")
#: (name, argument types) of the calls made with the GIL held.
_HELD = (
    ("cuDeviceGet", [ctypes.POINTER(ctypes.c_int), ctypes.c_int]),
    ("cuDevicePrimaryCtxRetain", [ctypes.POINTER(_HANDLE), ctypes.c_int]),
    ("cuCtxPushCurrent_v2", [_HANDLE]),
    ("cuCtxPopCurrent_v2", [ctypes.POINTER(_HANDLE)]),
    ("cuMemcpyHtoDAsync_v2", [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, _HANDLE]),
    ("cuEventCreate", [ctypes.POINTER(_HANDLE), ctypes.c_uint]),
    ("cuEventRecord", [_HANDLE, _HANDLE]),
    ("cuStreamWaitEvent", [_HANDLE, _HANDLE, ctypes.c_uint]),
    ("cuEventDestroy_v2", [_HANDLE]),
    ("cuGetErrorName", [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]),
)
#: The one call that waits for the GPU, made with the GIL released.
_RELEASED = (("cuEventSynchronize", [_HANDLE]),)


def _load(name: str = "libcuda.so.1") -> tuple[Any, Any] | None:
    """The driver library twice (GIL kept, GIL released), or None with ``_missing`` set."""
    global _libs, _missing
    if _libs is not None or _missing is not None:
        return _libs
    with _lock:
        if _libs is None and _missing is None:
            try:
                held, released = ctypes.PyDLL(name), ctypes.CDLL(name)
                for lib, calls in ((held, _HELD), (released, _RELEASED)):
                    for call, argtypes in calls:
                        function = getattr(lib, call)
                        function.argtypes = argtypes
                        function.restype = ctypes.c_int
                _libs = held, released
            except (OSError, AttributeError) as exc:
                _missing = f"{name}: {exc}"
    return _libs


def available() -> str | None:
    """None when the driver calls can be made here, else why not."""
    _load()
    return _missing


def _name(code: int) -> str:
    libs = _load()
    text = ctypes.c_char_p()
    if libs is None or libs[0].cuGetErrorName(code, ctypes.byref(text)) or not text.value:
        return "CUDA_ERROR_UNKNOWN"
    return text.value.decode()


def _check(code: int, call: str) -> None:
    if code:
        raise CudaError(call, int(code), _name(code))


def _context(device: int) -> ctypes.c_void_p:
    """The primary context of ``device`` (retained once for the process, as torch keeps it)."""
    context = _contexts.get(device)
    if context is None:
        held = _libs_or_raise()[0]
        ordinal = ctypes.c_int()
        _check(held.cuDeviceGet(ctypes.byref(ordinal), device), "cuDeviceGet")
        context = ctypes.c_void_p()
        _check(held.cuDevicePrimaryCtxRetain(ctypes.byref(context), ordinal),
               "cuDevicePrimaryCtxRetain")
        with _lock:
            # Two threads may both have retained it: one reference more is harmless.
            context = _contexts.setdefault(device, context)
    return context


def _libs_or_raise() -> tuple[Any, Any]:
    libs = _load()
    if libs is None:
        raise CudaError("dlopen", -1, f"the CUDA driver library cannot be used ({_missing})")
    return libs


def _in_context(device: int, work: Callable[[Any], T]) -> T:
    """``work(calls)``, the device's primary context pushed on this thread meanwhile and popped
    after, whatever happens. A Ctrl-C raises where a call returns (or a Python function starts):
    so the push is the first call in the ``try``, and nothing is called between the work and
    the pop."""
    held = _libs_or_raise()[0]
    context = _context(device)
    popped = ctypes.c_void_p()
    into = ctypes.byref(popped)
    code = None
    try:
        code = held.cuCtxPushCurrent_v2(context)
        if code == 0:
            result = work(held)
    except BaseException:
        if code is None or code == 0:   # None: interrupted as the push returned
            # What comes off is ours unless that push failed: then it was the caller's, and
            # goes back. (If the caller's was this same context, one too many is popped; a push
            # of a retained primary context does not fail.)
            if held.cuCtxPopCurrent_v2(into) == 0 and popped.value != context.value:
                held.cuCtxPushCurrent_v2(popped)
        raise
    if code != 0:
        _check(code, "cuCtxPushCurrent")   # nothing was pushed
    code = held.cuCtxPopCurrent_v2(into)
    _check(code, "cuCtxPopCurrent")
    return result


def copy_to_device(device: int, stream: int, copies: Iterable[tuple[int, int, int]]) -> None:
    """Queue ``(device address, host address, bytes)`` copies on ``stream`` (a handle; 0: the
    device's default stream). The host memory must be pinned."""
    def copy(held: Any) -> None:
        for dst, src, nbytes in copies:
            _check(held.cuMemcpyHtoDAsync_v2(dst, src, nbytes, stream), "cuMemcpyHtoDAsync")

    _in_context(device, copy)


def stream_wait(device: int, stream: int, event: Event) -> None:
    """Work queued on ``stream`` from now on waits for ``event``."""
    _in_context(device, lambda held: _check(held.cuStreamWaitEvent(stream, event.handle, 0),
                                            "cuStreamWaitEvent"))


class Event:
    """A CUDA event (no timing), recorded on a stream when made. ``blocking``: a host wait
    sleeps instead of spinning."""

    __slots__ = ("device", "handle", "pid", "__weakref__")

    def __init__(self, device: int, stream: int, *, blocking: bool = False):
        self.device = device
        self.pid = os.getpid()
        # Kept before the call fills it: an event made is destroyed with this object, even if
        # a Ctrl-C lands as the call returns.
        handle = ctypes.c_void_p()
        self.handle: ctypes.c_void_p | None = handle
        flags = DISABLE_TIMING | (BLOCKING_SYNC if blocking else 0)

        def make(held: Any) -> None:
            _check(held.cuEventCreate(ctypes.byref(handle), flags), "cuEventCreate")
            _check(held.cuEventRecord(handle, stream), "cuEventRecord")

        _in_context(device, make)

    @classmethod
    def adopt(cls, device: int, handle: ctypes.c_void_p) -> Event:
        """An event created and recorded elsewhere (the C calls of loader/native.py and
        loader/ring.py), destroyed with this object."""
        self = cls.__new__(cls)
        self.device = device
        self.handle = handle
        self.pid = os.getpid()
        return self

    def synchronize(self) -> None:
        """Wait until the work before the event has run (the GIL released meanwhile)."""
        released = _libs_or_raise()[1]
        _in_context(self.device, lambda held: _check(released.cuEventSynchronize(self.handle),
                                                     "cuEventSynchronize"))

    def __del__(self) -> None:
        # The driver frees a destroyed event's resources once its work completed. A forked
        # child inherits the object but not the driver's state: it must not call the driver.
        # At interpreter exit, errors are moot.
        handle, self.handle = getattr(self, "handle", None), None   # None: __init__ interrupted
        if handle is None or not handle.value or self.pid != os.getpid():
            return
        try:
            _in_context(self.device, lambda held: held.cuEventDestroy_v2(handle))
        except Exception:  # noqa: BLE001 - a finalizer must not raise
            pass


def _after_fork() -> None:
    # A child has no CUDA context of its parent's.
    global _lock
    _lock = threading.Lock()
    _contexts.clear()


in_child(_after_fork)
