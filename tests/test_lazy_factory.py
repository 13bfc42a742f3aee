"""LazyTensorFactory and LazyTensor: handles over one file or several, custom creation hooks,
safetensors' slice protocol, and laziness counted in bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import torch
from builders import (
    assert_bitwise_equal,
    open_fds,
    sharded_checkpoint,
    small_tensors,
    write_file,
)

from fastsafetensors import (
    CheckpointIndexError,
    CheckpointNotFoundError,
    ConfigError,
    FastSafetensorsFile,
    HeaderError,
    LazyTensor,
    TensorInfo,
    TensorNotFoundError,
    safe_open,
)
from fastsafetensors.lazy_tensor_factory import LazyTensorFactory
from fastsafetensors.loader.posix import STATS


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    out = small_tensors()
    out["big"] = torch.randn(64, 48, generator=torch.Generator().manual_seed(2))
    return out


@pytest.fixture
def shards(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> list[Path]:
    _, paths = sharded_checkpoint(tmp_path / "ckpt", tensors, shards=3)
    return paths


def test_single_file_sources(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = write_file(tmp_path / "m.safetensors", tensors)
    for source in (path, str(path), [path], (str(path),)):
        with LazyTensorFactory(source) as factory:
            assert factory.keys() == sorted(tensors) and len(factory) == len(tensors)
            assert list(factory) == sorted(tensors)
            assert "big" in factory and "nope" not in factory
            assert_bitwise_equal(factory.create("big"), tensors["big"])


def test_a_safe_open_handle_as_source(tmp_path: Path) -> None:
    # safe_open's handle reads every tensor in get_tensors() (as safetensors'); the factory
    # asked it for metadata, read the whole file and broke info() and create().
    path = write_file(tmp_path / "a.safetensors",
                      {"w": torch.arange(12.0).reshape(4, 3), "big": torch.zeros(512, 512)})
    with safe_open(path, "pt") as f:
        factory = LazyTensorFactory([f], creator=lambda data, info: bytes(data))
        assert f.bytes_read == 0
        assert factory.info("w").shape == (4, 3)
        assert factory.create("w") == torch.arange(12.0).numpy().tobytes()
        assert f.bytes_read == 48


def test_sharded_sources(shards: list[Path], tensors: dict[str, torch.Tensor]) -> None:
    assert len(shards) == 3
    before = STATS.snapshot()
    with LazyTensorFactory(shards) as factory:
        assert factory.keys() == sorted(tensors)
        handles = {name: factory.lazy(name) for name in factory}
        assert STATS.snapshot() == before  # handles read nothing
        for name, handle in handles.items():
            assert isinstance(handle, LazyTensor)
            assert handle.name == name
            assert handle.shape == tuple(tensors[name].shape)
            assert handle.get_shape() == list(tensors[name].shape)
            assert handle.dtype == tensors[name].dtype
            info = factory.info(name)
            assert isinstance(info, TensorInfo) and info.shape == handle.shape
            assert handle.get_dtype() == info.dtype and isinstance(handle.get_dtype(), str)
            assert_bitwise_equal(handle.materialize(), tensors[name])
            assert_bitwise_equal(factory.create(name), tensors[name])


def test_lazy_handle_reads_only_what_it_is_asked(tmp_path: Path,
                                                 tensors: dict[str, torch.Tensor]) -> None:
    path = write_file(tmp_path / "m.safetensors", tensors)
    with FastSafetensorsFile(path) as fsf, LazyTensorFactory([fsf]) as factory:
        handle = factory.lazy("big")
        assert fsf.bytes_read == 0
        assert_bitwise_equal(handle[8:12], tensors["big"][8:12])
        assert fsf.bytes_read == 4 * 48 * 4
        assert_bitwise_equal(handle[..., 5], tensors["big"][..., 5])
        assert_bitwise_equal(handle[-1, 2:6], tensors["big"][-1, 2:6])
        with pytest.raises(IndexError):
            handle[64]


def test_materialize_and_create_cast(shards: list[Path], tensors: dict[str, torch.Tensor]
                                     ) -> None:
    with LazyTensorFactory(shards) as factory:
        handle = factory.lazy("big")
        half = handle.materialize(dtype=torch.float16)
        assert half.dtype == torch.float16 and torch.equal(half, tensors["big"].half())
        assert_bitwise_equal(handle.materialize(device="cpu"), tensors["big"])
        created = factory.create("lm_head.weight", device="cpu", dtype=torch.bfloat16)
        assert torch.equal(created, tensors["lm_head.weight"].bfloat16())


def test_custom_creator_gets_bytes_and_info(tmp_path: Path,
                                            tensors: dict[str, torch.Tensor]) -> None:
    path = write_file(tmp_path / "m.safetensors", tensors)
    calls: list[tuple[bytes, TensorInfo]] = []

    class Wrapped:
        def __init__(self, data: bytes, info: TensorInfo):
            self.data, self.info = data, info

    def creator(data: memoryview, info: TensorInfo) -> Wrapped:
        assert isinstance(data, memoryview) and data.nbytes == info.nbytes
        calls.append((bytes(data), info))
        return Wrapped(bytes(data), info)

    with FastSafetensorsFile(path) as fsf:
        with LazyTensorFactory([fsf], creator=creator) as factory:
            made = factory.create("model.norm.weight")
            assert fsf.bytes_read == fsf.get_tensors()["model.norm.weight"].nbytes
            scalar = factory.create("step")
    assert isinstance(made, Wrapped) and made.info.name == "model.norm.weight"
    assert made.info.dtype == "F32" and made.info.shape == (16,)
    assert made.data == tensors["model.norm.weight"].numpy().tobytes()
    assert scalar.data == (7).to_bytes(8, "little")
    assert len(calls) == 2


def test_creator_builds_numpy(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = write_file(tmp_path / "m.safetensors", tensors)

    def to_numpy(data: memoryview, info: TensorInfo) -> np.ndarray:
        return np.frombuffer(data, dtype="<f4").reshape(info.shape)

    with LazyTensorFactory(path, creator=to_numpy) as factory:
        got = factory.create("big")
    np.testing.assert_array_equal(got, tensors["big"].numpy())


def test_a_creator_with_a_device_or_dtype_asked_for_refuses(tmp_path: Path,
                                                            tensors: dict[str, torch.Tensor]
                                                            ) -> None:
    # The creator builds from the stored bytes: a device or dtype passed to create() was
    # dropped without a word (a float16 asked for, float32 given).
    path = write_file(tmp_path / "m.safetensors", tensors)
    with LazyTensorFactory(path, creator=lambda data, info: bytes(data)) as factory:
        for option, value in (("device", "cpu"), ("dtype", torch.float16)):
            with pytest.raises(ConfigError, match=f"{option}=.*None with a creator") as info:
                factory.create("big", **{option: value})
            assert isinstance(info.value, ValueError)
        assert factory.create("big") == tensors["big"].numpy().tobytes()


def test_numpy_framework(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = write_file(tmp_path / "m.safetensors", tensors)
    with LazyTensorFactory(path, framework="np") as factory:
        handle = factory.lazy("big")
        assert handle.dtype == np.dtype("float32")
        got = handle[2:4]
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, tensors["big"].numpy()[2:4])
        np.testing.assert_array_equal(factory.create("step"), np.array(7))


def test_slice_protocol_consumers(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Code written against safetensors' slices (tensor-parallel sharding in transformers and
    vLLM style) accepts our handles unchanged and gets the same tensors."""
    path = write_file(tmp_path / "m.safetensors", tensors)

    def shard_rows(slice_: Any, rank: int, world: int) -> torch.Tensor:
        rows = slice_.get_shape()[0]
        per = rows // world
        return slice_[rank * per:(rank + 1) * per]

    def shard_cols(slice_: Any, rank: int, world: int) -> torch.Tensor:
        cols = slice_.get_shape()[-1]
        per = cols // world
        return slice_[:, rank * per:(rank + 1) * per]

    def dtype_name(slice_: Any) -> str:
        return {"F32": "float", "F16": "half", "BF16": "bfloat16"}[slice_.get_dtype()]

    with LazyTensorFactory(path) as factory, safetensors.safe_open(path, "pt") as ref:
        for name in ("big", "lm_head.weight", "model.layers.0.mlp.up_proj.weight"):
            for rank in range(4):
                assert_bitwise_equal(shard_rows(factory.lazy(name), rank, 4),
                                     shard_rows(ref.get_slice(name), rank, 4))
                assert_bitwise_equal(shard_cols(factory.lazy(name), rank, 4),
                                     shard_cols(ref.get_slice(name), rank, 4))
            assert dtype_name(factory.lazy(name)) == dtype_name(ref.get_slice(name))


def test_duplicate_name_across_files(tmp_path: Path) -> None:
    a = write_file(tmp_path / "a.safetensors", {"w": torch.zeros(2), "x": torch.ones(1)})
    b = write_file(tmp_path / "b.safetensors", {"w": torch.ones(2)})
    before = open_fds()
    with pytest.raises(CheckpointIndexError) as excinfo:
        LazyTensorFactory([a, b])
    assert open_fds() == before
    error = excinfo.value
    assert isinstance(error, HeaderError) and isinstance(error, ValueError)
    assert "'w'" in str(error) and "a.safetensors" in str(error) and "b.safetensors" in str(error)


def test_missing_source_releases_opened_files(tmp_path: Path) -> None:
    a = write_file(tmp_path / "a.safetensors", {"w": torch.zeros(2)})
    before = open_fds()
    with pytest.raises(CheckpointNotFoundError):
        LazyTensorFactory([a, tmp_path / "missing.safetensors"])
    assert open_fds() == before


def test_close_closes_only_owned_files(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = write_file(tmp_path / "m.safetensors", tensors)
    other = write_file(tmp_path / "o.safetensors", {"extra": torch.arange(3)})
    before = open_fds()
    with FastSafetensorsFile(path) as fsf:
        with LazyTensorFactory([fsf, other]) as factory:
            assert len(open_fds() - before) == 2
            assert factory.create("extra").tolist() == [0, 1, 2]
        assert len(open_fds() - before) == 1
        assert_bitwise_equal(fsf["big"], tensors["big"])  # the caller's file is still open
    assert open_fds() == before


def test_single_open_file_as_source(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = write_file(tmp_path / "m.safetensors", tensors)
    with FastSafetensorsFile(path) as fsf:
        with LazyTensorFactory(fsf) as factory:
            assert factory.keys() == fsf.keys()
            assert_bitwise_equal(factory.create("big"), tensors["big"])
        assert_bitwise_equal(fsf["big"], tensors["big"])


def test_unknown_name(shards: list[Path], tmp_path: Path) -> None:
    with LazyTensorFactory(shards) as factory:
        for call in (factory.lazy, factory.create, factory.info):
            with pytest.raises(TensorNotFoundError) as excinfo:
                call("lm_head.weights")
            assert isinstance(excinfo.value, KeyError)
            assert "'lm_head.weight'" in str(excinfo.value)
    path = write_file(tmp_path / "one.safetensors", {"a": torch.zeros(1)})
    with LazyTensorFactory(path) as factory:
        with pytest.raises(TensorNotFoundError, match="one.safetensors"):
            factory.lazy("b")
