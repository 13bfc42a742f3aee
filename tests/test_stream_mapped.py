"""Mapped readers (``mapped_readers``): chunks already in the page cache are copied to the
device straight from a read-only mapping of the file, registered for the device's copies,
instead of being read into staging first. On the fake device (tests/fake_device.py), which
refuses overlapping registrations as CUDA does and checks that a range is released only after
its copies ran; tests/gpu runs the real registration."""

from __future__ import annotations

import mmap
import os
import threading
from typing import Any

import pytest
import torch
from fake_device import FakeSink, record_lookups
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

from fastsafetensors import config
from fastsafetensors.errors import ConfigError
from fastsafetensors.loader import cuda as cuda_loader
from fastsafetensors.loader import hostpool, pagecache, streamparts
from fastsafetensors.loader import stream as stream_mod
from fastsafetensors.loader.posix import STATS
from fastsafetensors.loader.stream import StreamOptions, stream_tensors


@pytest.fixture
def shards(tmp_path):
    """Three shards of odd-sized tensors (so chunks break inside tensors and pages), just
    written: in the page cache."""
    g = torch.Generator().manual_seed(1)
    paths = []
    for s in range(3):
        tensors = {f"s{s}.w{i}": torch.randn(int(torch.randint(1, 30_000, (1,), generator=g)),
                                             generator=g).to(torch.bfloat16) for i in range(25)}
        tensors[f"s{s}.ids"] = torch.randint(0, 1 << 40, (333,), generator=g)
        path = tmp_path / f"m{s}.safetensors"
        save_file(tensors, str(path))
        paths.append(str(path))
    return paths


def _load(paths, sink, **opts):
    options = StreamOptions(threads=opts.pop("threads", 3), staging_bytes=opts.pop(
        "staging_bytes", 6 * 65536), **opts)
    out = {}
    for name, tensor in stream_tensors([(p, None, None) for p in paths], sink, options):
        out[name] = tensor
        sink.consumed(tensor.numel() * tensor.element_size())
    return out


def _same(got, paths):
    want = {}
    for p in paths:
        want.update(st_load_file(p))
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def _mapped_files(paths) -> int:
    """Mappings of ``paths`` this process still holds."""
    with open("/proc/self/maps") as f:
        return sum(line.rstrip().endswith(tuple(paths)) for line in f)


def _require_mincore():
    if pagecache._libc is None:
        pytest.skip("no mincore here: nothing is known to be cached, nothing is mapped")


def test_every_reader_mapped_copies_cached_chunks_without_staging(shards):
    _require_mincore()
    sink = FakeSink()
    STATS.reset()
    _same(_load(shards, sink, mapped_readers=3), shards)
    assert sink.violations == []
    # Read from the files all the same (by the copy engine): counted, one read per chunk.
    assert STATS.bytes_read == sum(t.numel() * t.element_size() for p in shards
                                   for t in st_load_file(p).values())
    assert STATS.reads == sink.sourced
    # Every chunk came from the page cache: no reader took staging, no registration was
    # refused (chunks that break for size break at page boundaries, so none share a page),
    # every range was released and every mapping dropped when the load ended.
    assert sink.sourced > 3 and sink.staged == [] and sink.source_refusals == 0
    assert sink.sources == {} and _mapped_files(shards) == 0
    sink.close()


def test_no_mapped_readers_stage_everything(shards):
    sink = FakeSink()
    _same(_load(shards, sink, mapped_readers=0), shards)
    assert sink.sourced == 0 and sink.staged and sink.violations == []
    sink.close()


@pytest.mark.parametrize(("seed", "options"), [
    # Two of four readers map, the other two stage.
    (3, {"threads": 4, "mapped_readers": 2}),
    # A memory budget ends chunks at tensor ends, so two chunks may share a page: the second
    # registration overlaps the first and is refused (as CUDA refuses it) while the first is
    # held; that chunk is staged, the data stays exact.
    (5, {"mapped_readers": 3, "max_device_bytes": 40_000}),
])
def test_mapped_and_staged_chunks_in_one_load(shards, seed, options):
    sink = FakeSink(seed=seed)
    _same(_load(shards, sink, **options), shards)
    assert sink.sourced > 0 and sink.violations == [] and sink.sources == {}
    sink.close()


@pytest.mark.parametrize("io", ["buffered", "direct"])
def test_only_io_auto_maps(shards, io):
    # A fixed io mode is the user's choice of how to read: kept.
    sink = FakeSink()
    _same(_load(shards, sink, io=io, mapped_readers=3), shards)
    assert sink.sourced == 0 and _mapped_files(shards) == 0
    sink.close()


def test_chunks_not_in_the_page_cache_are_staged(shards, monkeypatch):
    # Registering would fault uncached pages in one by one: such chunks are read instead.
    cold = shards[1]
    real = streamparts.resident_map

    def resident(fd, offset, length, **kw):
        pages = real(fd, offset, length, **kw)
        if pages is not None and os.path.samefile(f"/proc/self/fd/{fd}", cold):
            return bytes(len(pages))   # nothing of this file cached
        return pages

    monkeypatch.setattr(streamparts, "resident_map", resident)
    sink = FakeSink()
    registered: list[int] = []
    host_source = sink.host_source

    def spy(address, nbytes):
        registered.append(address)
        return host_source(address, nbytes)

    sink.host_source = spy
    _same(_load(shards, sink, mapped_readers=3), shards)
    assert registered and sink.staged and sink.violations == []
    sink.close()


def test_refused_registrations_fall_back_to_staging(shards):
    sink = FakeSink(refuse_sources=True)
    _same(_load(shards, sink, mapped_readers=3), shards)
    assert sink.source_refusals > 0 and sink.sourced == 0 and sink.staged
    assert sink.violations == [] and _mapped_files(shards) == 0
    sink.close()


def test_stopping_early_releases_every_range_and_mapping(shards):
    sink = FakeSink(delay=0.01)
    options = StreamOptions(threads=3, staging_bytes=6 * 65536, mapped_readers=3)
    it = stream_tensors([(p, None, None) for p in shards], sink, options)
    next(it)
    it.close()
    assert sink.sources == {} and sink.violations == [] and _mapped_files(shards) == 0
    sink.close()


def test_mapped_readers_option():
    assert config.get("mapped_readers") == 0   # off: slower on the one GPU measured
    assert config.get("mapped_readers", 0) == 0
    with pytest.raises(ConfigError, match="an integer >= 0"):
        config.get("mapped_readers", -1)
    with pytest.raises(ConfigError, match="a positive integer"):
        config.get("threads", 0)


def test_device_stream_passes_the_option_on(monkeypatch):
    seen = {}

    def fake_stream(files, sink, options, gate=None):
        seen["options"] = options
        return iter(())

    class Sink:
        def __init__(self, *args, **kwargs):
            pass

    monkeypatch.setattr(stream_mod, "stream_tensors", fake_stream)
    monkeypatch.setattr(cuda_loader, "TorchCudaSink", Sink)
    monkeypatch.setattr("fastsafetensors.loader.gds.select_backend", lambda *a, **k: "posix")
    from fastsafetensors.loading import device_stream

    with config.configure(mapped_readers=2):
        list(device_stream([], "cuda:0"))
    assert seen["options"].mapped_readers == 2


class _Driver:
    """libcuda's registration entry points, answering ``answer`` and recording the calls."""

    def __init__(self, answer: int):
        self.answer = answer
        self.calls: list[tuple[int, int, int]] = []

    def cuMemHostRegister_v2(self, address, nbytes, flags):  # noqa: N802 - CUDA's name
        self.calls.append((address.value, nbytes, flags))
        return self.answer

    def cuMemHostUnregister(self, address):  # noqa: N802 - CUDA's name
        self.calls.append((address.value, 0, 0))
        return 0


def _bare_sink() -> cuda_loader.TorchCudaSink:
    """A TorchCudaSink without CUDA: only what host_source needs."""
    sink = object.__new__(cuda_loader.TorchCudaSink)
    sink.device = torch.device("cuda", 0)
    sink._entered = threading.local()
    return sink


@pytest.mark.parametrize("answer", [0, hostpool.ALREADY_REGISTERED, 801])
def test_cuda_sink_registers_read_only_and_remembers_a_refusal(monkeypatch, answer):
    driver = _Driver(answer)
    monkeypatch.setattr(hostpool, "_driver", driver)
    monkeypatch.setattr(cuda_loader, "_source_refused", None)
    monkeypatch.setattr(cuda_loader, "_bound", threading.local())
    bound: list[Any] = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: bound.append(device))
    page = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    address = torch.frombuffer(page, dtype=torch.uint8).data_ptr()
    sink = _bare_sink()
    first = sink.host_source(address, 2 * mmap.PAGESIZE)
    second = sink.host_source(address, mmap.PAGESIZE)
    flags = hostpool.PORTABLE | hostpool.READ_ONLY
    if answer == 0:
        assert first is not None and first.data_ptr() == address
        assert first.numel() == 2 * mmap.PAGESIZE and second is not None
        sink.release_source(first)
        assert driver.calls[-1] == (address, 0, 0)
    elif answer == hostpool.ALREADY_REGISTERED:
        # That chunk alone is staged; the next one is tried.
        assert first is None and second is None and len(driver.calls) == 2
        assert cuda_loader._source_refused is None
    else:
        # Anything else holds for the process: not asked again.
        assert first is None and second is None and len(driver.calls) == 1
        assert cuda_loader._source_refused == 801
    assert driver.calls[0] == (address, 2 * mmap.PAGESIZE, flags)
    assert bound == [sink.device]   # a context bound once on this thread, before registering


def test_io_auto_maps_each_file_once_for_its_residency_lookups(shards, monkeypatch):
    # A mapping made and dropped per 32 MiB segment costs an munmap each, which interrupts
    # every core running the load's threads; one mapping per file serves every lookup.
    _require_mincore()
    monkeypatch.setattr(streamparts, "SEGMENT", 64 << 10)   # many segments per file
    made: list[int] = []
    mmap_call = pagecache._libc.mmap

    def counted(*args):
        made.append(args[1])
        return mmap_call(*args)

    monkeypatch.setattr(pagecache._libc, "mmap", counted)
    looked = record_lookups(monkeypatch)
    sink = FakeSink()
    _same(_load(shards, sink, io="auto"), shards)
    assert len(looked) > 2 * len(shards)                      # several segments a file
    assert sorted(made) == sorted(os.path.getsize(p) for p in shards)   # one whole-file map each
    assert _mapped_files(shards) == 0 and sink.sourced == 0   # dropped; no mapped readers
    sink.close()
