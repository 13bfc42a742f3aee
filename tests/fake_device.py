"""A fake asynchronous device for testing the streaming engine on the CPU.

Each stream is one worker thread that runs queued copies late (after a random delay), so an
engine that reuses a staging buffer before its copies ran, or hands out a tensor before its
copies completed, produces wrong bytes that the tests catch. Events are futures.

The consumer's stream is the host here, so memory that a real allocator hands out while the
consumer's kernels still read it cannot be simulated; instead every write into a tensor checks
that the writer was ordered after the tensor's allocation (``alloc_event`` waited for on the
copy's stream, or on the host before a DMA), and raises AssertionError otherwise. Likewise a
thread the engine started must call ``enter_thread`` before it uses the device (on CUDA that makes
the target device current there; a new thread starts on device 0).
"""

from __future__ import annotations

import ctypes
import mmap
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from fastsafetensors.format import TensorInfo
from fastsafetensors.frameworks.torch import TORCH, torch_dtype, torch_shape
from fastsafetensors.loader.stream import device_bytes


class FakeSink:
    def __init__(self, *, delay: float = 0.002, seed: int = 0,
                 refuse_sources: bool = False):
        self.delay = delay
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.streams: list[ThreadPoolExecutor] = []
        self.outstanding = 0          # bytes allocated and not yet handed to the consumer
        self.peak_outstanding = 0
        self.allocations = 0
        self.copies = 0
        self.born: dict[int, int] = {}       # id of a tensor -> its allocation number
        self.ordered: dict[Any, int] = {}    # stream -> allocations it was ordered after
        self.host_ordered = 0                # allocations the host waited for
        self.entered: set[int] = set()       # engine threads that called enter_thread
        self.staged: list[torch.Tensor] = []      # staging buffers handed out
        self.released: list[torch.Tensor] = []    # and given back
        self.reading: dict[int, list[Future[None]]] = {}   # id(buffer) -> copies out of it
        # Registered file ranges (host_source), as CUDA would hold them: start -> end.
        self.refuse_sources = refuse_sources
        self.sources: dict[int, int] = {}
        self.sourced = 0                     # ranges registered, all loads
        self.source_refusals = 0
        # Contract breaches seen on the engine's threads, where an exception would only be
        # logged by the thread pool: the tests assert there are none.
        self.violations: list[str] = []

    def enter_thread(self) -> None:
        with self.lock:
            self.entered.add(threading.get_ident())

    def _check_thread(self) -> None:
        thread = threading.current_thread()
        engine = thread.name.startswith(("fastsafetensors-plan", "fastsafetensors-io-"))
        if engine and thread.ident not in self.entered:
            raise AssertionError(f"{thread.name} used the device before enter_thread()")

    def alloc(self, info: TensorInfo) -> torch.Tensor:
        self._check_thread()
        # Poisoned, so a copy that never ran shows up as wrong data.
        flat = torch.full((info.nbytes,), 0xA5, dtype=torch.uint8)
        with self.lock:
            self.allocations += 1
            self.born[id(flat)] = self.allocations
            self.outstanding += device_bytes(info.nbytes)   # as torch's allocator rounds
            self.peak_outstanding = max(self.peak_outstanding, self.outstanding)
        return flat

    def alloc_event(self) -> Future[int]:
        self._check_thread()
        event: Future[int] = Future()
        with self.lock:
            event.set_result(self.allocations)
        return event

    def stream_wait(self, stream: ThreadPoolExecutor, event: Future[int]) -> None:
        with self.lock:
            self.ordered[stream] = max(self.ordered.get(stream, 0), event.result())

    def _check_ordered(self, flat: torch.Tensor, upto: int) -> None:
        born = self.born.get(id(flat), 0)
        if born > upto:
            raise AssertionError(f"allocation {born} written before the writer was ordered "
                                 f"after it (only up to {upto})")

    def consumed(self, nbytes: int) -> None:
        with self.lock:
            self.outstanding -= device_bytes(nbytes)

    def staging(self, nbytes: int) -> tuple[torch.Tensor, memoryview]:
        self._check_thread()
        raw = torch.empty(nbytes + 4096, dtype=torch.uint8)
        skip = -raw.data_ptr() % 4096
        buf = raw[skip:skip + nbytes]
        with self.lock:
            self.staged.append(buf)
        return buf, memoryview(buf.numpy()).cast("B")

    def release_staging(self, buffer: torch.Tensor) -> None:
        # Given back means reusable by another load: every copy out of it must have run.
        with self.lock:
            copies = self.reading.pop(id(buffer), [])
            self.released.append(buffer)
            if not all(c.done() for c in copies):
                self.violations.append("a staging buffer was given back before its copies ran")

    def host_source(self, address: int, nbytes: int) -> torch.Tensor | None:
        self._check_thread()
        with self.lock:
            if address % mmap.PAGESIZE or nbytes % mmap.PAGESIZE:
                self.violations.append(f"range {address:#x}+{nbytes} is not whole pages")
            # As cuMemHostRegister: a range overlapping one registered is refused.
            if self.refuse_sources or any(a < address + nbytes and address < b
                                          for a, b in self.sources.items()):
                self.source_refusals += 1
                return None
            self.sources[address] = address + nbytes
            self.sourced += 1
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address),
                                dtype=torch.uint8)

    def release_source(self, source: torch.Tensor) -> None:
        with self.lock:
            copies = self.reading.pop(id(source), [])
            if self.sources.pop(source.data_ptr(), None) is None:
                self.violations.append("a range was released that was not registered")
            if not all(c.done() for c in copies):
                self.violations.append("a registered range was released before its copies ran")

    def new_stream(self) -> ThreadPoolExecutor:
        self._check_thread()
        stream = ThreadPoolExecutor(1, thread_name_prefix="fake-stream")
        with self.lock:
            self.streams.append(stream)
        return stream

    def copy(self, stream: ThreadPoolExecutor, src: torch.Tensor,
             pieces: list[tuple[torch.Tensor, int, int, int]]) -> None:
        self._check_thread()
        for dst, dst_offset, src_offset, length in pieces:
            delay = self.rng.random() * self.delay
            with self.lock:
                self.copies += 1
                self._check_ordered(dst, self.ordered.get(stream, 0))

            def run(dst: torch.Tensor = dst, dst_offset: int = dst_offset,
                    src_offset: int = src_offset, length: int = length,
                    delay: float = delay) -> None:
                time.sleep(delay)
                dst[dst_offset:dst_offset + length].copy_(src[src_offset:src_offset + length])

            future = stream.submit(run)
            with self.lock:
                self.reading.setdefault(id(src), []).append(future)

    def record(self, stream: ThreadPoolExecutor) -> Future[None]:
        self._check_thread()
        return stream.submit(lambda: None)

    def host_wait(self, event: Future[Any]) -> None:
        allocations = event.result()
        if allocations is not None:  # an alloc_event: later DMA into those tensors is ordered
            with self.lock:
                self.host_ordered = max(self.host_ordered, allocations)

    def consumer_wait(self, events: list[Future[None]]) -> None:
        # The consumer here is the host, so "its stream waits" means waiting for the events.
        for event in events:
            event.result()

    def finish(self, flat: torch.Tensor | None, info: TensorInfo) -> torch.Tensor:
        dtype, shape = torch_dtype(info.dtype), torch_shape(info)
        if flat is None:
            return torch.empty(shape, dtype=dtype)
        with self.lock:  # written by copies on some stream, or by a DMA ordered by the host
            self._check_ordered(flat, max(self.host_ordered, *self.ordered.values(), 0))
        return flat.view(dtype).view(shape)

    def close(self) -> None:
        for stream in self.streams:
            stream.shutdown(wait=True)


class GroupingFakeSink(FakeSink):
    """FakeSink that takes runs of small tensors in one allocation (``Sink.finisher``), as the
    CUDA sink does."""

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.groups: list[list[int]] = []   # [bytes, tensors handed over] of each group
        self.waits = 0                      # consumer_wait calls

    def consumer_wait(self, events: list[Future[None]]) -> None:
        self.waits += 1
        super().consumer_wait(events)

    def finisher(self, block: torch.Tensor) -> Any:
        with self.lock:  # as finish(): every copy into the group ordered after its allocation
            self._check_ordered(block, max(self.host_ordered, *self.ordered.values(), 0))
        view = TORCH.strided_viewer(block)   # as on a device: the group's one storage
        group = [block.numel(), 0]
        self.groups.append(group)

        def finish(offset: int, info: TensorInfo) -> torch.Tensor:
            if offset < 0 or offset + info.nbytes > block.numel():
                raise AssertionError(f"{info.name} at {offset} runs past its group")
            group[1] += 1
            return view(offset, info)

        return finish


def as_bytes(t: Any) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8)


def record_lookups(monkeypatch: Any) -> list[tuple[int, int]]:
    """``(offset, end)`` of every page-cache residency lookup the engine makes from here on."""
    import fastsafetensors.loader.streamparts as parts

    asked: list[tuple[int, int]] = []
    real = parts.resident_map

    def recorded(fd: int, offset: int, length: int, **kw: Any) -> bytes | None:
        asked.append((offset, offset + length))
        return real(fd, offset, length, **kw)

    monkeypatch.setattr(parts, "resident_map", recorded)
    return asked


def stream_ids(monkeypatch: Any, sink: Any, current: list[Any], ids: bool) -> None:
    """For a TorchCudaSink emulated on the CPU: with ``ids``, the sink finds the consumer's
    current stream by its ids (torch's call behind torch.cuda.current_stream, which a CPU
    build lacks), emulated from ``current[0]``; without, through torch.cuda.current_stream."""
    import fastsafetensors.loader.cuda as cuda_module

    if ids:
        monkeypatch.setattr(cuda_module, "_current_stream_ids",
                            lambda index: (current[0].stream_id, index, 0))
        sink._consumer_ids = (sink.consumer.stream_id, 0, 0)
    else:
        monkeypatch.setattr(cuda_module, "_current_stream_ids", None)


def emulated_cuda_sink(monkeypatch: Any, ids: bool) -> tuple[Any, list[Any], list[int], Any]:
    """A TorchCudaSink with only the fields its stream calls use, emulated on the CPU: the
    consumer's stream is torch.Stream 1, ``current[0]`` is the consumer's current stream, and
    ``lookups`` lists the streams torch.cuda.current_stream was asked for (it answers a new,
    equal object each call, as torch's does). Returns (sink, current, lookups, stream 2)."""
    from fastsafetensors.loader.cuda import TorchCudaSink

    first, second = (torch.Stream(stream_id=i, device_index=0, device_type=0) for i in (1, 2))
    current = [first]
    lookups: list[int] = []

    def current_stream(device: object = None) -> torch.Stream:
        lookups.append(current[0].stream_id)
        return torch.Stream(stream_id=current[0].stream_id, device_index=0, device_type=0)

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    sink = object.__new__(TorchCudaSink)   # no CUDA here
    sink.device, sink.consumer, sink._waited, sink._waited_on = "cuda:0", first, {}, None
    sink._current, sink._dtypes, sink.calls, sink.index = None, {}, None, 0
    stream_ids(monkeypatch, sink, current, ids)
    return sink, current, lookups, second
