"""Golden checks: every tensor equals what safetensors itself loads, bit for bit.

Every dtype safetensors 0.8 writes, in ordinary, empty and 0-d shapes, through every public way of
reading a tensor; deliberately misaligned files; a 20,000-tensor file; the shape set of a 7B
Llama backed by a sparse file; and one real ~300 MB file (``slow``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
from builders import (
    ALL_DTYPES,
    NUMPY_DTYPES,
    all_dtype_tensors,
    as_bytes,
    assert_aligned,
    assert_bitwise_equal,
    header_bytes,
    layout,
    llama_specs,
    many_tensors,
    misaligned_entries,
    shapes_for,
    tensor_name,
    write_file,
    write_raw,
    write_sparse,
)

import fastsafetensors
from fastsafetensors import FastSafetensorsFile, LazyTensorFactory, UnsupportedDTypeError
from fastsafetensors.loader.posix import STATS


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """One file with every dtype in every golden shape, and what safetensors loads from it."""
    path = tmp_path_factory.mktemp("golden") / "all_dtypes.safetensors"
    write_file(path, all_dtype_tensors(), {"format": "pt", "note": "golden"})
    return path, safetensors.torch.load_file(path)


def _via_load_file(path: Path, names: list[str]) -> dict[str, Any]:
    out = fastsafetensors.load_file(path)
    return {n: out[n] for n in names}


def _via_getitem(path: Path, names: list[str]) -> dict[str, Any]:
    with FastSafetensorsFile(path) as fsf:
        return {n: fsf[n] for n in names}


def _via_get_tensor(path: Path, names: list[str]) -> dict[str, Any]:
    with FastSafetensorsFile(path) as fsf:
        return {n: fsf.get_tensor(n) for n in names}


def _via_safe_open(path: Path, names: list[str]) -> dict[str, Any]:
    with fastsafetensors.safe_open(path, framework="pt") as f:
        return {n: f.get_tensor(n) for n in names}


def _via_get_slice(path: Path, names: list[str]) -> dict[str, Any]:
    with fastsafetensors.safe_open(path, "pt") as f:
        return {n: f.get_slice(n)[...] for n in names}


def _via_loads(path: Path, names: list[str]) -> dict[str, Any]:
    out = fastsafetensors.loads(path.read_bytes())
    return {n: out[n] for n in names}


def _via_lazy(path: Path, names: list[str]) -> dict[str, Any]:
    with LazyTensorFactory(path) as factory:
        return {n: factory.lazy(n).materialize() for n in names}


def _via_create(path: Path, names: list[str]) -> dict[str, Any]:
    with LazyTensorFactory([path]) as factory:
        return {n: factory.create(n) for n in names}


def _via_creator(path: Path, names: list[str]) -> dict[str, Any]:
    """A custom creation hook building torch tensors itself from the raw bytes and TensorInfo."""
    from fastsafetensors.format import TensorInfo

    def creator(data: memoryview, info: TensorInfo) -> torch.Tensor:
        dtype = getattr(torch, fastsafetensors.format.DTYPES[info.dtype].torch)
        shape = (*info.shape[:-1], info.shape[-1] // 2) if info.dtype == "F4" else info.shape
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else \
            torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(shape)

    with LazyTensorFactory(path, creator=creator) as factory:
        return {n: factory.create(n) for n in names}


READERS: dict[str, Callable[[Path, list[str]], dict[str, Any]]] = {
    "load_file": _via_load_file, "getitem": _via_getitem, "get_tensor": _via_get_tensor,
    "safe_open": _via_safe_open, "get_slice": _via_get_slice, "loads": _via_loads,
    "lazy": _via_lazy, "create": _via_create, "creator": _via_creator,
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_every_dtype_bit_for_bit(golden: tuple[Path, dict[str, torch.Tensor]], dtype: str,
                                 reader: str) -> None:
    path, reference = golden
    names = [tensor_name(dtype, shape) for shape in shapes_for(dtype)]
    got = READERS[reader](path, names)
    for name in names:
        assert_bitwise_equal(got[name], reference[name])
        assert_aligned(got[name])
    # the set covers ordinary, empty (a zero dim) and 0-d tensors
    shapes = [reference[n].shape for n in names]
    assert any(0 in s for s in shapes) and any(s.numel() > 1 for s in shapes)
    assert dtype == "F4" or any(len(s) == 0 for s in shapes)


def test_load_file_returns_every_tensor_in_file_order(
        golden: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, reference = golden
    ours = fastsafetensors.load_file(path)
    assert set(ours) == set(reference)
    with safetensors.safe_open(path, "pt") as f:
        file_order = f.offset_keys()
    # empty tensors share an offset with a neighbour, so only non-empty ones have a fixed place
    assert ([n for n in ours if ours[n].numel()]
            == [n for n in file_order if reference[n].numel()])
    # fully materialized tensors that own their memory, not views of a mapping of the file
    for tensor in ours.values():
        assert tensor.device.type == "cpu" and not tensor.requires_grad


def test_f4_shape_counts_four_bit_values(golden: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = golden
    with FastSafetensorsFile(path) as fsf:
        info = fsf.get_tensors()["f4.3x8"]
        assert info.shape == (3, 8) and info.nbytes == 12
        t = fsf["f4.3x8"]
    assert t.dtype == torch.float4_e2m1fn_x2 and t.shape == (3, 4)


# -- numpy ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def golden_np(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tensors = {k: v for k, v in all_dtype_tensors(seed=5).items()
               if k.split(".")[0].upper() in NUMPY_DTYPES}
    path = tmp_path_factory.mktemp("golden_np") / "numpy_dtypes.safetensors"
    return write_file(path, tensors)


def _assert_np_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    assert isinstance(actual, np.ndarray)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.tobytes() == expected.tobytes()


@pytest.mark.parametrize("reader", ["load_file", "getitem", "safe_open", "loads", "slice"])
def test_numpy_bit_for_bit(golden_np: Path, reader: str) -> None:
    reference = safetensors.numpy.load_file(golden_np)
    assert {k.split(".")[0].upper() for k in reference} == set(NUMPY_DTYPES)
    if reader == "load_file":
        got = fastsafetensors.load_file(golden_np, framework="np")
    elif reader == "loads":
        got = fastsafetensors.loads(golden_np.read_bytes(), framework="np")
    elif reader == "safe_open":
        with fastsafetensors.safe_open(golden_np, framework="np") as f:
            got = {n: f.get_tensor(n) for n in f.keys()}
    else:
        with FastSafetensorsFile(golden_np, framework="np") as fsf:
            if reader == "getitem":
                got = {n: fsf[n] for n in fsf}
            else:
                got = {n: fsf.get_slice(n)[...] for n in fsf}
    assert set(got) == set(reference)
    for name in reference:
        _assert_np_equal(got[name], reference[name])


@pytest.mark.parametrize("dtype", [d for d in ALL_DTYPES if d not in NUMPY_DTYPES])
def test_numpy_rejects_dtypes_it_lacks(golden: tuple[Path, dict[str, torch.Tensor]],
                                       dtype: str) -> None:
    path, _ = golden
    name = tensor_name(dtype, shapes_for(dtype)[0])
    with FastSafetensorsFile(path, framework="np") as fsf:
        with pytest.raises(UnsupportedDTypeError) as excinfo:
            fsf[name]
        with pytest.raises(UnsupportedDTypeError):
            fsf.get_slice(name)[0]
    assert isinstance(excinfo.value, TypeError)
    message = str(excinfo.value)
    assert dtype in message and name in message and "framework='pt'" in message
    with pytest.raises(UnsupportedDTypeError, match="framework='pt'"):
        fastsafetensors.load_file(path, framework="np")


# -- misaligned tensors (hand-written headers) -------------------------------------------------

@pytest.fixture(params=["padded", "odd_header"])
def misaligned(request: pytest.FixtureRequest, tmp_path: Path
               ) -> tuple[Path, dict[str, torch.Tensor]]:
    """Tensors at data offsets that are not multiples of their element size; with an 8-aligned
    data region (``padded``) and with a data region starting at an odd file offset."""
    entries, data, expected = misaligned_entries()
    path = tmp_path / "misaligned.safetensors"
    if request.param == "padded":
        write_raw(path, entries, data)
        assert (os.path.getsize(path) - len(data)) % 8 == 0
    else:
        hb = header_bytes(entries, pad=False)
        if (8 + len(hb)) % 2 == 0:
            hb += b" "
        write_raw(path, hb, data, pad=False)
        assert (os.path.getsize(path) - len(data)) % 2 == 1
    return path, expected


@pytest.mark.parametrize("reader", [*READERS, "load_file_direct", "load_file_buffered"])
def test_misaligned_tensors_are_equal_and_aligned(
        misaligned: tuple[Path, dict[str, torch.Tensor]], reader: str) -> None:
    path, expected = misaligned
    names = list(expected)
    if reader.startswith("load_file_"):
        out = fastsafetensors.load_file(path, io=reader.split("_")[-1])
        got = {n: out[n] for n in names}
    else:
        got = READERS[reader](path, names)
    reference = safetensors.torch.load_file(path)
    for name in names:
        assert_bitwise_equal(got[name], expected[name])
        assert_bitwise_equal(got[name], reference[name])
        assert_aligned(got[name])


# -- many tensors -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("many") / "many.safetensors"
    return write_file(path, many_tensors(20_000))


def test_many_tensors_load_file(many: Path) -> None:
    reference = safetensors.torch.load_file(many)
    assert len(reference) == 20_000
    before = STATS.snapshot()
    ours = fastsafetensors.load_file(many, io="buffered")
    after = STATS.snapshot()
    with safetensors.safe_open(many, "pt") as ref:
        file_order = ref.offset_keys()
    # empty tensors share an offset with a neighbour, so only non-empty ones have a fixed place
    assert ([n for n in ours if ours[n].numel()]
            == [n for n in file_order if reference[n].numel()])
    for name, tensor in reference.items():
        assert_bitwise_equal(ours[name], tensor)
    header = fastsafetensors.format.read_header(many)
    # one pass over the data region in a few large reads, not one read per tensor
    assert after[0] - before[0] == header.data_size
    assert 1 <= after[1] - before[1] <= 4


def test_many_tensors_open_reads_no_data(many: Path) -> None:
    before = STATS.snapshot()
    with FastSafetensorsFile(many) as fsf:
        assert len(fsf) == 20_000
        infos = fsf.get_tensors()
        assert fsf.bytes_read == 0
        assert STATS.snapshot() == before
        name = fsf.offset_keys()[12_345]
        assert_bitwise_equal(fsf[name], safetensors.torch.load_file(many)[name])
        assert fsf.bytes_read == infos[name].nbytes
    assert len(infos) == 20_000


# -- a 7B Llama's shape set, backed by a sparse file ---------------------------------------------

@pytest.fixture(scope="module")
def llama_sparse(tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[Path, dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """13.5 GB of BF16 tensor shapes; only a few ranges hold written bytes, the rest is a hole."""
    specs = llama_specs()
    entries = layout(specs)
    path = tmp_path_factory.mktemp("llama") / "model.safetensors"
    data_start = write_sparse(path, entries, metadata={"format": "pt", "model": "llama-7b"})
    gen = torch.Generator().manual_seed(1)
    written = {
        "model.norm.weight": torch.randn(4096, generator=gen).bfloat16(),
        "model.layers.31.input_layernorm.weight": torch.randn(4096, generator=gen).bfloat16(),
        "embed_rows_1000_1004": torch.randn(4, 4096, generator=gen).bfloat16(),
        "lm_head_last_row": torch.randn(4096, generator=gen).bfloat16(),
    }
    where = {
        "model.norm.weight": entries["model.norm.weight"]["data_offsets"][0],
        "model.layers.31.input_layernorm.weight":
            entries["model.layers.31.input_layernorm.weight"]["data_offsets"][0],
        "embed_rows_1000_1004": entries["model.embed_tokens.weight"]["data_offsets"][0]
        + 1000 * 4096 * 2,
        "lm_head_last_row": entries["lm_head.weight"]["data_offsets"][1] - 4096 * 2,
    }
    fd = os.open(path, os.O_WRONLY)
    try:
        for key, tensor in written.items():
            os.pwrite(fd, bytes(as_bytes(tensor).numpy()), data_start + where[key])
    finally:
        os.close(fd)
    return path, entries, written


def test_llama_7b_header_parses(llama_sparse: Any) -> None:
    path, entries, _ = llama_sparse
    assert os.path.getsize(path) > 13_000_000_000
    # the file is sparse: the test wrote kilobytes, not gigabytes
    assert os.stat(path).st_blocks * 512 < 100_000_000
    header = fastsafetensors.format.read_header(path)
    assert header.data_size == 13_476_831_232
    assert len(header.tensors) == 291 == len(entries)
    assert header.metadata == {"format": "pt", "model": "llama-7b"}
    for name, entry in entries.items():
        info = header.tensors[name]
        assert (info.dtype, list(info.shape), list(info.data_offsets)) == (
            entry["dtype"], entry["shape"], entry["data_offsets"])
    assert sum(t.numel for t in header.tensors.values()) == 6_738_415_616


def test_llama_7b_reads_only_what_is_asked(llama_sparse: Any) -> None:
    path, _, written = llama_sparse
    before = STATS.snapshot()
    with FastSafetensorsFile(path) as fsf, safetensors.safe_open(path, "pt") as ref:
        assert fsf.metadata() == {"format": "pt", "model": "llama-7b"}
        assert len(fsf.get_tensors()) == 291 and fsf.bytes_read == 0
        assert STATS.snapshot() == before

        for name in ("model.norm.weight", "model.layers.31.input_layernorm.weight"):
            start = fsf.bytes_read
            assert_bitwise_equal(fsf[name], written[name])
            assert fsf.bytes_read - start == 4096 * 2

        row = 4096 * 2
        embed = fsf.get_slice("model.embed_tokens.weight")
        assert embed.get_shape() == [32000, 4096] and embed.get_dtype() == "BF16"
        start = fsf.bytes_read
        rows = embed[1000:1004]
        assert fsf.bytes_read - start == 4 * row
        assert_bitwise_equal(rows, written["embed_rows_1000_1004"])
        assert_bitwise_equal(rows, ref.get_slice("model.embed_tokens.weight")[1000:1004])

        start = fsf.bytes_read
        block = embed[1001:1003, 100:164]
        # rows 1001 and 1002 at most (whole rows, or only their columns), never more
        assert 2 * 64 * 2 <= fsf.bytes_read - start <= 2 * row
        assert_bitwise_equal(block, written["embed_rows_1000_1004"][1:3, 100:164])

        start = fsf.bytes_read
        last = fsf.get_slice("lm_head.weight")[-1]
        assert fsf.bytes_read - start == row
        assert_bitwise_equal(last, written["lm_head_last_row"])

        start = fsf.bytes_read
        hole = fsf.get_slice("model.layers.7.mlp.down_proj.weight")[5:7]
        assert hole.shape == (2, 11008) and fsf.bytes_read - start == 2 * 11008 * 2
        assert not hole.float().any()
        total = fsf.bytes_read
    assert total < 200_000
    assert STATS.snapshot()[0] - before[0] == total


def test_llama_7b_lazy_factory(llama_sparse: Any) -> None:
    path, _, written = llama_sparse
    with LazyTensorFactory([path]) as factory:
        handle = factory.lazy("model.layers.0.mlp.gate_proj.weight")
        assert handle.shape == (11008, 4096) and handle.dtype == torch.bfloat16
        assert_bitwise_equal(factory.create("model.norm.weight"), written["model.norm.weight"])


# -- one real file of a few hundred MB -----------------------------------------------------------

@pytest.mark.slow
def test_real_300mb_file_bit_for_bit(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for i in range(36):  # 36 x (4 MiB f32 + 2 MiB bf16 + 2 MiB f16) = 302 MB
        tensors[f"layers.{i}.w"] = torch.randn(1024, 1024, generator=gen)
        tensors[f"layers.{i}.b"] = torch.randn(1024, 1024, generator=gen).bfloat16()
        tensors[f"layers.{i}.h"] = torch.randn(1024, 1024, generator=gen).half()
    tensors["tail.odd"] = torch.arange(12345, dtype=torch.uint8)
    path = write_file(tmp_path / "big.safetensors", tensors)
    del tensors
    assert os.path.getsize(path) > 300_000_000
    reference = safetensors.torch.load_file(path)
    for io in ("buffered", "auto"):
        ours = fastsafetensors.load_file(path, io=io)
        assert set(ours) == set(reference)
        for name, tensor in reference.items():
            assert_bitwise_equal(ours[name], tensor)
        del ours
