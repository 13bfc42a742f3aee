"""Copies, events and stream waits through the CUDA driver (cuda_calls="driver"):
loader/driver.py, against tests/fake_libcuda.c, a stand-in for libcuda.so.1 compiled here,
whose "device" memory is host memory. tests/gpu runs the real driver."""

from __future__ import annotations

import ctypes
import gc
import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import as_bytes, misaligned_entries, write_raw
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

from fastsafetensors import CudaError
from fastsafetensors.loader import cuda, driver
from fastsafetensors.loader.stream import StreamOptions, stream_tensors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_ring_cpu import DriverSink  # noqa: E402

SOURCE = Path(__file__).with_name("fake_libcuda.c")


@pytest.fixture(scope="module")
def fake_so(tmp_path_factory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("needs a C compiler (cc or gcc) to build tests/fake_libcuda.c")
    out = tmp_path_factory.mktemp("fake_libcuda") / "libcuda.so.1"
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(out), str(SOURCE)],
                   check=True)
    return out


class Fake:
    """The loaded stand-in: its counters and knobs as attributes."""

    def __init__(self, lib: Any):
        self.lib = lib

    def _var(self, name: str) -> Any:
        kinds = {"fake_last_stream": "c_size_t", "fake_last_context": "c_size_t",
                 "fake_last_flags": "c_uint", "fake_devices": "c_int", "fake_copy_ms": "c_int",
                 "fake_sync_ms": "c_int", "fake_defer_copies": "c_int"}
        import ctypes

        return getattr(ctypes, kinds.get(name, "c_long")).in_dll(self.lib, name)

    def __getattr__(self, name: str) -> int:
        return int(self._var(f"fake_{name}").value)

    def set(self, name: str, value: int) -> None:
        self._var(f"fake_{name}").value = value


@pytest.fixture
def fake(fake_so, monkeypatch) -> Any:
    """driver.py bound to a fresh load of the stand-in."""
    import ctypes

    monkeypatch.setattr(driver, "_libs", None)
    monkeypatch.setattr(driver, "_missing", None)
    monkeypatch.setattr(driver, "_contexts", {})
    # A copy of the library per test: a fresh dlopen of the same path would share its counters.
    path = fake_so.parent / f"lib{len(list(fake_so.parent.iterdir()))}.so"
    shutil.copy(fake_so, path)
    assert driver._load(str(path)) is not None
    yield Fake(ctypes.CDLL(str(path)))
    gc.collect()   # events made with this library are destroyed by it, before it is unbound


def test_copies_land_at_the_addresses_of_their_pieces(fake):
    src = torch.arange(256, dtype=torch.uint8).repeat(4)
    a, b = torch.zeros(100, dtype=torch.uint8), torch.zeros(7, dtype=torch.uint8)
    pieces = [(a, 10, 3, 90), (b, 0, 1000, 7), (a, 0, 500, 10)]
    driver.copy_to_device(0, 7, cuda.addresses(src[5:], pieces))   # a view: its own offset
    assert torch.equal(a[10:], src[8:98]) and torch.equal(a[:10], src[505:515])
    assert torch.equal(b, src[1005:1012])
    assert fake.copies == 3 and fake.copied_bytes == 107
    assert fake.last_stream == 7 and fake.last_context == 0x1000   # device 0's context
    assert fake.pushes == fake.pops == 1   # one push for all copies of the call


def test_each_device_uses_its_own_primary_context_retained_once(fake):
    one = torch.zeros(4, dtype=torch.uint8)
    # Held by a name: addresses() gives only the source's address, and a temporary would be
    # freed (and its memory reused) before the copy reads it.
    ones = torch.ones(4, dtype=torch.uint8)
    for _ in range(3):
        driver.copy_to_device(1, 0, cuda.addresses(ones, [(one, 0, 0, 4)]))
    assert fake.last_context == 0x1001 and fake.last_stream == 0 and fake.retains == 1
    assert bool(one.all())
    with pytest.raises(CudaError, match="CUDA_ERROR_INVALID_DEVICE"):
        driver.copy_to_device(5, 0, [])


def test_events_are_recorded_waited_on_synchronized_and_destroyed(fake):
    event = driver.Event(0, 5, blocking=True)
    assert fake.last_flags == driver.DISABLE_TIMING | driver.BLOCKING_SYNC
    assert fake.records == 1 and fake.last_stream == 5 and fake.events_live == 1
    driver.Event(1, 6)   # dropped at once: destroyed at once
    assert fake.last_flags == driver.DISABLE_TIMING and fake.events_live == 1
    driver.stream_wait(1, 9, event)   # an event of one device waited for on another's stream
    assert fake.waits == 1 and fake.last_stream == 9 and fake.last_context == 0x1001
    event.synchronize()
    assert fake.syncs == 1
    del event
    gc.collect()
    assert fake.events_live == 0 and fake.pushes == fake.pops


def test_a_failed_call_raises_a_typed_picklable_error_and_pops_the_context(fake):
    fake.set("fail_copy", 2)
    dst = torch.zeros(30, dtype=torch.uint8)
    src = torch.ones(30, dtype=torch.uint8)
    with pytest.raises(CudaError) as info:
        driver.copy_to_device(0, 3, cuda.addresses(src, [(dst, 0, 0, 10), (dst, 10, 10, 10),
                                                          (dst, 20, 20, 10)]))
    error = info.value
    assert isinstance(error, RuntimeError)
    assert (error.call, error.code, error.name) == ("cuMemcpyHtoDAsync", 700,
                                                     "CUDA_ERROR_ILLEGAL_ADDRESS")
    assert "cuda_calls='torch'" in str(error)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is CudaError and str(again) == str(error)
    # The first copy ran, the third was not tried, and the context was popped all the same.
    assert dst[:10].tolist() == [1] * 10 and dst[10:].tolist() == [0] * 20
    assert fake.pushes == fake.pops == 1


def _progress_during(call: Any) -> int:
    """How far a busy Python thread got while this thread made ``call``."""
    count = [0]
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            count[0] += 1
            time.sleep(0)   # lets this thread have the GIL back whenever it wants it

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)   # no forced switch: the GIL moves only where it is released
    thread = threading.Thread(target=busy)
    try:
        thread.start()
        while count[0] == 0:
            time.sleep(0.001)
        before = count[0]
        call()
        return count[0] - before
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)


def test_queuing_keeps_the_gil_and_a_host_wait_releases_it(fake):
    # What the driver calls are for: a reader that queues a copy does not give the GIL away
    # (and wait to get it back); one that waits for the GPU lets the other threads run.
    if not getattr(sys, "_is_gil_enabled", lambda: True)():
        pytest.skip("free-threaded Python: there is no GIL to keep or release")
    dst, src = torch.zeros(8, dtype=torch.uint8), torch.ones(8, dtype=torch.uint8)
    fake.set("copy_ms", 200)
    assert _progress_during(lambda: driver.copy_to_device(
        0, 0, cuda.addresses(src, [(dst, 0, 0, 8)]))) == 0
    fake.set("copy_ms", 0)
    event = driver.Event(0, 0)
    fake.set("sync_ms", 200)
    assert _progress_during(event.synchronize) > 0


def test_a_missing_driver_library_is_said_once_and_torch_calls_are_used(monkeypatch, caplog):
    monkeypatch.setattr(driver, "_libs", None)
    monkeypatch.setattr(driver, "_missing", None)
    monkeypatch.setattr(cuda, "_refused", set())
    assert driver._load("libcuda-that-is-not-here.so.1") is None
    assert "libcuda-that-is-not-here" in (driver.available() or "")
    with pytest.raises(CudaError, match="cannot be used"):
        driver.copy_to_device(0, 0, [])
    with caplog.at_level("WARNING", logger="fastsafetensors.loader.cuda"):
        assert cuda._calls("driver") is None and cuda._calls("driver") is None
    assert [r.getMessage() for r in caplog.records if "cuda_calls" in r.getMessage()] == [
        f'cuda_calls="driver": the CUDA driver library cannot be used ({driver.available()}); '
        "queuing copies through torch"]


class _Stream:
    """What the sink reads of a torch.cuda.Stream in driver mode: its handle."""

    def __init__(self, handle: int):
        self.cuda_stream = handle


def test_the_cuda_sinks_driver_branches(fake, monkeypatch):
    # TorchCudaSink itself, its torch parts (streams, the device) stood in for on the CPU:
    # every event is the driver's, on the right stream and device, and a chunk whose pieces all
    # go in runs (through torch) makes no driver call.
    import contextlib

    sink = object.__new__(cuda.TorchCudaSink)
    sink.device, sink.index, sink.calls, sink.blocking = torch.device("cuda", 1), 1, driver, True
    sink.consumer, sink._waited, sink._waited_on, sink._current = _Stream(3), {}, None, None
    # The current stream through torch.cuda.current_stream (stood in for below), not by ids,
    # which a CUDA build of torch would ask the real device 1 for.
    monkeypatch.setattr(cuda, "_current_stream_ids", None)
    allocated = sink.alloc_event()
    assert isinstance(allocated, driver.Event) and fake.last_stream == 3
    assert fake.last_flags == driver.DISABLE_TIMING   # the host never waits on these
    sink.stream_wait(_Stream(6), allocated)
    assert fake.waits == 1 and fake.last_stream == 6 and fake.last_context == 0x1001

    monkeypatch.setattr(cuda, "SMALL_PIECE", 8)
    src = torch.arange(64, dtype=torch.uint8)
    dst = torch.zeros(40, dtype=torch.uint8)
    sink.copy(_Stream(7), src[4:], [(dst, 0, 0, 16), (dst, 16, 20, 24)])
    assert torch.equal(dst, torch.cat([src[4:20], src[24:48]]))
    assert fake.copies == 2 and fake.last_stream == 7
    runs: list[Any] = []
    monkeypatch.setattr(cuda, "copy_runs", lambda src, r, device: runs.extend(r))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    pushes = fake.pushes
    small = [(dst, i, i, 2) for i in range(0, 8, 2)]   # four small pieces: one run
    sink.copy(_Stream(7), src, small)
    assert runs == [small] and fake.pushes == pushes and fake.copies == 2

    staged = sink.record(_Stream(7))
    assert fake.last_flags == driver.DISABLE_TIMING | driver.BLOCKING_SYNC
    sink.host_wait(staged)
    assert fake.syncs == 1
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: sink.consumer)
    sink.consumer_wait([staged, allocated])
    sink.consumer_wait([staged])   # waited for already on this stream
    assert fake.waits == 3 and fake.last_stream == 3


def two_files(folder: Path, seed: int) -> tuple[Path, Path]:
    """A file of tensors of several dtypes and sizes (an empty one too) that span chunks of the
    engine's small test staging, and one of misaligned tensors (tests/builders.py)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {f"w{i}": torch.randn(n, 17, generator=g).to(dtype) for i, (n, dtype) in
               enumerate([(1, torch.float32), (900, torch.bfloat16), (3, torch.float16),
                          (2500, torch.float32), (0, torch.float32), (70, torch.int8)])}
    first = folder / "a.safetensors"
    save_file(tensors, str(first))
    entries, data, _ = misaligned_entries()
    return first, write_raw(folder / "b.safetensors", entries, data)


class DriverHostSink(DriverSink):
    """The CUDA sink's driver path with host memory as the device (benchmarks/bench_ring_cpu.py),
    its events counted."""

    def __init__(self) -> None:
        self.events: list[Any] = []    # recorded on the copy streams
        self.allocated = 0             # events recorded on the consumer's stream

    def alloc_event(self) -> Any:
        self.allocated += 1
        return super().alloc_event()

    def record(self, stream: int) -> Any:
        event = super().record(stream)
        self.events.append(event)
        return event


@pytest.mark.parametrize("io", ["buffered", "direct"])
@pytest.mark.parametrize("small_piece", [cuda.SMALL_PIECE, 64])
def test_the_engine_through_driver_calls_equals_safetensors(fake, tmp_path, monkeypatch, io,
                                                            small_piece):
    # Real files through the engine: chunk offsets, O_DIRECT's skew and misaligned tensors
    # become the addresses handed to the driver. With small_piece=64 almost every piece is
    # copied on its own by the driver; with the default, runs of small ones go through torch.
    monkeypatch.setattr(cuda, "SMALL_PIECE", small_piece)
    first, second = two_files(tmp_path, seed=3)
    sink = DriverHostSink()
    options = StreamOptions(threads=3, staging_bytes=6 * 16384, io=io)
    got = dict(stream_tensors([(str(first), None, None), (str(second), None, None)], sink,
                              options))
    want = {**st_load_file(str(first)), **st_load_file(str(second))}
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(as_bytes(got[name]), as_bytes(tensor)), name
    assert fake.copies > 0 and fake.records == len(sink.events) + sink.allocated
    assert fake.waits > 0 and fake.pushes == fake.pops
    if small_piece == 64:
        assert fake.copies > len(want)   # tensors split across chunks, copied by the driver


class _Interrupted:
    """Raise KeyboardInterrupt at the ``at``-th point where CPython could run a Ctrl-C's
    handler in loader/driver.py: as one of the driver's calls returns, or as a function of the
    module starts."""

    def __init__(self, at: int):
        self.at, self.points = at, 0
        self.held, self.released = driver._libs

    def _point(self) -> None:
        self.points += 1
        if self.points == self.at:
            raise KeyboardInterrupt

    def wrap(self, lib: Any) -> Any:
        interrupted = self

        class Calls:
            def __getattr__(self, name: str) -> Any:
                function = getattr(lib, name)

                def call(*args: Any) -> Any:
                    result = function(*args)
                    interrupted._point()
                    return result

                return call

        return Calls()

    def profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename == driver.__file__:
            self._point()


# A finalizer's interrupt is printed and dropped by Python (the "destroy" case).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("call", ["copy", "wait", "event", "synchronize", "destroy"])
def test_a_ctrl_c_anywhere_in_a_driver_call_leaves_no_context_pushed(fake, monkeypatch, call):
    dst = torch.zeros(8, dtype=torch.uint8)
    src = torch.ones(8, dtype=torch.uint8)
    event = driver.Event(0, 1)
    made: list[driver.Event] = []
    calls = {
        "copy": lambda: driver.copy_to_device(
            0, 1, cuda.addresses(src, [(dst, 0, 0, 4), (dst, 4, 4, 4)])),
        "wait": lambda: driver.stream_wait(0, 1, event),
        "event": lambda: made.append(driver.Event(0, 1)),
        "synchronize": event.synchronize,
        "destroy": lambda: driver.Event(0, 1).__del__(),
    }
    at = 0
    while True:
        at += 1
        interrupted = _Interrupted(at)
        monkeypatch.setattr(driver, "_libs", (interrupted.wrap(interrupted.held),
                                              interrupted.wrap(interrupted.released)))
        sys.setprofile(interrupted.profile)
        try:
            calls[call]()
        except KeyboardInterrupt:
            pass
        finally:
            sys.setprofile(None)
            monkeypatch.setattr(driver, "_libs", (interrupted.held, interrupted.released))
        made.clear()
        assert fake.pushes == fake.pops, f"a context left pushed at point {at}"
        if call != "destroy":   # a finalizer interrupted may leave its event (not its context)
            assert fake.events_live == 1, f"an event left alive at point {at}"
        if interrupted.points < at:   # not interrupted: every point was tried
            break
    assert at > 3


def test_a_failed_push_interrupted_as_it_returns_pops_nothing_of_the_callers(fake, monkeypatch):
    theirs = ctypes.c_void_p(0x5000)
    held = driver._libs[0]
    driver._context(0)   # retained now: the push is the first call below
    assert held.cuCtxPushCurrent_v2(theirs) == 0   # the caller's context, current
    fake.set("fail_push", fake.push_calls + 1)
    interrupted = _Interrupted(1)
    monkeypatch.setattr(driver, "_libs", (interrupted.wrap(held), driver._libs[1]))
    with pytest.raises(KeyboardInterrupt):
        driver.stream_wait(0, 1, driver.Event.adopt(0, ctypes.c_void_p()))
    monkeypatch.setattr(driver, "_libs", (held, driver._libs[1]))
    popped = ctypes.c_void_p()
    assert held.cuCtxPopCurrent_v2(ctypes.byref(popped)) == 0 and popped.value == 0x5000
    assert held.cuCtxPopCurrent_v2(ctypes.byref(popped)) != 0   # nothing under it
