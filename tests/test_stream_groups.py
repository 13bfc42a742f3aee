"""Runs of small tensors in one allocation (stream.py, ``Sink.finisher``), on the fake device."""

from __future__ import annotations

import gc
import json
import os
import struct
import threading
import weakref

import numpy as np
import pytest
import torch
from fake_device import FakeSink, GroupingFakeSink, as_bytes, emulated_cuda_sink
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

from fastsafetensors.format import TensorInfo, read_header
from fastsafetensors.loader import streamparts
from fastsafetensors.loader.stream import GROUP_BYTES, GROUP_MEMBER, StreamOptions, stream_tensors


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out: dict[str, torch.Tensor] = {}
    for i in range(300):
        # Mostly whole multiples of 16 bytes, as in real checkpoints, which group; every fifth
        # of an odd size, which ends a group (the next tensor starts off the 16-byte grid).
        numel = int(torch.randint(1, 40, (1,), generator=g)) * 16 + (i % 5 == 4)
        dtype = [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int64][i % 5]
        out[f"t{i:03d}"] = (torch.randn(numel, generator=g) * 100).to(dtype)
    out["big"] = torch.randn(GROUP_MEMBER // 4 + 5, generator=g)   # over GROUP_MEMBER bytes
    out["empty"] = torch.zeros(0, 3)
    out["scalar"] = torch.tensor(-1.25)
    out["flags"] = torch.rand(37, generator=g) > 0.5
    out["f8"] = torch.randn(11, 3, generator=g).to(torch.float8_e4m3fn)
    out["c64"] = torch.randn(9, dtype=torch.complex64, generator=g)
    return out


@pytest.fixture
def mixed(tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file(_mixed(), str(path))
    return str(path)


def _load(paths, sink, *, names=None, **opts):
    options = StreamOptions(threads=opts.pop("threads", 3), staging_bytes=opts.pop(
        "staging_bytes", 6 * 16384), small_tensor_groups=opts.pop("groups", True), **opts)
    return list(stream_tensors([(p, None, names) for p in paths], sink, options))


def _small_file(tmp_path, count: int, numel: int, width: int = 4):
    """``count`` F32 tensors of ``numel`` values (names of ``width`` digits, in file order) and
    the file they were saved to."""
    tensors = {f"t{i:0{width}d}": torch.full((numel,), float(i)) for i in range(count)}
    path = tmp_path / "small.safetensors"
    save_file(tensors, str(path))
    return tensors, path


@pytest.mark.parametrize("io", ["buffered", "direct", "auto"])
def test_grouped_loads_equal_safetensors_bit_for_bit_in_file_order(mixed, io):
    sink = GroupingFakeSink(delay=0.0005)
    got = _load([mixed], sink, io=io)
    want = st_load_file(mixed)
    assert [name for name, _ in got] == [name for name, _ in _load([mixed], FakeSink(delay=0))]
    for name, tensor in got:
        assert tensor.dtype == want[name].dtype and tensor.shape == want[name].shape, name
        assert torch.equal(as_bytes(tensor), as_bytes(want[name])), name
        # GROUP_ALIGN within a group, whose memory starts 64-byte aligned here.
        assert tensor.data_ptr() % 16 == 0, name
    assert sink.violations == []
    # Groups of two tensors or more were made, and not every tensor is in one (big and empty
    # are not).
    assert sink.groups and sum(n for _, n in sink.groups) < len(got)
    assert all(n >= 2 for _, n in sink.groups)
    # The consumer's stream is made to wait before each tensor, grouped or not: it may switch
    # streams between two tensors of a group.
    assert sink.waits == len(got)


def test_small_adjacent_tensors_share_one_allocation(tmp_path):
    tensors, path = _small_file(tmp_path, 5000, 4, width=5)
    sink = GroupingFakeSink(delay=0)
    got = dict(_load([str(path)], sink))
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    # 80 KB of tensors: one group (one allocation) instead of 5000.
    assert sink.allocations == 1 and sink.groups == [[5000 * 16, 5000]]
    storages = {t.untyped_storage().data_ptr() for t in got.values()}
    assert len(storages) == 1
    # They share memory without overlapping, which safetensors saves as it would any tensors.
    save_file(got, str(tmp_path / "again.safetensors"))
    again = st_load_file(str(tmp_path / "again.safetensors"))
    assert all(torch.equal(again[k], v) for k, v in tensors.items())
    # Off, each tensor has its own allocation, as safetensors gives it.
    sink = GroupingFakeSink(delay=0)
    got = dict(_load([str(path)], sink, groups=False))
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    assert sink.allocations == 5000 and sink.groups == []


def test_large_misaligned_and_empty_tensors_start_or_stay_out_of_groups(tmp_path):
    # a, b, c: a group (c is 3 bytes); d: F32 at 35, off the 16-byte grid of that group, ends
    # it, and e (8 bytes after d) ends d's; big: over GROUP_MEMBER, alone, and f right after
    # it (on its grid) stays out; g: empty, ends a run; h, i: a group.
    big = GROUP_MEMBER + 16
    layout = [("a", "U8", [16], 16), ("b", "F32", [4], 16), ("c", "U8", [3], 3),
              ("d", "F32", [2], 8), ("e", "F32", [3], 12), ("big", "U8", [big], big),
              ("f", "U8", [16], 16), ("g", "F32", [0], 0), ("h", "U8", [16], 16),
              ("i", "U8", [16], 16)]
    header, offset, data = {}, 0, b""
    for name, dtype, shape, nbytes in layout:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        data += bytes((offset + k) % 251 for k in range(nbytes))
        offset += nbytes
    raw = json.dumps(header).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    sink = GroupingFakeSink(delay=0)
    got = dict(_load([str(path)], sink, staging_bytes=6 * (1 << 20)))
    want = st_load_file(str(path))
    assert all(torch.equal(as_bytes(got[k]), as_bytes(want[k])) for k in want)
    assert all(t.data_ptr() % t.element_size() == 0 for t in got.values())
    assert sink.groups == [[35, 3], [32, 2]]
    assert got["b"].untyped_storage().data_ptr() == got["c"].untyped_storage().data_ptr()
    assert (got["b"].data_ptr() - got["a"].data_ptr()) % 16 == 0
    assert got["big"].untyped_storage().nbytes() == big
    assert sink.allocations == 6   # the two groups, d, e, big, f (g is empty)


class _Watching(GroupingFakeSink):
    """Each allocation over a numpy array, which its storage keeps alive: the array's weak
    reference dies with the memory."""

    def __init__(self, **kw: object):
        super().__init__(**kw)
        self.memory: list[weakref.ref[np.ndarray]] = []

    def alloc(self, info: TensorInfo) -> torch.Tensor:
        flat = super().alloc(info)
        array = np.full(info.nbytes, 0xA5, dtype=np.uint8)
        mine = torch.from_numpy(array)
        with self.lock:
            self.born[id(mine)] = self.born.pop(id(flat))
        self.memory.append(weakref.ref(array))
        return mine


def test_a_group_is_freed_with_its_last_tensor(tmp_path):
    tensors, path = _small_file(tmp_path, 300, 4)
    sink = _Watching(delay=0)
    got = dict(_load([str(path)], sink))
    assert sink.groups == [[300 * 16, 300]] and len(sink.memory) == 1
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    kept = got.pop("t0150")
    got.clear()
    gc.collect()
    assert sink.memory[0]() is not None and torch.equal(kept, tensors["t0150"])
    del kept
    assert sink.memory[0]() is None   # the engine keeps nothing of it (reference counts alone)


def test_the_engine_lets_a_group_go_once_its_tensors_are_handed_over(tmp_path, monkeypatch):
    # Two groups of 64 tensors, then a large tensor, all in one chunk (one batch): once the
    # consumer has dropped the tensors of both groups, neither group's memory may be held by
    # the engine while it hands the large one over.
    monkeypatch.setattr(streamparts, "GROUP_BYTES", 1024)
    tensors = {f"t{i:03d}": torch.full((4,), float(i)) for i in range(128)}
    tensors["zbig"] = torch.ones(GROUP_MEMBER // 4)
    path = tmp_path / "two.safetensors"
    save_file(tensors, str(path))
    sink = _Watching(delay=0)
    gen = stream_tensors([(str(path), None, None)], sink,
                         StreamOptions(threads=3, staging_bytes=24 << 20,
                                       small_tensor_groups=True))
    for i in range(128):
        name, tensor = next(gen)
        assert name == f"t{i:03d}" and torch.equal(tensor, tensors[name])
        del tensor
    name, big = next(gen)
    assert name == "zbig" and sink.groups == [[1024, 64], [1024, 64]]
    assert [ref() is None for ref in sink.memory] == [True, True, False]
    gen.close()


def test_groups_take_only_adjacent_wanted_tensors(mixed):
    infos = list(read_header(mixed).tensors.values())
    names = [info.name for info in infos[::3]]   # two tensors skipped between wanted ones
    sink = GroupingFakeSink(delay=0)
    got = dict(_load([mixed], sink, names=names))
    want = st_load_file(mixed)
    assert set(got) == set(names)
    assert all(torch.equal(as_bytes(got[k]), as_bytes(want[k])) for k in names)
    # No tensor is adjacent to another wanted one: nothing to group, nothing unwanted read
    # into a group.
    assert sink.groups == []


def test_a_group_holds_at_most_group_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(streamparts, "GROUP_BYTES", 4096)
    tensors, path = _small_file(tmp_path, 200, 100)   # 400 B each
    sink = GroupingFakeSink(delay=0)
    got = dict(_load([str(path)], sink))
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    assert [size for size, _ in sink.groups] == [4000] * 20
    assert GROUP_BYTES == 8 << 20   # the module's own value is untouched outside this test


def test_a_memory_budget_allocates_each_tensor_on_its_own(tmp_path):
    tensors, path = _small_file(tmp_path, 300, 16)
    sink = GroupingFakeSink(delay=0)
    got = {}
    for name, tensor in stream_tensors([(str(path), None, None)], sink,
                                       StreamOptions(threads=2, staging_bytes=4 * 16384,
                                                     max_device_bytes=64 << 10,
                                                     small_tensor_groups=True)):
        got[name] = tensor
        sink.consumed(tensor.numel() * tensor.element_size())
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    assert sink.groups == [] and sink.allocations == 300


def test_stopping_within_a_group_ends_the_load(tmp_path):
    tensors, path = _small_file(tmp_path, 1000, 8)
    before = len(os.listdir("/proc/self/fd"))
    sink = GroupingFakeSink(delay=0.001)
    gen = stream_tensors([(str(path), None, None)], sink,
                         StreamOptions(threads=2, staging_bytes=4 * 16384,
                                       small_tensor_groups=True))
    taken = [next(gen) for _ in range(3)]
    gen.close()
    assert [name for name, _ in taken] == ["t0000", "t0001", "t0002"]
    assert torch.equal(taken[2][1], tensors["t0002"])
    assert len(os.listdir("/proc/self/fd")) == before
    assert not [t.name for t in threading.enumerate()
                if t.name.startswith("fastsafetensors-") and "idle" not in t.name]


@pytest.mark.parametrize("ids", [False, True])
def test_the_cuda_sink_records_a_group_on_the_stream_its_tensor_is_handed_to(monkeypatch, ids):
    # As finish() (test_stream.py): a tensor of a group handed over while the consumer is on
    # another stream records the group's memory on that stream. Emulated on the CPU.
    from fastsafetensors.loader import cuda

    sink, current, lookups, second = emulated_cuda_sink(monkeypatch, ids)
    first = sink.consumer
    recorded: list[int] = []

    class Block:
        def record_stream(self, stream: torch.Stream) -> None:
            recorded.append(stream.stream_id)

    class Viewer:
        @staticmethod
        def strided_viewer(block: Block):
            return lambda offset, info: (offset, info.name)

    monkeypatch.setattr(cuda, "TORCH", Viewer)
    finish = sink.finisher(Block())
    out = []
    for i, s in enumerate((first, second, first)):
        current[0] = s
        sink.consumer_wait([])
        out.append(finish(16 * i, TensorInfo(f"w{i}", "F32", (4,), (16 * i, 16 * i + 16))))
    assert out == [(0, "w0"), (16, "w1"), (32, "w2")]
    assert recorded == [2] and lookups == ([2] if ids else [1, 2, 1])


@pytest.mark.parametrize("groups", [None, "off", "on"])
def test_the_option_reaches_the_engine_of_a_gpu_load(mixed, monkeypatch, groups):
    import fastsafetensors
    import fastsafetensors.loader.cuda as cuda_module
    import fastsafetensors.loader.gds as gds_module
    from fastsafetensors.loading import device_stream

    sinks: list[GroupingFakeSink] = []

    def sink(device: str, **kw: object) -> GroupingFakeSink:
        sinks.append(GroupingFakeSink(delay=0))
        return sinks[-1]

    monkeypatch.setattr(cuda_module, "TorchCudaSink", sink)
    monkeypatch.setattr(gds_module, "select_backend", lambda backend, device: "posix")
    if groups is not None:
        monkeypatch.setenv("FASTSAFETENSORS_SMALL_TENSOR_GROUPS", groups)
    got = dict(device_stream([(mixed, None, None)], "cuda:0"))
    want = st_load_file(mixed)
    assert all(torch.equal(as_bytes(got[k]), as_bytes(v)) for k, v in want.items())
    assert bool(sinks[0].groups) == (groups != "off")   # on by default
    with pytest.raises(Exception, match="small_tensor_groups"):
        with fastsafetensors.configure(small_tensor_groups="yes"):
            pass


def test_groups_copied_straight_from_the_page_cache(mixed):
    # Mapped readers copy cached chunks from the file's mapping instead of staging: a group
    # is filled from there the same way (its pieces break at page boundaries there).
    sink = GroupingFakeSink(delay=0.0005)
    got = _load([mixed], sink, io="auto", mapped_readers=3, staging_bytes=6 * 65536)
    want = st_load_file(mixed)
    assert all(torch.equal(as_bytes(t), as_bytes(want[name])) for name, t in got)
    assert sink.sourced > 0 and sink.groups and sink.violations == []
    assert sink.sources == {}   # every registered range released
