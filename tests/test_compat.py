"""The upstream-compatible API (fastsafetensors.compat, fastsafetensors.parallel_loader) driven the
way vLLM and SGLang drive it, checked bit for bit against safetensors; and the same on two gloo
ranks, where each rank must read only its own files."""

from __future__ import annotations

import enum
import os
import pickle
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import (
    all_dtype_tensors,
    assert_bitwise_equal,
    sharded_checkpoint,
    small_tensors,
    write_file,
)
from safetensors.torch import load_file

import fastsafetensors
from fastsafetensors import (
    BudgetInfeasibleError,
    ClosedFileError,
    ConfigError,
    HeaderError,
    RankMismatchError,
    SafeTensorsFileLoader,
    SingleGroup,
    TensorNotFoundError,
)
from fastsafetensors.compat import FilesBufferOnDevice
from fastsafetensors.loader.stream import device_bytes
from fastsafetensors.parallel_loader import ParallelLoader


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    """Three shards (small tensors, every dtype and shape) plus what safetensors reads."""
    write_file(tmp_path / "model-00001-of-00003.safetensors", small_tensors())
    write_file(tmp_path / "model-00002-of-00003.safetensors", all_dtype_tensors())
    write_file(tmp_path / "model-00003-of-00003.safetensors",
               {"odd.rows": torch.arange(35, dtype=torch.int32).reshape(5, 7)})
    return sorted(str(p) for p in tmp_path.glob("*.safetensors"))


def expected(files: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in files:
        out.update(load_file(path))
    return out


def assert_same(got: dict[str, Any], files: list[str]) -> None:
    want = expected(files)
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].device.type == "cpu"
        assert_bitwise_equal(got[name], tensor)


# -- the call sequences of the engines ------------------------------------------------------

def vllm_weights_iterator(files: list[str]) -> Any:
    """vLLM's fastsafetensors iterator before ParallelLoader: one loader per batch of
    ``pg.size()`` files, file i of a batch read by rank i, every tensor via get_tensor."""
    pg = torch.distributed.group.WORLD if torch.distributed.is_initialized() else SingleGroup()
    device = torch.device("cpu")
    for start in range(0, len(files), pg.size()):
        batch = files[start:start + pg.size()]
        loader = SafeTensorsFileLoader(pg, device, nogds=pg.size() > 1)
        loader.add_filenames({rank: [path] for rank, path in enumerate(batch)})
        try:
            fb = loader.copy_files_to_device()
            try:
                for name in list(fb.key_to_rank_lidx.keys()):
                    yield name, fb.get_tensor(name)
            finally:
                fb.close()
        finally:
            loader.close()


def sglang_weights_iterator(files: list[str]) -> Any:
    """SGLang's variant: GDS first, and on a RuntimeError mentioning gds a fresh loader with
    nogds=True (never taken here: we fall back to plain reads ourselves)."""
    pg = SingleGroup()
    device = torch.device("cpu")
    nogds = False
    for start in range(0, len(files), pg.size()):
        batch = files[start:start + pg.size()]
        loader = SafeTensorsFileLoader(pg, device, nogds=nogds)
        loader.add_filenames({i: [f] for i, f in enumerate(batch)})
        try:
            try:
                fb = loader.copy_files_to_device()
            except RuntimeError as exc:  # pragma: no cover - the engines' retry path
                if "gds" not in str(exc):
                    raise
                loader.close()
                nogds = True
                loader = SafeTensorsFileLoader(pg, device, nogds=nogds)
                loader.add_filenames({i: [f] for i, f in enumerate(batch)})
                fb = loader.copy_files_to_device()
            try:
                for name in list(fb.key_to_rank_lidx.keys()):
                    yield name, fb.get_tensor(name)
            finally:
                fb.close()
        finally:
            loader.close()


def test_vllm_call_sequence(shards: list[str]) -> None:
    assert_same(dict(vllm_weights_iterator(shards)), shards)


def test_sglang_call_sequence(shards: list[str]) -> None:
    assert_same(dict(sglang_weights_iterator(shards)), shards)


@pytest.mark.parametrize("queue_size", [-1, 0, 2])
def test_vllm_parallel_loader_sequence(shards: list[str], queue_size: int) -> None:
    # Recent vLLM: ParallelLoader built with keywords, iterate_weights(), close() in finally.
    loader = ParallelLoader(pg=SingleGroup(), hf_weights_files=shards, queue_size=queue_size,
                            use_tqdm_on_load=False, device=str(torch.device("cpu")),
                            nogds=False)
    try:
        got = dict(loader.iterate_weights())
    finally:
        loader.close()
    assert_same(got, shards)


def newest_vllm_weights_iterator(files: list[str], *, budget: int | None,
                                 accumulate_resident: bool = False, device: str = "cpu") -> Any:
    """vLLM's iterator with upstream's fit planner: BudgetInfeasibleError imported from the top
    level first, ParallelLoader built with the planner's keywords (max_batch_bytes twice the
    largest tensor when a budget is set), the error re-raised with vLLM's own message."""
    from safetensors import safe_open

    from fastsafetensors import BudgetInfeasibleError
    from fastsafetensors.parallel_loader import ParallelLoader as PL

    pg = torch.distributed.group.WORLD if torch.distributed.is_initialized() else SingleGroup()
    largest = 0
    for path in files:
        with safe_open(path, "pt") as f:
            largest = max([largest] + [f.get_tensor(k).nbytes for k in f.keys()])
    try:
        loader = PL(pg=pg, hf_weights_files=sorted(files), queue_size=0,
                    use_tqdm_on_load=False, device=device,
                    nogds=pg.size() > 1 or budget is not None, all_local=False,
                    accumulate_resident=accumulate_resident,
                    **({} if budget is None else {"device_memory_budget": budget,
                                                  "max_batch_bytes": 2 * largest}))
    except BudgetInfeasibleError as exc:
        raise BudgetInfeasibleError(f"the model does not fit the budget: {exc}") from exc
    try:
        yield from loader.iterate_weights()
    finally:
        loader.close()


@pytest.fixture
def mib_checkpoint(tmp_path: Path) -> list[str]:
    """Two files, 5.5 MiB of tensors; the largest is 2 MiB."""
    gen = torch.Generator().manual_seed(5)
    a = write_file(tmp_path / "a.safetensors", {
        "embed": torch.randn(512, 1024, generator=gen),                 # 2 MiB
        "norm": torch.randn(1024, generator=gen).bfloat16()})
    b = write_file(tmp_path / "b.safetensors", {
        f"layer{i}": torch.randn(256, 1024, generator=gen) for i in range(3)})  # 1 MiB each
    return [str(a), str(b)]


@pytest.mark.parametrize("accumulate_resident", [True, False])
def test_newest_vllm_sequence_with_a_budget(mib_checkpoint: list[str],
                                            accumulate_resident: bool) -> None:
    got = dict(newest_vllm_weights_iterator(mib_checkpoint, budget=64 << 20,
                                            accumulate_resident=accumulate_resident))
    assert_same(got, mib_checkpoint)
    assert_same(dict(newest_vllm_weights_iterator(mib_checkpoint, budget=None)), mib_checkpoint)


def test_a_float_budget_is_taken_as_upstream_takes_it(mib_checkpoint: list[str]) -> None:
    got = dict(newest_vllm_weights_iterator(mib_checkpoint, budget=float(64 << 20)))
    assert_same(got, mib_checkpoint)
    from fastsafetensors.parallel_loader import ParallelLoader as PL

    for bad in (float("nan"), float("inf"), -1.0, "64"):
        with pytest.raises(ConfigError, match="device_memory_budget"):
            PL(pg=SingleGroup(), hf_weights_files=mib_checkpoint, use_tqdm_on_load=False,
               device="cpu", device_memory_budget=bad)


@pytest.mark.parametrize("budget", [None, 64 << 20])
def test_one_rank_yields_a_name_stored_in_two_files_from_each(tmp_path: Path,
                                                              budget: int | None) -> None:
    # As upstream and vLLM's own safetensors iterator do: vLLM's single-GPU path reads so.
    a = write_file(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    b = write_file(tmp_path / "b.safetensors", {"w": torch.full((2,), 2.0), "b": torch.ones(1)})
    got = list(newest_vllm_weights_iterator([str(a), str(b)], budget=budget))
    assert [(name, t.tolist()) for name, t in got] == [
        ("w", [1.0, 1.0]), ("b", [1.0]), ("w", [2.0, 2.0])]


@pytest.mark.parametrize("accumulate_resident, budget", [
    (True, 5 << 20),    # every tensor kept: 5.5 MiB needed
    (False, 3 << 20),   # the tensor held and the next one read: 2 x 2 MiB needed
    (False, 1 << 20),   # vLLM's own test: a 1 MiB budget
])
def test_infeasible_budget_raises_before_reading(mib_checkpoint: list[str],
                                                 accumulate_resident: bool, budget: int) -> None:
    from fastsafetensors import BudgetInfeasibleError
    from fastsafetensors.loader.posix import STATS

    STATS.reset()
    with pytest.raises(BudgetInfeasibleError, match="does not fit the budget") as info:
        next(newest_vllm_weights_iterator(mib_checkpoint, budget=budget,
                                          accumulate_resident=accumulate_resident))
    cause = info.value.__cause__
    assert isinstance(cause, BudgetInfeasibleError) and isinstance(cause, ValueError)
    assert cause.budget == budget and cause.needed > budget
    assert f"device_memory_budget={budget}" in str(cause) and str(cause.needed) in str(cause)
    assert str(pickle.loads(pickle.dumps(cause))) == str(cause)
    assert STATS.bytes_read == 0


@pytest.mark.parametrize("budget", [
    2 * (2 << 20),                  # the tensor held and the next one: one tensor at a time
    2 * (2 << 20) + (5 << 19),      # the tensor held + 4.5 MiB read ahead
])
def test_budget_bounds_what_is_held_on_the_device(mib_checkpoint: list[str], budget: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake CUDA device (copies run late on worker threads) counts the bytes allocated and not
    # yet consumed. The consumer copies each tensor away, as vLLM's weight loaders do, and lets
    # go of it when its loop variable takes the next one. Upstream's planner accepts twice the
    # largest tensor; a budget of three times it was asked for here before.
    from fake_device import FakeSink

    sink = FakeSink(delay=0.001)
    fake_cuda(monkeypatch, sink)
    got = {}
    loader = ParallelLoader(None, mib_checkpoint, use_tqdm_on_load=False, device="cuda:0",
                            nogds=True, device_memory_budget=budget, accumulate_resident=False)
    held = 0
    for name, tensor in loader.iterate_weights():
        sink.consumed(held)   # the loop variable's previous tensor is gone now
        got[name] = tensor.clone()
        held = tensor.nbytes
    sink.consumed(held)
    loader.close()
    sink.close()
    assert_same(got, mib_checkpoint)
    assert 2 << 20 < sink.peak_outstanding <= budget


@pytest.mark.gpu
@pytest.mark.parametrize("budget", [2 * (2 << 20), 3 * (2 << 20) + (1 << 20)])
def test_newest_vllm_sequence_on_cuda_stays_within_budget(mib_checkpoint: list[str],
                                                          budget: int) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU and a CUDA build of torch")
    want = expected(mib_checkpoint)
    # vLLM's parameters exist before the load; the budget is for what the load adds.
    params = {name: torch.empty_like(t, device="cuda") for name, t in want.items()}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for name, weight in newest_vllm_weights_iterator(mib_checkpoint, budget=budget,
                                                     device="cuda:0"):
        params[name].copy_(weight)
    del weight
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= budget
    for name, tensor in want.items():
        assert_bitwise_equal(params[name].cpu(), tensor)


def fake_cuda(monkeypatch: pytest.MonkeyPatch, sink: Any) -> None:
    import fastsafetensors.compat as compat_module
    import fastsafetensors.loader.cuda as cuda_module
    import fastsafetensors.loading as loading_module

    monkeypatch.setattr(compat_module, "resolve_device", lambda device, framework, **_: "cuda:0")
    monkeypatch.setattr(loading_module, "resolve_device", lambda device, framework, **_: "cuda:0")
    monkeypatch.setattr(cuda_module, "TorchCudaSink", lambda device, **_: sink)


def test_bare_cuda_means_the_callers_device_on_every_thread(
        shards: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # The caller chose cuda:1; a thread that ParallelLoader starts is on device 0, so "cuda"
    # must be resolved where the caller made the loader, not where a batch is loaded.
    import threading

    from fastsafetensors.frameworks import resolve_device

    caller = threading.get_ident()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device",
                        lambda: 1 if threading.get_ident() == caller else 0)
    assert resolve_device("cuda", pin_index=True) == "cuda:1"
    assert resolve_device("cuda:0", pin_index=True) == "cuda:0"
    assert resolve_device("cuda") == "cuda"   # initialises nothing: resolved where it is read
    loader = ParallelLoader(None, shards, use_tqdm_on_load=False, device="cuda", nogds=True)
    seen: list[str] = []
    worker = threading.Thread(target=lambda: seen.append(
        SafeTensorsFileLoader(SingleGroup(), **loader._options).device))
    worker.start()
    worker.join()
    assert loader.loader.device == "cuda:1" and seen == ["cuda:1"]
    loader.close()


def test_prefetched_batches_are_read_on_the_callers_stream(
        shards: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # vLLM loads on a stream of its own. A batch read on the prefetch thread must be allocated
    # and ordered on that stream, not on the prefetch thread's default stream: memory the
    # caller frees would otherwise be handed out again under its copies still running.
    import contextlib
    import threading

    from fake_device import FakeSink

    import fastsafetensors.loader.cuda as cuda_module

    current = threading.local()      # each thread's current stream, as CUDA keeps it

    @contextlib.contextmanager
    def stream(s: str) -> Any:
        before = getattr(current, "stream", "default")
        current.stream = s
        try:
            yield
        finally:
            current.stream = before

    sink = FakeSink(delay=0)
    fake_cuda(monkeypatch, sink)
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: getattr(current, "stream", "default"))
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    sinks_made_on: list[str] = []
    monkeypatch.setattr(
        cuda_module, "TorchCudaSink",
        lambda device, **_: sinks_made_on.append(torch.cuda.current_stream()) or sink)
    loader = ParallelLoader(None, shards, queue_size=1, use_tqdm_on_load=False,
                            device="cuda:0", nogds=True)
    # One rank streams; the batch pipeline (with its prefetch thread) is what several ranks
    # run, and it runs the same with a group of one.
    loader._local = False
    with stream("caller's"):
        got = dict(loader.iterate_weights())
    loader.close()
    sink.close()
    assert_same(got, shards)
    assert sinks_made_on == ["caller's"] * len(shards)   # one batch per file, all prefetched


@pytest.mark.parametrize("queue_size", [-1, 0, 1])
def test_the_batch_pipeline_reads_under_the_callers_configure_block(mib_checkpoint: list[str],
                                                                    queue_size: int) -> None:
    # With queue_size >= 0 the batches are read on the prefetch thread, where the caller's
    # block is not open: its options must go there with each batch.
    from fastsafetensors.loader.posix import STATS

    def reads(**options: Any) -> int:
        loader = ParallelLoader(None, mib_checkpoint, queue_size=queue_size,
                                use_tqdm_on_load=False)
        loader._local = False   # the batch pipeline that several ranks run, here with one
        STATS.reset()
        with fastsafetensors.configure(io="buffered", **options):
            got = dict(loader.iterate_weights())
        loader.close()
        assert_same(got, mib_checkpoint)
        return STATS.reads

    whole = reads()   # a read a file
    assert reads(chunk_bytes=65536) > 10 * whole   # 5.5 MiB in chunks of 64 KiB


@pytest.mark.parametrize("queue_size", [-1, 1])
def test_a_failed_batch_leaves_no_reference_cycle(shards: list[str], queue_size: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A cycle (exception -> traceback -> frame -> prefetch future -> exception) would keep the
    # loader, and with it the process group, alive until the interpreter exits, where gloo
    # aborts the process when the group is destroyed that late.
    import gc

    from fastsafetensors import ReadError

    def unreadable(self: Any, paths: list[str]) -> dict[str, Any]:
        raise ReadError(paths[0], 0, 4096, 0)

    monkeypatch.setattr(SafeTensorsFileLoader, "_read", unreadable)
    loader = ParallelLoader(None, shards, queue_size=queue_size, use_tqdm_on_load=False)
    loader._local = False   # the batch pipeline that several ranks run, here with one
    gc.collect()
    gc.disable()
    try:
        with pytest.raises(ReadError):
            dict(loader.iterate_weights())
        loader.close()
        del loader
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        leaked = [type(o).__name__ for o in gc.garbage
                  if isinstance(o, (SafeTensorsFileLoader, ParallelLoader, ReadError))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert leaked == []


@pytest.mark.parametrize("queue_size, files_ahead", [(-1, 1), (0, 2), (2, 3)])
def test_one_rank_reads_ahead_as_far_as_queue_size_says(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, queue_size: int,
        files_ahead: int) -> None:
    # Without a budget, one rank streams; a slow consumer must not let the whole checkpoint
    # pile up on the device: at most as many files' bytes as the batch pipeline would hold.
    import time

    from fake_device import FakeSink

    gen = torch.Generator().manual_seed(7)
    files = [str(write_file(tmp_path / f"m{i}.safetensors",
                            {f"m{i}.w{j}": torch.randn(256, 256, generator=gen)
                             for j in range(4)}))
             for i in range(5)]          # 1 MiB per file in 256 KiB tensors
    sink = FakeSink(delay=0)
    fake_cuda(monkeypatch, sink)
    loader = ParallelLoader(None, files, queue_size=queue_size, use_tqdm_on_load=False,
                            device="cuda:0", nogds=True)
    got = {}
    for name, tensor in loader.iterate_weights():
        time.sleep(0.005)
        got[name] = tensor.clone()
        sink.consumed(tensor.nbytes)
    loader.close()
    sink.close()
    assert_same(got, files)
    # the files read ahead, and the tensor being handed over (counted until consumed)
    assert sink.peak_outstanding <= files_ahead * (1 << 20) + (256 << 10)


def test_progress_bar_counts_every_file_it_reads(mib_checkpoint: list[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    bars: list[dict[str, int]] = []

    class Bar:
        def __init__(self, total: int, desc: str) -> None:
            bars.append({"total": total, "done": 0, "closed": 0})

        def update(self, n: int) -> None:
            bars[-1]["done"] += n

        def close(self) -> None:
            bars[-1]["closed"] += 1

    monkeypatch.setitem(sys.modules, "tqdm.auto", types.SimpleNamespace(tqdm=Bar))
    loader = ParallelLoader(None, mib_checkpoint, tensor_filter=lambda name: name == "norm")
    assert list(dict(loader.iterate_weights())) == ["norm"]
    loader.close()
    assert bars == [{"total": 1, "done": 1, "closed": 1}]   # b has no kept tensor


def test_tensor_filter_reads_only_the_kept_tensors(mib_checkpoint: list[str]) -> None:
    from fastsafetensors.loader.posix import STATS

    STATS.reset()
    loader = ParallelLoader(None, mib_checkpoint, use_tqdm_on_load=False,
                            tensor_filter=lambda name: name.startswith("layer"), all_local=True)
    got = dict(loader.iterate_weights())
    loader.close()
    want = {k: v for k, v in expected(mib_checkpoint).items() if k.startswith("layer")}
    assert list(got) == ["layer0", "layer1", "layer2"]
    for name, tensor in want.items():
        assert_bitwise_equal(got[name], tensor)
    # exactly the kept tensors, one read each, nothing of a; each in memory of its own (a view
    # of a file buffer would keep the tensors filtered out in memory too)
    kept = sum(t.numel() * t.element_size() for t in want.values())
    assert STATS.snapshot()[:2] == (kept, len(want))
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in got.values())


def test_cpu_budget_counts_memory_the_tensors_own(tmp_path: Path) -> None:
    # One file of 8 tensors of 1 MiB, a budget of 3 MiB: with every tensor a view of one
    # buffer, the tensors handed over kept all 8 MiB alive.
    path = write_file(tmp_path / "w.safetensors",
                      {f"w{i}": torch.full((1 << 18,), float(i)) for i in range(8)})
    loader = ParallelLoader(None, [str(path)], use_tqdm_on_load=False, device="cpu",
                            device_memory_budget=3 << 20, accumulate_resident=False)
    for name, tensor in loader.iterate_weights():
        assert tensor.untyped_storage().nbytes() == tensor.nbytes, name
        assert torch.equal(tensor, torch.full((1 << 18,), float(name[1:])))
    loader.close()


def test_parallel_loader_stopped_early_leaves_no_thread(shards: list[str]) -> None:
    import threading

    before = set(threading.enumerate())
    loader = ParallelLoader(None, shards, queue_size=1, use_tqdm_on_load=False)
    stream = loader.iterate_weights()
    next(stream)
    stream.close()
    loader.close()
    assert set(threading.enumerate()) <= before


def test_upstream_examples_reset_and_reuse(shards: list[str]) -> None:
    # Upstream's README: one loader, reset() between file sets, get_keys(), get_shape().
    loader = SafeTensorsFileLoader(SingleGroup(), "cpu", nogds=True, debug_log=True,
                                   max_threads=4, bbuf_size_kb=1024, framework="pytorch")
    got: dict[str, Any] = {}
    for path in shards:
        loader.add_filenames({0: [path]})
        assert loader.get_shape(loader.get_keys()[0]) == list(load_file(path)[
            loader.get_keys()[0]].shape)
        fb = loader.copy_files_to_device(use_buf_register=False, max_copy_block_size=1 << 20)
        got.update((k, fb.get_tensor(k)) for k in fb.key_to_rank_lidx)
        fb.close()
        loader.reset()
    loader.close()
    assert_same(got, shards)


def test_exports_and_pg_none(shards: list[str]) -> None:
    assert fastsafetensors.SafeTensorsFileLoader is SafeTensorsFileLoader
    assert fastsafetensors.SingleGroup is SingleGroup
    assert {"SafeTensorsFileLoader", "SingleGroup"} <= set(fastsafetensors.__all__)
    loader = SafeTensorsFileLoader(None, "cpu")   # newer upstream: None means one process
    loader.add_filenames({0: shards[:1]})
    fb = loader.copy_files_to_device()
    assert fb.get_filename("lm_head.weight") == shards[0]
    assert fb.get_filename("nope") == ""
    assert fb.get_shape("lm_head.weight") == [64, 16]


# -- shards, push, dict, dtype --------------------------------------------------------------

def test_single_process_shard_ops_return_whole_tensors(shards: list[str]) -> None:
    want = expected(shards)
    loader = SafeTensorsFileLoader(SingleGroup(), "cpu")
    loader.add_filenames({0: shards})
    with loader, loader.copy_files_to_device() as fb:
        assert_bitwise_equal(fb.get_sharded("odd.rows", 0), want["odd.rows"])
        assert_bitwise_equal(fb.get_sharded("odd.rows", 1), want["odd.rows"])
        assert_bitwise_equal(fb.push_tensor("lm_head.weight", 0), want["lm_head.weight"])
        both = fb.as_dict({"odd.rows": 0, "model.norm.weight": -1})
        assert_bitwise_equal(both["model.norm.weight"], want["model.norm.weight"])
        cols = fb.get_multi_cols(["lm_head.weight", "model.embed_tokens.weight"], 1)
        assert_bitwise_equal(cols, torch.cat([want["lm_head.weight"],
                                              want["model.embed_tokens.weight"]], 1))


def test_multi_cols_of_mixed_dtypes_promote_as_torch_cat(tmp_path: Path) -> None:
    # Joined as bytes, int8 and uint8 came back as int8 (200 read as -56), int8 and float16
    # as a garbage int8 tensor of twice the columns.
    tensors = {"i8": torch.tensor([[-1], [-56]], dtype=torch.int8),
               "u8": torch.tensor([[2], [200]], dtype=torch.uint8),
               "f16": torch.tensor([[0.5], [1.5]], dtype=torch.float16),
               "e4m3": torch.ones(2, 1).to(torch.float8_e4m3fn)}
    path = write_file(tmp_path / "mix.safetensors", tensors)
    loader = SafeTensorsFileLoader(SingleGroup(), "cpu")
    loader.add_filenames({0: [str(path)]})
    with loader, loader.copy_files_to_device() as fb:
        for names in (["i8", "u8"], ["i8", "f16"], ["u8", "u8"]):
            want = torch.cat([tensors[n] for n in names], 1)
            got = fb.get_multi_cols(names, 1)
            assert got.dtype == want.dtype and torch.equal(got, want), names
        with pytest.raises(ConfigError, match="torch.cat"):
            fb.get_multi_cols(["f16", "e4m3"], 1)   # torch has no float8 promotion


class UpstreamDType(enum.Enum):
    """Stand-in for upstream's st_types.DType (an enum of file dtype names plus AUTO)."""

    AUTO = "AUTO"
    F16 = "F16"


@pytest.mark.parametrize("dtype", [torch.float16, "F16", UpstreamDType.F16])
def test_dtype_argument_casts_like_upstream(shards: list[str], dtype: Any) -> None:
    want = load_file(shards[0])
    loader = SafeTensorsFileLoader(SingleGroup(), "cpu")
    loader.add_filenames({0: shards[:1]})
    fb = loader.copy_files_to_device(dtype=dtype)
    for name, tensor in want.items():
        assert_bitwise_equal(fb.get_tensor(name), tensor.to(torch.float16))
    # per call: device and dtype, as upstream's get_tensor(name, device, dtype)
    got = fb.get_tensor("lm_head.weight", device="cpu", dtype=torch.bfloat16)
    assert_bitwise_equal(got, want["lm_head.weight"].to(torch.bfloat16))


def test_dtype_auto_keeps_file_dtype(shards: list[str]) -> None:
    loader = SafeTensorsFileLoader(SingleGroup(), "cpu")
    loader.add_filenames({0: shards[:1]})
    fb = loader.copy_files_to_device(dtype=UpstreamDType.AUTO)
    assert fb.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
    with pytest.raises(ConfigError):
        loader.copy_files_to_device(dtype="float42")


def test_copy_files_to_device_takes_upstreams_keywords(shards: list[str]) -> None:
    # Upstream 0.5.0: copy_files_to_device(dtype, use_buf_register, max_copy_block_size,
    # allow_inflight, borrowed_tensors); its own ParallelLoader passes the last two. They raised
    # TypeError here. Tensors here are complete when it returns and own their memory, which
    # satisfies both.
    loader = SafeTensorsFileLoader(SingleGroup(), "cpu", nogds=True)
    loader.add_filenames({0: shards})
    fb = loader.copy_files_to_device(None, True, 16 << 30, True, True)
    got = {name: fb.get_tensor(name) for name in fb.keys()}
    fb.close()
    fb = loader.copy_files_to_device(allow_inflight=False, borrowed_tensors=False)
    assert fb.keys() == list(got)
    loader.close()
    assert_same(got, shards)


# -- errors and lifetime ----------------------------------------------------------------------

def test_unknown_key_is_tensor_not_found(shards: list[str]) -> None:
    loader = SafeTensorsFileLoader(SingleGroup(), "cpu")
    loader.add_filenames({0: shards[:1]})
    fb = loader.copy_files_to_device()
    for call in (lambda: fb.get_tensor("lm_head.weigth"), lambda: fb.get_sharded("x", 0),
                 lambda: fb.push_tensor("x", 0), lambda: fb.get_shape("x"),
                 lambda: loader.get_shape("x")):
        with pytest.raises(TensorNotFoundError) as info:
            call()
        assert isinstance(info.value, KeyError)
    with pytest.raises(KeyError, match="lm_head.weight"):   # close matches are listed
        fb.get_tensor("lm_head.weigth")


def test_close_is_idempotent_and_tensors_outlive_it(shards: list[str]) -> None:
    loader = SafeTensorsFileLoader(SingleGroup(), "cpu")
    loader.add_filenames({0: shards[:1]})
    fb = loader.copy_files_to_device()
    kept = fb.get_tensor("lm_head.weight")
    fb.close()
    fb.close()
    loader.close()
    loader.close()
    assert_bitwise_equal(kept, load_file(shards[0])["lm_head.weight"])
    with pytest.raises(ClosedFileError):
        fb.get_tensor("lm_head.weight")
    with pytest.raises(ClosedFileError):
        loader.copy_files_to_device()
    parallel = ParallelLoader(None, shards, use_tqdm_on_load=False)
    parallel.close()
    parallel.close()


def test_bad_arguments_raise_with_the_valid_choices(shards: list[str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pytorch"):
        SafeTensorsFileLoader(SingleGroup(), "cpu", framework="paddle")
    loader = SafeTensorsFileLoader(SingleGroup(), "cpu")
    with pytest.raises(ConfigError, match="rank=1"):
        loader.add_filenames({1: shards[:1]})
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(Path(shards[0]).read_bytes())
    with pytest.raises(HeaderError, match="one file only"):
        loader.add_filenames({0: [shards[0], str(copy)]})
    with pytest.raises(ConfigError, match="max_concurrent_producers"):
        ParallelLoader(None, shards, max_concurrent_producers=2)
    if not torch.cuda.is_available():   # an int names a CUDA device, as torch.device(0) does
        with pytest.raises(fastsafetensors.NoGPUError, match="cuda:0"):
            SafeTensorsFileLoader(SingleGroup(), 0)

    class NotAGroup:
        def rank(self) -> int:
            return 0

        def size(self) -> int:
            return 2

    with pytest.raises(ConfigError, match="ProcessGroup"):
        SafeTensorsFileLoader(NotAGroup(), "cpu")


def test_buffer_keys_follow_rank_then_file_order(shards: list[str]) -> None:
    loader = SafeTensorsFileLoader(SingleGroup(), "cpu")
    loader.add_filenames({0: list(reversed(shards))})
    fb = loader.copy_files_to_device()
    assert isinstance(fb, FilesBufferOnDevice)
    assert fb.key_to_rank_lidx["lm_head.weight"] == (0, 0)
    assert fb.key_to_rank_lidx["odd.rows"] == (0, 2)
    assert fb.keys() == list(fb.key_to_rank_lidx)


# -- two ranks over gloo ------------------------------------------------------------------------

def _rank_main(rank: int, store: str, files: list[str]) -> None:
    """One rank: load {0: [a], 1: [b]}, count the bytes read, then take every tensor whole,
    sharded (even and uneven), pushed and column-concatenated; then ParallelLoader."""
    import torch.distributed as dist

    from fastsafetensors.loader.posix import STATS

    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
    try:
        a, b, c = files
        want = expected(files)
        pg = dist.group.WORLD
        loader = SafeTensorsFileLoader(pg, torch.device("cpu"), nogds=True)
        loader.add_filenames({0: [a], 1: [b]})
        # As upstream refuses it (ValueError): a borrowed tensor cannot be broadcast.
        with pytest.raises(ConfigError, match="borrowed_tensors"):
            loader.copy_files_to_device(borrowed_tensors=True)
        STATS.reset()
        fb = loader.copy_files_to_device()
        read = STATS.snapshot()[0]
        own, other = (a, b) if rank == 0 else (b, a)
        own_data = sum(t.nbytes for t in load_file(own).values())
        other_data = sum(t.nbytes for t in load_file(other).values())
        # all of this rank's file (reads round to 4 KiB blocks), none of the other's
        assert own_data <= read <= os.path.getsize(own) + 4096 < own_data + other_data, (
            rank, read, own_data, other_data)

        for name in list(fb.key_to_rank_lidx):
            assert_bitwise_equal(fb.get_tensor(name), want[name])
        for name, dim in [("big.b", 0), ("big.b", 1), ("odd.b", 0), ("odd.b", 1),
                          ("lm_head.weight", 0), ("u8.3x4", 1), ("f4.3x8", 0)]:
            whole = want[name]
            block = -(-whole.shape[dim] // 2)
            part = whole.narrow(dim, min(rank * block, whole.shape[dim]),
                                max(0, min(block, whole.shape[dim] - rank * block)))
            got = fb.get_sharded(name, dim)
            assert_bitwise_equal(got, part)
            # memory of its own: a view would keep the whole tensor alive on the owner
            assert got.untyped_storage().nbytes() == got.nbytes, (name, dim)
        assert_bitwise_equal(fb.get_sharded("bf16.3x4", -1), want["bf16.3x4"])
        # float4 has no cat kernel in torch: the blocks are joined as bytes
        assert_bitwise_equal(fb.get_multi_cols(["f4.3x8"], 1),
                             want["f4.3x8"].view(torch.uint8).narrow(1, rank * 2, 2)
                             .view(want["f4.3x8"].dtype))
        pushed = fb.push_tensor("big.b", 0)
        if rank == 0:
            assert_bitwise_equal(pushed, want["big.b"])
        else:
            assert pushed is None
        names = ["lm_head.weight", "model.embed_tokens.weight"]
        cols = fb.get_multi_cols(names, 0)
        assert_bitwise_equal(cols, torch.cat([want[n].narrow(0, rank * 32, 32) for n in names]))
        fb.close()
        loader.close()

        # ParallelLoader: batches [a, b] and [c]; in the second, rank 1 reads nothing.
        parallel = ParallelLoader(pg, files, queue_size=0, use_tqdm_on_load=False, nogds=True)
        try:
            got = dict(parallel.iterate_weights())
        finally:
            parallel.close()
        assert set(got) == set(want)
        for name, tensor in want.items():
            assert_bitwise_equal(got[name], tensor)

        # A device_memory_budget that holds one file at a time turns reading ahead off. Budgets
        # count what the allocator hands out: multiples of 512 bytes.
        per_file = max(sum(device_bytes(t.nbytes) for t in load_file(p).values()) for p in files)
        largest = max(device_bytes(t.nbytes) for t in want.values())
        fitted = ParallelLoader(pg, files, queue_size=2, use_tqdm_on_load=False, nogds=True,
                                device_memory_budget=per_file + 2 * largest,
                                accumulate_resident=False)
        assert fitted.queue_size == -1
        got = dict(fitted.iterate_weights())
        fitted.close()
        assert set(got) == set(want)
        for name, tensor in want.items():
            assert_bitwise_equal(got[name], tensor)
        # No whole file fits: each rank reads parts of files, whole tensors in file order, as
        # upstream's planner cuts them (a 46 GiB shard under 38 GiB of free memory). The floor
        # is two tensors handed over (held, and received by a broadcast) and the largest one.
        assert per_file + 2 * largest > 3 * largest
        parted = ParallelLoader(pg, files, queue_size=0, use_tqdm_on_load=False, nogds=True,
                                device_memory_budget=3 * largest, accumulate_resident=False)
        assert parted.queue_size == -1
        batches = parted._batches()
        assert all(sum(device_bytes(i.nbytes) for i in infos) <= largest
                   for batch in batches for _, infos in batch)
        mine = sum(i.nbytes for batch in batches if rank < len(batch)
                   for i in batch[rank][1])
        STATS.reset()
        got = dict(parted.iterate_weights())
        read = STATS.snapshot()[0]
        parted.close()
        assert list(got) == [i.name for batch in batches for _, infos in batch for i in infos]
        assert set(got) == set(want)
        for name, tensor in want.items():
            assert_bitwise_equal(got[name], tensor)
        total = sum(t.nbytes for t in want.values())
        assert mine <= read < total, (rank, mine, read, total)   # only its own parts
        with pytest.raises(fastsafetensors.BudgetInfeasibleError) as too_small:
            ParallelLoader(pg, files, device_memory_budget=3 * largest - 1,
                           accumulate_resident=False)
        assert too_small.value.needed == 3 * largest
        # A filter needs each rank to read what it yields; all_local does that.
        with pytest.raises(ConfigError, match="all_local") as info:
            ParallelLoader(pg, files, tensor_filter=lambda name: True)
        assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)
        del info   # its traceback holds the process group: see _failing_rank_main
        STATS.reset()
        local = ParallelLoader(pg, files, all_local=True, use_tqdm_on_load=False,
                               tensor_filter=lambda name: name.startswith("big"))
        got = dict(local.iterate_weights())
        local.close()
        assert sorted(got) == ["big.a", "big.b"]
        kept = want["big.a"].nbytes + want["big.b"].nbytes
        # each rank reads both files' kept ranges itself (rounded out to 4 KiB at each end)
        assert kept <= STATS.bytes_read <= kept + 2 * 2 * 4096
        for name in got:
            assert_bitwise_equal(got[name], want[name])
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_gloo(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    a = write_file(tmp_path / "a.safetensors",
                   {**all_dtype_tensors(), "big.a": torch.randn(128, 128, generator=gen)})
    b = write_file(tmp_path / "b.safetensors",
                   {**small_tensors(), "big.b": torch.randn(128, 256, generator=gen),
                    "odd.b": torch.randn(5, 7, generator=gen).bfloat16()})
    c = write_file(tmp_path / "c.safetensors", {"c.only": torch.arange(10)})
    store = f"file://{tmp_path / 'store'}"
    torch.multiprocessing.spawn(_rank_main, args=(store, [str(a), str(b), str(c)]), nprocs=2,
                                join=True)


def _failing_rank_main(rank: int, store: str, files: list[str]) -> None:
    """Rank 1 cannot read its files: every rank must raise (rank 1 its own error, rank 0
    PeerLoadError), none may wait in a broadcast for tensors that never come."""
    from datetime import timedelta

    import torch.distributed as dist

    from fastsafetensors import PeerLoadError, ReadError

    # A short timeout: a regression fails with gloo's timeout error instead of hanging CI.
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        import fastsafetensors.compat as compat_module
        import fastsafetensors.parallel_loader as parallel_module

        parallel_read_header = parallel_module.read_header
        a, b = files
        pg = dist.group.WORLD
        # A shard that only rank 1 cannot open (missing on its node): the header reads.
        if rank == 1:
            def missing(path: str) -> Any:
                raise FileNotFoundError(2, "No such file or directory", path)

            compat_module.read_header, read_header = missing, compat_module.read_header
        loader = SafeTensorsFileLoader(pg, "cpu", nogds=True)
        with pytest.raises(FileNotFoundError if rank == 1 else PeerLoadError) as missed:
            loader.add_filenames({0: [a], 1: [b]})
        if rank == 0:
            assert missed.value.ranks == (1,) and set(missed.value.files) == {a, b}
        else:
            compat_module.read_header = read_header
        loader.close()
        # Its traceback holds this frame, which holds it: a cycle that keeps the process group
        # alive until the interpreter exits, where destroying it after finalization aborts.
        del missed
        # With a budget, ParallelLoader reads every header when it is made: the same check.
        if rank == 1:
            parallel_module.read_header = missing
        with pytest.raises(FileNotFoundError if rank == 1 else PeerLoadError) as missed:
            ParallelLoader(pg, [a, b], use_tqdm_on_load=False, nogds=True,
                           device_memory_budget=1 << 30)
        if rank == 0:
            assert missed.value.ranks == (1,)
        else:
            parallel_module.read_header = parallel_read_header
        del missed

        # Rank 1 cannot read the data of its files.
        if rank == 1:
            def unreadable(self: Any, paths: list[str]) -> dict[str, Any]:
                if not paths:
                    return {}
                raise ReadError(paths[0], 0, 4096, 0)

            SafeTensorsFileLoader._read = unreadable  # type: ignore[method-assign]
        expected_error = ReadError if rank == 1 else PeerLoadError

        loader = SafeTensorsFileLoader(pg, "cpu", nogds=True)
        loader.add_filenames({0: [a], 1: [b]})
        with pytest.raises(expected_error) as info:
            loader.copy_files_to_device()
        if rank == 0:
            assert info.value.ranks == (1,) and info.value.files == (b,)
            assert "b.safetensors" in str(info.value)
        loader.close()
        del info

        for queue_size in (-1, 0, 2):   # on the caller's thread, then prefetched
            parallel = ParallelLoader(pg, [a, b], queue_size=queue_size, use_tqdm_on_load=False,
                                      nogds=True)
            with pytest.raises(expected_error):
                dict(parallel.iterate_weights())
            parallel.close()
        dist.barrier()   # both ranks got here: neither waited for the other's tensors
    finally:
        dist.destroy_process_group()


def test_a_rank_that_cannot_read_stops_every_rank(tmp_path: Path) -> None:
    a = write_file(tmp_path / "a.safetensors", small_tensors())
    b = write_file(tmp_path / "b.safetensors", {"b.only": torch.arange(10)})
    store = f"file://{tmp_path / 'store'}"
    torch.multiprocessing.spawn(_failing_rank_main, args=(store, [str(a), str(b)]), nprocs=2,
                                join=True)


def _side_stream_rank_main(rank: int, store: str, files: list[str]) -> None:
    """Both ranks on GPU 0 over gloo (which moves CUDA tensors through the host), each loading
    on a stream of its own as vLLM does; batches are prefetched on another thread."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
    try:
        torch.cuda.set_device(0)
        side = torch.cuda.Stream()
        want = expected(files)
        with torch.cuda.stream(side):
            parallel = ParallelLoader(dist.group.WORLD, files, queue_size=1,
                                      use_tqdm_on_load=False, device="cuda", nogds=True)
            got = {}
            for name, tensor in parallel.iterate_weights():
                # Keep the caller's stream busy, then read the tensor there (as vLLM's
                # param.copy_ does) and drop it: were the next batches allocated and ordered
                # on another stream, they could reuse and overwrite its memory before the
                # clone has read it.
                torch.cuda._sleep(20_000_000)
                got[name] = tensor.clone()
                del tensor
            parallel.close()
            torch.cuda.current_stream().synchronize()
        assert set(got) == set(want)
        for name, tensor in want.items():
            assert got[name].device == torch.device("cuda", 0)
            assert_bitwise_equal(got[name].cpu(), tensor)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_two_ranks_prefetch_on_the_callers_stream_on_a_gpu(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU and a CUDA build of torch")
    gen = torch.Generator().manual_seed(5)
    files = [str(write_file(tmp_path / f"m{i}.safetensors",
                            {f"m{i}.w{j}": torch.randn(512, 512, generator=gen)
                             for j in range(4)}))
             for i in range(6)]
    store = f"file://{tmp_path / 'store'}"
    torch.multiprocessing.spawn(_side_stream_rank_main, args=(store, files), nprocs=2,
                                join=True)


def test_sharded_checkpoint_fixture_loads_through_parallel_loader(tmp_path: Path) -> None:
    _index, paths = sharded_checkpoint(tmp_path / "ckpt", small_tensors(), shards=3)
    files = [str(p) for p in paths]
    loader = ParallelLoader(None, files, use_tqdm_on_load=False)
    got = dict(loader.iterate_weights())
    loader.close()
    assert_same(got, files)


def test_cpu_owned_reads_leave_the_callers_configuration_alone(mib_checkpoint: list[str]
                                                               ) -> None:
    # A configure() block held open across the generator's yields applied to the caller.
    import fastsafetensors

    loader = ParallelLoader(None, mib_checkpoint, use_tqdm_on_load=False, max_threads=3,
                            tensor_filter=lambda name: True, all_local=True)
    with fastsafetensors.configure(threads=5):
        for _ in loader.iterate_weights():
            assert fastsafetensors.config.get("threads") == 5
    loader.close()


# A Ctrl-C that lands in a finalizer (the stream's file handle, collected in there) is printed
# and dropped by CPython, not raised; one before a configure() block was entered has it warn
# that it never was.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:fastsafetensors.configure:RuntimeWarning")
def test_a_ctrl_c_in_cpu_owned_reads_leaves_the_callers_configuration_alone(
        mib_checkpoint: list[str]) -> None:
    # Each read ran in a configure(threads=...) block in the caller's context: a Ctrl-C as the
    # block's __enter__ or __exit__ ran (Python functions, where CPython runs its handler) left
    # that option set there, for every later load of the caller.
    from builders import each_ctrl_c

    import fastsafetensors

    loader = ParallelLoader(None, mib_checkpoint[:1], use_tqdm_on_load=False, max_threads=3,
                            tensor_filter=lambda name: name == "norm", all_local=True)
    for point in each_ctrl_c(lambda: list(loader.iterate_weights()),
                             lambda frame: frame.f_code.co_filename != __file__):
        assert fastsafetensors.config.overrides() == {}, point
    loader.close()
    assert point > 20


def test_close_ends_a_suspended_stream(shards: list[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The caller keeps the stream (no garbage collection to close it): close() must end it.
    # On a device the engine holds the files open while it streams.
    from fake_device import FakeSink

    fake_cuda(monkeypatch, FakeSink(delay=0))
    before = len(os.listdir("/proc/self/fd"))
    loader = ParallelLoader(None, shards, use_tqdm_on_load=False, device="cuda:0", nogds=True)
    stream = loader.iterate_weights()
    next(stream)
    assert stream.gi_frame is not None   # suspended  # type: ignore[attr-defined]
    loader.close()
    assert stream.gi_frame is None       # ended      # type: ignore[attr-defined]
    assert len(os.listdir("/proc/self/fd")) == before
    assert list(stream) == []


def _budget_rank_main(rank: int, store: str, files: list[str]) -> None:
    """Budgets that differ per rank (vLLM derives them from each GPU's free memory): every rank
    plans with the smallest, so either all load, the same batches, or all refuse; and on the
    CPU, the tensors a rank read itself come in memory of their own, not views of its file."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        pg = dist.group.WORLD
        mib = 1 << 20
        # Whole files on rank 0's budget, parts on rank 1's: batches differed, and the
        # collectives paired up wrongly until the group's timeout.
        loader = ParallelLoader(pg, files, queue_size=0, use_tqdm_on_load=False,
                                device_memory_budget=12 * mib if rank == 0 else 13 * mib // 2,
                                accumulate_resident=False)
        assert loader._budget == 13 * mib // 2 and loader._part_bytes is not None
        want = expected(files)
        seen = []
        for name, tensor in loader.iterate_weights():
            assert torch.equal(tensor, want[name]), name
            assert tensor.untyped_storage().nbytes() == tensor.nbytes, name   # not a view
            seen.append(name)
        assert sorted(seen) == sorted(want)
        loader.close()
        # A budget below the floor on one rank only: every rank refuses, none waits.
        with pytest.raises(BudgetInfeasibleError):
            ParallelLoader(pg, files, use_tqdm_on_load=False, accumulate_resident=False,
                           device_memory_budget=None if rank == 0 else mib)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_budgets_agree(mib_checkpoint: list[str], tmp_path: Path) -> None:
    store = f"file://{tmp_path / 'store'}"
    torch.multiprocessing.spawn(_budget_rank_main, args=(store, mib_checkpoint), nprocs=2,
                                join=True)


def test_max_batch_bytes_of_zero_is_accepted(tmp_path: Path) -> None:
    """What vLLM passes (2 x the largest tensor) for a checkpoint of empty tensors."""
    path = write_file(tmp_path / "empty.safetensors", {"e": torch.zeros(0, 3)})
    with ParallelLoader(None, [str(path)], max_batch_bytes=0, device_memory_budget=0,
                        use_tqdm_on_load=False) as loader:
        assert [n for n, t in loader.iterate_weights()] == ["e"]


def _differing_copy_rank_main(rank: int, store: str, folders: list[str]) -> None:
    """Each rank reads its own node's copy of the checkpoint, and rank 1's copy of b differs
    (a shape): every rank must refuse, not fill half a tensor or wait in a collective."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        pg = dist.group.WORLD
        files = [os.path.join(folders[rank], name) for name in ("a.safetensors", "b.safetensors")]
        with pytest.raises(HeaderError, match="ranks read different headers"):
            for _ in ParallelLoader(pg, files, use_tqdm_on_load=False).iterate_weights():
                pass
        loader = SafeTensorsFileLoader(pg, "cpu")
        with pytest.raises(HeaderError, match="ranks read different headers"):
            loader.add_filenames({0: [files[0]], 1: [files[1]]})
        # The same files, but the ranks disagree on who reads which: broadcasts from
        # different roots would wait until the group's timeout.
        same = [os.path.join(folders[0], name) for name in ("a.safetensors", "b.safetensors")]
        order = same if rank == 0 else same[::-1]
        with pytest.raises(HeaderError, match="ranks read different headers"):
            SafeTensorsFileLoader(pg, "cpu").add_filenames({0: [order[0]], 1: [order[1]]})
        dist.barrier()   # still a working group
    finally:
        dist.destroy_process_group()


def test_a_shard_that_differs_between_nodes_stops_every_rank(tmp_path: Path) -> None:
    folders = []
    for node, rows in enumerate((64, 32)):
        folder = tmp_path / f"node{node}"
        folder.mkdir()
        write_file(folder / "a.safetensors", {"a": torch.ones(4, 8)})
        write_file(folder / "b.safetensors", {"b": torch.full((rows, 8), 2.0)})
        folders.append(str(folder))
    store = f"file://{tmp_path / 'store'}"
    torch.multiprocessing.spawn(_differing_copy_rank_main, args=(store, folders), nprocs=2,
                                join=True)


def test_max_threads_left_out_means_this_packages_default(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Upstream's default is 16; to a GPU, 8 loaded faster on an H200 (docs/benchmarks.md), so
    # a loader that names no max_threads (as vLLM's) leaves the choice to this package.
    from safetensors.torch import save_file

    import fastsafetensors.compat as compat
    import fastsafetensors.loading as loading

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(4)}, str(path))
    asked: list[Any] = []

    def checked(keeps_all: bool, caller: str, paths: Any, **options: Any) -> Any:
        asked.append((keeps_all, options["threads"]))
        return iter([("w", torch.ones(4))])

    monkeypatch.setattr(loading, "_checked", checked)
    monkeypatch.setattr(compat, "resolve_device", lambda *a, **k: "cuda:0")
    for max_threads in (None, 5):
        loader = SafeTensorsFileLoader(None, "cuda:0", nogds=True,
                                       **({} if max_threads is None else
                                          {"max_threads": max_threads}))
        assert loader._read([str(path)])["w"].sum() == 4
    assert asked == [(True, None), (True, 5)]   # a dict of every tensor: all kept


def test_get_sharded_dim_of_the_wrong_type(tmp_path: Path) -> None:
    # dim="1" raised TypeError ("'<' not supported between instances of 'str' and 'int'"),
    # dim=1.0 one from the tuple index; numpy ints still work.
    import numpy

    path = write_file(tmp_path / "m.safetensors", {"w": torch.arange(12.0).reshape(3, 4)})
    loader = SafeTensorsFileLoader(SingleGroup(), "cpu")
    loader.add_filenames({0: [str(path)]})
    fb = loader.copy_files_to_device()
    for dim in ("1", 1.0, True, None):
        with pytest.raises(ConfigError, match=f"^dim={dim!r} .*-2, -1, 0, 1"):
            fb.get_sharded("w", dim)
        with pytest.raises(ConfigError, match=f"^dim={dim!r} "):
            fb.get_multi_cols(["w"], dim)
    assert fb.get_sharded("w", numpy.int64(1)).shape == (3, 4)
    loader.close()


def test_multi_cols_and_as_dict_of_the_wrong_shape(tmp_path: Path) -> None:
    # get_multi_cols("ab") read the names "a" and "b", [] raised torch.cat's ValueError;
    # as_dict(["w"]) raised AttributeError ('list' object has no attribute 'items').
    path = write_file(tmp_path / "m.safetensors", {"w": torch.arange(12.0).reshape(3, 4),
                                                  "a": torch.ones(3, 1), "b": torch.ones(3, 1)})
    loader = SafeTensorsFileLoader(SingleGroup(), "cpu")
    loader.add_filenames({0: [str(path)]})
    fb = loader.copy_files_to_device()
    for names in ("ab", "w", []):
        with pytest.raises(ConfigError, match="^tensor_names=.*a non-empty list of tensor"):
            fb.get_multi_cols(names, 1)
    assert fb.get_multi_cols(["a", "b"], 1).shape == (3, 2)
    # Shapes that torch.cat cannot join are refused before any block moves between ranks
    # (torch's RuntimeError came after them, on every rank).
    for names, dim in ((["w", "a"], 0), (["w", "a"], -2)):
        with pytest.raises(ConfigError, match=r"differ only along dim .*w: \(3, 4\), a: \(3, 1\)"):
            fb.get_multi_cols(names, dim)
    assert fb.get_multi_cols(["w", "a"], -1).shape == (3, 5)
    for given in (["w"], "w"):
        with pytest.raises(TypeError, match="as_dict takes {tensor name: dim}"):
            fb.as_dict(given)   # type: ignore[arg-type]
    assert list(fb.as_dict({"w": -1})) == ["w"]
    loader.close()


def test_queue_size_of_the_wrong_type(shards: list[str]) -> None:
    # queue_size="2" raised TypeError ("'<' not supported between instances of 'str' and
    # 'int'"), naming no argument.
    for queue_size in ("2", 1.5, None, True):
        with pytest.raises(ConfigError, match=f"^queue_size={queue_size!r} "):
            ParallelLoader(SingleGroup(), shards, queue_size=queue_size)


def test_max_threads_is_checked_when_the_loader_is_made(shards: list[str]) -> None:
    # max_threads=-1 was taken, then copy_files_to_device refused "threads=-1".
    for max_threads in (-1, 0, 1.5, "x"):
        with pytest.raises(ConfigError, match=f"^max_threads={max_threads!r} .*positive"):
            SafeTensorsFileLoader(SingleGroup(), "cpu", max_threads=max_threads)
        with pytest.raises(ConfigError, match=f"^max_threads={max_threads!r} .*positive"):
            ParallelLoader(SingleGroup(), shards, max_threads=max_threads)
    assert SafeTensorsFileLoader(SingleGroup(), "cpu", max_threads=2).max_threads == 2


def test_push_tensor_to_a_rank_outside_the_group(tmp_path: Path) -> None:
    # One rank returned the tensor for dst_rank=5 (or "x"); under several ranks the owner
    # sent it to a rank that does not exist.
    path = write_file(tmp_path / "m.safetensors", {"w": torch.arange(3.0)})
    loader = SafeTensorsFileLoader(SingleGroup(), "cpu")
    loader.add_filenames({0: [str(path)]})
    fb = loader.copy_files_to_device()
    for dst in (5, 1, -1, "0", None):
        with pytest.raises(ConfigError, match=f"^dst_rank={dst!r} .*0 to 0"):
            fb.push_tensor("w", dst)
    assert fb.push_tensor("w", 0).tolist() == [0.0, 1.0, 2.0]
    loader.close()


def _mismatched_calls_rank_main(rank: int, store: str, files: list[str]) -> None:
    """The ranks call the buffer with different arguments: every rank raises at once, and the
    group is still in step afterwards. Before, rank 1 asking for another tensor of rank 0's
    file of the same size got rank 0's tensor's bytes silently, another owner or dim waited
    until the group's timeout, and another dim of an uneven tensor made gloo abort rank 1's
    process (a size mismatch)."""
    import torch.distributed as dist

    # Short: a regression fails with gloo's timeout error instead of hanging the suite.
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2,
                            timeout=timedelta(seconds=20))
    try:
        want = expected(files)
        loader = SafeTensorsFileLoader(dist.group.WORLD, "cpu", nogds=True)
        loader.add_filenames({0: [files[0]], 1: [files[1]]})
        fb = loader.copy_files_to_device()
        mismatched = [
            lambda: fb.get_tensor(["a", "a2"][rank]),            # one owner, one size
            lambda: fb.get_tensor(["a", "b"][rank]),             # two owners
            lambda: fb.get_sharded("a", [0, 1][rank]),
            lambda: fb.get_sharded(["a", "a2"][rank], 0),
            lambda: fb.get_sharded("odd", [0, 1][rank]),         # 5 x 3: uneven blocks
            lambda: fb.get_sharded("a", 0) if rank else fb.get_tensor("a"),
            lambda: fb.push_tensor("a", [0, 1][rank]),
            lambda: fb.get_multi_cols([["a", "b"], ["a"]][rank], 0),
            lambda: fb.get_multi_cols([["a", "a2"], ["a2", "a"]][rank], 0),   # another order
        ]
        for call in mismatched:
            with pytest.raises(RankMismatchError, match=f"rank {rank} called .*rank {1 - rank}"):
                call()
            # still in step: the next call pairs up
            assert_bitwise_equal(fb.get_tensor("b"), want["b"])
        # A call that one rank cannot make (an unknown name, a dim the tensor lacks): that rank
        # raises its own error, the other does not wait for it.
        with pytest.raises(TensorNotFoundError if rank == 0 else RankMismatchError) as info:
            fb.get_tensor(["nope", "a"][rank])
        del info   # its traceback holds the process group: see _failing_rank_main
        with pytest.raises(ConfigError if rank == 1 else RankMismatchError):
            fb.get_sharded("a", [0, 2][rank])
        # The same call written two ways is the same call.
        got = fb.get_sharded("a", -1) if rank else fb.get_tensor("a")
        assert_bitwise_equal(got, want["a"])
        assert_bitwise_equal(fb.get_sharded("a", [-2, 0][rank]), want["a"].narrow(0, 2 * rank, 2))
        fb.close()
        fb.close()
        with pytest.raises(ClosedFileError):   # on both ranks
            fb.get_tensor("a")
        loader.close()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ranks_that_call_the_buffer_differently_all_raise(tmp_path: Path) -> None:
    a = write_file(tmp_path / "a.safetensors", {"a": torch.arange(12.0).reshape(4, 3),
                                                "a2": torch.ones(4, 3),
                                                "odd": torch.arange(15.0).reshape(5, 3)})
    b = write_file(tmp_path / "b.safetensors", {"b": torch.arange(12.0).reshape(4, 3) + 100})
    store = f"file://{tmp_path / 'store'}"
    torch.multiprocessing.spawn(_mismatched_calls_rank_main, args=(store, [str(a), str(b)]),
                                nprocs=2, join=True)


def _steps_apart_rank_main(rank: int, store: str, files: list[str]) -> None:
    """Three ranks, rank 2 a step ahead: it goes on to the next loader while ranks 0 and 1
    still take a tensor. Every rank raises; before, the check that every rank could read its
    files and the check of a buffer call sent tensors of different sizes (5 and 6 int64), and
    gloo aborted the processes."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=3,
                            timeout=timedelta(seconds=20))
    try:
        pg = dist.group.WORLD
        loader = SafeTensorsFileLoader(pg, "cpu", nogds=True)
        loader.add_filenames({0: [files[0]], 1: [files[1]]})
        fb = loader.copy_files_to_device()
        with pytest.raises(RankMismatchError, match="rank 2"):
            if rank < 2:
                fb.get_tensor("a")
            else:
                SafeTensorsFileLoader(pg, "cpu", nogds=True).add_filenames({0: [files[1]]})
        with pytest.raises(RankMismatchError, match="rank 2"):
            if rank < 2:
                fb.push_tensor("b", 0)
            else:
                fb.close()
                loader.copy_files_to_device()
        loader.close()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_rank_a_step_ahead_stops_every_rank(tmp_path: Path) -> None:
    a = write_file(tmp_path / "a.safetensors", {"a": torch.arange(12.0).reshape(4, 3)})
    b = write_file(tmp_path / "b.safetensors", {"b": torch.arange(4.0)})
    store = f"file://{tmp_path / 'store'}"
    torch.multiprocessing.spawn(_steps_apart_rank_main, args=(store, [str(a), str(b)]),
                                nprocs=3, join=True)
