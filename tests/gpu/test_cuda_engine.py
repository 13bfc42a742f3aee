"""The engine on a real CUDA device. Skipped (with the remedy) where no NVIDIA GPU is usable."""

from __future__ import annotations

import json
import struct
import threading

import pytest
import torch
from builders import require_o_direct
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

import fastsafetensors
from fastsafetensors.loader import cuda as cuda_loader
from fastsafetensors.loader.posix import STATS

pytestmark = pytest.mark.gpu

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
          torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
          torch.uint16, torch.uint32, torch.uint64]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8).cpu()


def _random(dtype: torch.dtype, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    raw = torch.randint(0, 256, (int(torch.tensor(shape).prod()) * torch.empty(
        (), dtype=dtype).element_size(),), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def _check_sums(sums: list[tuple[str, torch.Tensor]], expected: dict[str, torch.Tensor]) -> None:
    """Sums launched on the GPU without a host sync, once the GPU is done, against the sums of
    the tensors saved."""
    torch.cuda.synchronize()
    for name, total in sums:
        assert total.item() == expected[name].sum().item(), name


@pytest.fixture
def slow_copies(monkeypatch):
    """Each worker's copies start 2 ms late on its stream. A GPU copies a chunk faster than
    the next pread, so without this the tests of the engine's waits would pass without them."""
    copy = cuda_loader.TorchCudaSink.copy
    read_copy = cuda_loader.TorchCudaSink._read_copy

    def late(self, stream, src, pieces):
        with torch.cuda.stream(stream):
            torch.cuda._sleep(2_000_000)   # cycles: about 1-2 ms at the clocks of an H100
        copy(self, stream, src, pieces)

    def late_native(self, stream, *args):
        # cuda_calls="native": queued before the call, which queues the chunk's copies.
        with torch.cuda.stream(stream):
            torch.cuda._sleep(2_000_000)
        return read_copy(self, stream, *args)

    monkeypatch.setattr(cuda_loader.TorchCudaSink, "copy", late)
    monkeypatch.setattr(cuda_loader.TorchCudaSink, "_read_copy", late_native)

    # cuda_calls="ring": a sleep on the ring's stream as each group of tensors is submitted,
    # queued there before its chunks' copies (the ring queues them once each chunk was read).
    from fastsafetensors.loader import ring

    open_ring, submit_file = ring.Ring.open, ring.Ring.submit_file

    def opened(self, stream, address):
        self.test_stream = torch.cuda.ExternalStream(stream,
                                                     device=torch.device("cuda", self.device))
        open_ring(self, stream, address)

    def sleep_on_the_rings_stream(self):
        stream = getattr(self, "test_stream", None)
        if stream is not None:
            with torch.cuda.stream(stream):
                torch.cuda._sleep(2_000_000)

    def late_submit_file(self, *args, **kw):   # the engine's one way in: a group of tensors
        sleep_on_the_rings_stream(self)
        return submit_file(self, *args, **kw)

    monkeypatch.setattr(ring.Ring, "open", opened)
    monkeypatch.setattr(ring.Ring, "submit_file", late_submit_file)


class DriverCounts:
    """What went through loader/driver.py in a test: pieces copied, events made (and with
    which blocking flag)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.copies = 0
        self.blocking: list[bool] = []
        self.chunks = 0   # native calls, or chunks submitted to a ring
        self.expect_chunks = True   # staged chunks, which these make (not mapped ones)


@pytest.fixture(params=["torch", "driver", "native", "ring"])
def cuda_calls(request, monkeypatch):
    """Each way of queuing the readers' copies, events and stream waits (loader/driver.py,
    loader/native.py, loader/ring.py). With the driver's, the test fails unless its events
    were the driver's; with native calls or the ring, unless a chunk went through one; the
    counts tell a test what else went through them."""
    from fastsafetensors.loader import driver, native, ring

    monkeypatch.setenv("FASTSAFETENSORS_CUDA_CALLS", request.param)
    counts = DriverCounts(request.param)
    if request.param == "driver":
        assert driver.available() is None, driver.available()
        queue = driver.copy_to_device

        def counted(device, stream, pieces):
            pieces = list(pieces)
            counts.copies += len(pieces)
            queue(device, stream, pieces)

        class Event(driver.Event):
            __slots__ = ()

            def __init__(self, device, stream, *, blocking=False):
                counts.blocking.append(blocking)
                super().__init__(device, stream, blocking=blocking)

        monkeypatch.setattr(driver, "copy_to_device", counted)
        monkeypatch.setattr(driver, "Event", Event)
    if request.param == "native":
        assert native.available() is None, native.available()
        call = native.read_copy

        def counted_chunk(device, staged, fd, offset, length, needed, dest, stream, allocated,
                          copies, **kw):
            counts.chunks += 1
            counts.copies += len(copies)
            counts.blocking.append(kw["blocking"])   # the flag of the event the call makes
            return call(device, staged, fd, offset, length, needed, dest, stream, allocated,
                        copies, **kw)

        monkeypatch.setattr(native, "read_copy", counted_chunk)
    if request.param == "ring":
        assert ring.available() is None, ring.available()
        made, submit_file = ring.Ring.__init__, ring.Ring.submit_file

        def init(self, device, **kw):
            counts.blocking.append(kw.get("blocking", False))   # its events' flag
            made(self, device, **kw)

        def counted_submit_file(self, *args, **kw):   # the engine's one way in
            chunks = submit_file(self, *args, **kw)
            counts.chunks += chunks or 0   # its pieces are cut in C, out of Python's sight
            return chunks

        monkeypatch.setattr(ring.Ring, "__init__", init)
        monkeypatch.setattr(ring.Ring, "submit_file", counted_submit_file)
    yield counts
    if request.param == "driver":
        assert counts.blocking, "no event went through the driver"
    if request.param in ("native", "ring") and counts.expect_chunks:
        assert counts.chunks, f"no chunk went through cuda_calls={request.param!r}"


@pytest.fixture
def every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t_{str(d).split('.')[-1]}": _random(d, (257, 129), g) for d in DTYPES}
    tensors["empty"] = torch.zeros(0, 3)
    tensors["scalar"] = torch.tensor(2.5)
    tensors["e8m0"] = _random(torch.uint8, (64,), g).view(torch.float8_e8m0fnu)
    tensors["f4"] = _random(torch.uint8, (8, 16), g).view(torch.float4_e2m1fn_x2)
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path))
    return str(path)


@pytest.mark.parametrize("io", ["buffered", "direct", "auto"])
def test_every_dtype_bit_for_bit(every_dtype, io, cuda_calls):
    if io == "direct":
        require_o_direct(every_dtype)   # else "direct" reads buffered, and proves nothing
    STATS.reset()
    with fastsafetensors.configure(backend="posix"):   # GDS reads bypass STATS
        got = fastsafetensors.load_file(every_dtype, device="cuda:0", io=io)
    if io == "direct":   # O_DIRECT into pinned staging buffers, not a silent fallback
        assert STATS.snapshot()[2] > 0
    want = st_load_file(every_dtype)
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].device.type == "cuda"
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
        assert torch.equal(_bytes(got[name]), _bytes(tensor)), name


@pytest.mark.parametrize("io", ["buffered", "direct"])
def test_staging_on_registered_huge_pages_is_kept_and_gives_the_same_data(every_dtype, io):
    # huge_pages="on": staging is anonymous memory on huge pages registered with CUDA once and
    # kept (loader/hostpool.py); O_DIRECT reads land in it too (page-aligned).
    from fastsafetensors.loader import hostpool

    if io == "direct":
        require_o_direct(every_dtype)
    want = st_load_file(every_dtype)
    registered = []
    for _ in range(2):
        with fastsafetensors.configure(backend="posix", huge_pages="on"):
            got = fastsafetensors.load_file(every_dtype, device="cuda:0", io=io)
        for name, tensor in want.items():
            assert torch.equal(_bytes(got[name]), _bytes(tensor)), name
        registered.append(hostpool.held())
    if hostpool._refused == 801:   # CUDA_ERROR_NOT_SUPPORTED: this machine cannot register
        pytest.skip("cuMemHostRegister is not supported here: staging fell back to torch's "
                    "pinned memory (the data above was checked)")
    # Any other refusal is a failure (201, no context on the reader's thread, was one).
    assert hostpool._refused is None
    # Registered by the first load (or an earlier test's), given back after each load, and
    # none more registered by the second.
    assert registered[0][0] > 0 and registered[0][1] > 0 and registered[1] == registered[0]


@pytest.mark.parametrize("budget", [None, 6 << 20])
def test_cached_chunks_copied_straight_from_the_page_cache_give_the_same_data(
        tmp_path, monkeypatch, slow_copies, budget, cuda_calls):
    # mapped_readers: chunks in the page cache (this file, just written) are copied from a
    # registered read-only mapping of the file, no staging. Odd sizes put tensor ends inside
    # pages; a budget ends chunks at tensor ends (two chunks may then share a page, and the
    # second is staged); slow copies make a range released too early show as wrong bytes.
    g = torch.Generator().manual_seed(7)
    tensors = {f"w{i}": _random(torch.bfloat16, (int(torch.randint(1, 1 << 20, (1,),
                                                                      generator=g)),), g)
               for i in range(24)}
    path = tmp_path / "mapped.safetensors"
    save_file(tensors, str(path))
    counts = {"registered": 0, "released": 0}
    host_source = cuda_loader.TorchCudaSink.host_source
    release_source = cuda_loader.TorchCudaSink.release_source

    def counted(self, address, nbytes):
        source = host_source(self, address, nbytes)
        counts["registered"] += source is not None
        return source

    def released(self, source):
        counts["released"] += 1
        release_source(self, source)

    monkeypatch.setattr(cuda_loader.TorchCudaSink, "host_source", counted)
    monkeypatch.setattr(cuda_loader.TorchCudaSink, "release_source", released)
    # Every reader mapped and every chunk cached: none may be staged, so no native call. (The
    # ring is not used with mapped readers.)
    cuda_calls.expect_chunks = budget is not None and cuda_calls.mode != "ring"
    with fastsafetensors.configure(backend="posix", mapped_readers=4, threads=4,
                                   staging_bytes=8 << 20):
        got = {}
        for name, tensor in fastsafetensors.iter_tensors([str(path)], device="cuda:0",
                                                         io="auto", max_device_bytes=budget):
            got[name] = tensor
    for name, tensor in tensors.items():
        assert torch.equal(_bytes(got[name]), _bytes(tensor)), name
    if cuda_loader._source_refused == 801:   # CUDA_ERROR_NOT_SUPPORTED
        pytest.skip("registering a file mapping is not supported here: chunks were staged "
                    "(the data above was checked)")
    assert cuda_loader._source_refused is None
    assert counts["registered"] > 0 and counts["released"] == counts["registered"]


@pytest.mark.parametrize("streamed", [False, True])
def test_single_tensor_reads_go_to_the_device(every_dtype, monkeypatch, streamed):
    if streamed:  # as a tensor of DEVICE_STREAM_BYTES or more: through the streaming engine
        monkeypatch.setattr("fastsafetensors.file.DEVICE_STREAM_BYTES", 0)
    with fastsafetensors.FastSafetensorsFile(every_dtype, device="cuda:0") as fsf:
        t = fsf["t_float32"]
        assert t.device.type == "cuda"
        # Bytes, not values: random bits hold NaNs, which torch.equal never finds equal.
        assert torch.equal(_bytes(t), _bytes(st_load_file(every_dtype)["t_float32"]))


def test_large_pieces_through_driver_copies_bit_for_bit(every_dtype, monkeypatch, cuda_calls):
    # Pieces of 1 MiB or more are copied one by one, through the driver with
    # cuda_calls="driver"; the smaller ones in runs, through torch. Here every piece counts as
    # large, so every one of every dtype goes through the driver.
    monkeypatch.setattr(cuda_loader, "SMALL_PIECE", 1)
    with fastsafetensors.configure(backend="posix", threads=2, staging_bytes=1 << 20):
        got = fastsafetensors.load_file(every_dtype, device="cuda:0")
    want = st_load_file(every_dtype)
    for name, tensor in want.items():
        assert torch.equal(_bytes(got[name]), _bytes(tensor)), name
    if cuda_calls.mode in ("driver", "native"):   # the ring's pieces are cut in C
        assert cuda_calls.copies >= sum(1 for t in want.values() if t.numel())


def test_many_tensors_and_misaligned(tmp_path, cuda_calls):
    many = {f"t{i}": torch.full((3,), float(i)) for i in range(20_000)}
    path = tmp_path / "many.safetensors"
    save_file(many, str(path))
    got = fastsafetensors.load([str(path)], device="cuda:0")
    # Every tensor (they go to the device in runs of small pieces): one stack, one comparison.
    assert torch.equal(torch.stack([got[f"t{i}"] for i in range(20_000)]).cpu(),
                       torch.stack([many[f"t{i}"] for i in range(20_000)]))
    # Each its own memory: at 12 bytes apart no two are 16-byte aligned from one start, so
    # small_tensor_groups (the default) finds no group.
    assert len({t.untyped_storage().data_ptr() for t in got.values()}) == 20_000

    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "b": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}}
    raw = json.dumps(header).encode()
    mis = tmp_path / "mis.safetensors"
    mis.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x07" + struct.pack("<3f", 1, 2, 3))
    got = fastsafetensors.load_file(str(mis), device="cuda")  # no index: the current device
    assert got["b"].device == torch.device("cuda", torch.cuda.current_device())
    assert got["b"].cpu().tolist() == [1.0, 2.0, 3.0]


def test_blocking_event_waits_give_the_same_data(tmp_path, monkeypatch, slow_copies,
                                                 cuda_calls):
    """event_wait="block": staging events take the blocking flag, the data stays exact."""
    tensors = {f"w{i}": torch.randn(512, 1024) for i in range(16)}  # 2 MiB each
    path = tmp_path / "block.safetensors"
    save_file(tensors, str(path))
    flags: list[bool] = []

    class Recorded(torch.cuda.Event):
        def __new__(cls, enable_timing=False, blocking=False, interprocess=False):
            flags.append(blocking)
            return super().__new__(cls, enable_timing=enable_timing, blocking=blocking,
                                   interprocess=interprocess)

    monkeypatch.setattr(torch.cuda, "Event", Recorded)
    # 2 threads with 1 MiB of staging each: every buffer is reused, so readers wait on events.
    with fastsafetensors.configure(event_wait="block", threads=2, staging_bytes=4 << 20):
        got = fastsafetensors.load([str(path)], device="cuda:0", backend="posix")
    assert any(flags + cuda_calls.blocking), "no staging event was created with blocking=True"
    assert all(torch.equal(got[k].cpu(), v) for k, v in tensors.items())


def test_two_loads_at_once(every_dtype, cuda_calls):
    results: list[dict[str, torch.Tensor]] = [{}, {}]

    def run(i: int) -> None:
        results[i] = fastsafetensors.load([every_dtype], device="cuda:0")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = st_load_file(every_dtype)
    for got in results:
        assert all(torch.equal(_bytes(got[k]), _bytes(v)) for k, v in want.items())


def test_consumer_on_another_stream_sees_complete_data(tmp_path, slow_copies, cuda_calls):
    big = {f"w{i}": torch.full((1024, 1024), float(i)) for i in range(8)}
    path = tmp_path / "big.safetensors"
    save_file(big, str(path))
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        sums = []
        for name, tensor in fastsafetensors.iter_tensors([str(path)], device="cuda:0",
                                                         backend="posix"):
            sums.append((name, tensor.sum()))  # launched on `side` with no host sync between
    _check_sums(sums, big)


@pytest.mark.parametrize("groups", ["off", "on"])
def test_a_consumer_that_switches_streams_between_tensors_sees_complete_data(tmp_path,
                                                                           slow_copies,
                                                                           cuda_calls,
                                                                           groups):
    # Small tensors share one chunk and so one copy event; the consumer's stream skips waits
    # it has already done. A consumer on another stream must wait again (the first version of
    # that skip never reset, so the second stream read tensors still being copied). With
    # small_tensor_groups they also share one allocation: the consumer waits before each.
    small = {f"s{i}": torch.full((1024,), float(i)) for i in range(64)}   # 4 KiB each
    path = tmp_path / "small.safetensors"
    save_file(small, str(path))
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    sums = []
    with fastsafetensors.configure(small_tensor_groups=groups):
        gen = fastsafetensors.iter_tensors([str(path)], device="cuda:0", backend="posix")
        for i in range(len(small)):
            with torch.cuda.stream(streams[i % 2]):
                name, tensor = next(gen)
                sums.append((name, tensor.sum()))   # on this tensor's stream, no host sync
        gen.close()
    _check_sums(sums, small)


def test_small_tensor_groups_give_the_same_data_and_free_their_memory(tmp_path, cuda_calls):
    # Runs of small tensors in one allocation each (small_tensor_groups="on"): the dtypes of
    # DTYPES, sizes in whole multiples of 16 bytes but for every seventh (which ends its group:
    # the next tensor starts off the 16-byte grid), and one tensor over 1 MiB, alone.
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for i in range(400):
        dtype = DTYPES[i % len(DTYPES)]
        size = torch.empty((), dtype=dtype).element_size()
        numel = int(torch.randint(1, 40, (1,), generator=g)) * 16 // size + (i % 7 == 6)
        tensors[f"t{i:03d}"] = _random(dtype, (numel,), g)
    tensors["big"] = _random(torch.float32, ((1 << 20) // 4 + 4,), g)
    path = tmp_path / "groups.safetensors"
    save_file(tensors, str(path))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    with fastsafetensors.configure(small_tensor_groups="on", backend="posix"):
        got = fastsafetensors.load_file(str(path), device="cuda:0")
    want = st_load_file(str(path))
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(_bytes(got[name]), _bytes(tensor)), name
        assert got[name].data_ptr() % 16 == 0, name   # GROUP_ALIGN
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in got.values()}
    assert len(storages) < len(got) // 4                        # grouped
    assert max(storages.values()) <= 8 << 20                     # GROUP_BYTES
    assert got["big"].untyped_storage().nbytes() == got["big"].nbytes   # alone
    # A group's memory stays while one of its tensors does, and goes with the last.
    kept = got.pop("t000")
    del got
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    assert 0 < held <= 8 << 20
    assert torch.equal(_bytes(kept), _bytes(want["t000"]))
    del kept
    assert torch.cuda.memory_allocated() == base


def test_the_sink_finds_the_consumers_stream_by_its_ids():
    # Before each tensor handed over the sink looks up the consumer's current stream: by its ids
    # (torch._C._cuda_getCurrentStream), the load's own Stream object while the consumer stays
    # on it, a new one only after a switch (a silent loss of the shortcut would go unseen).
    assert cuda_loader._current_stream_ids is not None
    sink = cuda_loader.TorchCudaSink("cuda:0")
    assert sink._current_stream() is sink.consumer
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        found = sink._current_stream()
        assert found is not sink.consumer and found == side
    assert sink._current_stream() is sink.consumer


def test_tensors_are_allocated_on_the_consumers_stream(tmp_path):
    # The planner, a pooled thread, allocates with the consumer's stream current there (set
    # once per load, not per tensor), so memory the consumer frees is handed out again in that
    # stream's order. Two loads on two streams: the pooled threads must not keep the first's.
    tensors = {f"w{i}": torch.randn(256, 256) for i in range(6)}
    path = tmp_path / "streams.safetensors"
    save_file(tensors, str(path))

    def streams_of(got: dict[str, torch.Tensor]) -> set[int]:
        wanted = {t.data_ptr() for t in got.values()}
        found: set[int] = set()
        for segment in torch.cuda.memory_snapshot():
            address = segment["address"]   # blocks follow each other from there
            for block in segment["blocks"]:
                if block["state"] == "active_allocated" and address in wanted:
                    found.add(segment["stream"])
                address += block["size"]
        return found

    for _ in range(2):
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            got = fastsafetensors.load_file(str(path), device="cuda:0")
        torch.cuda.synchronize()
        assert streams_of(got) == {side.cuda_stream}
        assert all(torch.equal(got[k].cpu(), v) for k, v in tensors.items())
        del got


def test_peak_device_memory_is_tensors_plus_slack(tmp_path):
    tensors = {f"w{i}": torch.randn(2048, 2048) for i in range(16)}  # 256 MiB
    path = tmp_path / "peak.safetensors"
    save_file(tensors, str(path))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = fastsafetensors.load([str(path)], device="cuda:0")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    nbytes = sum(t.numel() * t.element_size() for t in got.values())
    assert peak <= nbytes + 256 * 2**20


def test_a_whole_load_asks_the_driver_for_each_files_memory_at_once(tmp_path):
    # load() keeps every tensor: each file's memory is allocated at once and freed before its
    # tensors are cut from it (TorchCudaSink.reserve), one driver allocation a file rather than
    # one a tensor. iter_tensors, whose consumer may drop each tensor, allocates one by one, as
    # does load() with reserve_memory="off".
    if not cuda_loader._plain_allocator():
        pytest.skip("torch's allocator is configured here (PYTORCH_CUDA_ALLOC_CONF): loads "
                    "do not reserve then")
    paths = []
    for f in range(2):
        path = tmp_path / f"part{f}.safetensors"
        save_file({f"f{f}.w{i}": torch.randn(2048, 2048) for i in range(8)}, str(path))  # 128 MiB
        paths.append(str(path))
    expected = {k: v for p in paths for k, v in st_load_file(p).items()}

    def segments() -> int:
        torch.cuda.synchronize()
        return torch.cuda.memory_stats()["segment.large_pool.allocated"]

    torch.cuda.empty_cache()
    before = segments()
    got = fastsafetensors.load(paths, device="cuda:0")
    whole = segments() - before
    assert all(torch.equal(got[k].cpu(), v) for k, v in expected.items())
    del got
    torch.cuda.empty_cache()
    before = segments()
    streamed = dict(fastsafetensors.iter_tensors(paths, device="cuda:0"))
    one_by_one = segments() - before
    assert all(torch.equal(streamed[k].cpu(), v) for k, v in expected.items())
    del streamed
    torch.cuda.empty_cache()
    before = segments()
    with fastsafetensors.configure(reserve_memory="off"):
        unreserved = fastsafetensors.load(paths, device="cuda:0")
    turned_off = segments() - before
    assert all(torch.equal(unreserved[k].cpu(), v) for k, v in expected.items())
    assert whole <= 2 < len(expected) <= min(one_by_one, turned_off)


def test_budget_bounds_iter_tensors(tmp_path):
    tensors = {f"w{i}": torch.randn(1024, 1024) for i in range(16)}  # 4 MiB each
    path = tmp_path / "budget.safetensors"
    save_file(tensors, str(path))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _name, tensor in fastsafetensors.iter_tensors([str(path)], device="cuda:0",
                                                      max_device_bytes=16 * 2**20):
        del tensor
    # The budget counts the tensor last yielded until the next one is asked for, and the
    # generators drop theirs then; one tensor of slack for the consumer's loop variable.
    assert torch.cuda.max_memory_allocated() - base <= 16 * 2**20 + 4 * 2**20


def test_memory_the_consumer_frees_is_not_overwritten_under_its_kernels(tmp_path, cuda_calls):
    # Under a budget the allocator hands a new tensor the memory of one the consumer has just
    # freed, while the consumer's (here: slowed down) sum of it may still be queued. The copy
    # stream must wait for the consumer's stream before it writes that memory.
    tensors = {f"w{i}": torch.full((1024, 1024), float(i)) for i in range(12)}  # 4 MiB each
    path = tmp_path / "reuse.safetensors"
    save_file(tensors, str(path))
    sums = []
    for name, tensor in fastsafetensors.iter_tensors([str(path)], device="cuda:0",
                                                     max_device_bytes=8 * 2**20):
        torch.cuda._sleep(20_000_000)   # some 10 ms of GPU time before the sum runs
        sums.append((name, tensor.sum()))
        del tensor
    _check_sums(sums, tensors)


def test_stopping_early_leaves_no_copy_running(tmp_path, cuda_calls):
    tensors = {f"w{i}": torch.randn(1024, 1024) for i in range(16)}
    path = tmp_path / "early.safetensors"
    save_file(tensors, str(path))
    base = torch.cuda.memory_allocated()
    gen = fastsafetensors.iter_tensors([str(path)], device="cuda:0")
    name, first = next(gen)
    gen.close()   # joins the workers, which wait for their copies; unyielded tensors are freed
    from fastsafetensors.loader import threads as pool

    assert pool.busy() == 0   # idle pool threads may stay (named fastsafetensors-idle)
    assert torch.cuda.memory_allocated() - base == first.numel() * first.element_size()
    assert torch.equal(first.cpu(), tensors[name])
    torch.cuda.synchronize()   # no CUDA error left behind
