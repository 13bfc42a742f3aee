"""``LazyTensor[index]`` reads only the bytes the index touches (what a tensor-parallel rank asks
for), and returns exactly what indexing the whole tensor would.

``plan_index`` is pure, so its runs are checked without files; the reads are checked against
safetensors-written files, value for value and byte for byte.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import save_file  # noqa: E402

from fastsafetensors import FastSafetensorsFile  # noqa: E402
from fastsafetensors.lazy_tensor_factory import MERGE_GAP, plan_index  # noqa: E402


def test_row_split_is_one_run() -> None:
    runs, block, post = plan_index((8, 16), 4, (slice(2, 6), slice(None)))
    assert runs == [(2 * 64, 4 * 64)] and block == (4, 16)


def test_column_split_is_one_run_per_row() -> None:
    runs, block, _ = plan_index((4, 256), 4, (slice(None), slice(128, 256)))
    assert runs == [(r * 1024 + 512, 512) for r in range(4)] and block == (4, 128)


def test_small_gaps_are_read_through() -> None:
    # 64 F32 per row: skipping half a row (128 bytes) costs more than reading it.
    runs, block, post = plan_index((4, 64), 4, (slice(None), slice(32, 64)))
    assert runs == [(0, 4 * 256)] and block == (4, 64) and post[1] == slice(32, 64, 1)
    assert 128 < MERGE_GAP


def test_whole_tensor_and_empty_selections() -> None:
    assert plan_index((3, 5), 2, ...)[0] == [(0, 30)]
    assert plan_index((), 4, ())[0] == [(0, 4)]
    assert plan_index((3, 5), 2, (slice(1, 1),))[0] == []


@pytest.mark.parametrize("index", [(1, 2, 3), ("a",), (..., ...)])
def test_bad_indices_raise_index_error(index: Any) -> None:
    with pytest.raises(IndexError):
        plan_index((4, 4), 4, index)


def _random_index(rng: random.Random, shape: tuple[int, ...]) -> tuple[Any, ...]:
    parts: list[Any] = []
    for size in shape[:rng.randint(0, len(shape))]:
        if size and rng.random() < 0.2:
            parts.append(rng.randrange(-size, size))
        else:
            start = rng.randrange(0, size + 1)
            stop = rng.randrange(start, size + 1) if rng.random() < 0.8 else None
            parts.append(slice(start, stop, rng.choice([1, 1, 1, 2, 3])))
    if rng.random() < 0.2 and len(parts) < len(shape):
        parts.append(...)
    return tuple(parts)


def test_random_indices_equal_torch_indexing_and_read_exactly_the_plan(tmp_path: Path) -> None:
    rng = random.Random(0)
    tensors = {
        "matrix": torch.randn(16, 300),
        "bf16": torch.randn(3, 5, 300).to(torch.bfloat16),
        "ints": torch.arange(7, dtype=torch.int64),
        "scalar": torch.tensor(3.0),
        "empty": torch.randn(0, 4),
        "four_d": torch.randn(4, 3, 2, 200),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    with FastSafetensorsFile(path) as f:
        for name, whole in tensors.items():
            for _ in range(150):
                index = _random_index(rng, tuple(whole.shape))
                before = f.bytes_read
                got = f.get_slice(name)[index]
                expected = whole[index]
                assert got.shape == expected.shape and torch.equal(got, expected), (name, index)
                assert got.is_contiguous()
                if whole.dim():
                    runs, _, _ = plan_index(tuple(whole.shape), whole.element_size(), index)
                    assert f.bytes_read - before == sum(length for _, length in runs)


def test_column_half_reads_half_the_bytes(tmp_path: Path) -> None:
    weight = torch.randn(64, 512)
    save_file({"w": weight}, str(tmp_path / "w.safetensors"))
    with FastSafetensorsFile(tmp_path / "w.safetensors") as f:
        for rank in range(2):
            before = f.bytes_read
            part = f.get_slice("w")[:, rank * 256:(rank + 1) * 256]
            assert torch.equal(part, weight[:, rank * 256:(rank + 1) * 256])
            assert f.bytes_read - before == weight.numel() * 4 // 2


ADVANCED = [None, (None,), (slice(None), None), (1, None), True, False, [0, 2],
            (slice(None), [0, 1]), torch.tensor([0, 1]), torch.tensor(True), torch.tensor(False),
            torch.tensor([1]), (slice(None), torch.tensor(True)), torch.tensor(1),
            torch.tensor([True, False, True, False]), ((0, 1),), (0, (1, 2)), range(2)]


@pytest.mark.parametrize("index", ADVANCED, ids=repr)
def test_indices_beyond_slices_follow_the_framework(tmp_path: Path, index: Any) -> None:
    # A bool or a one-element tensor has __index__, but as an index it adds or keeps a
    # dimension: treating it as an integer returned other rows, silently.
    import numpy as np
    from safetensors import safe_open

    weight = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    half = weight.to(torch.bfloat16)
    save_file({"w": weight, "h": half}, str(tmp_path / "w.safetensors"))
    with FastSafetensorsFile(tmp_path / "w.safetensors") as f, \
            safe_open(str(tmp_path / "w.safetensors"), framework="pt") as st:
        for name, whole in (("w", weight), ("h", half)):
            got = f.get_slice(name)[index]
            assert got.shape == whole[index].shape and torch.equal(got, whole[index])
            try:
                theirs = st.get_slice(name)[index]
            except Exception:  # noqa: BLE001  (safetensors refuses some of these)
                continue
            assert got.shape == theirs.shape and torch.equal(got, theirs)
        assert torch.equal(f.get_slice("w")[np.int64(2)], weight[2])  # a NumPy integer is one


@pytest.mark.parametrize("index", [slice(None, None, -1), (slice(None), slice(None, None, -2))])
def test_negative_steps_raise_what_torch_raises(tmp_path: Path, index: Any) -> None:
    # torch and safetensors raise ValueError; an IndexError escaped `except ValueError`.
    whole = torch.arange(12.0).reshape(3, 4)
    save_file({"w": whole}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="step must be greater than zero"):
        whole[index]
    with FastSafetensorsFile(tmp_path / "w.safetensors") as fsf:
        with pytest.raises(ValueError, match="step must be greater than zero"):
            fsf.get_slice("w")[index]


def test_column_runs_past_a_shrunk_file_raise_read_error(tmp_path: Path) -> None:
    from fastsafetensors import ReadError
    from fastsafetensors.loader.posix import STATS

    path = tmp_path / "w.safetensors"
    whole = torch.arange(64 * 256, dtype=torch.float32).reshape(64, 256)
    save_file({"w": whole}, str(path))
    with FastSafetensorsFile(path) as fsf:
        STATS.reset()
        assert torch.equal(fsf.get_slice("w")[:, 200:216], whole[:, 200:216])
        assert STATS.snapshot()[:2] == (64 * 16 * 4, 64)   # one read per row, its bytes only
        os.truncate(path, os.path.getsize(path) - 10 * 1024 - 100)   # the last rows are gone
        with pytest.raises(ReadError):
            fsf.get_slice("w")[:, 200:216]
