"""Loads through the C engines (cuda_calls="native" and "ring") that the caller abandons
part-way, on the fake device (tests/fake_libcuda.c as the CUDA driver, host memory as the
device): stopped after each number of tensors by close(), by dropping the stream (its last
reference, or in a reference cycle the collector finds), by an exception or a break in the
loop's body; and interrupted by a Ctrl-C at each place of the package's loader code where
CPython would raise one (builders.each_ctrl_c). Afterwards nothing of the load may be left: no
thread of it running (the pool's, the ring's C threads, a cleanup's), no descriptor or mapping
of its files, no staging out of the pool, no tensor of it alive, no context pushed, no event
undestroyed, the load untracked, the collector and the switch interval as they were; and the
next load equals safetensors."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import each_ctrl_c, open_fds
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

# With test_driver's and test_native's fixtures, found by pytest under these names (F811 where
# they are used).
from test_driver import fake, fake_so  # noqa: F401
from test_native import NativeHostSink, cache  # noqa: F401
from test_ring import RingHostSink

import fastsafetensors
from fastsafetensors import api, gcpause, loading
from fastsafetensors.loader import cuda, hostpool, native, ring, switching
from fastsafetensors.loader import threads as pool

DEFAULT_INTERVAL = sys.getswitchinterval()


@pytest.fixture
def engines(fake: Any, cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:  # noqa: F811
    """native.py and ring.py built and bound to the stand-in driver."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(hostpool, "_free", type(hostpool._free)(list))   # a pool of its own
    monkeypatch.setattr(hostpool, "_lent", {})
    monkeypatch.setattr(hostpool, "_refused", None)
    monkeypatch.setattr(hostpool, "_registered", 0)
    native.forget()
    ring.forget()
    assert native.available() is None and ring.available() is None
    yield fake
    native.forget()
    ring.forget()


class Counted:
    """Mixed into a test sink: its staging from the process's pool of registered buffers, as
    TorchCudaSink's with huge_pages (registration stood in for), and what it lends and takes
    back, staging buffers and tensors (the device's memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.lent = 0
        self.returned = 0
        self.tensors: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()

    def staging(self, nbytes: int) -> tuple[Any, memoryview]:
        block = hostpool.take(nbytes, lambda address, size: 0)
        assert block is not None
        self.lent += 1
        return block.tensor, block.view

    def release_staging(self, buffer: Any) -> None:
        assert hostpool.give(buffer), "not a buffer of the pool, or given back twice"
        self.returned += 1

    def alloc(self, info: Any) -> Any:
        flat = super().alloc(info)  # type: ignore[misc]
        self.tensors.add(flat)
        return flat


class NativeSink(Counted, NativeHostSink):
    pass


class RingSink(Counted, RingHostSink):
    pass


SINKS = {"native": NativeSink, "ring": RingSink}


@pytest.fixture
def checkpoint(tmp_path: Path) -> list[Path]:
    """Two files of 6 tensors each, spanning several chunks of the small staging below."""
    g = torch.Generator().manual_seed(3)
    paths = []
    for k in range(2):
        path = tmp_path / f"m{k}.safetensors"
        save_file({f"f{k}.w{i}": torch.randn(3000 + 700 * i, generator=g) for i in range(6)},
                  str(path))
        paths.append(path)
    return paths


class Device:
    """The public verbs to "cuda:0", each load's sink one of ``mode``'s (kept in ``sinks``)."""

    def __init__(self, mode: str, monkeypatch: pytest.MonkeyPatch, stand_in: Any) -> None:
        self.mode, self.stand_in = mode, stand_in
        self.sinks: list[Any] = []

        def make(device: Any, **_: Any) -> Any:
            self.sinks.append(SINKS[mode]())
            return self.sinks[-1]

        device_of = lambda device, framework, **_: "cuda:0"  # noqa: E731
        monkeypatch.setattr(loading, "resolve_device", device_of)
        monkeypatch.setattr(api, "resolve_device", device_of)
        monkeypatch.setattr(cuda, "TorchCudaSink", make)

    def options(self) -> Any:
        return fastsafetensors.configure(cuda_calls=self.mode, backend="posix",
                                         switch_interval_us=500)

    def stream(self, paths: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
        with self.options():
            return fastsafetensors.iter_tensors([str(p) for p in paths], device="cuda:0",
                                                threads=2, staging_bytes=4 * 16384)

    def load(self, paths: list[Path]) -> dict[str, torch.Tensor]:
        with self.options():
            return fastsafetensors.load([str(p) for p in paths], device="cuda:0", threads=2,
                                        staging_bytes=4 * 16384)

    def load_file(self, path: Path) -> dict[str, torch.Tensor]:
        with self.options():
            return fastsafetensors.load_file(str(path), device="cuda:0")


def _tasks() -> set[int]:
    """Native ids of this process's threads."""
    return {int(t) for t in os.listdir("/proc/self/task")}


def _foreign() -> set[int]:
    """Threads Python does not know of (the ring's C threads)."""
    return _tasks() - {t.native_id for t in threading.enumerate() if t.native_id is not None}


def _mappings() -> list[str]:
    """This process's mappings of checkpoint files (io="auto" maps each file it reads)."""
    with open("/proc/self/maps") as maps:
        return [line for line in maps if line.rstrip().endswith(".safetensors")]


class Before:
    """The process as it was before a load, and the checks that a load left it so."""

    def __init__(self, device: Device) -> None:
        self.device = device
        gc.collect()
        self.fds = open_fds()
        self.mappings = _mappings()
        self.foreign = _foreign()
        self.events = device.stand_in.events_live
        self.running = len(pool._running)

    def _busy(self) -> list[str]:
        left = []
        if pool.busy():
            left.append(f"{pool.busy()} pooled threads busy")
        cleanups = [t.name for t in threading.enumerate() if t.name == "fastsafetensors-cleanup"]
        if cleanups:
            left.append(f"cleanups running: {cleanups}")
        if _foreign() - self.foreign:
            left.append(f"threads not Python's: {_foreign() - self.foreign}")
        if open_fds() != self.fds:
            left.append(f"descriptors {open_fds() ^ self.fds}")
        if _mappings() != self.mappings:
            left.append(f"mappings {_mappings()}")
        return left

    def _held(self) -> list[str]:
        """What the sinks lent and the driver made that is still held."""
        held = []
        for sink in self.device.sinks:
            if sink.lent != sink.returned:
                held.append(f"staging: {sink.lent} lent, {sink.returned} given back")
            if len(sink.tensors):
                held.append(f"{len(sink.tensors)} tensors alive")
        # The events the test sinks keep, dropped with them.
        events = self.device.stand_in.events_live - self.events - sum(
            len(sink.events) for sink in self.device.sinks)
        if events:
            held.append(f"{events} events alive")
        return held

    def check(self, where: Any) -> None:
        deadline = time.monotonic() + 10
        while self._busy() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not self._busy(), (where, self._busy())
        # A pooled thread counted idle still holds its last task for a moment (and the task's
        # closure the load's queues): what it held goes then.
        while self._held() and time.monotonic() < deadline:
            gc.collect()   # only then: a collection costs more than a load here
            if self._held():
                time.sleep(0.05)
        assert not self._held(), (where, self._held())
        assert not hostpool._lent, (where, "staging not back in the pool")
        self.device.sinks.clear()
        stand_in = self.device.stand_in
        assert stand_in.pushes == stand_in.pops, (where, "a context left pushed")
        assert gc.isenabled() and gcpause._depth == 0, where
        assert switching._depth == 0, where
        assert sys.getswitchinterval() == pytest.approx(DEFAULT_INTERVAL), where
        assert len(pool._running) == self.running, (where, "a load still tracked")


def assert_equal(got: dict[str, torch.Tensor], paths: list[Path]) -> None:
    want: dict[str, torch.Tensor] = {}
    for path in paths:
        want.update(st_load_file(str(path)))
    assert list(got) == list(want)
    assert all(torch.equal(got[k], v) for k, v in want.items())


class Stop(Exception):
    pass


Stream = Callable[[], Iterator[tuple[str, torch.Tensor]]]


def _close(make: Stream, k: int) -> None:
    stream = make()
    for _ in range(k):
        next(stream)
    stream.close()  # type: ignore[attr-defined]


def _drop(make: Stream, k: int) -> None:
    stream = make()
    for _ in range(k):
        next(stream)
    del stream   # the last reference: closed at once


def _cycle(make: Stream, k: int) -> None:
    stream = make()
    for _ in range(k):
        next(stream)
    cycle: list[Any] = [stream]
    cycle.append(cycle)
    del stream, cycle
    gc.collect()   # closed by the collector, which must not wait for the load's threads


def _raise(make: Stream, k: int) -> None:
    with contextlib.suppress(Stop):
        for i, _ in enumerate(make()):
            if i + 1 >= k:
                raise Stop


def _break(make: Stream, k: int) -> None:
    with contextlib.closing(make()) as stream:  # type: ignore[type-var]
        for i, _ in enumerate(stream):
            if i + 1 >= k:
                break


WAYS: dict[str, Callable[[Stream, int], None]] = {
    "close": _close, "drop": _drop, "cycle": _cycle, "raise": _raise, "break": _break}


@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize("mode", ["native", "ring"])
def test_a_stream_abandoned_after_each_tensor_leaves_nothing(engines, checkpoint, monkeypatch,
                                                            mode, way):
    device = Device(mode, monkeypatch, engines)
    total = 12
    for k in range(total + 1):
        before = Before(device)
        WAYS[way](lambda: device.stream(checkpoint), k)
        before.check((mode, way, k))
        assert_equal(device.load(checkpoint), checkpoint)
        before.check((mode, way, k, "next load"))
    # Every load's staging came back to the pool and was lent again: a ring's one buffer, or
    # two for each of the 2 readers.
    assert hostpool.held() == ({"native": 4, "ring": 1}[mode],) * 2


LOADER = os.path.dirname(cuda.__file__) + os.sep


def in_loader(frame: Any) -> bool:
    """A frame of the package's loader modules, not inside a finalizer: CPython prints and
    drops what a finalizer raises, and a Ctrl-C there leaves its event undestroyed (a known
    limit, tests/test_driver.py)."""
    if not frame.f_code.co_filename.startswith(LOADER):
        return False
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return False
        frame = frame.f_back
    return True


VERBS: dict[str, Callable[[Device, list[Path]], Any]] = {
    "iter_tensors": lambda device, paths: list(device.stream(paths)),
    "load": lambda device, paths: device.load(paths),
    "load_file": lambda device, paths: device.load_file(paths[0]),
}
#: Every third place of the Ctrl-C sweeps. Every place (some 570 for a native load) passes
#: too: the six sweeps in about a minute on the 2-core VM.
STEP = 3


@pytest.mark.parametrize("verb", list(VERBS))
@pytest.mark.parametrize("mode", ["native", "ring"])
def test_a_ctrl_c_anywhere_in_a_load_leaves_nothing(engines, checkpoint, monkeypatch, mode,
                                                    verb):
    device = Device(mode, monkeypatch, engines)
    before = Before(device)
    for point in each_ctrl_c(lambda: VERBS[verb](device, checkpoint), in_loader, step=STEP):
        before.check((mode, verb, point))
        assert_equal(device.load(checkpoint), checkpoint)
        before.check((mode, verb, point, "next load"))
    assert point > 100


@pytest.mark.parametrize("k", [1, 7, 12])
@pytest.mark.parametrize("mode", ["native", "ring"])
def test_a_ctrl_c_as_an_abandoned_stream_closes_leaves_nothing(engines, checkpoint, monkeypatch,
                                                               mode, k):
    device = Device(mode, monkeypatch, engines)
    before = Before(device)
    closing = [False]   # only the close is interrupted

    def close_one() -> None:
        closing[0] = False
        stream = device.stream(checkpoint)
        for _ in range(k):
            next(stream)
        closing[0] = True
        stream.close()

    for point in each_ctrl_c(close_one, lambda frame: closing[0] and in_loader(frame)):
        closing[0] = False
        before.check((mode, k, point))
        assert_equal(device.load(checkpoint), checkpoint)
        before.check((mode, k, point, "next load"))
    assert point > 5


def _interrupt_the_close(device: Any, checkpoint: Any, before: Any, mode: str,
                         codes: set[Any]) -> int:
    """A Ctrl-C at each place in ``codes`` while a stream that yielded one tensor is closed,
    with ``before``'s checks after each; the number of places."""
    closing = [False]

    def close_one() -> None:
        closing[0] = False
        stream = device.stream(checkpoint)
        next(stream)
        closing[0] = True
        stream.close()

    for point in each_ctrl_c(close_one, lambda frame: closing[0] and frame.f_code in codes):
        closing[0] = False
        before.check((mode, point))
    return point


@pytest.mark.parametrize("mode", ["native", "ring"])
def test_a_ctrl_c_as_a_stopped_stream_asks_how_to_end_still_closes_its_files(
        engines, checkpoint, monkeypatch, mode):
    # Between telling its threads to stop and ending the load (waiting for them, closing its
    # files), the cleanup asks where it runs (sys.is_finalizing, the thread, pool.collecting):
    # a Ctrl-C as one of those returned skipped the end, and the files with chunks never read
    # (taken off the readers' queue by the stop) or never reported (the ring's) stayed open.
    from fastsafetensors.loader import stream as stream_module

    device = Device(mode, monkeypatch, engines)
    before = Before(device)
    engines.set("copy_ms", 20)   # slow copies: chunks still queued or unreported at the close
    codes = {stream_module.stream_tensors.__code__, pool.collecting.__code__}
    assert _interrupt_the_close(device, checkpoint, before, mode, codes) > 3


@pytest.mark.parametrize("mode", ["native", "ring"])
def test_a_ctrl_c_as_a_load_is_tracked_leaves_it_untracked(engines, checkpoint, monkeypatch,
                                                           mode):
    # A load is tracked (for interpreter exit) as it starts: a Ctrl-C as track() returned,
    # before the try whose cleanup untracks it, left it tracked for good.
    device = Device(mode, monkeypatch, engines)
    before = Before(device)
    code = pool.track.__code__
    for point in each_ctrl_c(lambda: list(device.stream(checkpoint)),
                             lambda frame: frame.f_code is code):
        before.check((mode, point))
    assert point > 2


@pytest.mark.parametrize("mode", ["native", "ring"])
def test_a_ctrl_c_as_a_stopped_streams_files_close_leaves_none_open(engines, checkpoint,
                                                                   monkeypatch, mode):
    # The load's end closes each file: its descriptors and its mapping are taken off it first
    # (a retry must not close numbers, or unmap addresses, given to another file since). They
    # were then closed by close_fds() and unmap(): a Ctrl-C as either function started lost
    # them for good, the retry finding nothing to close.
    from fastsafetensors.loader import posix, streamparts

    device = Device(mode, monkeypatch, engines)
    before = Before(device)
    engines.set("copy_ms", 20)   # slow copies: files still open at the close
    codes = {streamparts._close.__code__, streamparts._shut.__code__,
             posix.close_fds.__code__}
    assert _interrupt_the_close(device, checkpoint, before, mode, codes) > 5


@pytest.mark.parametrize("mode", ["native", "ring"])
def test_a_ctrl_c_as_a_loads_thread_starts_leaves_none_running(engines, checkpoint,
                                                                monkeypatch, mode):
    # A Ctrl-C as pool.start() returned, its task handed to a thread already, lost the task's
    # event: the load's end did not wait for that thread, which ran on after it (a planner
    # could open a file once the end had closed the load's files, and leave it open).
    device = Device(mode, monkeypatch, engines)
    list(device.stream(checkpoint))   # the pool's threads wait for the next load's tasks
    device.sinks.clear()
    before = Before(device)
    real = SINKS[mode].enter_thread

    def late(self: Any) -> None:   # each thread of the load still runs as the load ends
        time.sleep(0.05)
        real(self)

    monkeypatch.setattr(SINKS[mode], "enter_thread", late)
    code = pool.start.__code__
    for point in each_ctrl_c(lambda: list(device.stream(checkpoint)),
                             lambda frame: frame.f_code is code):
        assert pool.busy() == 0, (mode, point, "a thread of the ended load still runs")
        before.check((mode, point))
    assert point > 6
