"""A staged chunk's wait, read, copies and event in one C call (cuda_calls="native"):
loader/native.py and loader/readcopy.c, built here with the system's C compiler, against
tests/fake_libcuda.c (test_driver.py's stand-in for libcuda.so.1, whose "device" memory is host
memory). tests/gpu runs the real driver."""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import as_bytes, require_o_direct
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

# With test_driver's fixtures, found by pytest under these names (F811 where they are used).
from test_driver import (  # noqa: F401
    DriverHostSink,
    _progress_during,
    _Stream,
    fake,
    fake_so,
    two_files,
)

from fastsafetensors import CudaError, ReadError
from fastsafetensors.loader import cuda, driver, native
from fastsafetensors.loader.posix import STATS
from fastsafetensors.loader.stream import PHASES, StreamOptions, stream_tensors


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def bound(module: Any, stand_in: Any, folder: Path, monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[Any]:
    """``module`` (native.py, ring.py) bound to the stand-in driver, its C file built into
    ``folder``, for the length of a test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    module.forget()
    assert module.available() is None
    yield stand_in
    module.forget()


@pytest.fixture
def calls(fake: Any, cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:  # noqa: F811
    yield from bound(native, fake, cache, monkeypatch)


def staging(nbytes: int) -> torch.Tensor:
    return torch.zeros(nbytes, dtype=torch.uint8)


def test_one_call_reads_and_copies_each_piece_then_records(calls, tmp_path):
    data = bytes(range(256)) * 40
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    buffer = staging(8192)
    a, b = torch.zeros(100, dtype=torch.uint8), torch.zeros(7, dtype=torch.uint8)
    allocated = driver.Event(0, 0)
    staged = driver.Event(0, 7)
    syncs, waits = calls.syncs, calls.waits
    fd = os.open(path, os.O_RDONLY)
    try:
        got, event, spent = native.read_copy(
            0, staged, fd, 1000, 5000, 5000, buffer.data_ptr(), 7, allocated,
            [(a.data_ptr() + 10, 3, 90), (b.data_ptr(), 4000, 7), (a.data_ptr(), 500, 10)],
            blocking=True, path=str(path))
    finally:
        os.close(fd)
    want = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    assert got == 5000 and torch.equal(buffer[:5000], want[1000:6000])
    assert len(spent) == 3 and all(0 <= s < 5 for s in spent) and spent[1] > 0
    assert torch.equal(a[10:], want[1003:1093]) and torch.equal(a[:10], want[1500:1510])
    assert torch.equal(b, want[5000:5007])
    # The staging's last copies waited for, the allocation waited for on the copy stream, one
    # copy per piece, and an event of this driver recorded on that stream after them.
    assert calls.syncs == syncs + 1 and calls.waits == waits + 1
    assert calls.copies == 3 and calls.copied_bytes == 107 and calls.last_stream == 7
    assert isinstance(event, driver.Event)
    assert calls.last_flags == driver.DISABLE_TIMING | driver.BLOCKING_SYNC
    assert calls.pushes == calls.pops and calls.last_context == 0x1000
    live = calls.events_live
    del event
    assert calls.events_live == live - 1   # destroyed with its object


def test_a_short_read_queues_nothing(calls, tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * 100)
    buffer = staging(4096)
    dst = torch.zeros(50, dtype=torch.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        got, event, _ = native.read_copy(0, None, fd, 0, 4096, 150, buffer.data_ptr(), 7,
                                         None, [(dst.data_ptr(), 100, 50)], blocking=False,
                                         path=str(path))
        assert (got, event) == (100, None) and calls.copies == 0
        # Up to the end of the file is enough when that is all that is needed (O_DIRECT
        # reads widened to whole blocks past the end).
        got, event, _ = native.read_copy(0, None, fd, 0, 4096, 100, buffer.data_ptr(), 7,
                                         None, [(dst.data_ptr(), 50, 50)], blocking=False,
                                         path=str(path))
        assert got == 100 and event is not None and bool((dst == ord("x")).all())
    finally:
        os.close(fd)
    assert calls.pushes == calls.pops


def test_errors_are_typed_and_the_context_popped(calls, tmp_path):
    buffer = staging(4096)
    dst = torch.zeros(30, dtype=torch.uint8)
    fd = os.open(tmp_path, os.O_RDONLY)   # a folder: read() fails with EISDIR
    try:
        with pytest.raises(OSError) as info:
            native.read_copy(0, None, fd, 0, 10, 10, buffer.data_ptr(), 7, None, [],
                             blocking=False, path=str(tmp_path))
    finally:
        os.close(fd)
    assert info.value.errno == 21 and info.value.filename == str(tmp_path)
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(64))
    calls.set("fail_copy", 2)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(CudaError) as error:
            native.read_copy(0, None, fd, 0, 64, 64, buffer.data_ptr(), 7, None,
                             [(dst.data_ptr() + i, i, 10) for i in (0, 10, 20)],
                             blocking=False, path=str(path))
    finally:
        os.close(fd)
    assert (error.value.call, error.value.name) == ("cuMemcpyHtoDAsync",
                                                     "CUDA_ERROR_ILLEGAL_ADDRESS")
    assert type(pickle.loads(pickle.dumps(error.value))) is CudaError
    assert calls.copies == 1 and calls.pushes == calls.pops


def test_the_call_releases_the_gil(calls, tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(4096))
    buffer = staging(4096)
    staged = driver.Event(0, 7)
    calls.set("sync_ms", 200)   # the wait for the staging's copies, inside the call
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _progress_during(lambda: native.read_copy(
            0, staged, fd, 0, 4096, 4096, buffer.data_ptr(), 7, None, [], blocking=False,
            path=str(path))) > 0
    finally:
        os.close(fd)


class NativeHostSink(DriverHostSink):
    """DriverHostSink with the native chunk call, as TorchCudaSink has it with
    cuda_calls="native"."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def read_copy(self, stream: int, staged: Any, fd: int, offset: int, length: int,
                  needed: int, buffer: Any, allocated: Any, pieces: list[Any],
                  path: str) -> tuple[int, Any, Any]:
        self.calls += 1
        got, event, spent = native.read_copy(
            0, staged, fd, offset, length, needed, buffer.data_ptr(), stream, allocated,
            [(dst.data_ptr() + at, src, n) for dst, at, src, n in pieces], blocking=False,
            path=path)
        if event is not None:
            self.events.append(event)
        return got, event, spent


def assert_same(got: dict[str, torch.Tensor], paths: list[Path]) -> dict[str, torch.Tensor]:
    """``got`` holds the tensors of ``paths`` in their order, each equal to safetensors' bit
    for bit; returns safetensors' tensors."""
    want: dict[str, torch.Tensor] = {}
    for path in paths:
        want.update(st_load_file(str(path)))
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(as_bytes(got[name]), as_bytes(tensor)), name
    return want


@pytest.mark.parametrize("io", ["buffered", "direct"])
def test_the_engine_through_native_calls_equals_safetensors(calls, tmp_path, io):
    # Real files through the engine: chunk offsets, O_DIRECT's widening and skew and misaligned
    # tensors become the reads and addresses of the C call; every byte counted once.
    first, second = two_files(tmp_path, seed=5)
    if io == "direct":
        require_o_direct(first)
    sink = NativeHostSink()
    options = StreamOptions(threads=3, staging_bytes=6 * 16384, io=io)
    STATS.reset()
    PHASES.reset()
    got = dict(stream_tensors([(str(first), None, None), (str(second), None, None)], sink,
                              options))
    # The call's parts are counted under the phases the Python readers use.
    phases = PHASES.snapshot()
    assert phases["reader: read"] > 0 and "reader: around its native call" in phases
    assert "reader: queue copies" in phases and "reader: wait for its staging's copies" in phases
    want = assert_same(got, [first, second])
    # Each staged chunk in one call with an event of its own (and each reader's last wait,
    # on an event recorded as it ends), each piece one copy of the driver.
    chunks = sink.calls
    assert chunks > 3 and len(sink.events) == chunks + options.threads
    assert calls.copies >= len([t for t in want.values() if t.numel()])
    assert calls.records == len(sink.events) + sink.allocated and calls.pushes == calls.pops
    wanted = sum(t.numel() * t.element_size() for t in want.values())
    if io == "buffered":
        assert STATS.bytes_read == wanted and STATS.direct_reads == 0
    else:
        assert STATS.bytes_read >= wanted and STATS.direct_reads == chunks


def test_a_file_cut_short_while_loading_fails_the_load_with_a_read_error(calls, tmp_path,
                                                                          monkeypatch):
    from fastsafetensors.loader import stream

    tensors = {"w": torch.arange(4096, dtype=torch.float32)}
    path = tmp_path / "a.safetensors"
    save_file(tensors, str(path))
    plan = stream._chunk_read

    def cut_first(chunk: Any, policy: Any) -> Any:
        # After the header was read and checked: the file shrinks under the load.
        os.truncate(path, 1000)
        return plan(chunk, policy)

    monkeypatch.setattr(stream, "_chunk_read", cut_first)
    sink = NativeHostSink()
    with pytest.raises(ReadError, match="a.safetensors"):
        dict(stream_tensors([(str(path), None, None)], sink,
                            StreamOptions(threads=2, staging_bytes=4 * 16384, io="buffered")))
    assert sink.calls >= 1 and calls.copies == 0   # nothing of a short read copied


def test_a_cuda_error_in_the_middle_of_a_load_fails_it(calls, tmp_path):
    # The third copy of the load fails: the error reaches the caller, every reader ends (no
    # hang), and every context pushed was popped.
    path = tmp_path / "a.safetensors"
    save_file({f"w{i}": torch.full((8192,), float(i)) for i in range(16)}, str(path))
    calls.set("fail_copy", 3)
    with pytest.raises(CudaError, match="cuMemcpyHtoDAsync"):
        dict(stream_tensors([(str(path), None, None)], NativeHostSink(),
                            StreamOptions(threads=2, staging_bytes=4 * 16384, io="buffered")))
    assert calls.pushes == calls.pops


def sink_of_device_1(monkeypatch: pytest.MonkeyPatch, blocking: bool, **modules: Any
                     ) -> cuda.TorchCudaSink:
    """TorchCudaSink itself, its torch parts stood in for on the CPU, with the driver's calls
    and ``modules`` (native=native.py, rings=ring.py)."""
    monkeypatch.setattr(cuda.torch.cuda, "current_stream", lambda device=None: _Stream(3))
    sink = cuda.TorchCudaSink.__new__(cuda.TorchCudaSink)
    sink.device, sink.index, sink.calls = torch.device("cuda", 1), 1, driver
    sink.blocking = blocking
    for name, module in modules.items():
        setattr(sink, name, module)
    return sink


def test_the_cuda_sink_makes_the_native_call(calls, monkeypatch):
    # With native=True: pieces become device addresses, the staging buffer its address, the
    # stream its handle.
    sink = sink_of_device_1(monkeypatch, False, native=native)
    made: list[Any] = []
    monkeypatch.setattr(native, "read_copy",
                        lambda *a, **k: made.append((a, k)) or (5, None, (0.0, 0.0, 0.0)))
    buffer, dst = staging(64), torch.zeros(8, dtype=torch.uint8)
    assert sink._read_copy(_Stream(6), None, 9, 0, 64, 64, buffer, None, [(dst, 2, 4, 6)],
                           "p") == (5, None, (0.0, 0.0, 0.0))
    ((args, kwargs),) = made
    assert args == (1, None, 9, 0, 64, 64, buffer.data_ptr(), 6, None,
                    [(dst.data_ptr() + 2, 4, 6)])
    assert kwargs == {"blocking": False, "path": "p"}


@pytest.mark.parametrize("mode", ["native", "ring"])
def test_without_a_compiler_the_c_calls_fall_back_said_once(
        fake, tmp_path, monkeypatch, caplog, mode):  # noqa: F811
    from fastsafetensors.loader import ring

    module, fallback = {"native": (native, "through the CUDA driver's calls one by one"),
                        "ring": (ring, "from Python reader threads")}[mode]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("PATH", str(tmp_path))   # no cc, no gcc
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(cuda, "_refused", set())
    module.forget()
    try:
        why = module.available()
        assert why is not None and "no C compiler" in why and "install" in why
        with pytest.raises(CudaError, match="cannot be made|cannot be used"):
            if mode == "native":
                native.read_copy(0, None, 0, 0, 0, 0, 0, 0, None, [], blocking=False,
                                 path="p")
            else:
                ring.Ring(0, readers=1, windows=2, stride=4096, capacity=2).open(0, 0)
        with caplog.at_level("WARNING", logger="fastsafetensors.loader.cuda"):
            assert cuda._calls(mode) is None and cuda._calls(mode) is None
        said = [r.getMessage() for r in caplog.records
                if f'cuda_calls="{mode}"' in r.getMessage()]
        assert len(said) == 1 and fallback in said[0]
    finally:
        module.forget()


def test_a_compiler_error_is_said(tmp_path, monkeypatch):
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\necho 'readcopy.c:1: error: no' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    with pytest.raises(RuntimeError, match="could not build .*error: no"):
        native.build(tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())   # no half-built file left


def test_the_build_is_cached_per_source(tmp_path, monkeypatch):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("needs a C compiler (cc or gcc)")
    first = native.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    # Another source text (a new release): another file, the first one left as it was.
    changed = tmp_path / "readcopy.c"
    changed.write_text(native.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "SOURCE", changed)
    second = native.build(tmp_path)
    assert second != first and second.exists() and first.stat().st_mtime_ns == stamp


def test_a_cached_file_others_may_write_is_not_loaded(tmp_path):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("needs a C compiler (cc or gcc)")
    built = native.build(tmp_path)
    assert built.stat().st_mode & 0o022 == 0
    built.chmod(0o777)
    with pytest.raises(RuntimeError, match="others may write it"):
        native.build(tmp_path)


def test_the_ring_sketch_equals_safetensors(calls, tmp_path):
    # benchmarks/sketch_ring.c, a reference row of bench_load.py: its readers, its ring of
    # windows reused in order, its copier; every tensor equal, across window and file edges.
    # Copies run only once an event after them is waited for, so a window read into while its
    # copies were still queued would show as a differing tensor.
    from sketch_ring import RingSketch

    g = torch.Generator().manual_seed(9)
    paths = []
    for shard in range(2):
        path = tmp_path / f"s{shard}.safetensors"
        save_file({f"s{shard}.w{i}": torch.randn(n, generator=g).to(dtype) for i, (n, dtype)
                   in enumerate([(3000, torch.float32), (1, torch.bfloat16),
                                 (20000, torch.float16), (777, torch.float32)])}, str(path))
        paths.append(str(path))
    want = {**st_load_file(paths[0]), **st_load_file(paths[1])}
    calls.set("defer_copies", 1)
    for readers, windows in ((3, 4), (1, 1), (5, 2)):
        got = RingSketch(paths, device="cpu", readers=readers, window=8192,
                         windows=windows).load()
        assert list(got) == list(want), (readers, windows)
        assert all(torch.equal(got[k], v) for k, v in want.items()), (readers, windows)
    assert calls.pushes == calls.pops and calls.events_live == 0
    # A file cut short after the plan was made: the read error reaches the caller.
    sketch = RingSketch(paths, device="cpu", readers=2, window=8192, windows=4)
    os.truncate(paths[1], 4000)
    with pytest.raises(OSError):
        sketch.load()
    assert calls.pushes == calls.pops and calls.events_live == 0
