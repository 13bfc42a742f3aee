"""FastSafetensorsFile: the mapping API, laziness proven by bytes counted, get_slice semantics,
lifetime (close, use after close) and thread safety."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
from builders import (
    assert_aligned,
    assert_bitwise_equal,
    require_o_direct,
    small_tensors,
    write_file,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fastsafetensors
from fastsafetensors import (
    ClosedFileError,
    ConfigError,
    FastSafetensorsFile,
    LazyTensor,
    ReadError,
    TensorInfo,
    TensorNotFoundError,
)
from fastsafetensors.loader.posix import STATS

ROWS, COLS = 256, 1024  # "big": 1 MiB of F32, rows of 4 KiB


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = small_tensors()
    tensors["big"] = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(9))
    tensors["cube"] = torch.arange(4 * 6 * 8, dtype=torch.int32).reshape(4, 6, 8)
    tensors["empty"] = torch.zeros(0, 3)
    path = write_file(tmp_path / "model.safetensors", tensors, {"format": "pt", "step": "7"})
    return path, tensors


# -- metadata ---------------------------------------------------------------------------------

def test_get_tensors_is_metadata_only(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = ckpt
    before = STATS.snapshot()
    with FastSafetensorsFile(path) as fsf:
        infos = fsf.get_tensors()
        assert fsf.bytes_read == 0
        assert STATS.snapshot() == before
    assert set(infos) == set(tensors)
    for name, info in infos.items():
        assert isinstance(info, TensorInfo) and info.name == name
        assert info.shape == tuple(tensors[name].shape) and isinstance(info.shape, tuple)
        assert info.nbytes == tensors[name].numel() * tensors[name].element_size()
        assert info.data_offsets[1] - info.data_offsets[0] == info.nbytes
    assert infos["big"].dtype == "F32" and infos["model.layers.0.mlp.up_proj.weight"].dtype == \
        "BF16"
    text = repr(infos["big"])
    assert "F32" in text and "(256, 1024)" in text and "nbytes=1048576" in text


def test_mapping_api_matches_safetensors(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = ckpt
    with FastSafetensorsFile(path) as fsf, safetensors.safe_open(path, "pt") as ref:
        assert fsf.keys() == ref.keys() == sorted(tensors)
        assert fsf.offset_keys() == [n for n in ref.offset_keys()]
        assert fsf.offset_keys() == list(fsf.get_tensors())
        assert fsf.metadata() == ref.metadata() == {"format": "pt", "step": "7"}
        assert len(fsf) == len(tensors)
        assert list(fsf) == sorted(tensors)
        assert "big" in fsf and "nope" not in fsf and 3 not in fsf
        assert fsf.path == str(path) and fsf.device == "cpu"
        assert "tensors" in repr(fsf) and path.name in repr(fsf)
        assert fsf.header.data_size == sum(i.nbytes for i in fsf.get_tensors().values())
        for name in tensors:
            assert_bitwise_equal(fsf[name], ref.get_tensor(name))
            assert_bitwise_equal(fsf.get_tensor(name), tensors[name])


def test_metadata_none_and_copies(tmp_path: Path) -> None:
    path = write_file(tmp_path / "m.safetensors", {"a": torch.ones(2)})
    with FastSafetensorsFile(str(path)) as fsf:
        assert fsf.metadata() is None
    path = write_file(tmp_path / "n.safetensors", {"a": torch.ones(2)}, {"k": "v"})
    with FastSafetensorsFile(path) as fsf:
        fsf.metadata()["k"] = "changed"  # type: ignore[index]
        fsf.get_tensors().clear()
        assert fsf.metadata() == {"k": "v"} and len(fsf.get_tensors()) == 1


def test_file_without_tensors(tmp_path: Path) -> None:
    path = write_file(tmp_path / "none.safetensors", {})
    with FastSafetensorsFile(path) as fsf:
        assert len(fsf) == 0 and fsf.keys() == [] and fsf.get_tensors() == {}
    assert fastsafetensors.load_file(path) == {}


def test_framework_names(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = ckpt
    for name in ("pt", "torch", "pytorch"):
        with FastSafetensorsFile(path, framework=name) as fsf:
            assert isinstance(fsf["big"], torch.Tensor)
    with pytest.raises(ConfigError) as excinfo:
        FastSafetensorsFile(path, framework="jax")
    assert "'pt'" in str(excinfo.value) or "pt" in excinfo.value.valid
    assert "np" in str(excinfo.value)


# -- reading ----------------------------------------------------------------------------------

def test_get_tensor_casts(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = ckpt
    with FastSafetensorsFile(path) as fsf:
        half = fsf.get_tensor("big", dtype=torch.float16)
        assert half.dtype == torch.float16
        assert torch.equal(half, tensors["big"].to(torch.float16))
        same = fsf.get_tensor("big", device="cpu", dtype=torch.float32)
        assert_bitwise_equal(same, tensors["big"])
        assert fsf.get_tensor("step", dtype=torch.float64).item() == 7.0


def test_unknown_name_lists_close_matches(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = ckpt
    with FastSafetensorsFile(path) as fsf:
        with pytest.raises(TensorNotFoundError) as excinfo:
            fsf["model.norm.weigth"]
        with pytest.raises(KeyError):
            fsf.get_tensor("nope")
        with pytest.raises(TensorNotFoundError):
            fsf.get_slice("model.norm")
    error = excinfo.value
    assert isinstance(error, KeyError) and error.name == "model.norm.weigth"
    message = str(error)
    assert "'model.norm.weigth'" in message and path.name in message
    assert "'model.norm.weight'" in message


def test_close_matches_are_at_most_five(tmp_path: Path) -> None:
    tensors = {f"layer.{i}.weight": torch.zeros(1) for i in range(12)}
    path = write_file(tmp_path / "m.safetensors", tensors)
    with FastSafetensorsFile(path) as fsf:
        with pytest.raises(TensorNotFoundError) as excinfo:
            fsf["layer.1.weights"]
    listed = [n for n in tensors if repr(n) in str(excinfo.value)]
    assert 1 <= len(listed) <= 5 and "layer.1.weight" in listed


def test_reading_one_tensor_reads_only_its_bytes(
        ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = ckpt
    with FastSafetensorsFile(path) as fsf:
        for name in ("model.norm.weight", "big", "step", "empty"):
            before, start = STATS.snapshot(), fsf.bytes_read
            t = fsf[name]
            nbytes = fsf.get_tensors()[name].nbytes
            assert fsf.bytes_read - start == nbytes
            assert STATS.snapshot()[0] - before[0] == nbytes
            assert_bitwise_equal(t, tensors[name])
            assert_aligned(t)


def _row_bytes(fsf: FastSafetensorsFile, name: str) -> int:
    info = fsf.get_tensors()[name]
    return info.nbytes // info.shape[0]


def test_get_slice_reads_only_the_rows(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = ckpt
    full = tensors["big"]
    with FastSafetensorsFile(path) as fsf:
        row = _row_bytes(fsf, "big")
        assert row == COLS * 4
        sl = fsf.get_slice("big")
        assert fsf.bytes_read == 0

        start = fsf.bytes_read
        assert_bitwise_equal(sl[10:20], full[10:20])
        assert fsf.bytes_read - start == 10 * row

        start = fsf.bytes_read
        assert_bitwise_equal(sl[7], full[7])
        assert fsf.bytes_read - start == row

        start = fsf.bytes_read
        assert_bitwise_equal(sl[-1], full[-1])
        assert fsf.bytes_read - start == row

        start, stats = fsf.bytes_read, STATS.snapshot()
        block = sl[100:104, 8:24]
        assert_bitwise_equal(block, full[100:104, 8:24])
        read = fsf.bytes_read - start
        assert 4 * 16 * 4 <= read <= 4 * row  # rows 100..104 at most
        assert STATS.snapshot()[0] - stats[0] == read

        start = fsf.bytes_read
        assert_bitwise_equal(sl[5:5], full[5:5])
        assert fsf.bytes_read - start == 0


INDEXES_2D: list[Any] = [
    slice(3, 9), 4, -1, -ROWS, (slice(2, 5), slice(10, 30)), (Ellipsis, slice(0, 7)),
    slice(None, None, 2), slice(None), Ellipsis, (slice(1, 40, 3), slice(None, None, 5)),
    (3, 5), (slice(-3, None),), slice(9, 2), (slice(None), -1), (-2, slice(4, 8)),
    (slice(0, 1000),), (slice(250, 300), 0), (), (Ellipsis, 3), (0, Ellipsis),
]
INDEXES_3D: list[Any] = [
    (1, slice(None), slice(2, 4)), (Ellipsis, 0), (0, Ellipsis, 1), slice(1, 3),
    (slice(None), 2, slice(None, None, 3)), (-1, -1, -1), (slice(0, 4, 2), slice(1, 5), 7),
]


@pytest.mark.parametrize("index", INDEXES_2D, ids=repr)
def test_get_slice_matches_torch_indexing_2d(ckpt: tuple[Path, dict[str, torch.Tensor]],
                                             index: Any) -> None:
    path, tensors = ckpt
    with FastSafetensorsFile(path) as fsf:
        got = fsf.get_slice("big")[index]
    expected = tensors["big"][index]
    assert_bitwise_equal(got, expected.contiguous())
    assert got.is_contiguous()


@pytest.mark.parametrize("index", INDEXES_3D, ids=repr)
def test_get_slice_matches_torch_indexing_3d(ckpt: tuple[Path, dict[str, torch.Tensor]],
                                             index: Any) -> None:
    path, tensors = ckpt
    with FastSafetensorsFile(path) as fsf:
        got = fsf.get_slice("cube")[index]
    assert_bitwise_equal(got, tensors["cube"][index].contiguous())


@pytest.mark.parametrize("index", [slice(1, 3), 2, -1, (slice(None), slice(1, 2)),
                                   (Ellipsis, slice(0, 3)), slice(None, None, 2)], ids=repr)
def test_get_slice_matches_safetensors(ckpt: tuple[Path, dict[str, torch.Tensor]],
                                       index: Any) -> None:
    path, _ = ckpt
    with fastsafetensors.safe_open(path, "pt") as fsf, safetensors.safe_open(path, "pt") as ref:
        for name in ("big", "cube", "model.layers.0.mlp.up_proj.weight"):
            assert_bitwise_equal(fsf.get_slice(name)[index], ref.get_slice(name)[index])


def test_get_slice_scalar_and_empty(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = ckpt
    with FastSafetensorsFile(path) as fsf:
        scalar = fsf.get_slice("step")
        assert scalar.get_shape() == [] and scalar.get_dtype() == "I64"
        assert_bitwise_equal(scalar[...], tensors["step"])
        assert_bitwise_equal(scalar[()], tensors["step"])
        with pytest.raises(TypeError):
            len(scalar)
        empty = fsf.get_slice("empty")
        assert_bitwise_equal(empty[:], tensors["empty"])
        assert_bitwise_equal(empty[..., 1:], tensors["empty"][..., 1:])
        # Several "...": torch's rule (safetensors' slices index with torch), not numpy's
        with safetensors.safe_open(path, "pt") as ref:
            for index in ((..., 0, ...), (..., ...), (1, ..., ...)):
                assert_bitwise_equal(fsf.get_slice("big")[index], ref.get_slice("big")[index])


@pytest.mark.parametrize("index", [ROWS, -ROWS - 1, 10 ** 9, (0, COLS), (0, -COLS - 1),
                                   (0, 0, 0), 1.5, "a"], ids=repr)
def test_get_slice_bad_index_raises_index_error(ckpt: tuple[Path, dict[str, torch.Tensor]],
                                                index: Any) -> None:
    path, _ = ckpt
    with FastSafetensorsFile(path) as fsf:
        with pytest.raises(IndexError):
            fsf.get_slice("big")[index]


def test_slice_handle_protocol(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = ckpt
    with FastSafetensorsFile(path) as fsf, safetensors.safe_open(path, "pt") as ref:
        for name in fsf.keys():
            ours, theirs = fsf.get_slice(name), ref.get_slice(name)
            assert isinstance(ours, LazyTensor)
            assert ours.get_shape() == theirs.get_shape()
            assert isinstance(ours.get_shape(), list)
            assert ours.get_dtype() == theirs.get_dtype()
            assert ours.dtype == fsf[name].dtype
            assert ours.shape == tuple(fsf[name].shape)
            assert ours.get_ndim() == len(theirs.get_shape())
        assert len(fsf.get_slice("big")) == ROWS
        assert "big" in repr(fsf.get_slice("big"))


# -- lifetime ---------------------------------------------------------------------------------

def test_context_manager_and_idempotent_close(ckpt: tuple[Path, dict[str, torch.Tensor]]
                                              ) -> None:
    path, _ = ckpt
    with FastSafetensorsFile(path) as fsf:
        assert fsf["step"].item() == 7
    assert "closed" in repr(fsf)
    fsf.close()
    fsf.close()
    other = FastSafetensorsFile(path)
    other.close()
    other.close()


def test_use_after_close_raises(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = ckpt
    fsf = FastSafetensorsFile(path)
    info = fsf.get_tensors()["big"]
    fsf.close()
    attempts = {
        "getitem": lambda: fsf["big"],
        "get_tensor": lambda: fsf.get_tensor("big"),
        "empty tensor": lambda: fsf["empty"],
        "get_slice": lambda: fsf.get_slice("big")[0],
        "read_bytes": lambda: fsf.read_bytes(info),
    }
    for what, attempt in attempts.items():
        with pytest.raises(ClosedFileError) as excinfo:
            attempt()
        assert isinstance(excinfo.value, ValueError), what
        assert path.name in str(excinfo.value) and "closed" in str(excinfo.value)
    with pytest.raises(ClosedFileError):
        fsf.get_slice("big")
    # an unknown name is still reported as such
    with pytest.raises(TensorNotFoundError):
        fsf["nope"]


def test_slices_taken_before_close_keep_working(ckpt: tuple[Path, dict[str, torch.Tensor]]
                                                ) -> None:
    # As safetensors' slices (which keep its mmap alive): {name: f.get_slice(name)} collected
    # in a `with` block and indexed after it used to raise ClosedFileError.
    from builders import open_fds

    from fastsafetensors import safe_open

    path, tensors = ckpt
    before = open_fds()
    with safe_open(path, framework="pt") as f:
        slices = {name: f.get_slice(name) for name in ("big", "empty")}
    assert len(open_fds() - before) == 1   # kept open for the slices
    with pytest.raises(ClosedFileError):
        f.get_tensor("big")                # the handle itself is closed
    assert_bitwise_equal(slices["big"][1:3, 2:], tensors["big"][1:3, 2:])
    assert_bitwise_equal(slices["big"].materialize(), tensors["big"])
    assert_bitwise_equal(slices["empty"][:], tensors["empty"])
    del slices
    assert open_fds() == before             # the last slice gone: the descriptor too


def test_every_slice_is_counted_once(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    # A slice made without get_slice() (a subclass's, a copy) was uncounted at birth but
    # counted down at collection: below zero, close() never closed the descriptor again.
    import copy
    import pickle

    from builders import open_fds

    from fastsafetensors.integrations._transformers_seam import Load

    path, tensors = ckpt
    before = open_fds()
    load = Load({})
    handle = load.open(path)
    dropped = handle.get_slice("big")
    kept = handle.get_slice("big")
    for duplicate in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="get_slice"):
            duplicate(kept)
    del dropped
    load.close()
    assert_bitwise_equal(kept[1:2], tensors["big"][1:2])
    del kept
    assert open_fds() == before and handle._slices == 0


def test_close_releases_the_descriptor(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    from builders import open_fds

    path, _ = ckpt
    before = open_fds()
    fsf = FastSafetensorsFile(path)
    assert len(open_fds() - before) == 1
    fsf.close()
    assert open_fds() == before
    fsf = FastSafetensorsFile(path)
    del fsf
    assert open_fds() == before


def test_file_truncated_after_open_raises_read_error(
        ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = ckpt
    with FastSafetensorsFile(path) as fsf:
        infos = fsf.get_tensors()
        last = fsf.offset_keys()[-1]
        first = fsf.offset_keys()[0]
        os.truncate(path, fsf.header.data_start + infos[last].data_offsets[0] + 1)
        with pytest.raises(ReadError) as excinfo:
            fsf[last]
        assert isinstance(excinfo.value, OSError) and path.name in str(excinfo.value)
        assert "truncated" in str(excinfo.value)
        assert_bitwise_equal(fsf[first], tensors[first])  # what is still there reads fine


# -- threads ----------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [None, "65536"])
def test_threads_share_one_handle(ckpt: tuple[Path, dict[str, torch.Tensor]],
                                  monkeypatch: pytest.MonkeyPatch, chunk: str | None) -> None:
    """8 threads read different and the same tensors at once (with small chunks, each read of
    "big" also fans out to reader threads of its own)."""
    if chunk:
        monkeypatch.setenv("FASTSAFETENSORS_CHUNK_BYTES", chunk)
    path, tensors = ckpt
    names = sorted(tensors)
    barrier = threading.Barrier(8)
    failures: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            for k in range(12):
                name = "big" if k % 3 == 0 else names[(i + k) % len(names)]
                assert_bitwise_equal(fsf[name], tensors[name])
                lo = (i * 7 + k) % (ROWS - 4)
                assert_bitwise_equal(fsf.get_slice("big")[lo:lo + 4, 3:9],
                                     tensors["big"][lo:lo + 4, 3:9])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    with FastSafetensorsFile(path) as fsf:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failures, failures[0]


def test_close_waits_for_reads_in_flight(ckpt: tuple[Path, dict[str, torch.Tensor]],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A read in progress when close() is called completes correctly; close() returns after it;
    reads that start later raise ClosedFileError."""
    import fastsafetensors.file as file_module

    path, tensors = ckpt
    real = file_module.pread_into
    entered, release = threading.Event(), threading.Event()
    order: list[str] = []

    def gated(*args: Any, **kwargs: Any) -> int:
        entered.set()
        assert release.wait(60), "test never released the read"
        got = real(*args, **kwargs)
        order.append("read done")
        return got

    monkeypatch.setattr(file_module, "pread_into", gated)
    fsf = FastSafetensorsFile(path)
    result: dict[str, Any] = {}

    def reader() -> None:
        try:
            result["tensor"] = fsf["big"]
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc

    def closer() -> None:
        fsf.close()
        order.append("closed")

    t_read = threading.Thread(target=reader)
    t_read.start()
    assert entered.wait(60)
    t_close = threading.Thread(target=closer)
    t_close.start()
    # close() marks the handle closed before it waits for the reader: new reads now fail
    for _ in range(6000):
        if "closed" in repr(fsf):
            break
        threading.Event().wait(0.01)
    with pytest.raises(ClosedFileError):
        fsf["model.norm.weight"]
    assert "closed" not in order
    release.set()
    t_read.join(60)
    t_close.join(60)
    assert "error" not in result, result.get("error")
    assert_bitwise_equal(result["tensor"], tensors["big"])
    assert order == ["read done", "closed"]


def test_close_during_many_reads(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """Whenever close() lands, every read either returns the right tensor or ClosedFileError."""
    path, tensors = ckpt
    fsf = FastSafetensorsFile(path)
    started = threading.Barrier(5)
    outcomes: list[Any] = []

    def work() -> None:
        started.wait()
        for _ in range(50):
            try:
                outcomes.append(("ok", fsf["big"]))
            except ClosedFileError:
                outcomes.append(("closed", None))
                return
            except BaseException as exc:  # noqa: BLE001
                outcomes.append(("error", exc))
                return

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait()
    fsf.close()
    for t in threads:
        t.join()
    assert not [o for o in outcomes if o[0] == "error"], outcomes
    assert sum(o[0] == "closed" for o in outcomes) >= 1 or len(outcomes) == 200
    for kind, tensor in outcomes:
        if kind == "ok":
            assert_bitwise_equal(tensor, tensors["big"])


# -- Ctrl-C -----------------------------------------------------------------------------------

def _each_ctrl_c(action: Any) -> Any:
    """``action`` interrupted at each place where CPython would run a Ctrl-C handler, outside
    this file (builders.each_ctrl_c)."""
    from builders import each_ctrl_c

    return each_ctrl_c(action, lambda frame: frame.f_code.co_filename != __file__)


def _closes_from_another_thread(fsf: FastSafetensorsFile) -> None:
    """Another thread can take the handle's lock, and close() there returns (the join's timeout
    only keeps a hang from hanging the suite)."""
    taken = []

    def take() -> None:
        taken.append(fsf._lock.acquire(blocking=False))
        if taken[-1]:
            fsf._lock.release()

    checker = threading.Thread(target=take)
    checker.start()
    checker.join()
    assert taken == [True], "the lock is held by the thread that a Ctrl-C stopped"
    closer = threading.Thread(target=fsf.close, daemon=True)
    closer.start()
    closer.join(30)
    assert not closer.is_alive(), "close() waits for a read that a Ctrl-C ended"


def test_a_handle_read_when_a_ctrl_c_came_still_reads_and_closes(
        ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    # A Ctrl-C at the start of a Condition's __enter__ or __exit__ (Python functions: CPython
    # runs its handler as one starts) left the handle's lock held by the interrupted thread, and
    # one as a read ended left the read counted: close() then waited for ever.
    from builders import open_fds

    path, tensors = ckpt
    before = open_fds()
    handles = [FastSafetensorsFile(path)]
    for point in _each_ctrl_c(lambda: handles[-1]["cube"]):
        fsf = handles.pop()
        assert_bitwise_equal(fsf["model.norm.weight"], tensors["model.norm.weight"])
        _closes_from_another_thread(fsf)
        assert open_fds() == before, point
        handles.append(FastSafetensorsFile(path))
    handles.pop().close()
    assert point > 20


def test_a_slice_taken_when_a_ctrl_c_came_leaves_no_descriptor_open(
        ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    # A Ctrl-C as a slice was counted, before it knew its file, left a count that no collected
    # slice took back: close() then left the descriptor open for good.
    from builders import open_fds

    path, tensors = ckpt
    before = open_fds()
    handles = [FastSafetensorsFile(path)]
    held: list[LazyTensor] = []

    def take() -> None:
        # Kept: a slice collected in here would have its __del__ interrupted too, where no code
        # can make up for it.
        held.append(handles[-1].get_slice("big"))
        held[-1][1:3, 8:16]

    for point in _each_ctrl_c(take):
        if held:
            assert_bitwise_equal(held[-1][1:3, 8:16], tensors["big"][1:3, 8:16])
        held.clear()
        _closes_from_another_thread(handles.pop())
        assert open_fds() == before, point
        handles.append(FastSafetensorsFile(path))
    handles.pop().close()
    assert point > 20


@pytest.mark.parametrize("direct", [False, True])
def test_a_close_stopped_by_a_ctrl_c_is_finished_by_the_next(mib_file: Any, direct: bool
                                                             ) -> None:
    # A close() stopped half-way (the handle marked closed, its descriptors open) made the next
    # close() return at once, and __del__ do nothing: the descriptors stayed open for good. With
    # the O_DIRECT descriptor open, a Ctrl-C as the first one closed left the second open.
    from builders import open_fds

    path, _ = mib_file
    before = open_fds()

    def opened() -> FastSafetensorsFile:
        handle = FastSafetensorsFile(path)
        if direct:
            with fastsafetensors.configure(io="direct"):
                handle["a"]
            assert len(open_fds() - before) == 2
        return handle

    points = 0
    handles: list[FastSafetensorsFile] = []
    for closed_again in (True, False):
        handles.append(opened())
        for points in _each_ctrl_c(lambda: handles[-1].close()):
            if closed_again:
                handles[-1].close()
            handles.clear()   # collected: __del__
            assert open_fds() == before, points
            handles.append(opened())
        handles.clear()
    assert points > 3


def test_two_handles_compared_when_a_ctrl_c_came_leave_no_read_counted(
        ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    # from_pretrained asks whether a requester's handle reads the batch's file: a Ctrl-C as
    # that check's reads ended left one counted, and close() waited for it for ever.
    from fastsafetensors.integrations._transformers_batch import same_file

    path, _ = ckpt
    a, b = FastSafetensorsFile(path), FastSafetensorsFile(path)
    for point in _each_ctrl_c(lambda: same_file(a, b)):
        assert not a._readers and not b._readers, point
    assert same_file(a, b) and point > 5
    _closes_from_another_thread(a)
    _closes_from_another_thread(b)


# -- get_slice against torch indexing, property-based -------------------------------------------

SHAPES_FOR_SLICING = {"v": (7,), "m": (5, 6), "c": (3, 4, 5), "h": (2, 1, 3, 4), "z": (0, 3),
                      "w": (4, 0), "r": (9, 2)}
DTYPES_FOR_SLICING = {"v": torch.float64, "m": torch.float32, "c": torch.int16,
                      "h": torch.uint8, "z": torch.float32, "w": torch.int64,
                      "r": torch.bfloat16}


@pytest.fixture(scope="module")
def sliceable(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    tensors = {name: (torch.randn(shape, generator=gen) * 100).to(DTYPES_FOR_SLICING[name])
               for name, shape in SHAPES_FOR_SLICING.items()}
    path = tmp_path_factory.mktemp("slicing") / "s.safetensors"
    return write_file(path, tensors), tensors


@st.composite
def name_and_index(draw: st.DrawFn) -> tuple[str, Any]:
    name = draw(st.sampled_from(sorted(SHAPES_FOR_SLICING)))
    shape = SHAPES_FOR_SLICING[name]
    ndim = draw(st.integers(0, len(shape)))
    parts: list[Any] = []
    for size in shape[:ndim]:
        slices = st.slices(size).filter(lambda s: s.step is None or s.step > 0)
        parts.append(draw(slices | st.integers(-size, size - 1)) if size else draw(slices))
    if draw(st.booleans()):
        parts.insert(draw(st.integers(0, len(parts))), Ellipsis)
    if len(parts) == 1 and draw(st.booleans()):
        return name, parts[0]
    return name, tuple(parts)


@settings(max_examples=150, deadline=None)
@given(name_and_index())
def test_get_slice_equals_torch_indexing(sliceable: tuple[Path, dict[str, torch.Tensor]],
                                         case: tuple[str, Any]) -> None:
    path, tensors = sliceable
    name, index = case
    full = tensors[name]
    try:
        expected = full[index]
    except IndexError:  # e.g. "..." moved an integer onto an empty dimension
        with FastSafetensorsFile(path) as fsf, pytest.raises(IndexError):
            fsf.get_slice(name)[index]
        return
    except RuntimeError:  # torch's own limit: a step near 2**63 on an empty dimension
        assume(False)
    # torch's own bug: with such a step and another dimension empty it gives a dimension of -1
    # (torch.zeros(0, 3)[..., ::2**63 - 2] has shape (0, -1)); Python's rule gives 1
    assume(all(d >= 0 for d in expected.shape))
    with FastSafetensorsFile(path) as fsf:
        got = fsf.get_slice(name)[index]
        read = fsf.bytes_read
        row = fsf.get_tensors()[name].nbytes // max(1, full.shape[0])
    assert_bitwise_equal(got, expected.contiguous())
    # never more than the span of rows (first-dim entries) from the first to the last touched
    parts = index if isinstance(index, tuple) else (index,)
    if Ellipsis in parts and len(parts) - 1 < full.dim() and parts.index(Ellipsis) == 0:
        parts = (slice(None),)
    first = parts[0] if parts and parts[0] is not Ellipsis else slice(None)
    touched = range(full.shape[0])[first]
    rows = (touched[-1] - touched[0] + 1 if touched else 0) if isinstance(first, slice) else 1
    assert read <= rows * row


def test_f4_slices_index_the_torch_shape(tmp_path: Path) -> None:
    """F4 files count 4-bit values; slicing indexes the float4_e2m1fn_x2 tensor (pairs)."""
    from builders import random_tensor

    tensors = {"q": random_tensor("F4", (4, 8)), "p": random_tensor("F4", (6,))}
    path = write_file(tmp_path / "f4.safetensors", tensors)
    with FastSafetensorsFile(path) as fsf:
        for name, indexes in {"q": [slice(1, 3), 2, -1, (slice(None), slice(0, 2)), Ellipsis],
                              "p": [slice(0, 2), 1, -1, Ellipsis]}.items():
            full = fsf[name]
            assert_bitwise_equal(full, tensors[name])
            for index in indexes:
                assert_bitwise_equal(fsf.get_slice(name)[index], full[index].contiguous())


@pytest.mark.parametrize("index", [2, -1, Ellipsis, slice(1, 3), (1, 2), (slice(None), 1),
                                   (Ellipsis, slice(0, 2))], ids=repr)
def test_numpy_slices_match_safetensors(tmp_path: Path, index: Any) -> None:
    """Integer indexes give 0-d arrays (not shape (1,)), as numpy and safetensors do."""
    import numpy as np
    from safetensors.numpy import save_file

    arrays = {"v": np.arange(5, dtype=np.float32), "m": np.arange(12, dtype=np.int32).reshape(3, 4),
              "s": np.array(3, dtype=np.int64)}
    path = tmp_path / "n.safetensors"
    save_file(arrays, str(path))
    with FastSafetensorsFile(path, framework="np") as fsf, \
            safetensors.safe_open(path, "np") as ref:
        for name, array in arrays.items():
            try:
                expected = array[index]
            except IndexError:
                with pytest.raises(IndexError):
                    fsf.get_slice(name)[index]
                continue
            got = fsf.get_slice(name)[index]
            assert isinstance(got, np.ndarray) and got.flags["C_CONTIGUOUS"]
            assert got.shape == np.shape(expected) and got.dtype == array.dtype
            assert got.tobytes() == np.ascontiguousarray(expected).tobytes()
            if name != "s" or index is Ellipsis:
                assert got.shape == ref.get_slice(name)[index].shape


@pytest.mark.parametrize(("nbytes", "threads"), [(3000, 1), (8 << 20, 1), ((8 << 20) + 1, 2),
                                                  (40 << 20, 5), (900 << 20, 16)])
def test_a_device_read_of_one_tensor_takes_no_more_staging_than_it_needs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nbytes: int, threads: int) -> None:
    # transformers reads many tensors at once from its thread pool; each large tensor read to a
    # GPU streams with staging of its own, which must not be the whole default 256 MiB. Each
    # worker's buffer is the one a whole load's worker gets (8 MiB here): one pinned size class.
    import fastsafetensors.file as file_module
    import fastsafetensors.loading as loading

    path = tmp_path / "one.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(16, dtype=torch.uint8)}, str(path))
    asked: list[dict[str, Any]] = []

    def fake_device_stream(files: Any, device: str, **kwargs: Any) -> Any:
        # the engine is given this handle's open file (through /proc), not the path again
        source, header, names = files[0]
        asked.append({"opens": os.path.realpath(source), "header": header, "names": names,
                      "device": device, **kwargs})
        yield "w", torch.zeros(16, dtype=torch.uint8)

    monkeypatch.setattr(file_module, "resolve_device", lambda device, framework, **_: "cuda:0")
    monkeypatch.setattr(file_module, "DEVICE_STREAM_BYTES", 0)
    monkeypatch.setattr(loading, "device_stream", fake_device_stream)
    with FastSafetensorsFile(path) as fsf, fastsafetensors.configure(threads=16,
                                                                      staging_bytes=256 << 20):
        large = SimpleNamespace(name="w", nbytes=nbytes)   # as if the tensor were this large
        monkeypatch.setattr(fsf, "_info", lambda name: large)
        fsf.get_tensor("w", device="cuda:0")
        # the header this file holds, not one read again for the tensor
        assert asked[0]["header"] is fsf.header and asked[0]["names"] == ["w"]
        assert asked[0]["opens"] == os.path.realpath(path)
    assert asked[0]["device"] == "cuda:0" and asked[0]["threads"] == threads
    assert asked[0]["staging_bytes"] == threads * 2 * (8 << 20)


def test_device_reads_at_once_share_the_reader_threads() -> None:
    from fastsafetensors.file import _DEVICE_READS

    big = 1 << 30
    with fastsafetensors.configure(threads=16, staging_bytes=256 << 20):
        with _DEVICE_READS.share(big) as first, _DEVICE_READS.share(big) as second:
            with _DEVICE_READS.share(big) as third, _DEVICE_READS.share(big) as fourth:
                assert [t for t, _ in (first, second, third, fourth)] == [16, 8, 5, 4]
            with _DEVICE_READS.share(big) as later:   # two still running: a third each
                assert later == (5, 5 * 16 << 20)
        with _DEVICE_READS.share(big) as alone:
            assert alone == (16, 256 << 20)


# -- the io option on per-tensor reads ---------------------------------------------------------

@pytest.fixture
def mib_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Tensors of 1 MiB and more (the per-tensor io threshold), one small, and an odd-sized
    last one whose end is not block-aligned."""
    gen = torch.Generator().manual_seed(5)
    tensors = {"small": torch.arange(7, dtype=torch.int16),
               "a": torch.randn(512, 512, generator=gen),                  # 1 MiB
               "b": torch.randn(3, 700, 200, generator=gen).bfloat16(),   # 0.8 MiB
               "c": torch.randn(1000, 333, generator=gen).double()}       # 2.66 MB, last
    path = write_file(tmp_path / "m.safetensors", tensors)
    require_o_direct(path)
    return path, tensors


@pytest.mark.parametrize("io", ["buffered", "direct"])
def test_per_tensor_reads_follow_the_io_option(mib_file: Any, io: str) -> None:
    path, tensors = mib_file
    reference = safetensors.torch.load_file(path)
    with fastsafetensors.configure(io=io, chunk_bytes=1 << 20, threads=3), \
            FastSafetensorsFile(path) as f:
        for name in tensors:
            before = STATS.snapshot()[2]
            got = f.get_tensor(name)
            assert_bitwise_equal(got, reference[name])
            assert_aligned(got)
            big = reference[name].nbytes >= fastsafetensors.file.DIRECT_MIN_BYTES
            assert (STATS.snapshot()[2] > before) == (io == "direct" and big), name
            # its bytes alone (not the blocks an O_DIRECT read widens to), no second copy
            assert got.untyped_storage().nbytes() == got.nbytes
        rows = f.get_slice("c")[100:900]   # rows of the last tensor go the same way
        assert_bitwise_equal(rows, reference["c"][100:900])


def test_per_tensor_reads_of_a_misaligned_tensor_stay_buffered(tmp_path: Path) -> None:
    import json
    import struct

    # U8 first, so the F32 after it starts at an odd offset: O_DIRECT would need a copy.
    values = torch.randn(1 << 18)
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "b": {"dtype": "F32", "shape": [1 << 18], "data_offsets": [1, 1 + (1 << 20)]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "mis.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x07" + values.numpy().tobytes())
    require_o_direct(path)
    before = STATS.snapshot()[2]
    with fastsafetensors.configure(io="direct"), FastSafetensorsFile(path) as f:
        got = f.get_tensor("b")
    assert torch.equal(got, values) and STATS.snapshot()[2] == before
    assert_aligned(got)


def test_auto_reads_a_cold_tensor_direct_and_a_cached_one_buffered(mib_file: Any) -> None:
    from fastsafetensors.loader.pagecache import resident_fraction

    path, tensors = mib_file
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if (resident_fraction(fd) or 0) > 0.1:
            pytest.skip("page-cache state not observable here")
    finally:
        os.close(fd)
    with FastSafetensorsFile(path) as f:   # io="auto", the default
        before = STATS.snapshot()[2]
        assert torch.equal(f.get_tensor("a"), tensors["a"])
        assert STATS.snapshot()[2] == before + 1   # cold: one direct read
        path.read_bytes()                          # now every page is cached
        before = STATS.snapshot()[2]
        assert torch.equal(f.get_tensor("c"), tensors["c"])
        assert STATS.snapshot()[2] == before


def test_closing_closes_the_direct_descriptor(mib_file: Any) -> None:
    path, _ = mib_file
    before = len(os.listdir("/proc/self/fd"))
    with fastsafetensors.configure(io="direct"):
        f = FastSafetensorsFile(path)
        f.get_tensor("a")
        assert len(os.listdir("/proc/self/fd")) == before + 2
        f.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_direct_read_of_a_tensor_ending_just_past_a_block(tmp_path: Path) -> None:
    # Starts 8 bytes before a block boundary, ends 16 bytes into the next: widened at both ends.
    import json
    import struct

    pad = (4088 - 8 - 256) % 4096   # a 256-byte header: data starts at byte 264
    size = (1 << 20) + 16
    header = {"pad": {"dtype": "U8", "shape": [pad], "data_offsets": [0, pad]},
              "t": {"dtype": "F64", "shape": [size // 8], "data_offsets": [pad, pad + size]}}
    raw = json.dumps(header).encode()
    raw += b" " * (256 - len(raw))
    values = torch.randn(size // 8, dtype=torch.float64)
    path = tmp_path / "edge.safetensors"
    path.write_bytes(struct.pack("<Q", 256) + raw + bytes(pad) + values.numpy().tobytes())
    require_o_direct(path)
    with fastsafetensors.configure(io="direct"), FastSafetensorsFile(path) as f:
        assert (f.header.data_start + pad) % 4096 == 4088
        before = STATS.snapshot()[2]
        got = f.get_tensor("t")
        assert STATS.snapshot()[2] > before
    assert torch.equal(got, values)
    assert got.untyped_storage().nbytes() == got.nbytes


def test_direct_descriptor_zero_is_a_descriptor(mib_file: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # 0 is a valid descriptor: "open_direct(...) or -1" took it for "refused" and leaked it.
    path, _ = mib_file
    used: list[int] = []
    closed: list[int] = []
    real_close = os.close
    monkeypatch.setattr("fastsafetensors.file.open_direct", lambda fd, p: 0)
    monkeypatch.setattr("fastsafetensors.file.pread_into",
                        lambda fd, dest, offset, **kw: used.append(fd) or len(dest))
    monkeypatch.setattr(os, "close", lambda fd: closed.append(fd) if fd == 0 else real_close(fd))
    with fastsafetensors.configure(io="direct"), FastSafetensorsFile(path) as f:
        f.get_tensor("a")
    assert 0 in used and 0 in closed


def test_f4_with_an_odd_last_dimension_says_what_to_do_under_torch(tmp_path: Path) -> None:
    import json
    import struct

    from fastsafetensors.errors import UnsupportedDTypeError

    header = {"q": {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "f4odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x12\x34\x56")
    with FastSafetensorsFile(path) as f:
        with pytest.raises(UnsupportedDTypeError, match="raw bytes") as info:
            f.get_tensor("q")
        assert "framework='pt' (PyTorch) instead" not in str(info.value)
        assert bytes(f.read_bytes(f.get_tensors()["q"])) == b"\x12\x34\x56"


@pytest.mark.parametrize("dtype", ["F6_E2M3", "F6_E3M2"])
def test_a_6_bit_tensor_leaves_the_rest_of_its_file_readable(tmp_path: Path, dtype: str) -> None:
    # safetensors 0.8 opens such a file, reads its other tensors and refuses the 6-bit one
    # (no framework has the type); refusing the whole header would refuse the file.
    import json
    import pickle
    import struct

    from safetensors import SafetensorError, safe_open

    from fastsafetensors.errors import UnsupportedDTypeError

    header = {"x": {"dtype": dtype, "shape": [2, 4], "data_offsets": [0, 6]},
              "y": {"dtype": "F32", "shape": [2], "data_offsets": [6, 14]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "f6.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(range(1, 7))
                     + struct.pack("<2f", 1.5, -2.0))
    with safe_open(str(path), "pt") as theirs:
        want = theirs.get_tensor("y")
        with pytest.raises(SafetensorError):
            theirs.get_tensor("x")
    for framework in ("pt", "np"):
        with FastSafetensorsFile(path, framework=framework) as f:
            assert f.get_tensors()["x"].shape == (2, 4) and f.get_tensors()["x"].nbytes == 6
            assert torch.equal(torch.as_tensor(f["y"]), want)
            with pytest.raises(UnsupportedDTypeError, match="raw bytes") as info:
                f["x"]
            assert "framework='pt' (PyTorch) instead" not in str(info.value)
            assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)
            assert bytes(f.read_bytes("x")) == bytes(range(1, 7))
            with pytest.raises(TensorNotFoundError):
                f.read_bytes("z")
    with pytest.raises(UnsupportedDTypeError, match=f"'x' has dtype {dtype}"):
        fastsafetensors.load_file(path)


@pytest.mark.parametrize("replacement", ["other file", "fifo"])
def test_direct_reads_come_from_the_file_opened(tmp_path: Path, replacement: str) -> None:
    # The O_DIRECT descriptor was opened again by path on first use: a checkpoint replaced
    # meanwhile gave the new file's bytes for large tensors (the old one's for small ones), and
    # a FIFO put in its place hung the read.
    path = write_file(tmp_path / "m.safetensors", {"w": torch.full((1 << 19,), 1.0)})
    require_o_direct(path)
    with FastSafetensorsFile(path) as fsf:
        if replacement == "fifo":
            path.unlink()
            os.mkfifo(path)
        else:
            other = write_file(tmp_path / "n.safetensors", {"w": torch.full((1 << 19,), 2.0)})
            os.replace(other, path)
        with fastsafetensors.configure(io="direct"):
            assert torch.equal(fsf["w"], torch.full((1 << 19,), 1.0))
            assert torch.equal(fsf.get_slice("w")[: 1 << 18], torch.full((1 << 18,), 1.0))


def test_a_large_device_read_names_the_file_in_its_errors(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine reads a handle's file through /proc/self/fd/N; its errors named that link
    # ("3: changed after its header was read") instead of the file.
    from fake_device import FakeSink

    import fastsafetensors.file as file_module
    import fastsafetensors.loader.cuda as cuda_module
    from fastsafetensors import HeaderError, ReadError

    monkeypatch.setattr(file_module, "resolve_device", lambda device, framework, **_: "cuda:0")
    monkeypatch.setattr(cuda_module, "TorchCudaSink", lambda device, **_: FakeSink(delay=0))
    monkeypatch.setattr(file_module, "DEVICE_STREAM_BYTES", 0)
    path = write_file(tmp_path / "m.safetensors", {"w": torch.ones(1 << 16)})
    with FastSafetensorsFile(path) as fsf, fastsafetensors.configure(backend="posix"):
        assert torch.equal(fsf.get_tensor("w", device="cuda:0"), torch.ones(1 << 16))
        os.truncate(path, 4096)
        with pytest.raises((ReadError, HeaderError)) as info:
            fsf.get_tensor("w", device="cuda:0")
    assert info.value.path == str(path) and str(info.value).startswith("m.safetensors")


def test_device_reads_with_tiny_staging_still_get_a_valid_size() -> None:
    # 16 threads and 8 bytes of staging: a whole load gives each buffer its floor; a share of
    # 0 bytes was handed to the engine, which refused it (ConfigError staging_bytes=0).
    from fastsafetensors.config import get
    from fastsafetensors.file import _DEVICE_READS

    with fastsafetensors.configure(threads=16, staging_bytes=8):
        with _DEVICE_READS.share(1 << 20) as (threads, staging):
            assert threads == 16 and staging > 0
            assert get("staging_bytes", staging) == staging   # the engine's own check


def test_device_reads_take_the_gpu_thread_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # Left unset, the threads option gives a load to a GPU 8 readers (2 per core, at most 16,
    # then capped at 8): per-tensor reads share those, not the 16 of a CPU load.
    from fastsafetensors.file import _DEVICE_READS

    monkeypatch.delenv("FASTSAFETENSORS_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    with fastsafetensors.configure(staging_bytes=256 << 20):
        with _DEVICE_READS.share(1 << 30) as (threads, staging):
            assert (threads, staging) == (8, 256 << 20)
