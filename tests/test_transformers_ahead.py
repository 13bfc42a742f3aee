"""Reading ahead (``read_ahead="on"``): a transformers load with one device_map device starts
reading the checkpoint as soon as its files are known, while transformers builds the model.

Batches are for CUDA targets; the ``batched`` fixture (of test_transformers) adds the CPU so
that all of this runs here, with ``device_map="cpu"``. Every load is compared with the stock
loader's model, tensor for tensor.
"""

from __future__ import annotations

import gc
import json
import logging
import re
import shutil
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.transformers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import test_transformers as shared  # noqa: E402
from test_transformers import (  # noqa: E402
    LOGGER,
    assert_same,
    fail_after_the_first_file,
    our_records,
    shards,
    weight_bytes,
)

# test_transformers' fixtures (pytest finds a fixture by the name it has in this module).
models, calls, batched = shared.models, shared.calls, shared.batched

from fastsafetensors.errors import ReadError  # noqa: E402
from fastsafetensors.integrations import _transformers_ahead as ahead  # noqa: E402
from fastsafetensors.integrations import _transformers_batch as batching  # noqa: E402
from fastsafetensors.integrations import _transformers_seam as seam  # noqa: E402
from fastsafetensors.loader.posix import STATS  # noqa: E402


@pytest.fixture(autouse=True)
def reading_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """read_ahead="on" (the default) for every load of this module, whatever the environment."""
    monkeypatch.setenv("FASTSAFETENSORS_READ_AHEAD", "on")


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """What the batches of each load were when transformers began building the model
    (``at_build``: (ahead, started) per batch) and the batches themselves (``batches``)."""
    from transformers import modeling_utils

    record: dict[str, Any] = {"at_build": [], "batches": []}
    init = modeling_utils.PreTrainedModel.__init__
    born = batching.Batch.__init__

    def building(self: Any, *args: Any, **kwargs: Any) -> None:
        load = seam._ACTIVE.get()
        if load is not None:
            record["at_build"].append([(b.ahead, b.thread is not None)
                                       for b in load.batches.values()])
        init(self, *args, **kwargs)

    def new_batch(self: Any, *args: Any) -> None:
        born(self, *args)
        record["batches"].append(self)

    monkeypatch.setattr(modeling_utils.PreTrainedModel, "__init__", building)
    monkeypatch.setattr(batching.Batch, "__init__", new_batch)
    yield record


def test_the_hooks_are_installed_on_this_transformers() -> None:
    # Both sites exist as the seam expects from 5.0 on; without them loads batch on demand.
    from transformers import modeling_utils

    for module, qualname, _ in seam.AHEAD_SIGNATURES:
        assert seam._signature_problem(module, qualname, _) is None
    for attr in ("_get_dtype", "caching_allocator_warmup"):
        assert hasattr(getattr(modeling_utils, attr), "__fastsafetensors_original__"), attr
    seam.uninstall()
    try:
        for attr in ("_get_dtype", "caching_allocator_warmup"):
            assert not hasattr(getattr(modeling_utils, attr), "__fastsafetensors_original__")
    finally:
        seam.install()


@pytest.mark.parametrize("kind", ["llama", "mixtral", "bert"])
def test_reading_starts_before_the_model_is_built(models: dict[str, Path], calls: Counter[str],
                                                  batched: Counter[str], seen: dict[str, Any],
                                                  caplog: pytest.LogCaptureFixture,
                                                  kind: str) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForMaskedLM if kind == "bert" else AutoModelForCausalLM
    folder = models[kind]
    reference = auto.from_pretrained(folder, device_map="cpu")
    seen["at_build"].clear()
    STATS.reset()
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = auto.from_pretrained(folder, device_map="cpu", loader="fastsafetensors")
    assert assert_same(model, reference) > 0
    # The batch was reading ahead when transformers began to build the model; one engine run
    # over every shard, no tensor read on its own, every byte once.
    # (every PreTrainedModel being built: the model and, inside it, its base model)
    assert seen["at_build"] and all(s == [(True, True)] for s in seen["at_build"])
    assert batched == Counter(batch=1, files=len(shards(folder)))
    assert STATS.bytes_read - weight_bytes(folder) < 2 * 4096 * len(shards(folder))
    (line,) = our_records(caplog)
    assert "read ahead while transformers built the model" in line
    # Its timeline: the batch started reading before transformers first waited.
    times = re.search(r"cpu: read (\d+\.\d+)-(\d+\.\d+) s, first waited on at (\d+\.\d+) s, "
                      r"last tensor at (\d+\.\d+) s", line)
    assert times is not None, line
    (batch,) = [b for b in seen["batches"] if b.ahead]
    assert batch.times["started"] < batch.times["asked"]   # (the reads may end before it)
    assert batch.times["started"] < batch.times["last"] <= batch.times["finished"]


def test_reading_ahead_is_the_default(models: dict[str, Path], calls: Counter[str],
                                      batched: Counter[str], seen: dict[str, Any],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv("FASTSAFETENSORS_READ_AHEAD")
    folder = models["llama"]
    reference = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    seen["at_build"].clear()
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", loader="fastsafetensors")
    assert_same(model, reference)
    assert seen["at_build"] and all(s == [(True, True)] for s in seen["at_build"])


def with_unused_tensor(source: Path, folder: Path) -> Path:
    """A copy of ``source`` whose last shard also holds a tensor no model parameter uses."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    last = shards(folder)[-1]
    tensors = load_file(last)
    tensors["unused.weight"] = torch.arange(4096, dtype=torch.float32)
    save_file(tensors, str(last), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["unused.weight"] = last.name
    index.write_text(json.dumps(data))
    return folder


def test_what_nobody_asks_for_is_read_but_not_kept(models: dict[str, Path], tmp_path: Path,
                                                  calls: Counter[str], batched: Counter[str],
                                                  seen: dict[str, Any],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, modeling_utils

    import fastsafetensors.loading

    folder = with_unused_tensor(models["llama"], tmp_path / "llama-unused")
    reference = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    yielded: dict[str, weakref.ref[Any]] = {}
    real = fastsafetensors.loading._host_stream

    def recording(*args: Any, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        for name, tensor in real(*args, **kwargs):
            yielded[name] = weakref.ref(tensor)
            yield name, tensor

    monkeypatch.setattr(fastsafetensors.loading, "_host_stream", recording)
    # Dropped once transformers has asked for everything, not only when the load ends.
    convert = modeling_utils.convert_and_load_state_dict_in_model
    after_loading: list[Any] = []

    def converted(*args: Any, **kwargs: Any) -> Any:
        result = convert(*args, **kwargs)
        gc.collect()
        after_loading.append(yielded["unused.weight"]())
        return result

    monkeypatch.setattr(modeling_utils, "convert_and_load_state_dict_in_model", converted)
    # Every tensor read before transformers' first wait, so that the unused one waits in
    # `ready` then (it would otherwise be dropped as it arrives).
    done = batching.Batch.requests_done
    waiting: list[bool] = []

    def after_reading(self: Any) -> None:
        if self.thread is not None and not self.asked:
            self.thread.join(timeout=30)
            waiting.append(any(name == "unused.weight" for _, name in self.ready))
        done(self)

    monkeypatch.setattr(batching.Batch, "requests_done", after_reading)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu",
                                                 loader="fastsafetensors")
    assert_same(model, reference)
    (batch,) = seen["batches"]
    assert batch.ahead and batch.asked and not batch.ready
    assert waiting == [True] and after_loading == [None]


@pytest.mark.parametrize("case", ["environment off", "float16", "read_ahead=off",
                                  "no device_map", "tp_plan"])
def test_no_reading_ahead_where_it_would_not_pay(models: dict[str, Path], calls: Counter[str],
                                                 batched: Counter[str], seen: dict[str, Any],
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 case: str) -> None:
    # Off where asked for; a cast would keep both copies on the device; without one device_map
    # device the tensors' devices are not known before the model is built.
    from transformers import AutoModelForCausalLM

    folder = models["llama"]
    kwargs: dict[str, Any] = {"device_map": "cpu"}
    if case == "environment off":
        monkeypatch.setenv("FASTSAFETENSORS_READ_AHEAD", "off")
    elif case == "float16":
        kwargs["dtype"] = torch.float16
    elif case == "read_ahead=off":
        kwargs["loader_options"] = {"read_ahead": "off"}
    elif case == "no device_map":
        kwargs.pop("device_map")
    else:
        assert ahead.ahead_device({"device_map": "cpu", "tp_plan": "auto"}) is None
        return
    stock = {k: v for k, v in kwargs.items() if k != "loader_options"}
    reference = AutoModelForCausalLM.from_pretrained(folder, **stock)
    seen["at_build"].clear()
    model = AutoModelForCausalLM.from_pretrained(folder, loader="fastsafetensors", **kwargs)
    assert_same(model, reference)
    # no batch yet when the model (and its base model) was built
    assert seen["at_build"] and all(s == [] for s in seen["at_build"])
    assert [b.ahead for b in seen["batches"]] == [False] and batched["batch"] == 1


def test_ahead_device_of_each_device_map(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # an int is a CUDA index
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for device_map, expected in (
            ("cuda:1", "cuda:1"), ("cuda", "cuda:0"), (torch.device("cuda", 2), "cuda:2"),
            (1, "cuda:1"), ({"": "cuda:1"}, "cuda:1"), ({"": 0}, "cuda:0"),
            ("cpu", None), ("auto", None), ("balanced", None), ("disk", None), (None, None),
            (True, None), ({"model": "cuda:0", "lm_head": "cuda:0"}, None), ({}, None),
            (["cuda:0"], None)):
        assert ahead.ahead_device({"device_map": device_map}) == expected, device_map
    for key in ("tp_plan", "distributed_config", "device_mesh", "quantization_config"):
        assert ahead.ahead_device({"device_map": "cuda:0", key: object()}) is None, key
    # A bare "cuda" is this process's local rank to transformers (torchrun), as here.
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ahead.ahead_device({"device_map": "cuda"}) == "cuda:1"
    assert ahead.ahead_device({"device_map": torch.device("cuda")}) == "cuda:3"


def test_reading_ahead_needs_room_on_the_device(models: dict[str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The whole checkpoint plus a GiB must fit in the device's free memory; else transformers
    # asks first and the batch reads on demand.
    files = [str(p) for p in shards(models["llama"])]
    nbytes = weight_bytes(models["llama"])
    free = nbytes + ahead.AHEAD_HEADROOM - 1
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 80 << 30))
    load = seam.Load({})
    outcome = ahead.start_reading_ahead(load, "cuda:0", files, torch.float32, None, None)
    assert "free on cuda:0" in outcome and not load.batches
    for given, why in (((None, torch.float32, {"w": 1}, None), "state_dict"),
                       ((files, torch.float32, None, object()), "quantizer"),
                       ((files, "auto", None, None), "no single dtype"),
                       ((["pytorch_model.bin"], torch.float32, None, None), "no safetensors"),
                       ((files, torch.bfloat16, None, None), "the model torch.bfloat16")):
        assert why in ahead.start_reading_ahead(load, "cuda:0", *given), why
        assert not load.batches
    with seam.config.configure(read_ahead="off"):
        assert ahead.start_reading_ahead(load, "cuda:0", files, torch.float32, None, None) == \
            "read_ahead='off'"
    load.close()


@pytest.mark.parametrize("case", ["HF_DEACTIVATE_ASYNC_LOAD", "hf-mount"])
def test_no_reading_ahead_where_transformers_does_not_ask_through_futures(
        models: dict[str, Path], calls: Counter[str], batched: Counter[str],
        seen: dict[str, Any], monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    # Without a first wait on a future nothing ends the requests: what was read ahead would
    # stay on the device beside what transformers reads itself.
    from transformers import AutoModelForCausalLM, modeling_utils

    if case == "HF_DEACTIVATE_ASYNC_LOAD":
        monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")
    else:
        if not hasattr(modeling_utils, "_is_on_hf_mount"):
            pytest.skip(f"transformers {transformers.__version__} has no hf-mount path")
        mounted = {str(p) for p in shards(models["llama"])[:1]}
        real = modeling_utils._is_on_hf_mount
        monkeypatch.setattr(modeling_utils, "_is_on_hf_mount",
                            lambda path: str(path) in mounted or real(path))
    reference = AutoModelForCausalLM.from_pretrained(models["llama"], device_map="cpu")
    STATS.reset()
    model = AutoModelForCausalLM.from_pretrained(models["llama"], device_map="cpu",
                                                 loader="fastsafetensors")
    assert_same(model, reference)
    assert not any(b.ahead for b in seen["batches"])
    assert STATS.bytes_read <= weight_bytes(models["llama"]) + 2 * 4096 * len(
        shards(models["llama"]))   # nothing read twice


def test_a_nested_from_pretrained_does_not_read_ahead(models: dict[str, Path]) -> None:
    # Only a load's first dtype (its own files) may start reading ahead, to the load's device.
    calls: list[Any] = []
    hook = seam.make_dtype_hook(lambda *args: calls.append(args) or ("config", torch.bfloat16))
    load = seam.Load({})
    load.ahead_device = "cpu"
    token = seam._ACTIVE.set(load)
    try:
        hook(torch.bfloat16, [str(p) for p in shards(models["llama"])], "config", None, None,
             True, None)   # the llama files are float32: declined
        assert load.ahead_device is None and not load.batches
        hook(torch.float32, [str(p) for p in shards(models["llama"])], "config", None, None,
             True, None)   # a nested load's dtype: not tried again
        assert not load.batches and len(calls) == 2
    finally:
        seam._ACTIVE.reset(token)
        load.close()


def test_the_warmup_is_skipped_while_reading_ahead(models: dict[str, Path]) -> None:
    # transformers' warm-up allocates the model's size at once; beside tensors read ahead it
    # would double the device's peak.
    called: list[Any] = []
    warmup = seam.make_warmup_hook(lambda *args: called.append(args))
    load = seam.Load({})
    token = seam._ACTIVE.set(load)
    try:
        warmup("model", {"w": "cuda:0"}, None)
        assert len(called) == 1   # no batch reads ahead: transformers' own
        load.batch("cpu").ahead = True
        warmup("model", {"w": "cuda:0"}, None)
        assert len(called) == 1
    finally:
        seam._ACTIVE.reset(token)
    warmup("model", {}, None)   # outside a load: transformers' own
    assert len(called) == 2
    load.close()


# -- the batch itself, reading ahead --------------------------------------------------------------

def two_files(tmp_path: Path) -> list[Path]:
    from safetensors.torch import save_file

    paths = []
    for i in range(2):
        path = tmp_path / f"part-{i}.safetensors"
        save_file({"w": torch.full((4,), float(i)), f"only{i}": torch.ones(2) * i}, str(path))
        paths.append(path)
    return paths


def read_through(batch: Any) -> None:
    """Wait until the batch's engine run is over."""
    assert batch.thread is not None
    batch.thread.join(timeout=30)
    assert batch.finished


def held_batch(tmp_path: Path) -> tuple[Any, list[Any], Any, threading.Event]:
    """A load reading two files ahead on the CPU, whose engine run waits for the event."""
    load = seam.Load({})
    handles = [load.open(p) for p in two_files(tmp_path)]
    batch = load.batch("cpu")
    gate = threading.Event()
    real = batch._read

    def held(*args: Any) -> None:
        gate.wait(timeout=30)
        real(*args)

    batch._read = held
    batch.read_ahead(handles)
    return load, handles, batch, gate


def test_requests_before_and_after_the_tensor_arrives(tmp_path: Path) -> None:
    load, handles, batch, gate = held_batch(tmp_path)
    early = batch.add(handles[0].get_slice("w"), None)   # before anything is read
    assert early is not None and not early.done()
    gate.set()
    read_through(batch)
    assert early.done()
    # Read before transformers asked: waiting in `ready`, handed over once, cast as asked.
    late = batch.add(handles[1].get_slice("w"), torch.float16)
    assert late is not None and late.done()
    assert batch.add(handles[1].get_slice("w"), None) is None   # asked twice: read on its own
    assert batch.add(handles[0].get_slice("w"), None) is None
    assert set(batch.ready) == {(str(handles[0].path), "only0"), (str(handles[1].path), "only1")}
    # transformers' first wait: it asks for nothing more, and what is left is dropped.
    assert early.result(timeout=10).tolist() == [0.0] * 4
    assert late.result().tolist() == [1.0] * 4 and late.result().dtype == torch.float16
    assert batch.asked and not batch.ready
    assert batch.add(handles[0].get_slice("only0"), None) is None
    load.close()


def test_what_arrives_after_the_requests_ended_is_dropped(tmp_path: Path) -> None:
    load, handles, batch, gate = held_batch(tmp_path)
    future = batch.add(handles[0].get_slice("w"), None)
    batch.requests_done()   # transformers' first wait, before anything arrived
    gate.set()
    read_through(batch)
    assert not batch.ready   # nothing kept as it arrived (result() would clear it again)
    assert future is not None and future.result(timeout=5).tolist() == [0.0] * 4
    load.close()


def test_a_cast_that_fails_fails_its_future(tmp_path: Path) -> None:
    # The reader has taken the tensor's requests out of `wanted` when it casts: a failed cast
    # (out of device memory, say) must still complete them, with its error.
    load, handles, batch, gate = held_batch(tmp_path)
    future = batch.add(handles[0].get_slice("w"), "not a dtype")
    other = batch.add(handles[0].get_slice("only0"), None)
    gate.set()
    read_through(batch)
    assert future is not None and other is not None
    with pytest.raises(RuntimeError, match="not a dtype"):   # tensor.to() refused it
        future.result(timeout=5)
    assert other.result(timeout=5).tolist() == [0.0, 0.0]
    load.close()


def gpu_batch_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device_stream: Any
                 ) -> tuple[Any, list[Any], Any]:
    """A load of two files and its batch to cuda:0, whose engine run is ``device_stream``
    (there is no CUDA here)."""
    import fastsafetensors.loading as loading

    monkeypatch.setattr(loading, "device_stream", device_stream)
    monkeypatch.setattr(batching, "complete", lambda device: None)   # no CUDA stream here
    load = seam.Load({})
    handles = [load.open(p) for p in two_files(tmp_path)]
    return load, handles, load.batch("cuda:0")


def read_in_file_order(sources: list[Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """What the engine yields for ``sources`` (a fake device_stream's), read by safetensors."""
    from safetensors.torch import load_file

    for source, _, names in sources:
        tensors = load_file(source)
        for name in sorted(names, key=lambda n: list(tensors).index(n)):
            yield name, tensors[name]


def test_a_batch_reading_ahead_to_a_gpu_keeps_every_tensor_so_its_ring_may_run_ahead(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Read ahead, the batch holds each tensor until transformers takes it: the engine may
    # allocate them all ahead of their reads (StreamOptions.keeps_all), and its ring need not
    # wait for its reports, which need the GIL that transformers' thread holds while it
    # builds the model.
    asked: list[tuple[str, dict[str, Any]]] = []

    def device_stream(sources: list[Any], device: str, **options: Any) -> Iterator[Any]:
        asked.append((device, options))
        yield from read_in_file_order(sources)

    load, handles, batch = gpu_batch_of(tmp_path, monkeypatch, device_stream)
    batch.read_ahead(handles)
    read_through(batch)
    assert asked == [("cuda:0", {"keeps_all": True, "gate": None})]
    future = batch.add(handles[1].get_slice("w"), None)
    assert future is not None and future.result(timeout=5).tolist() == [1.0] * 4
    load.close()
    # On demand, transformers may convert and free each tensor as it comes (here a cast): the
    # engine must not allocate them all ahead of their reads.
    load = seam.Load({})
    handles = [load.open(p) for p in two_files(tmp_path)]
    batch = load.batch("cuda:0")
    cast = batch.add(handles[0].get_slice("w"), torch.float16)
    batch.start()
    read_through(batch)
    assert asked[1:] == [("cuda:0", {"keeps_all": False, "gate": None})]
    assert cast is not None and cast.result(timeout=5).dtype == torch.float16
    load.close()


def test_a_quiet_read_ahead_returns_once_planned_and_holds_its_reports_until_asked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # read_ahead="quiet": transformers' thread waits in read_ahead() until the engine has
    # planned every chunk, and the engine's reports (so the hand-overs) wait until
    # transformers first waits, or the load stops.
    events: list[str] = []

    def device_stream(sources: list[Any], device: str, *, keeps_all: bool,
                      gate: Any) -> Iterator[Any]:
        time.sleep(0.05)   # planning
        events.append("planned")
        gate.set_planned()
        gate.wait_released(threading.Event())
        events.append("released")
        yield from read_in_file_order(sources)

    load, handles, batch = gpu_batch_of(tmp_path, monkeypatch, device_stream)
    batch.read_ahead(handles, quiet=True)
    assert events == ["planned"] and batch.gate.planned and "planned" in batch.times
    future = batch.add(handles[1].get_slice("w"), None)
    assert future is not None
    batch.thread.join(0.1)
    assert batch.thread.is_alive() and not future.done()
    assert events == ["planned"] and not batch.ready   # nothing handed over while held
    assert future.result(timeout=5).tolist() == [1.0] * 4   # the first wait lets them go
    read_through(batch)
    assert events == ["planned", "released"]
    load.close()
    # Closed without a request (the model failed to build): the held run ends, no hang.
    load, handles, batch = gpu_batch_of(tmp_path, monkeypatch, device_stream)
    batch.read_ahead(handles, quiet=True)
    load.close()
    assert batch.thread is not None and not batch.thread.is_alive()
    assert batch.gate.released


def test_a_quiet_read_ahead_to_the_cpu_does_not_wait(tmp_path: Path) -> None:
    # Python readers to the CPU have nothing to hold: read_ahead() returns at once, planned.
    load = seam.Load({})
    handles = [load.open(p) for p in two_files(tmp_path)]
    batch = load.batch("cpu")
    batch.read_ahead(handles, quiet=True)
    assert batch.gate.planned and batch.gate.released
    future = batch.add(handles[0].get_slice("w"), None)
    assert future is not None and future.result(timeout=10).tolist() == [0.0] * 4
    load.close()


def test_a_file_replaced_at_its_path_is_not_served(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    paths = two_files(tmp_path)
    load = seam.Load({})
    batch = load.batch("cpu")
    batch.read_ahead([load.open(p) for p in paths])
    read_through(batch)
    paths[0].rename(tmp_path / "old.safetensors")
    save_file({"w": torch.full((4,), 7.0)}, str(paths[0]))
    newer = load.open(paths[0])
    assert batch.add(newer.get_slice("w"), None) is None   # the caller reads the new file
    assert newer.get_tensor("w").tolist() == [7.0] * 4
    load.close()


def test_after_a_failed_read_every_request_gets_the_error(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fail_after_the_first_file(monkeypatch)
    load = seam.Load({})
    handles = [load.open(p) for p in two_files(tmp_path)]
    batch = load.batch("cpu")
    batch.read_ahead(handles)
    read_through(batch)
    served = batch.add(handles[0].get_slice("w"), None)   # read before the failure
    failed = batch.add(handles[1].get_slice("w"), None)   # never read: the load's error
    assert served is not None and failed is not None
    assert served.result().tolist() == [0.0] * 4
    with pytest.raises(ReadError, match="returned 3"):
        failed.result(timeout=5)
    load.close()


def test_a_failed_read_ahead_fails_the_load(models: dict[str, Path], calls: Counter[str],
                                            batched: Counter[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Whether the error comes before or after transformers asks, from_pretrained raises it.
    from transformers import AutoModelForCausalLM

    fail_after_the_first_file(monkeypatch)
    with pytest.raises(ReadError, match="read of 10 bytes at offset 0 returned 3"):
        AutoModelForCausalLM.from_pretrained(models["llama"], device_map="cpu",
                                             loader="fastsafetensors")
    assert not [t for t in threading.enumerate()
                if t.name.startswith("fastsafetensors-transformers-batch")]


def test_a_load_that_fails_while_building_stops_the_read(models: dict[str, Path],
                                                        calls: Counter[str],
                                                        batched: Counter[str],
                                                        seen: dict[str, Any],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, modeling_utils

    def broken(self: Any, *args: Any, **kwargs: Any) -> None:
        (batch,) = seen["batches"]
        batch.thread.join(timeout=30)   # everything read ahead, waiting in `ready`
        assert batch.ready
        raise RuntimeError("the model cannot be built")

    monkeypatch.setattr(modeling_utils.PreTrainedModel, "__init__", broken)
    with pytest.raises(RuntimeError, match="cannot be built"):
        AutoModelForCausalLM.from_pretrained(models["llama"], device_map="cpu",
                                             loader="fastsafetensors")
    (batch,) = seen["batches"]
    assert batch.ahead and batch.stopped.is_set() and not batch.ready
    assert batch.thread is not None and not batch.thread.is_alive()


@pytest.mark.gpu
def test_reading_ahead_to_cuda_keeps_the_device_peak(tmp_path: Path, calls: Counter[str],
                                                     seen: dict[str, Any]) -> None:
    # The warm-up skipped while reading ahead: the device's peak is no higher than when the
    # batch reads on demand, after the warm-up. A warm-up beside the tensors read ahead would
    # add the model's size (about 23 MB here). Its weights are of 1 MiB and more, so no run of
    # small tensors passes through device scratch, which the bound would have to allow for.
    import tf_models
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    folder = tmp_path / "llama-wide"
    torch.manual_seed(0)
    LlamaForCausalLM(tf_models.llama_config(hidden_size=512, intermediate_size=1024,
                                            vocab_size=512, num_key_value_heads=4)
                     ).save_pretrained(folder, max_shard_size="4MB")
    peaks = {}
    loaded = {}
    for way, kwargs in (("stock", {}),
                        ("on demand", {"loader": "fastsafetensors",
                                       "loader_options": {"read_ahead": "off"}}),
                        ("ahead", {"loader": "fastsafetensors"}),
                        ("quiet", {"loader": "fastsafetensors",
                                   "loader_options": {"read_ahead": "quiet"}})):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loaded[way] = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda", **kwargs)
        peaks[way] = torch.cuda.max_memory_allocated() - before
    assert assert_same(loaded["ahead"], loaded["stock"]) > 0
    assert assert_same(loaded["on demand"], loaded["stock"]) > 0
    assert assert_same(loaded["quiet"], loaded["stock"]) > 0
    assert [b.ahead for b in seen["batches"]] == [False, True, True]
    # read_ahead="quiet": transformers waited for the planning, the reports for its request.
    quiet = seen["batches"][2]
    assert quiet.gate is not None and quiet.gate.planned and quiet.gate.released
    assert "planned" in quiet.times
    assert peaks["ahead"] <= peaks["on demand"] + (1 << 20), peaks
    assert peaks["quiet"] <= peaks["on demand"] + (1 << 20), peaks


@pytest.mark.parametrize("ran", [True, False])
def test_a_tensor_is_completed_without_a_wait_once_its_copies_ran(monkeypatch, ran):
    # A wait gives the GIL away, and taking it back waits behind transformers' thread for up
    # to a switch interval, once per tensor: asked first, the stream is waited for only while
    # copies are still queued on it.
    from fastsafetensors.integrations import _transformers_batch

    calls: list[str] = []

    class Stream:
        def query(self) -> bool:
            calls.append("query")
            return ran

        def synchronize(self) -> None:
            calls.append("synchronize")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    _transformers_batch.complete("cuda:0")
    assert calls == (["query"] if ran else ["query", "synchronize"])
