"""The streaming engine (fastsafetensors.loader.stream) on a fake asynchronous device."""

from __future__ import annotations

import os
import threading
import time
import types
from typing import Any

import pytest
import torch
from fake_device import FakeSink, as_bytes, emulated_cuda_sink, record_lookups, stream_ids
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

from fastsafetensors.errors import HeaderError, ReadError, TensorNotFoundError
from fastsafetensors.loader import streamparts
from fastsafetensors.loader import threads as pool
from fastsafetensors.loader.posix import DIRECT_ALIGN, STATS
from fastsafetensors.loader.stream import StreamOptions, stream_tensors


def _mixed(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(12):
        rows = [1, 7, 300, 2048][i % 4]
        out[f"layer.{i}.weight"] = torch.randn(rows, 33, generator=g).to(
            [torch.float32, torch.bfloat16, torch.float16][i % 3])
    out["empty"] = torch.zeros(0, 5)
    out["scalar"] = torch.tensor(3.5)
    out["flags"] = torch.rand(999, generator=g) > 0.5
    out["ids"] = torch.randint(-2**40, 2**40, (513,), generator=g)
    out["f8"] = torch.randn(77, 3, generator=g).to(torch.float8_e4m3fn)
    return out


@pytest.fixture
def checkpoint(tmp_path):
    paths = []
    for shard in range(3):
        path = tmp_path / f"model-{shard}.safetensors"
        save_file({f"s{shard}.{k}": v for k, v in _mixed(shard).items()}, str(path))
        paths.append(str(path))
    return paths


def _run(paths, sink, *, names=None, **opts):
    options = StreamOptions(threads=opts.pop("threads", 3), staging_bytes=opts.pop(
        "staging_bytes", 6 * 16384), **opts)
    sources = [(p, None, names) for p in paths]
    out = {}
    for name, tensor in stream_tensors(sources, sink, options):
        out[name] = tensor
        sink.consumed(tensor.numel() * tensor.element_size() if tensor.dtype != torch.bool
                      else tensor.numel())
    return out


def _engine_threads_running():
    """Threads still working for a load (the pool keeps finished ones, idle, for the next)."""
    return [t.name for t in threading.enumerate()
            if t.name.startswith("fastsafetensors-") and not t.name.startswith(pool.IDLE_NAME)]


def _expected(paths):
    out = {}
    for p in paths:
        out.update(st_load_file(p))
    return out


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("io", ["buffered", "direct", "auto"])
def test_stream_equals_safetensors_bit_for_bit(checkpoint, io):
    sink = FakeSink(delay=0.003)
    # 16 KiB staging buffers: big tensors span several chunks, small ones share chunks.
    got = _run(checkpoint, sink, io=io)
    sink.close()
    want = _expected(checkpoint)
    assert list(got) == [n for p in checkpoint for n in _order(p)]
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(as_bytes(got[name]), as_bytes(tensor)), name
    assert sink.copies > sink.allocations  # tensors really were split across chunks


def _order(path):
    from fastsafetensors.format import read_header

    return list(read_header(path).tensors)


def test_direct_io_reads_with_o_direct(checkpoint):
    STATS.reset()
    _run(checkpoint, FakeSink(delay=0), io="direct")
    assert STATS.snapshot()[2] > 0


def test_budget_bounds_memory_held_before_yield(tmp_path):
    tensors = {f"w{i}": torch.full((64, 256), float(i)) for i in range(20)}  # 64 KiB each
    path = tmp_path / "big.safetensors"
    save_file(tensors, str(path))
    sink = FakeSink(delay=0.001)
    budget = 3 * 65536
    got = _run([str(path)], sink, max_device_bytes=budget)
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    # Allocated-but-unconsumed bytes stay within the budget, plus the one tensor in hand-off.
    assert sink.peak_outstanding <= budget + 65536


def test_budget_counts_the_last_tensor_until_the_next_is_asked_for(tmp_path):
    # The consumer lets go of a tensor when its loop variable takes the next one. Released at
    # the yield instead, the next tensor was allocated while the consumer held two: one more
    # than the budget and the tensor in its hands.
    tensors = {f"w{i}": torch.full((64, 256), float(i)) for i in range(40)}  # 64 KiB each
    path = tmp_path / "big.safetensors"
    save_file(tensors, str(path))
    sink = FakeSink(delay=0)
    budget = 2 * 65536
    options = StreamOptions(threads=3, staging_bytes=6 * 16384, max_device_bytes=budget)
    held = 0
    for name, tensor in stream_tensors([(str(path), None, None)], sink, options):
        sink.consumed(held)
        assert torch.equal(tensor, tensors[name])
        time.sleep(0.002)   # the planner has time to allocate past the budget, if it may
        held = tensor.numel() * 4
    assert sink.peak_outstanding <= budget + 65536


def _within(seconds: float, run: Any) -> Any:
    """``run()`` on a thread, failing (not hanging this test) if it takes over ``seconds``: a
    planner waiting for budget that tensors it has not handed over would free waits forever.
    (A deadlocked load is left behind, and later tests may fail from it: the first failure is
    the one to read.) What ``run`` raises is raised here."""
    out: list[Any] = []
    failed: list[BaseException] = []

    def target() -> None:
        try:
            out.append(run())
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            failed.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: deadlocked?"
    if failed:
        raise failed[0]
    return out[0]


def test_budget_counts_what_the_allocator_hands_out(tmp_path):
    # 4-byte scales (FP8 checkpoints have thousands) take 512 bytes each on the device.
    tensors = {f"scale{i}": torch.tensor([float(i)]) for i in range(2000)}
    path = tmp_path / "scales.safetensors"
    save_file(tensors, str(path))
    sink = FakeSink(delay=0)
    budget = 64 << 10
    got = _within(30, lambda: _run([str(path)], sink, max_device_bytes=budget))
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    assert sink.peak_outstanding <= budget


def test_unbounded_allocates_ahead(tmp_path):
    tensors = {f"w{i}": torch.full((64, 256), float(i)) for i in range(20)}
    path = tmp_path / "big.safetensors"
    save_file(tensors, str(path))
    sink = FakeSink(delay=0.001)
    _run([str(path)], sink)
    assert sink.allocations == 20


def test_subset_reads_only_wanted_tensors(checkpoint):
    STATS.reset()
    sink = FakeSink(delay=0)
    got = _run(checkpoint[:1], sink, names=["s0.scalar", "s0.f8"])
    assert set(got) == {"s0.scalar", "s0.f8"}
    want = st_load_file(checkpoint[0])
    assert torch.equal(as_bytes(got["s0.f8"]), as_bytes(want["s0.f8"]))
    nbytes = sum(as_bytes(want[n]).numel() for n in ("s0.scalar", "s0.f8"))
    # One coalesced range: the wanted bytes plus at most the small tensors in between.
    assert STATS.snapshot()[0] < os.path.getsize(checkpoint[0])
    assert STATS.snapshot()[0] >= nbytes


def test_unknown_name_raises_and_cleans_up(checkpoint):
    before = _fd_count()
    with pytest.raises(TensorNotFoundError):
        _run(checkpoint, FakeSink(delay=0), names=["nope"])
    assert _fd_count() == before
    assert _engine_threads_running() == []


def test_truncated_file_raises_read_error_without_partial_result(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(4096), "b": torch.ones(4096)}, str(path))
    from fastsafetensors.format import read_header

    header = read_header(path)  # validated while whole; the file then shrinks under us
    os.truncate(path, os.path.getsize(path) - 100)
    before = _fd_count()
    options = StreamOptions(threads=2, staging_bytes=4 * 8192, io="buffered")
    # Found when the file is opened again for its data,
    with pytest.raises(HeaderError, match="changed after its header was read"):
        list(stream_tensors([(str(path), header, None)], FakeSink(delay=0), options))
    # or, shrinking after that open, by the reads.
    monkeypatch.setattr(streamparts, "header_of", lambda fd, path, header: header)
    with pytest.raises(ReadError):
        list(stream_tensors([(str(path), header, None)], FakeSink(delay=0), options))
    assert _fd_count() == before


def test_early_close_stops_threads_and_closes_files(checkpoint):
    before = _fd_count()
    gen = stream_tensors([(p, None, None) for p in checkpoint], FakeSink(delay=0.002),
                         StreamOptions(threads=3, staging_bytes=6 * 8192))
    next(gen)
    gen.close()
    assert _fd_count() == before
    assert _engine_threads_running() == []


def test_misaligned_tensors_stream_correctly(tmp_path):
    import json
    import struct

    header = {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "b": {"dtype": "F32", "shape": [5], "data_offsets": [3, 23]},
              "c": {"dtype": "F64", "shape": [2], "data_offsets": [23, 39]}}
    raw = json.dumps(header).encode()
    a = bytes([1, 2, 3])
    b = struct.pack("<5f", 1.5, -2.0, 3.25, 0.0, 7.0)
    c = struct.pack("<2d", 1e300, -5.5)
    path = tmp_path / "mis.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + a + b + c)
    got = _run([str(path)], FakeSink(delay=0))
    assert got["b"].tolist() == [1.5, -2.0, 3.25, 0.0, 7.0]
    assert got["c"].tolist() == [1e300, -5.5]
    assert all(t.data_ptr() % t.element_size() == 0 for t in got.values())


def test_many_small_tensors_use_few_reads(tmp_path):
    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(20_000)}
    path = tmp_path / "many.safetensors"
    save_file(tensors, str(path))
    STATS.reset()
    got = _run([str(path)], FakeSink(delay=0), staging_bytes=2 * 3 * (1 << 20))
    assert len(got) == 20_000
    assert all(torch.equal(got[f"t{i}"], tensors[f"t{i}"]) for i in range(0, 20_000, 997))
    # 320 KB of data: a handful of chunk reads, not one read per tensor.
    assert STATS.snapshot()[1] <= 4


def test_copies_are_ordered_after_the_allocation_of_their_tensors(tmp_path):
    # On CUDA the memory of a new tensor may be the memory of one the consumer just freed, still
    # read by its kernels; the copy stream must wait for the consumer's stream first. FakeSink
    # raises on a copy into a tensor allocated after the last alloc_event its stream waited for.
    tensors = {f"w{i}": torch.full((64, 256), float(i)) for i in range(20)}
    path = tmp_path / "big.safetensors"
    save_file(tensors, str(path))
    sink = FakeSink(delay=0.001)
    got = _run([str(path)], sink, max_device_bytes=2 * 65536)
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    assert max(sink.ordered.values()) == sink.allocations


class _NoPinnedMemory(FakeSink):
    def staging(self, nbytes):
        raise RuntimeError("CUDA error: out of memory (pinned)")


def test_worker_that_cannot_start_raises_instead_of_hanging(checkpoint):
    outcome: list[BaseException] = []

    def consume() -> None:
        try:
            _run(checkpoint, _NoPinnedMemory(delay=0))
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "the consumer hangs when no worker could start"
    assert isinstance(outcome[0], RuntimeError) and "pinned" in str(outcome[0])
    assert _engine_threads_running() == []


def test_gds_stopped_early_waits_for_reads_in_flight(tmp_path):
    # cuFile reads are DMA into the tensors' memory: closing the handle or freeing the memory
    # while one is in flight corrupts whatever gets that memory next.
    import types

    from fastsafetensors.loader.gds import stream_gds

    path = tmp_path / "m.safetensors"
    save_file({f"t{i}": torch.full((8,), float(i)) for i in range(6)}, str(path))
    pending: list[Any] = []

    class Future:
        def __init__(self, nbytes: int):
            self.nbytes, self.waited = nbytes, False
            pending.append(self)

        def get(self) -> int:
            assert not self.waited, "kvikio futures can be waited for once"
            self.waited = True
            return self.nbytes

    class CuFile:
        def __init__(self, path, mode):
            self.closed = False

        def pread(self, buf, size, offset):
            return Future(size)

        def close(self):
            assert all(f.waited for f in pending), "handle closed with reads in flight"
            self.closed = True

    gen = stream_gds([(str(path), None, None)], FakeSink(delay=0),
                     kvikio=types.SimpleNamespace(CuFile=CuFile))
    next(gen)
    gen.close()
    assert len(pending) == 6 and all(f.waited for f in pending)


@pytest.mark.parametrize("threads", [1, 2, 3, 6, 8, 10, 12, 14, 16])
def test_pinned_staging_stays_within_staging_bytes(threads: int) -> None:
    # torch's pinned allocator rounds each request up to a power of two: the request must be
    # one already, or 12 threads would pin 384 MiB of a 256 MiB budget.
    options = StreamOptions(threads=threads, staging_bytes=256 << 20)
    request = options.buffer_bytes + 3 * DIRECT_ALIGN   # what each staging buffer pins
    assert request & (request - 1) == 0
    assert 2 * threads * request <= options.staging_bytes < 4 * threads * request


@pytest.mark.parametrize(("chunk", "buffer"), [(0, 16 << 20), (32 << 20, 16 << 20),
                                               (8 << 20, 8 << 20), (5 << 20, 4 << 20)])
def test_chunk_bytes_caps_each_buffer(chunk: int, buffer: int) -> None:
    # chunk_bytes caps the share of staging a buffer gets (rounded down to a power of two,
    # as every pinned request), never raises it: 8 threads of 256 MiB share 16 MiB each.
    options = StreamOptions(threads=8, staging_bytes=256 << 20, chunk_bytes=chunk)
    assert options.buffer_bytes + 3 * DIRECT_ALIGN == buffer


def test_closing_iter_tensors_joins_the_engine_even_if_its_stream_is_still_referenced(
        checkpoint, monkeypatch):
    # iter_tensors wraps the engine's generator. Its close() must end the engine itself: left
    # to the inner generator's collection, the workers ran on after close() returned (seen on
    # the H200 machine), and a reference held anywhere would keep them running indefinitely.
    import fastsafetensors.loading as loading

    held = []

    def device_stream(files, device, **options):
        gen = stream_tensors(files, FakeSink(delay=0.002),
                             StreamOptions(threads=4, staging_bytes=8 * 16384))
        held.append(gen)
        return gen

    monkeypatch.setattr(loading, "device_stream", device_stream)
    outer = loading._iter_tensors(checkpoint, None, "cuda:0", None, None, {}, threads=None,
                                  io=None, backend=None, staging_bytes=None,
                                  max_device_bytes=None)
    next(outer)
    outer.close()
    assert pool.busy() == 0 and _engine_threads_running() == []
    assert held[0].gi_frame is None   # closed, not merely dropped


def test_only_a_caller_that_keeps_every_tensor_lets_the_ring_run_ahead(checkpoint,
                                                                        monkeypatch):
    # load() without a cast keeps every tensor: the ring may plan the whole load ahead of its
    # reports (stream.RING_SLOTS). iter_tensors' consumer may drop each tensor as it comes:
    # tensors allocated ahead of their reads would raise its peak.
    import fastsafetensors
    import fastsafetensors.loading as loading

    asked = []

    def device_stream(files, device, **options):
        asked.append(options["keeps_all"])
        return stream_tensors(files, FakeSink(delay=0),
                              StreamOptions(threads=2, staging_bytes=8 * 16384))

    monkeypatch.setattr(loading, "resolve_device", lambda device, framework: "cuda:0")
    monkeypatch.setattr(loading, "device_stream", device_stream)
    expected = _expected(checkpoint)
    loaded = fastsafetensors.load(checkpoint, device="cuda:0")
    assert asked == [True] and loaded.keys() == expected.keys()
    assert dict(fastsafetensors.iter_tensors(checkpoint, device="cuda:0")).keys() == \
        expected.keys()
    assert asked == [True, False]
    # Cast: each original is dropped once cast, and must not all be allocated ahead.
    assert fastsafetensors.load(checkpoint, device="cuda:0", dtype=torch.float64).keys() == \
        expected.keys()
    assert asked == [True, False, False]
    with pytest.raises(TypeError, match="keeps_all"):   # not an option of iter_tensors
        dict(fastsafetensors.iter_tensors(checkpoint, device="cuda:0", keeps_all=True))


class ReservingSink(FakeSink):
    def __init__(self) -> None:
        super().__init__(delay=0)
        self.reserved: list[tuple[int, int]] = []   # (bytes, allocations made before)

    def reserve(self, nbytes: int) -> None:
        self.reserved.append((nbytes, self.allocations))


@pytest.mark.parametrize("how", ["keeps all", "streams", "budget"])
def test_a_load_that_keeps_every_tensor_reserves_each_files_memory_first(checkpoint, how):
    # One reservation per file, before its first tensor is allocated, of what its tensors take
    # (device_bytes each: 512-byte granules); not for a consumer that may drop each tensor, nor
    # under a memory budget, where memory held at once is what the caller bounds.
    from fastsafetensors.format import read_header
    from fastsafetensors.loader.stream import device_bytes

    sink = ReservingSink()
    options = StreamOptions(threads=2, staging_bytes=8 * 16384, keeps_all=how != "streams",
                            max_device_bytes=1 << 30 if how == "budget" else None)
    got = dict(stream_tensors([(p, None, None) for p in checkpoint], sink, options))
    expected = _expected(checkpoint)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    if how != "keeps all":
        assert sink.reserved == []
        return
    sizes = [sum(device_bytes(i.nbytes) for i in read_header(p).tensors.values())
             for p in checkpoint]
    counts = [sum(i.nbytes > 0 for i in read_header(p).tensors.values())   # allocated ones
              for p in checkpoint]
    assert sink.reserved == [(sizes[i], sum(counts[:i])) for i in range(len(checkpoint))]


def _reserving_sink(monkeypatch: pytest.MonkeyPatch, *, held: int = 0, free: int = 80 << 30,
                    conf: str = "") -> Any:
    """TorchCudaSink with what its reserve() uses, on the CPU: torch.cuda's allocator calls
    stood in for (``held`` bytes cached unused, ``free`` on the device), allocator settings
    ``conf``."""
    from fastsafetensors.loader.cuda import TorchCudaSink

    monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", lambda: conf,
                        raising=False)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: (1 << 30) + held)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 << 30)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 << 30))
    sink = object.__new__(TorchCudaSink)   # no CUDA here
    sink.device, sink._entered, sink._unreserved = "cuda:0", threading.local(), False
    sink._entered.yes = True
    return sink


@pytest.mark.parametrize(("nbytes", "held", "free", "conf", "reserved"), [
    (128 << 20, 0, 80 << 30, "", True),
    (128 << 20, 127 << 20, 80 << 30, "", True),
    (128 << 20, 128 << 20, 80 << 30, "", False),      # the allocator holds that much unused
    (32 << 20, 0, 80 << 30, "", False),               # under RESERVE_MIN
    (128 << 20, 0, 80 << 30, "max_split_size_mb:64", False),   # would not cut tensors from it
    (128 << 20, 0, 150 << 20, "", False),             # not that much free on the device
])
def test_the_cuda_sink_reserves_a_files_memory_only_where_it_helps(monkeypatch, nbytes, held,
                                                                   free, conf, reserved):
    asked: list[int] = []
    nothing = torch.empty(0)

    def empty(n: int, **kwargs: Any) -> torch.Tensor:
        asked.append(n)
        return nothing

    sink = _reserving_sink(monkeypatch, held=held, free=free, conf=conf)
    monkeypatch.setattr(torch, "empty", empty)
    sink._reserve(nbytes)
    assert asked == ([nbytes] if reserved else [])


def test_after_a_reservation_runs_out_of_memory_a_load_makes_no_more(monkeypatch):
    asked: list[int] = []

    def empty(n: int, **kwargs: Any) -> torch.Tensor:
        asked.append(n)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    sink = _reserving_sink(monkeypatch)
    monkeypatch.setattr(torch, "empty", empty)
    sink._reserve(1 << 30)   # no error: the tensors are then allocated one by one
    sink._reserve(1 << 30)   # each failed try would first free torch's whole cache
    assert asked == [1 << 30]


@pytest.mark.parametrize("stop_early", [False, True])
def test_workers_leave_at_once_when_a_load_ends(checkpoint, monkeypatch, stop_early):
    # Per-tensor reads to a device run one load per tensor: a worker that noticed the end only
    # by its idle poll would add that poll to every tensor. With the poll set to an hour, the
    # load must still end (stop markers reach every worker, also after an early stop).
    import fastsafetensors.loader.stream as stream_module

    monkeypatch.setattr(stream_module, "WORKER_POLL", 3600.0)
    done = threading.Event()

    def load() -> None:
        gen = stream_tensors([(p, None, None) for p in checkpoint], FakeSink(delay=0),
                             StreamOptions(threads=8, staging_bytes=16 * 16384))
        if stop_early:
            next(gen)
            gen.close()
        else:
            for _ in gen:
                pass
        done.set()

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert done.is_set(), "a worker waited for its idle poll after the load ended"


def _page_cache_file(tmp_path, *, evicted: bool):
    """A file of 8 tensors of 256 KiB, cached or evicted; skips where that cannot be set up."""
    from builders import opens_direct

    from fastsafetensors.loader.pagecache import resident_fraction

    tensors = {f"w{i}": torch.full((65536,), float(i)) for i in range(8)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    if not opens_direct(path):
        pytest.skip("this filesystem refuses O_DIRECT, so auto can only read buffered")
    fd = os.open(path, os.O_RDONLY)
    try:
        if evicted:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        else:
            os.pread(fd, os.path.getsize(path), 0)
        left = resident_fraction(fd)
    finally:
        os.close(fd)
    if left is None or (left > 0.1 if evicted else left < 1.0):
        pytest.skip(f"page-cache state not observable here (resident share: {left})")
    return str(path), tensors


@pytest.mark.parametrize("evicted", [False, True])
def test_auto_reads_cached_chunks_buffered_and_cold_ones_direct(tmp_path, evicted):
    path, tensors = _page_cache_file(tmp_path, evicted=evicted)
    before = STATS.snapshot()
    got = _run([path], FakeSink(delay=0), io="auto")
    direct = STATS.snapshot()[2] - before[2]
    assert (direct > 0) if evicted else (direct == 0)
    assert all(torch.equal(got[k], v) for k, v in tensors.items())


def test_a_one_tensor_load_asks_residency_of_that_tensor_only(tmp_path, monkeypatch):
    # transformers reads to a device tensor by tensor: each load looking at the residency of
    # the whole file cost 20 ms per 2 GB file, per tensor.

    path, tensors = _page_cache_file(tmp_path, evicted=False)
    asked = record_lookups(monkeypatch)
    got = _run([path], FakeSink(delay=0), names=["w5"], io="auto")
    assert torch.equal(got["w5"], tensors["w5"])
    # Asked chunk by chunk (by the readers), each byte of that tensor once and nothing else.
    from fastsafetensors.format import read_header

    header = read_header(path)
    begin, end = (header.data_start + o for o in header.tensors["w5"].data_offsets)
    asked.sort()
    assert asked[0][0] == begin and asked[-1][1] == end
    assert all(a[1] == b[0] for a, b in zip(asked, asked[1:]))


@pytest.mark.parametrize(("wait", "huge", "calls", "reserve"),
                         [("spin", "off", "torch", "off"),
                          ("block", "on", "driver", "on"),
                          ("spin", "on", "native", None),
                          ("block", "off", "ring", "off"),
                          ("spin", "auto", None, None)])
def test_event_wait_huge_pages_and_cuda_calls_options_reach_the_cuda_sink(
        checkpoint, monkeypatch, wait, huge, calls, reserve):
    import fastsafetensors
    import fastsafetensors.loader.cuda as cuda_module
    import fastsafetensors.loader.gds as gds_module
    from fastsafetensors.loading import device_stream

    made: list[tuple[bool, ...]] = []

    def sink(device: str, *, blocking: bool = False, huge_pages: bool = False,
             driver: bool = False, native: bool = False, ring: bool = False,
             reserve: bool = False) -> FakeSink:
        made.append((blocking, huge_pages, driver, native, ring, reserve))
        return FakeSink()

    monkeypatch.setattr(cuda_module, "TorchCudaSink", sink)
    monkeypatch.setattr(cuda_module, "ring_usable", lambda: True)
    monkeypatch.setattr(gds_module, "select_backend", lambda backend, device: "posix")
    options = {"event_wait": wait, "huge_pages": huge, "cuda_calls": calls,
               "reserve_memory": reserve}
    with fastsafetensors.configure(**{k: v for k, v in options.items() if v is not None}):
        got = dict(device_stream([(path, None, None) for path in checkpoint], "cuda:0"))
    # auto (the default) and on: staging on registered huge pages; off: torch's pinned memory.
    # cuda_calls: the ring by default, where it can run. reserve_memory: on by default.
    assert made == [(wait == "block", huge != "off", calls == "driver", calls == "native",
                     calls in ("ring", None), reserve != "off")]
    want = _expected(checkpoint)
    assert all(torch.equal(as_bytes(got[k]), as_bytes(v)) for k, v in want.items())


def test_a_load_to_a_gpu_takes_8_threads_unless_told_otherwise(monkeypatch):
    # The H200 runs measured 8 reader threads faster than 16 (docs/benchmarks.md section 2);
    # the threads option, set anywhere, still wins.
    import fastsafetensors.loader.cuda as cuda_module
    import fastsafetensors.loader.gds as gds_module
    import fastsafetensors.loader.stream as stream_module
    from fastsafetensors import config
    from fastsafetensors.loading import device_stream

    asked: list[int] = []
    monkeypatch.setattr(cuda_module, "TorchCudaSink", lambda device, **_: FakeSink())
    monkeypatch.setattr(cuda_module, "ring_usable", lambda: False)
    monkeypatch.setattr(gds_module, "select_backend", lambda backend, device: "posix")
    monkeypatch.setattr(stream_module, "stream_tensors",
                        lambda files, sink, options, gate=None:
                        asked.append(options.threads) or iter(()))
    monkeypatch.delenv("FASTSAFETENSORS_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert config.get("threads") == 16   # to the CPU: unchanged
    device_stream([], "cuda:0")
    device_stream([], "cuda:0", threads=12)
    with config.configure(threads=16):
        device_stream([], "cuda:0")
    monkeypatch.setenv("FASTSAFETENSORS_THREADS", "10")
    device_stream([], "cuda:0")
    monkeypatch.delenv("FASTSAFETENSORS_THREADS")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    device_stream([], "cuda:0")
    assert asked == [8, 12, 16, 10, 4]


class _RingFakeSink(FakeSink):
    """A FakeSink that has a ring, as TorchCudaSink has with cuda_calls="ring"."""

    @staticmethod
    def ring(**shape: int) -> None:
        raise AssertionError("not opened in these tests")


def test_a_load_through_the_ring_takes_12_threads_unless_told_otherwise(monkeypatch):
    # C readers never wait for the GIL: on the H200 machine 12 of them loaded faster than 8.
    # Python readers (another cuda_calls, mapped readers, no ring here) keep 8.
    import fastsafetensors.loader.cuda as cuda_module
    import fastsafetensors.loader.gds as gds_module
    import fastsafetensors.loader.stream as stream_module
    from fastsafetensors import config
    from fastsafetensors.loading import device_stream

    asked: list[tuple[int, bool]] = []
    usable = [True]
    monkeypatch.setattr(cuda_module, "TorchCudaSink", lambda device, *, ring=False, **_:
                        _RingFakeSink() if ring else FakeSink())
    monkeypatch.setattr(cuda_module, "ring_usable", lambda: usable[0])
    monkeypatch.setattr(gds_module, "select_backend", lambda backend, device: "posix")
    monkeypatch.setattr(stream_module, "stream_tensors",
                        lambda files, sink, options, gate=None: asked.append(
                            (options.threads, isinstance(sink, _RingFakeSink))) or iter(()))
    monkeypatch.delenv("FASTSAFETENSORS_THREADS", raising=False)
    monkeypatch.delenv("FASTSAFETENSORS_CUDA_CALLS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    device_stream([], "cuda:0")
    device_stream([], "cuda:0", threads=6)
    with config.configure(cuda_calls="torch"):
        device_stream([], "cuda:0")
    with config.configure(mapped_readers=2):
        device_stream([], "cuda:0")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    device_stream([], "cuda:0")
    usable[0] = False   # the default falls back to torch's calls; the ring asked for stays
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    device_stream([], "cuda:0")
    with config.configure(cuda_calls="ring"):
        device_stream([], "cuda:0")
    assert asked == [(12, True), (6, True), (8, False), (8, True), (4, True), (8, False),
                     (12, True)]


def test_a_load_through_the_ring_takes_128_mib_of_staging_unless_told_otherwise(monkeypatch):
    # On the H200 machine the ring's readers read faster out of less staging (config.
    # RING_STAGING); Python readers keep the option's default, and a value given or set wins.
    import fastsafetensors.loader.cuda as cuda_module
    import fastsafetensors.loader.gds as gds_module
    import fastsafetensors.loader.stream as stream_module
    from fastsafetensors import config
    from fastsafetensors.loading import device_stream

    asked: list[tuple[int, bool]] = []
    monkeypatch.setattr(cuda_module, "TorchCudaSink", lambda device, *, ring=False, **_:
                        _RingFakeSink() if ring else FakeSink())
    monkeypatch.setattr(cuda_module, "ring_usable", lambda: True)
    monkeypatch.setattr(gds_module, "select_backend", lambda backend, device: "posix")
    monkeypatch.setattr(stream_module, "stream_tensors",
                        lambda files, sink, options, gate=None: asked.append(
                            (options.staging_bytes >> 20, isinstance(sink, _RingFakeSink)))
                        or iter(()))
    monkeypatch.delenv("FASTSAFETENSORS_STAGING_BYTES", raising=False)
    monkeypatch.delenv("FASTSAFETENSORS_CUDA_CALLS", raising=False)
    device_stream([], "cuda:0")
    device_stream([], "cuda:0", staging_bytes=64 << 20)
    with config.configure(staging_bytes=256 << 20):
        device_stream([], "cuda:0")
    with config.configure(cuda_calls="native"):
        device_stream([], "cuda:0")
    monkeypatch.setenv("FASTSAFETENSORS_STAGING_BYTES", str(32 << 20))
    device_stream([], "cuda:0")
    assert asked == [(128, True), (64, True), (256, True), (256, False), (32, True)]


def test_a_gds_load_neither_builds_nor_asks_for_the_ring(monkeypatch):
    # GDS reads straight to the device: the default takes torch's calls there, without
    # building ring.c to find out whether it could run; a mode asked for by name is kept.
    import fastsafetensors.loader.cuda as cuda_module
    import fastsafetensors.loader.gds as gds_module
    from fastsafetensors import config
    from fastsafetensors.loading import device_stream

    made: list[bool] = []

    def no_probe() -> bool:
        raise AssertionError("the ring was probed for a GDS load")

    monkeypatch.delenv("FASTSAFETENSORS_CUDA_CALLS", raising=False)
    monkeypatch.setattr(cuda_module, "ring_usable", no_probe)
    monkeypatch.setattr(cuda_module, "TorchCudaSink", lambda device, *, ring=False, **_:
                        made.append(ring) or FakeSink())
    monkeypatch.setattr(gds_module, "select_backend", lambda backend, device: "gds")
    monkeypatch.setattr(gds_module, "stream_gds", lambda files, sink, **_: iter(()))
    device_stream([], "cuda:0")
    with config.configure(cuda_calls="ring"):
        device_stream([], "cuda:0")
    assert made == [False, True]


def test_where_the_ring_cannot_run_the_default_says_why_once_at_info(monkeypatch, caplog):
    import logging

    import fastsafetensors.loader.cuda as cuda_module
    from fastsafetensors.loader import driver

    monkeypatch.setattr(driver, "available", lambda: "libcuda.so.1 not found")
    monkeypatch.setattr(cuda_module, "_refused", set())
    with caplog.at_level(logging.INFO, logger=cuda_module.__name__):
        assert cuda_module.ring_usable() is False
        assert cuda_module.ring_usable() is False
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [("INFO", "cuda_calls left to its default, ring: its C threads cannot be "
                             "used (libcuda.so.1 not found); loading from Python reader "
                             "threads with torch's calls")]


# -- resources while a load runs or stops -----------------------------------------------------

def test_a_file_is_closed_once_its_reads_are_done(tmp_path):
    # Every file used to stay open until the load ended: hundreds of shards ran out of
    # descriptors.
    paths = []
    for i in range(30):
        path = tmp_path / f"s{i:02d}.safetensors"
        save_file({f"t{i}": torch.full((1024,), float(i))}, str(path))
        paths.append(str(path))
    before = _fd_count()
    most = 0
    options = StreamOptions(threads=2, staging_bytes=1 << 20)
    for name, tensor in stream_tensors([(p, None, None) for p in paths], FakeSink(delay=0),
                                       options):
        most = max(most, _fd_count() - before)
        assert torch.equal(tensor, torch.full((1024,), float(name[1:])))
    # Two descriptors a file (auto). Open at most: the queue's chunks (4 a thread), one being
    # read by each thread, one the planner holds: 22 here, 60 if none were closed early.
    assert most <= 2 * (4 * 2 + 2 + 1)
    assert _fd_count() == before


def test_a_thread_that_cannot_start_stops_the_load_cleanly(checkpoint, monkeypatch):
    real_start = pool.start
    calls = []

    def start(task, name, finished=None):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("can't start new thread")
        return real_start(task, name, finished)

    monkeypatch.setattr(pool, "start", start)
    before = _fd_count()
    with pytest.raises(RuntimeError, match="can't start"):
        _run(checkpoint, FakeSink(), threads=4)
    assert _fd_count() == before and pool.busy() == 0


def test_stopping_does_not_wait_for_a_source_that_blocks(checkpoint):
    # A source blocked in a download: closing the stream must not wait for it.
    release = threading.Event()
    closed_first: list[bool] = []

    def sources():
        yield checkpoint[0], None, None
        release.wait(30)   # the test releases it only after close() returned
        yield checkpoint[1], None, None

    stream = stream_tensors(sources(), FakeSink(delay=0), StreamOptions(threads=2,
                                                                         staging_bytes=1 << 20))
    first = _expected([checkpoint[0]])
    for _ in first:
        next(stream)
    stream.close()
    closed_first.append(not release.is_set())
    release.set()
    assert closed_first == [True]
    for _ in range(100):   # the planner then ends by itself, opening nothing more
        if pool.busy() == 0:
            break
        threading.Event().wait(0.05)
    assert pool.busy() == 0


def test_a_name_asked_twice_is_read_once(checkpoint):
    want = _expected([checkpoint[0]])
    name = next(iter(want))
    sources = [(checkpoint[0], None, [name, name])]
    got = list(stream_tensors(sources, FakeSink(delay=0), StreamOptions(threads=1,
                                                                        staging_bytes=65536)))
    assert [n for n, _ in got] == [name] and torch.equal(as_bytes(got[0][1]), as_bytes(want[name]))


def test_options_are_checked_before_the_backend_is_chosen(checkpoint, monkeypatch):
    import fastsafetensors.loader.cuda as cuda_module
    import fastsafetensors.loader.gds as gds_module
    from fastsafetensors.errors import ConfigError
    from fastsafetensors.loading import device_stream, iter_tensors

    monkeypatch.setattr(cuda_module, "TorchCudaSink", lambda device, **_: FakeSink())
    monkeypatch.setattr(gds_module, "select_backend", lambda backend, device: "gds")
    for bad in ({"io": "bogus"}, {"threads": 0}, {"staging_bytes": 0},
                {"max_device_bytes": -1}):
        with pytest.raises(ConfigError):
            device_stream([(checkpoint[0], None, None)], "cuda:0", **bad)
    with pytest.raises(ConfigError, match="max_device_bytes"):
        list(iter_tensors(checkpoint[0], max_device_bytes=0))


def test_a_copy_that_fails_halfway_leaves_nothing_running(tmp_path):
    # The pieces queued before the failure had no event of their own: the load's end must
    # still wait for them, or they write into tensors already given back.
    tensors = {f"w{i}": torch.full((4096,), float(i)) for i in range(6)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    running = []

    class FailingSink(FakeSink):
        def copy(self, stream, src, pieces):
            def slow():
                running.append(1)
                threading.Event().wait(0.3)
                running.pop()

            stream.submit(slow)   # a copy still in flight when the next one fails
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        _run([str(path)], FailingSink(delay=0), threads=1)
    assert running == []


def test_staging_whose_copies_cannot_be_waited_for_is_never_lent_again(tmp_path, monkeypatch,
                                                                      caplog):
    # After a CUDA error a reader cannot know whether the copies out of its staging still run:
    # its buffers must not go back to an allocator that lends them to the next load (torch's
    # pinned cache does not know of copies queued through the driver, cuda_calls="driver").
    import fastsafetensors.loader.stream as stream_module

    abandoned: list[Any] = []
    monkeypatch.setattr(stream_module, "ABANDONED", abandoned)
    tensors = {f"w{i}": torch.full((4096,), float(i)) for i in range(6)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))

    class BrokenSink(FakeSink):
        def host_wait(self, event):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    sink = BrokenSink(delay=0)
    with caplog.at_level("ERROR"), pytest.raises(RuntimeError, match="illegal memory access"):
        _run([str(path)], sink, threads=1)
    assert sink.staged and sink.released == []
    assert {id(buffer[0]) for buffer in abandoned} == {id(b) for b in sink.staged}


@pytest.mark.parametrize("step", ["last_wait", "release_staging"])
def test_a_reader_failing_after_its_last_chunk_fails_the_load(tmp_path, monkeypatch, step):
    # A reader's last wait for its copies is where an asynchronous copy error shows, often
    # after the caller had every tensor; raised in the pool's thread it was only logged, and
    # the load passed for done. Handing its staging back failing is the same.
    import fastsafetensors.loader.stream as stream_module

    monkeypatch.setattr(stream_module, "ABANDONED", [])
    path = tmp_path / "m.safetensors"
    save_file({f"t{i}": torch.full((30000,), float(i)) for i in range(8)}, str(path))

    class FailingLast(FakeSink):
        def __init__(self):
            super().__init__(delay=0)
            self.last = threading.local()

        def record(self, stream):
            event = super().record(stream)
            self.last.event = event
            return event

        def host_wait(self, event):
            if step == "last_wait" and event is getattr(self.last, "event", None):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            super().host_wait(event)

        def release_staging(self, buffer):
            if step == "release_staging":
                raise RuntimeError("the pinned allocator refused the buffer back")
            super().release_staging(buffer)

    with pytest.raises(RuntimeError, match="illegal memory access|refused the buffer"):
        _run([str(path)], FailingLast(), threads=2, staging_bytes=1 << 20, io="buffered")


def test_a_source_that_fails_to_close_does_not_hang_the_load(checkpoint):
    class Source:
        def __init__(self):
            self.items = iter([(checkpoint[0], None, None)])

        def __iter__(self):
            return self

        def __next__(self):
            return next(self.items)

        def close(self):
            raise OSError("download pool would not shut down")

    with pytest.raises(OSError, match="would not shut down"):
        list(stream_tensors(Source(), FakeSink(delay=0),
                            StreamOptions(threads=2, staging_bytes=1 << 20)))


def test_a_load_closed_on_its_own_thread_does_not_wait_for_itself(checkpoint):
    # The garbage collector runs a generator's finally on whichever thread allocates: often one
    # of the load's own threads, which then waited for itself for ever (holding its files).
    box = {}
    closed = threading.Event()
    go_on = threading.Event()

    class ClosingSink(FakeSink):
        def alloc(self, info):   # on the planner thread
            gen = box.pop("gen", None)
            if gen is not None:
                gen.close()
                closed.set()
            return super().alloc(info)

    def sources():
        yield (checkpoint[0], None, None)
        go_on.wait(30)
        yield (checkpoint[1], None, None)

    before = _fd_count()
    gen = stream_tensors(sources(), ClosingSink(delay=0),
                         StreamOptions(threads=2, staging_bytes=6 * 8192))
    next(gen)
    box["gen"] = gen
    del gen
    go_on.set()
    assert closed.wait(30), "the load's finally waited for its own thread"
    deadline = time.monotonic() + 30
    while (_fd_count() != before or _engine_threads_running()) and time.monotonic() < deadline:
        time.sleep(0.05)   # the files are closed by a cleanup thread once the tasks end
    assert _fd_count() == before and _engine_threads_running() == []


def test_exit_with_a_load_left_suspended_does_not_hang(checkpoint, tmp_path):
    # The pool's daemon threads are frozen at interpreter exit; a generator collected after
    # that waited for them for ever.
    import subprocess
    import sys

    script = tmp_path / "suspended.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from fake_device import FakeSink\n"
        "from fastsafetensors.loader.stream import StreamOptions, stream_tensors\n"
        f"it = stream_tensors([(p, None, None) for p in {checkpoint!r}], FakeSink(delay=0),\n"
        "                    StreamOptions(threads=2, staging_bytes=6 * 8192,\n"
        "                                  max_device_bytes=8192))\n"
        "next(it)\n"
        "print('suspended')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "suspended" in done.stdout, done.stderr


def test_an_interrupted_close_is_not_repeated(checkpoint, monkeypatch):
    # A second Ctrl-C right after a file's descriptors were closed left their numbers in place;
    # the cleanup retried and closed them again, by then another file's.
    from fastsafetensors.loader import stream
    from fastsafetensors.loader.cpu import IOPolicy

    f = stream._open(checkpoint[0], None, IOPolicy("buffered"), None)
    closed = []

    def interrupted(fd):
        closed.append(fd)
        raise KeyboardInterrupt

    # The file's closes are os.close's own (streamparts._shut), here stood in for.
    monkeypatch.setattr(streamparts, "os", types.SimpleNamespace(close=interrupted))
    with pytest.raises(KeyboardInterrupt):
        stream._close(f)
    monkeypatch.setattr(streamparts, "os", types.SimpleNamespace(close=closed.append))
    stream._close(f)   # the retry
    assert len(closed) == 1 and f.fd == -1   # asked once, never again
    os.close(closed[0])


def test_a_forked_child_can_close_a_load_it_inherited(checkpoint):
    # The child has none of the parent's threads: closing (or collecting) an inherited load
    # waited for them for ever.
    import signal

    gen = stream_tensors([(p, None, None) for p in checkpoint], FakeSink(delay=0),
                         StreamOptions(threads=2, staging_bytes=6 * 8192, max_device_bytes=8192))
    next(gen)
    child = os.fork()
    if child == 0:   # pragma: no cover - the child's result is its exit status
        signal.alarm(30)
        try:
            gen.close()
        finally:
            os._exit(0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(child, 9)
        os.waitpid(child, 0)
        pytest.fail("the child hung closing the inherited load")
    gen.close()
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_load_collected_under_a_lock_its_threads_need_does_not_wait(checkpoint):
    # The garbage collector finalizes an abandoned load on whatever thread allocates, inside
    # whatever lock it holds (concurrent.futures' global lock, in submit()): waiting there for
    # threads that need that lock to finish waited for ever.
    import gc

    shared = threading.Lock()

    class LockingSink(FakeSink):
        def record(self, stream):
            with shared:
                return super().record(stream)

    before = _fd_count()
    # (a budget keeps the load running, its threads alive, while it is abandoned)
    gen = stream_tensors([(p, None, None) for p in checkpoint], LockingSink(delay=0.001),
                         StreamOptions(threads=2, staging_bytes=6 * 8192, max_device_bytes=8192))
    next(gen)
    box = [gen]
    box.append(box)   # dropped into a reference cycle: only the collector ends it
    del gen, box
    collected = threading.Event()

    def collect():
        with shared:
            gc.collect()
        collected.set()

    threading.Thread(target=collect, daemon=True).start()
    assert collected.wait(30), "the collected load waited for threads that need the lock"
    deadline = time.monotonic() + 30
    while (_fd_count() != before or _engine_threads_running()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _fd_count() == before and _engine_threads_running() == []


def test_a_stopped_load_allocates_nothing_more(tmp_path):
    # The planner waiting for budget went on to allocate one more tensor once the consumer
    # stopped: past max_device_bytes, for nothing.
    path = tmp_path / "m.safetensors"
    save_file({f"t{i}": torch.full((256, 1024), float(i)) for i in range(4)}, str(path))  # 1 MiB
    sink = FakeSink(delay=0)
    gen = stream_tensors([(str(path), None, None)], sink,
                         StreamOptions(threads=1, staging_bytes=1 << 20, max_device_bytes=1 << 20))
    next(gen)
    deadline = time.monotonic() + 5
    while sink.allocations < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)   # the planner is waiting for budget for the second tensor
    gen.close()
    assert sink.allocations == 1 and sink.peak_outstanding <= 1 << 20


def test_small_pieces_are_copied_in_runs_bit_for_bit():
    # The CUDA sink copies runs of small pieces with one host-to-device copy and one batched
    # device copy (copy_pieces). Here on the CPU: the same grouping and offsets.
    from fastsafetensors.loader.cuda import MIN_RUN, RUN_GAP, SMALL_PIECE, copy_pieces, plan_runs

    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (8 << 20,), dtype=torch.uint8, generator=g)
    pieces = []
    at = 0

    def add(length: int, *, gap: int = 0, dst_offset: int = 0) -> None:
        nonlocal at
        at += gap
        dst = torch.full((dst_offset + length + 3,), 0xA5, dtype=torch.uint8)  # poisoned
        pieces.append((dst, dst_offset, at, length))
        at += length

    for i in range(10):
        add(100 + 7 * i, gap=i % 3)                  # a run of 10, small gaps between
    add(SMALL_PIECE)                                 # a large tensor: on its own
    for _ in range(MIN_RUN - 1):
        add(4096)                                    # too few for a run
    add(5000, gap=RUN_GAP + 1)                       # too far: starts a new run
    for _ in range(MIN_RUN + 1):
        add(333, dst_offset=17)                      # pieces of tensors split across chunks
    singles, runs = plan_runs(pieces)
    assert [len(r) for r in runs] == [10, MIN_RUN + 2] and len(singles) == MIN_RUN
    copy_pieces(src, pieces, torch.device("cpu"))
    for dst, dst_offset, src_offset, length in pieces:
        assert torch.equal(dst[dst_offset:dst_offset + length],
                           src[src_offset:src_offset + length])
        assert (dst[:dst_offset] == 0xA5).all() and (dst[dst_offset + length:] == 0xA5).all()


def test_auto_looks_up_each_segment_once_and_reads_cached_ones_buffered(tmp_path, monkeypatch):
    # Residency is looked up per segment by the readers (in parallel), once per segment, as a
    # snapshot taken before that segment is read: a half-cached file reads its cached half
    # buffered and its cold half with O_DIRECT.
    from builders import opens_direct

    from fastsafetensors.format import read_header
    from fastsafetensors.loader.pagecache import resident_fraction

    tensors = {f"w{i}": torch.full((65536,), float(i)) for i in range(16)}   # 256 KiB each
    path = tmp_path / "half.safetensors"
    save_file(tensors, str(path))
    if not opens_direct(path):
        pytest.skip("this filesystem refuses O_DIRECT, so auto can only read buffered")
    header = read_header(str(path))
    middle = header.data_start + header.tensors["w8"].data_offsets[0]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)   # no read-ahead into the rest
        os.pread(fd, middle, 0)                      # the first half into the page cache
        first, second = resident_fraction(fd, 0, middle), resident_fraction(fd, middle)
    finally:
        os.close(fd)
    if first is None or first < 1.0 or second > 0.1:
        pytest.skip(f"page-cache state not observable here ({first}, {second})")
    monkeypatch.setattr(streamparts, "SEGMENT", 256 << 10)
    lookups = record_lookups(monkeypatch)
    before = STATS.snapshot()
    got = _run([str(path)], FakeSink(delay=0), io="auto", threads=4, staging_bytes=8 * (128 << 10))
    reads, direct = (a - b for a, b in zip(STATS.snapshot()[1:], before[1:]))
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    asked = [offset for offset, _ in lookups]
    assert sorted(asked) == sorted(set(asked)) and len(asked) == 17   # 16 segments + the tail
    assert 0 < direct < reads


def test_phases_say_where_the_engine_spent_its_time(checkpoint):
    # The benchmark reads these after a load on a GPU machine: one run then says whether the
    # readers waited for chunks, for copies, for pinning, or read.
    from fastsafetensors.loader.stream import PHASES

    PHASES.reset()
    got = _run(checkpoint, FakeSink(delay=0.001))
    spent = PHASES.snapshot()
    assert len(got) == len(_expected(checkpoint))
    for phase in ("load: wall time", "reader: read", "reader: wait for a chunk",
                  "reader: queue copies", "reader: pin staging", "planner: allocate",
                  "planner: open files", "caller: wait for the planner",
                  "caller: wait for a tensor's reads", "caller: hand a tensor over"):
        assert spent.get(phase, -1) >= 0, phase
    assert spent["reader: read"] > 0 and spent["load: wall time"] > 0
    # Three readers cannot have spent more than three times the wall time reading.
    assert spent["reader: read"] <= 3 * spent["load: wall time"]
    PHASES.reset()
    assert PHASES.snapshot() == {}


@pytest.mark.parametrize("ids", [False, True])
@pytest.mark.parametrize("calls", ["torch", "driver"])
def test_the_consumer_waits_again_after_it_switches_streams(monkeypatch, calls, ids):
    # TorchCudaSink skips the wait for an event its consumer's stream already waits on. A CUDA
    # stream compared with None by `!=` answers False (torch's C comparison), so the first
    # version never noticed a switch of streams: a tensor sharing a chunk's event with the one
    # before it was handed to the new stream without a wait. Emulated on the CPU with a stream
    # class that compares as torch.cuda.Stream does (only __eq__ defined in Python); with
    # cuda_calls="driver" the waits go to the driver, by the stream's handle.
    from fastsafetensors.loader.cuda import TorchCudaSink

    waits: list[tuple[int, object]] = []

    class Stream(torch.Stream):
        def __eq__(self, other: object) -> bool:
            return super().__eq__(other) if isinstance(other, Stream) else False

        __hash__ = torch.Stream.__hash__

        @property
        def cuda_stream(self) -> int:
            return int(self.stream_id)

        def wait_event(self, event: object) -> None:
            waits.append((self.stream_id, event))

    class Driver:
        @staticmethod
        def stream_wait(device: int, stream: int, event: object) -> None:
            assert device == 0
            waits.append((stream, event))

    first, second = (Stream(stream_id=i, device_index=0, device_type=0) for i in (1, 2))
    current = [first]
    # A new object each call, as torch's: equal to the one before, not the same.
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(
        stream_id=current[0].stream_id, device_index=0, device_type=0))
    sink = object.__new__(TorchCudaSink)   # no CUDA here: the fields consumer_wait uses
    sink.device, sink._waited, sink._waited_on = "cuda:0", {}, None
    sink.index, sink.calls = 0, Driver() if calls == "driver" else None
    sink.consumer = first
    stream_ids(monkeypatch, sink, current, ids)
    event, other = object(), object()
    sink.consumer_wait([event])
    sink.consumer_wait([event, other])       # same stream: only the new event
    current[0] = second
    sink.consumer_wait([event])              # another stream: waits again
    assert waits == [(1, event), (1, other), (2, event)]


@pytest.mark.parametrize("ids", [False, True])
def test_a_tensor_handed_to_another_stream_is_recorded_on_it(monkeypatch, ids):
    # finish() uses the stream consumer_wait looked up just before (one lookup per tensor):
    # a tensor handed over while the consumer is on a stream other than the one it was
    # allocated on must be recorded on that stream, or freeing it could hand its memory out
    # under that stream's work. Emulated on the CPU with torch.Stream objects.
    from fastsafetensors.format import TensorInfo

    sink, current, lookups, second = emulated_cuda_sink(monkeypatch, ids)
    first = sink.consumer
    recorded: list[int] = []

    class Flat:
        def record_stream(self, stream: torch.Stream) -> None:
            recorded.append(stream.stream_id)

        def view(self, what: object) -> Flat:
            return self

    info = TensorInfo("w", "F32", (2,), (0, 8))
    for stream in (first, second, first):
        current[0] = stream
        sink.consumer_wait([])
        sink.finish(Flat(), info)
    assert recorded == [2]
    # One lookup each, the right stream; by ids, a Stream is built only for another stream.
    assert lookups == ([2] if ids else [1, 2, 1])


@pytest.mark.parametrize("dtype, shape", [
    ("F32", (6,)), ("BF16", (2, 3)), ("I64", ()), ("U8", (0,)),
    pytest.param("F4", (8,), marks=pytest.mark.skipif(
        not hasattr(torch, "float4_e2m1fn_x2"), reason="this torch has no float4_e2m1fn_x2"))])
def test_the_cuda_sink_views_the_flat_storage_with_dtype_and_shape(monkeypatch, dtype, shape):
    # finish() views a flat uint8 allocation: a 1-D tensor with one call (dtype), others with
    # two. Emulated on the CPU: the consumer never switched streams.
    from fastsafetensors.format import DTYPES, TensorInfo
    from fastsafetensors.frameworks.torch import torch_dtype, torch_shape
    from fastsafetensors.loader.cuda import TorchCudaSink

    stream = torch.Stream(stream_id=1, device_index=0, device_type=0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    sink = object.__new__(TorchCudaSink)   # no CUDA here: the fields finish() uses
    sink.device, sink.consumer, sink._current, sink._dtypes = "cpu", stream, None, {}
    sink.index = 0
    stream_ids(monkeypatch, sink, [stream], ids=False)   # a CUDA build of torch has the ids
    numel = 1
    for dim in shape:
        numel *= dim
    nbytes = numel * DTYPES[dtype].bits // 8
    info = TensorInfo("w", dtype, shape, (0, nbytes))
    flat = torch.arange(nbytes, dtype=torch.uint8)
    got = sink.finish(flat if nbytes else None, info)
    assert got.dtype == torch_dtype(dtype) and tuple(got.shape) == torch_shape(info)
    if nbytes:
        assert got.data_ptr() == flat.data_ptr()   # a view, no copy
        assert torch.equal(got.reshape(-1).view(torch.uint8), flat)


def test_residency_is_indexed_by_the_systems_page_size(monkeypatch):
    # mincore answers one entry per page, 64 KiB on some aarch64 kernels: the map starts at the
    # page holding `base` (old code: 4 KiB steps from `base`, an empty slice here, so a cold
    # range was read through the page cache).
    import fastsafetensors.loader.cpu as cpu

    monkeypatch.setattr(cpu, "PAGE", 64 << 10)
    policy = cpu.IOPolicy("auto")
    resident = bytes([1, 0, 0])                       # pages [0, 64K) cached, the rest not
    assert policy.direct_range(resident, 4096, 64 << 10, 192 << 10)        # cold: direct
    assert not policy.direct_range(resident, 4096, 4096, 64 << 10)         # cached: buffered


def test_planned_tensors_reach_the_caller_a_batch_per_chunk(tmp_path, monkeypatch):
    # One queue operation per chunk, not per tensor: with 20,000 small tensors the hand-over
    # cost more than planning them.
    import queue as queue_module
    import types

    import fastsafetensors.loader.stream as stream_module

    batches: list[int] = []

    class Counting(queue_module.SimpleQueue):
        def put(self, item, *args, **kwargs):
            if isinstance(item, list):
                batches.append(len(item))
            super().put(item, *args, **kwargs)

    monkeypatch.setattr(stream_module, "queue", types.SimpleNamespace(
        SimpleQueue=Counting, Empty=queue_module.Empty))
    tensors = {f"t{i:04d}": torch.full((64,), float(i)) for i in range(1000)}   # 256 B each
    path = tmp_path / "many.safetensors"
    save_file(tensors, str(path))
    options = StreamOptions(threads=2, staging_bytes=8 * 16384)
    chunks = -(-1000 * 256 // options.buffer_bytes)
    sink = FakeSink(delay=0)
    out = dict(stream_tensors([(str(path), None, None)], sink, options))
    sink.close()
    assert sum(batches) == 1000 and len(batches) <= chunks + 1
    assert list(out) == sorted(tensors) and all(torch.equal(out[k], v) for k, v in tensors.items())


def test_a_tensor_over_many_chunks_waits_for_its_last_piece(tmp_path):
    # The readers copy the first chunks of a large tensor while the planner still cuts its
    # later pieces (slowed here at each chunk it hands out): the tensor must reach the caller
    # only once every piece was copied, whatever the order.
    class SlowPlanner(FakeSink):
        def alloc_event(self):
            time.sleep(0.02)   # on the planner, at each chunk: the readers run ahead
            return super().alloc_event()

    g = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(10, generator=g), "big": torch.randn(40000, generator=g),
               "z": torch.randn(3, generator=g)}
    path = tmp_path / "big.safetensors"
    save_file(tensors, str(path))
    sink = SlowPlanner(delay=0.001)
    options = StreamOptions(threads=3, staging_bytes=6 * 16384)   # 8 KiB chunks: 20 for "big"
    # Within a time: a miscounted tensor would be waited for forever, and must fail, not hang.
    out = _within(30, lambda: dict(stream_tensors([(str(path), None, None)], sink, options)))
    sink.close()
    assert all(torch.equal(out[k], v) for k, v in tensors.items())


def test_the_cuda_sink_allocates_without_stream_blocks_only_on_entered_threads(monkeypatch):
    # The planner's thread gets the consumer's stream made current once (enter_thread), and
    # then allocates with a bare torch.empty: two context managers per tensor cost more than
    # the allocation. Any other thread (the caller's, for GDS) still enters both blocks.
    # Emulated on the CPU: what matters is which calls are made on which thread.
    import contextlib

    from fastsafetensors.format import TensorInfo
    from fastsafetensors.loader.cuda import TorchCudaSink

    calls: list[tuple[str, object]] = []

    @contextlib.contextmanager
    def block(kind: str, what: object):
        calls.append((kind, what))
        yield

    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: calls.append(("set_stream", s)))
    monkeypatch.setattr(torch.cuda, "device", lambda d: block("device block", d))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: block("stream block", s))
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda n, dtype, device: real_empty(n, dtype=dtype))
    sink = object.__new__(TorchCudaSink)   # no CUDA here: the fields alloc uses
    sink.device, sink.consumer, sink._entered = "cuda:0", "consumer-stream", threading.local()
    info = TensorInfo("w", "U8", (16,), (0, 16))

    def planner() -> None:
        sink.enter_thread()
        sink.alloc(info)

    thread = threading.Thread(target=planner)
    thread.start()
    thread.join()
    assert calls == [("set_device", "cuda:0"), ("set_stream", "consumer-stream")]
    calls.clear()
    sink.alloc(info)   # this thread never entered
    assert calls == [("device block", "cuda:0"), ("stream block", "consumer-stream")]


@pytest.mark.parametrize("where", ["Latch.set", "restore"])
def test_a_ctrl_c_as_a_stopped_stream_tells_its_threads_still_ends_them(tmp_path, where):
    # A Ctrl-C inside close()'s cancelled.set() (threading.Event's Python code before it was a
    # latch), or inside its restore of the switch interval, skipped the rest of the cleanup:
    # the planner, waiting for budget, waited for good, and the files stayed open.
    from builders import each_ctrl_c, open_fds

    from fastsafetensors.loader import switching, waiting

    path = tmp_path / "b.safetensors"
    save_file({f"w{i}": torch.full((1 << 16,), float(i)) for i in range(6)}, str(path))
    before = open_fds()
    code = (waiting.Latch.set if where == "Latch.set" else switching.restore).__code__
    sinks: list[FakeSink] = []
    closing = [False]   # only the close is interrupted

    def close_one() -> None:
        sinks.append(FakeSink(delay=0))
        stream = stream_tensors([(str(path), None, None)], sinks[-1], StreamOptions(
            threads=2, staging_bytes=4 * 16384, max_device_bytes=3 << 18,
            switch_interval=0.0005))
        next(stream)   # the planner waits for budget
        closing[0] = True
        stream.close()

    for point in each_ctrl_c(close_one, lambda frame: closing[0] and frame.f_code is code):
        closing[0] = False
        sink = sinks.pop()
        for _ in range(100):   # ended in the background
            if pool.busy() == 0 and open_fds() == before:
                break
            time.sleep(0.03)
        assert pool.busy() == 0 and open_fds() == before, point
        assert len(sink.staged) == len(sink.released), point
        assert switching._depth == 0, point
    assert point > 1
