"""The CUDA side of the streaming engine, on PyTorch: device memory from torch's caching
allocator, pinned staging, one copy stream per worker, events for completion.

Stream hazards handled here:
* tensors are allocated on the consumer's current stream (captured when the load starts), so
  when the consumer frees one, the allocator reuses that memory in the consumer's stream order;
  the copy streams, which write that memory, first wait for an event recorded on the consumer's
  stream after the allocation (the memory's previous tensor may still be read there);
* a tensor used on a stream other than the one it was allocated on is recorded on that stream
  (``record_stream``), so that freeing it does not hand its memory out under that stream's work;
* the consumer's stream waits on the copy events of a tensor before the tensor is yielded, so a
  kernel launched on it afterwards sees complete data without a host synchronisation;
* a staging buffer is overwritten only after the event recorded after its last copy completed;
* device scratch for runs of small tensors (``copy_pieces``) is allocated on the copy stream,
  so the allocator hands its memory out again only in that stream's order, after the copies
  that read it.

With ``driver=True`` (``cuda_calls="driver"``) the same copies, events and stream waits go
through the CUDA driver with the GIL held (loader/driver.py), in the same order on the same
streams; runs of small tensors still go through torch. With ``native=True``
(``cuda_calls="native"``) a staged chunk's wait, read, copies and event are one C call
without the GIL (loader/native.py), each piece its own copy; the other calls as with driver.
With ``ring=True`` (``cuda_calls="ring"``) C threads read the chunks into a ring of pinned
windows and queue their copies on one stream (loader/ring.py); the other calls as with driver.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import torch

from ..format import TensorInfo
from ..frameworks.torch import TORCH, torch_dtype, torch_shape
from . import hostpool
from .posix import DIRECT_ALIGN

__all__ = ["TorchCudaSink", "addresses", "copy_pieces", "copy_runs", "plan_runs", "split_pieces"]

logger = logging.getLogger(__name__)

#: The CUDA error of a refused registration of a file mapping, once there was one (the process
#: then stages every chunk: a refusal is not tried again for each chunk of each load).
_source_refused: int | None = None
#: Devices whose context _bind bound on this thread (pooled threads serve many loads).
_bound = threading.local()

#: Pieces smaller than this go to the device in runs: one host-to-device copy of the run's span
#: into device scratch, then one batched device-side copy into the tensors
#: (``torch._foreach_copy_``), in place of one copy call per piece (Python and driver time each):
#: on the H200 machine, 20,000 tensors of 5.5 KB took 2.3 s with a copy call each, 2.1 s so.
SMALL_PIECE = 1 << 20
#: A file's tensors smaller than this in all are allocated one by one without a reservation
#: first (TorchCudaSink.reserve).
RESERVE_MIN = 64 << 20
#: A run ends where the next small piece starts further on than this (a large tensor between
#: them is copied on its own, never twice).
RUN_GAP = 64 << 10
#: Runs of fewer pieces are copied piece by piece (the batch would save nothing).
MIN_RUN = 4
# A run's device scratch is at most one staging buffer (a chunk), one per reader at a time,
# taken from the reader's stream pool of torch's allocator: not counted by max_device_bytes.

Piece = tuple[torch.Tensor, int, int, int]   # (dst, dst_offset, src_offset, length)


def plan_runs(pieces: list[Piece]) -> tuple[list[Piece], list[list[Piece]]]:
    """Split a chunk's pieces (in source order) into those copied one by one and runs of small
    ones copied together."""
    singles: list[Piece] = []
    runs: list[list[Piece]] = []
    run: list[Piece] = []
    for piece in pieces:
        if piece[3] >= SMALL_PIECE:
            singles.append(piece)
            continue
        if run and piece[2] - (run[-1][2] + run[-1][3]) > RUN_GAP:
            runs.append(run)
            run = []
        run.append(piece)
    if run:
        runs.append(run)
    kept = []
    for run in runs:
        if len(run) < MIN_RUN:
            singles.extend(run)
        else:
            kept.append(run)
    return singles, kept


def split_pieces(pieces: list[Piece]) -> tuple[list[Piece], list[list[Piece]]]:
    """:func:`plan_runs` where torch can copy a run in one batched call."""
    return plan_runs(pieces) if hasattr(torch, "_foreach_copy_") else (pieces, [])


def copy_pieces(src: torch.Tensor, pieces: list[Piece], device: torch.device) -> None:
    """``dst[dst_offset:+length] = src[src_offset:+length]`` for each piece, queued on the
    current stream of ``device`` (on the CPU too, which the tests use)."""
    singles, runs = split_pieces(pieces)
    for dst, dst_offset, src_offset, length in singles:
        dst[dst_offset:dst_offset + length].copy_(src[src_offset:src_offset + length],
                                                  non_blocking=True)
    copy_runs(src, runs, device)


def addresses(src: torch.Tensor, pieces: list[Piece]) -> list[tuple[int, int, int]]:
    """``(destination address, source address, bytes)`` of each piece. Destinations are flat
    uint8 tensors (``alloc``), so a byte offset into one is an address offset."""
    base = src.data_ptr()
    return [(dst.data_ptr() + dst_offset, base + src_offset, length)
            for dst, dst_offset, src_offset, length in pieces]


def copy_runs(src: torch.Tensor, runs: list[list[Piece]], device: torch.device) -> None:
    """Each run of small pieces: one copy of its span into device scratch, then one batched
    device-side copy into its tensors; queued on the current stream of ``device``."""
    for run in runs:
        begin = run[0][2]
        end = run[-1][2] + run[-1][3]
        scratch = torch.empty(end - begin, dtype=torch.uint8, device=device)
        scratch.copy_(src[begin:end], non_blocking=True)
        dsts = [dst if dst_offset == 0 and length == dst.numel() else
                dst[dst_offset:dst_offset + length] for dst, dst_offset, _, length in run]
        # The run's pieces as views of the scratch, cut by one split (a third of the cost of a
        # slice each), the bytes between pieces (tensors not wanted) cut out as parts too.
        sizes: list[int] = []
        keep: list[int] = []
        cursor = begin
        for _, _, src_offset, length in run:
            if src_offset > cursor:
                sizes.append(src_offset - cursor)
            keep.append(len(sizes))
            sizes.append(length)
            cursor = src_offset + length
        parts = scratch.split(sizes)
        torch._foreach_copy_(dsts, [parts[i] for i in keep], non_blocking=True)


#: cuda_calls modes said once in the log not to be usable here (the driver library, or the
#: native calls, cannot be loaded).
_refused: set[str] = set()

#: ``(stream id, device index, device type)`` of a device's current stream: the call behind
#: ``torch.cuda.current_stream``, without the Python calls and the Stream object that builds
#: around it, once per tensor handed over. None in a build of torch without CUDA.
_current_stream_ids = getattr(torch._C, "_cuda_getCurrentStream", None)


def _calls(mode: str) -> Any:
    """loader/driver.py (``mode="driver"``), loader/native.py (``"native"``) or loader/ring.py
    (``"ring"``) where its calls can be made, else None (the calls of the mode below it), said
    once in the log."""
    from . import driver, native, ring

    module = {"driver": driver, "native": native, "ring": ring}[mode]
    why = module.available()
    if why is None:
        return module
    if mode not in _refused:
        _refused.add(mode)
        what, below = {
            "driver": ("CUDA driver library", "queuing copies through torch"),
            "native": ("chunk calls",
                       "queuing copies through the CUDA driver's calls one by one, or torch's"),
            "ring": ("ring's C threads", "loading from Python reader threads"),
        }[mode]
        logger.warning('cuda_calls="%s": the %s cannot be used (%s); %s', mode, what, why,
                       below)
    return None


def ring_usable() -> bool:
    """Whether ``cuda_calls="ring"`` can run here (the CUDA driver loaded, ring.c built). The
    option's default asks this: where the ring cannot run, a load goes on with torch's calls,
    said once in the log at info level (nothing was asked that could not be given; a ring
    asked for by name is warned about by the sink)."""
    from . import driver, ring

    why = driver.available() or ring.available()
    if why is not None and "ring-default" not in _refused:
        _refused.add("ring-default")
        logger.info("cuda_calls left to its default, ring: its C threads cannot be used (%s); "
                    "loading from Python reader threads with torch's calls", why)
    return why is None


def _plain_allocator() -> bool:
    """torch's caching allocator, configured by nothing (PYTORCH_CUDA_ALLOC_CONF, or in code
    where torch can say)."""
    settings = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    if settings is not None:
        if settings():
            return False
    elif os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return False
    backend = getattr(torch.cuda, "get_allocator_backend", None)
    return backend is not None and backend() == "native"


class TorchCudaSink:
    """A :class:`~fastsafetensors.loader.stream.Sink` for one CUDA device."""

    def __init__(self, device: str | torch.device, *, blocking: bool = False,
                 huge_pages: bool = False, driver: bool = False, native: bool = False,
                 ring: bool = False, reserve: bool = False):
        self.device = torch.device(device)
        # Staging from registered huge pages kept for the process (loader/hostpool.py), not
        # from torch's pinned allocator.
        self.huge_pages = huge_pages
        # Only the staging events are waited on from the host (host_wait), so only they
        # take the flag; the consumer's stream waits on the device either way.
        self.blocking = blocking
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.index: int = self.device.index
        # Copies, events and stream waits through the CUDA driver with the GIL held
        # (loader/driver.py), or None: through torch. All events of a load are then the
        # driver's.
        self.calls: Any = _calls("driver") if driver or native or ring else None
        # One C call per staged chunk (stream.Sink.read_copy), or None.
        self.native: Any = _calls("native") if native and self.calls is not None else None
        self.read_copy = self._read_copy if self.native is not None else None
        # C threads for the reads and copies (stream.Sink.ring), or None.
        self.rings: Any = _calls("ring") if ring and self.calls is not None else None
        self.ring = self._ring if self.rings is not None else None
        self.consumer = torch.cuda.current_stream(self.device)
        self._consumer_ids = (self.consumer.stream_id, self.consumer.device_index,
                              self.consumer.device_type)
        # Events the consumer's current stream already waits for: tensors of one chunk share
        # one event, and 20,000 small tensors must not cost 20,000 stream waits. Strong
        # references (an id could be reused by a new event), cleared once there are many.
        self._waited: dict[Any, None] = {}
        self._waited_on: torch.cuda.Stream | None = None
        # The consumer's current stream as consumer_wait found it, for the finish() the
        # engine calls right after it on the same thread (one lookup per tensor, not two).
        self._current: torch.cuda.Stream | None = None
        # Threads of the engine (enter_thread), whose current device and stream are set.
        self._entered = threading.local()
        self._dtypes: dict[str, torch.dtype] = {}
        # Each file's memory at once (stream.Sink.reserve), or None: a tensor at a time.
        self.reserve = self._reserve if reserve else None
        self._unreserved = False   # a reservation ran out of memory: no more

    def enter_thread(self) -> None:
        # A new thread starts on device 0. Leaving a ``torch.cuda.stream(...)`` block there
        # restores device 0's stream, which makes device 0 current and creates a CUDA context
        # on it: several hundred MiB on GPU 0 for every rank that loads to its own GPU.
        torch.cuda.set_device(self.device)
        # The planner allocates here, on the consumer's stream: current on this thread (a
        # pooled one, which the next load sets again), an allocation needs no stream and device
        # blocks around it, which cost more than the allocation itself, per tensor. The
        # readers' copies enter their own stream's block and come back to this one.
        torch.cuda.set_stream(self.consumer)
        self._entered.yes = True

    def alloc(self, info: TensorInfo) -> torch.Tensor:
        return self._empty(info.nbytes)

    def _empty(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of the device, from torch's caching allocator on the consumer's stream."""
        if getattr(self._entered, "yes", False):
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        # Another thread (the consumer's, for GDS), whose current device may be another one;
        # leaving the stream block must not make that thread switch to (and initialise)
        # device 0.
        with torch.cuda.device(self.device), torch.cuda.stream(self.consumer):
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def _reserve(self, nbytes: int) -> None:
        # A file's tensors allocated one by one from a fresh caching allocator each ask the
        # driver for memory: on the H200 machine 8 GiB in 512 tensors took 0.039-0.042 s, and
        # 0.003-0.004 s once 8 GiB had been allocated at once and freed (0.001 s), which is
        # what this does per file (transformers' caching_allocator_warmup does it per model,
        # and is skipped while a batch reads ahead). Each of those calls also gives the GIL
        # away long enough for a thread running Python (transformers building the model) to
        # take it, and the planner then waits for it back. Skipped where the allocator already
        # holds that much unused (a process's later loads), and where the allocator is not
        # torch's own with its defaults: with max_split_size_mb it would not cut the tensors
        # from the block reserved, and would keep that block besides.
        # Nor where the device has not that much free besides: the allocator would first free
        # every cached block (and wait for the device) before failing.
        if nbytes < RESERVE_MIN or self._unreserved or not _plain_allocator():
            return
        held = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        if held >= nbytes or torch.cuda.mem_get_info(self.device)[0] < nbytes + RESERVE_MIN:
            return
        try:
            block = self._empty(nbytes)
        except torch.cuda.OutOfMemoryError:
            # Not that much in one piece: this load's tensors are allocated one by one.
            self._unreserved = True
            return
        del block

    def staging(self, nbytes: int) -> tuple[torch.Tensor, memoryview]:
        if self.huge_pages:
            block = hostpool.take(nbytes, self._register)   # page-aligned: O_DIRECT-aligned
            if block is not None:
                return block.tensor, block.view
        raw = torch.empty(nbytes + DIRECT_ALIGN, dtype=torch.uint8, pin_memory=True)
        skip = -raw.data_ptr() % DIRECT_ALIGN  # O_DIRECT reads need an aligned buffer
        buffer = raw[skip:skip + nbytes]
        # .data is memoryview(array); numpy's stubs give ndarray no __buffer__ before Python 3.12
        return buffer, buffer.numpy().data.cast("B")

    def _register(self, address: int, nbytes: int) -> int:
        self._bind()
        return hostpool.register(address, nbytes)

    def _bind(self) -> None:
        """Bind the device's context to this thread, once per thread and device (pooled
        threads serve many loads). The driver registers for the context current on the
        calling thread, and a reader thread may have none yet: recent torch releases skip
        cudaSetDevice when the device is already the current one, and the runtime binds its
        context to a thread only on a call that needs one. Memory info is such a call, without
        a synchronization."""
        bound = getattr(_bound, "devices", None)
        if bound is None:
            bound = _bound.devices = set()
        if self.device not in bound:
            torch.cuda.mem_get_info(self.device)
            bound.add(self.device)

    def host_source(self, address: int, nbytes: int) -> torch.Tensor | None:
        global _source_refused
        if _source_refused is not None:
            return None
        self._bind()
        err = hostpool.register(address, nbytes, hostpool.PORTABLE | hostpool.READ_ONLY)
        if err:
            # Overlap with a range another reader holds (a page shared by two chunks): this
            # chunk alone goes through staging. Anything else holds for the process.
            if err != hostpool.ALREADY_REGISTERED:
                _source_refused = err
                logger.warning("registering a cached file range with CUDA failed (CUDA error "
                               "%s); this process copies cached data through pinned staging",
                               err)
            return None
        try:
            # Writable for Python, read-only for the CPU: only the copy engine reads it.
            return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address),
                                    dtype=torch.uint8)
        except BaseException:
            hostpool.unregister(address)
            raise

    def release_source(self, source: torch.Tensor) -> None:
        hostpool.unregister(source.data_ptr())

    def release_staging(self, buffer: torch.Tensor) -> None:
        # torch's pinned blocks go back to its cache when the last reference goes.
        hostpool.give(buffer)

    def alloc_event(self) -> Any:
        if self.calls is not None:
            return self.calls.Event(self.index, self.consumer.cuda_stream)
        event = torch.cuda.Event()
        event.record(self.consumer)
        return event

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def stream_wait(self, stream: torch.cuda.Stream, event: Any) -> None:
        if self.calls is not None:
            self.calls.stream_wait(self.index, stream.cuda_stream, event)
        else:
            stream.wait_event(event)

    def copy(self, stream: torch.cuda.Stream, src: torch.Tensor,
             pieces: list[tuple[torch.Tensor, int, int, int]]) -> None:
        if self.calls is None:
            with torch.cuda.stream(stream):
                copy_pieces(src, pieces, self.device)
            return
        # src is staging or a registered file range: pinned, as driver copies need (from
        # pageable memory a copy would run synchronously, the GIL held).
        singles, runs = split_pieces(pieces)
        if singles:
            self.calls.copy_to_device(self.index, stream.cuda_stream, addresses(src, singles))
        if runs:
            with torch.cuda.stream(stream):
                copy_runs(src, runs, self.device)

    def record(self, stream: torch.cuda.Stream) -> Any:
        if self.calls is not None:
            return self.calls.Event(self.index, stream.cuda_stream, blocking=self.blocking)
        event = torch.cuda.Event(blocking=self.blocking)
        event.record(stream)
        return event

    def host_wait(self, event: Any) -> None:
        event.synchronize()

    def _read_copy(self, stream: torch.cuda.Stream, staged: Any, fd: int, offset: int,
                   length: int, needed: int, buffer: torch.Tensor, allocated: Any,
                   pieces: list[Piece], path: str) -> tuple[int, Any, tuple[float, ...]]:
        # Every piece its own copy: from C a copy call costs microseconds and no GIL, so
        # small ones need no runs through torch.
        return self.native.read_copy(
            self.index, staged, fd, offset, length, needed, buffer.data_ptr(),
            stream.cuda_stream, allocated,
            [(dst.data_ptr() + dst_offset, src_offset, n)
             for dst, dst_offset, src_offset, n in pieces],
            blocking=self.blocking, path=path)

    def _ring(self, **shape: int) -> Any:
        return self.rings.Ring(self.index, blocking=self.blocking, **shape)

    def _current_stream(self) -> torch.cuda.Stream:
        """The consumer's current stream on the device: the load's own Stream object while the
        consumer is still on it (the common case), else a new one."""
        if (_current_stream_ids is not None
                and tuple(_current_stream_ids(self.index)) == self._consumer_ids):
            return self.consumer
        return torch.cuda.current_stream(self.device)

    def consumer_wait(self, events: list[torch.cuda.Event]) -> None:
        stream = self._current = self._current_stream()
        # `is None` first: a CUDA stream compared with None by `!=` answers False (torch's C
        # comparison), which left the dict in place after the consumer switched streams.
        if (self._waited_on is None or (stream is not self._waited_on
                                        and stream != self._waited_on)
                or len(self._waited) > 256):
            self._waited = {}
            self._waited_on = stream
        for event in events:
            if event not in self._waited:
                if self.calls is not None:
                    self.calls.stream_wait(self.index, stream.cuda_stream, event)
                else:
                    stream.wait_event(event)
                self._waited[event] = None

    def finish(self, flat: torch.Tensor | None, info: TensorInfo) -> torch.Tensor:
        dtype = self._dtypes.get(info.dtype)
        if dtype is None:
            dtype = self._dtypes[info.dtype] = torch_dtype(info.dtype, info.name)
        shape = torch_shape(info)
        if flat is None:
            return torch.empty(shape, dtype=dtype, device=self.device)
        current, self._current = self._current, None
        if current is None:
            current = self._current_stream()
        if current is not self.consumer and current != self.consumer:
            # The consumer switched streams since the load started: the allocator only knows
            # the allocation stream, so without this it could reuse the memory too early.
            flat.record_stream(current)
        typed = flat.view(dtype)
        # A 1-D tensor (norms, biases: most small ones) has its shape already: one torch call
        # fewer per tensor, each of which gives the GIL away.
        return typed if len(shape) == 1 else typed.view(shape)

    def finisher(self, block: torch.Tensor) -> Callable[[int, TensorInfo], torch.Tensor]:
        """Tensors of a group (stream.py): one ``as_strided`` each on a typed view of the
        group's memory."""
        view = TORCH.strided_viewer(block)

        def finish(offset: int, info: TensorInfo) -> torch.Tensor:
            current, self._current = self._current, None
            if current is None:
                current = self._current_stream()
            if current is not self.consumer and current != self.consumer:
                # As in finish(): the memory must not be handed out again under the
                # consumer's new stream's work (recorded for the whole group).
                block.record_stream(current)
            return view(offset, info)

        return finish

    @staticmethod
    def pinned(nbytes: int) -> tuple[torch.Tensor, memoryview]:
        """Page-locked host memory for one read, from torch's caching pinned allocator."""
        buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return buffer, buffer.numpy().data.cast("B")
