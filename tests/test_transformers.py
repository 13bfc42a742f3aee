"""transformers' ``from_pretrained(..., loader="fastsafetensors")``, checked against stock.

Every load test asserts that every parameter and buffer is ``torch.equal`` (same dtype, device and
type) to what transformers' own loader produces from the same files, and proves the bytes went
through this package by counting them (fastsafetensors.loader.posix.STATS) and counting the
handles each path opened. Tiny checkpoints are built in a temporary folder; no network.
"""

from __future__ import annotations

import importlib
import json
import logging
import mmap
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version

pytestmark = pytest.mark.transformers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tf_models  # noqa: E402  (tests/ is on sys.path via conftest)
from builders import require_o_direct  # noqa: E402

import fastsafetensors.integrations.transformers as ft  # noqa: E402
from fastsafetensors import configure  # noqa: E402
from fastsafetensors.errors import ConfigError, HeaderError  # noqa: E402
from fastsafetensors.integrations import _transformers_ahead as ahead  # noqa: E402
from fastsafetensors.integrations import _transformers_batch as batching  # noqa: E402
from fastsafetensors.integrations import _transformers_seam as seam  # noqa: E402
from fastsafetensors.loader.posix import DIRECT_ALIGN, STATS  # noqa: E402

# Releases whose own loading differs in ways the tests must allow for (see each use).
BEFORE_5_1, BEFORE_5_13, BEFORE_5_14, BEFORE_5_21 = (
    Version(transformers.__version__) < Version(release) for release in
    ("5.1", "5.13", "5.14", "5.21"))

LOGGER = "fastsafetensors.integrations.transformers"
IDS = [[1, 5, 9, 17, 33, 65]]


# -- checkpoints and helpers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tf")
    return {
        "llama": tf_models.build("llama", root / "llama", shard="400KB"),
        "mixtral": tf_models.build("mixtral", root / "mixtral", shard="100KB"),
        "bert": tf_models.build("bert", root / "bert", shard="100KB"),
        "llama_bf16_config": tf_models.build("llama", root / "llama_bf16", shard="1MB",
                                             config_dtype="bfloat16"),
        "llama_no_dtype": tf_models.build("llama", root / "llama_nodtype", shard="1MB",
                                          config_dtype=None),
        "llama_bin": tf_models.build("llama", root / "llama_bin", shard="1MB", safe=False),
    }


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def weight_bytes(folder: Path) -> int:
    return sum(tf_models.weight_bytes(folder).values())


def assert_same(model: Any, reference: Any) -> int:
    """Every parameter and buffer of ``model`` equals ``reference``'s; returns how many."""
    mine = dict(model.named_parameters()) | dict(model.named_buffers())
    ref = dict(reference.named_parameters()) | dict(reference.named_buffers())
    assert mine.keys() == ref.keys()
    for name, expected in ref.items():
        got = mine[name]
        assert type(got) is type(expected), name
        assert got.dtype == expected.dtype and got.device == expected.device, name
        if expected.device.type == "meta":   # offloaded to disk: compared through its files
            assert got.shape == expected.shape, name
            continue
        assert torch.equal(got, expected), f"{name} differs from the stock loader's"
    assert ref, "nothing compared"
    return len(ref)


def logits(model: Any) -> Any:
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Counts ``stock`` safe_open calls (safetensors' own) and ``ours`` (handles of this
    package), and resets the byte counter."""
    counts: Counter[str] = Counter()
    ft.uninstall()
    for name in seam.SAFE_OPEN_SITES:
        module = importlib.import_module(name)
        if BEFORE_5_14 and not hasattr(module, "safe_open"):   # a site of later releases
            continue

        def spy(*args: Any, _real: Any = module.safe_open, **kwargs: Any) -> Any:
            counts["stock"] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "safe_open", spy)
    real_open = seam.Load.open

    def open_spy(self: Any, path: Any) -> Any:
        counts["ours"] += 1
        return real_open(self, path)

    monkeypatch.setattr(seam.Load, "open", open_spy)
    ft.install()
    STATS.reset()
    yield counts
    ft.uninstall()
    monkeypatch.undo()
    ft.install()


def our_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


# -- install, uninstall, version checks ---------------------------------------------------------

def test_import_installs_and_install_is_idempotent() -> None:
    import safetensors
    from transformers import PreTrainedModel, modeling_utils

    assert ft.is_installed()
    wrapper = PreTrainedModel.__dict__["from_pretrained"]
    dispatcher = modeling_utils.safe_open
    ft.install()
    ft.install()
    assert PreTrainedModel.__dict__["from_pretrained"] is wrapper
    assert modeling_utils.safe_open is dispatcher
    ft.uninstall()
    ft.uninstall()
    try:
        assert not ft.is_installed()
        for name in seam.SAFE_OPEN_SITES:
            # Before 5.14 not every site imports safe_open (the seam replaces it where present):
            # absent stays absent.
            module = importlib.import_module(name)
            site = getattr(module, "safe_open", safetensors.safe_open) if BEFORE_5_14 else \
                module.safe_open
            assert site is safetensors.safe_open, name
        assert not hasattr(PreTrainedModel.__dict__["from_pretrained"].__func__,
                           "__fastsafetensors_original__")
        from transformers import core_model_loading

        assert not hasattr(core_model_loading._materialize_copy, "__fastsafetensors_original__")
    finally:
        ft.install()
    assert ft.is_installed()


def test_importing_the_package_does_not_import_transformers() -> None:
    code = ("import sys, fastsafetensors, fastsafetensors.integrations; "
            "assert 'transformers' not in sys.modules, 'imported transformers'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_transformers_the_import_says_what_to_install() -> None:
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from fastsafetensors.errors import FrameworkNotInstalledError\n"
            "try:\n    import fastsafetensors.integrations.transformers\n"
            "except FrameworkNotInstalledError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert "No module named 'transformers'" in out and "fastsafetensors[transformers]" in out


@pytest.mark.parametrize("version", ["4.57.1", "6.0.0", "not-a-version"])
def test_unsupported_version_names_the_supported_range(monkeypatch: pytest.MonkeyPatch,
                                                      version: str) -> None:
    # The module object transformers registers (it may replace itself in sys.modules).
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    with pytest.raises(ft.IncompatibleVersionError) as info:
        ft.install()
    err = info.value
    assert isinstance(err, ImportError)
    assert "transformers>=5.0,<6" in str(err) and version in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is type(err) and str(again) == str(err)


def test_changed_private_signature_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import core_model_loading

    def _materialize_copy(tensor: Any) -> Any:  # lost its device and dtype parameters
        return tensor

    monkeypatch.setattr(core_model_loading, "_materialize_copy", _materialize_copy)
    with pytest.raises(ft.IncompatibleVersionError, match=r"_materialize_copy.*device, dtype"):
        ft.install()


def test_either_home_of_the_tensor_parallel_shard_step_is_accepted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers 5.14 moved the step that indexes a slice for a tensor-parallel rank from
    integrations.tensor_parallel to distributed.sharding_utils (5.14 still defines the old one,
    as a stub). The old home answers only where the new one is gone; the refusal names both."""
    import types

    # Both homes emptied, whichever this release has.
    sharding_utils = types.ModuleType("transformers.distributed.sharding_utils")
    tensor_parallel = types.ModuleType("transformers.integrations.tensor_parallel")
    for module in (sharding_utils, tensor_parallel):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(ft.IncompatibleVersionError,
                       match=r"DtensorShardOperation.shard_tensor is gone; .*"
                             r"TensorParallelLayer.shard_tensor is gone"):
        ft.install()

    class TensorParallelLayer:   # the 5.0 to 5.13 signature
        def shard_tensor(self, param: Any, tensor_idx: Any = None, device: Any = None,
                         dtype: Any = None) -> Any:
            return param

    tensor_parallel.TensorParallelLayer = TensorParallelLayer  # type: ignore[attr-defined]
    ft.install()
    assert ft.is_installed()

    class DtensorShardOperation:   # the new home, with its parameters renamed
        def shard_tensor(self, src: Any, idx: Any = None, device: Any = None,
                         dtype: Any = None) -> Any:
            return src

    sharding_utils.DtensorShardOperation = DtensorShardOperation  # type: ignore[attr-defined]
    with pytest.raises(ft.IncompatibleVersionError,
                       match=r"DtensorShardOperation.shard_tensor\(.*lacks parameter\(s\) "
                             r"source, tensor_idx\. ") as info:
        ft.install()
    assert "TensorParallelLayer" not in str(info.value)


# -- loads compared with the stock loader --------------------------------------------------------

def test_sharded_llama_with_index(models: dict[str, Path], calls: Counter[str],
                                  caplog: pytest.LogCaptureFixture) -> None:
    from transformers import LlamaForCausalLM

    folder = models["llama"]
    assert len(shards(folder)) >= 6 and (folder / "model.safetensors.index.json").exists()
    reference = LlamaForCausalLM.from_pretrained(folder)
    assert calls["stock"] == len(shards(folder)) and calls["ours"] == 0 and STATS.bytes_read == 0
    calls.clear()
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = LlamaForCausalLM.from_pretrained(folder, loader="fastsafetensors")
    assert assert_same(model, reference) >= 20
    assert torch.equal(logits(model), logits(reference))
    # Every weight byte, exactly once, came through this package; safetensors opened nothing.
    assert calls == Counter(ours=len(shards(folder)))
    assert STATS.bytes_read == weight_bytes(folder)
    (line,) = our_records(caplog)
    assert "LlamaForCausalLM.from_pretrained: read" in line
    assert f"{len(shards(folder))} files" in line


@pytest.mark.parametrize("io", ["buffered", "direct"])
def test_parameters_own_exactly_their_memory(models: dict[str, Path], io: str) -> None:
    """dtype and device already match: each parameter is the tensor that was read (no second
    copy, no view into a file-sized buffer), and its storage is its bytes alone, as stock's
    are: not the aligned allocation it was read into, nor the blocks an O_DIRECT read widens
    to (safetensors' save_model and save_pretrained's shard sizes go by storage)."""
    from transformers import LlamaForCausalLM

    if io == "direct":
        require_o_direct(shards(models["llama"])[0])
    model = LlamaForCausalLM.from_pretrained(models["llama"], loader="fastsafetensors",
                                             loader_options={"io": io})
    for name, p in model.named_parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name
        assert p.untyped_storage().data_ptr() == p.data_ptr(), name


def test_a_tied_model_saves_as_stock_does(models: dict[str, Path], tmp_path: Path) -> None:
    # BERT's decoder is tied to its word embeddings: safetensors' save_model keeps one of two
    # tied weights only if it covers its whole storage, and refused every model of ours when
    # the storages were the aligned allocations the tensors were read into.
    import safetensors.torch
    from transformers import BertForMaskedLM

    ours = BertForMaskedLM.from_pretrained(models["bert"], loader="fastsafetensors")
    stock = BertForMaskedLM.from_pretrained(models["bert"])
    for model, name in ((ours, "ours"), (stock, "stock")):
        safetensors.torch.save_model(model, str(tmp_path / f"{name}.safetensors"))
        model.save_pretrained(tmp_path / name, max_shard_size="100KB")
    # Which of two tied names save_model keeps varies from run to run; the bytes do not.
    saved = safetensors.torch.load_file(tmp_path / "ours.safetensors")
    expected = stock.state_dict()
    assert len(saved) == len(safetensors.torch.load_file(tmp_path / "stock.safetensors"))
    for name, tensor in saved.items():
        assert torch.equal(tensor, expected[name]), name
    written = {p.name: p.read_bytes() for p in (tmp_path / "stock").iterdir()}
    assert {p.name: p.read_bytes() for p in (tmp_path / "ours").iterdir()} == written


def test_mixtral_weight_converters(models: dict[str, Path], calls: Counter[str]) -> None:
    from transformers import MixtralForCausalLM

    folder = models["mixtral"]
    reference = MixtralForCausalLM.from_pretrained(folder)
    calls.clear()
    model = MixtralForCausalLM.from_pretrained(folder, loader="fastsafetensors")
    # The checkpoint stores one tensor per expert; the model holds fused expert tensors.
    assert "model.layers.0.mlp.experts.gate_up_proj" in dict(model.named_parameters())
    assert assert_same(model, reference) > 0
    assert torch.equal(logits(model), logits(reference))
    assert calls == Counter(ours=len(shards(folder)))
    assert STATS.bytes_read == weight_bytes(folder)


def test_bert_encoder(models: dict[str, Path], calls: Counter[str]) -> None:
    from transformers import BertForMaskedLM

    folder = models["bert"]
    reference = BertForMaskedLM.from_pretrained(folder)
    calls.clear()
    model = BertForMaskedLM.from_pretrained(folder, loader="fastsafetensors")
    assert assert_same(model, reference) > 0
    assert calls["stock"] == 0 and calls["ours"] == len(shards(folder))
    assert STATS.bytes_read == weight_bytes(folder)


def test_auto_model_classes(models: dict[str, Path], calls: Counter[str]) -> None:
    from transformers import AutoModel, AutoModelForCausalLM

    for auto in (AutoModel, AutoModelForCausalLM):   # AutoModel drops the "model." prefix
        reference = auto.from_pretrained(models["llama"])
        calls.clear()
        model = auto.from_pretrained(models["llama"], loader="fastsafetensors")
        assert type(model) is type(reference)
        assert assert_same(model, reference) > 0
        assert calls["stock"] == 0 and calls["ours"] == len(shards(models["llama"]))


def test_pipeline_model_kwargs(models: dict[str, Path], tmp_path: Path,
                               calls: Counter[str]) -> None:
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast, pipeline

    folder = tmp_path / "llama_pipe"
    shutil.copytree(models["llama"], folder)
    vocab = {f"w{i}": i for i in range(1, 128)} | {"[UNK]": 0}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="w1",
                            pad_token="w2").save_pretrained(folder)
    stock = pipeline("text-generation", model=str(folder))
    calls.clear()
    ours = pipeline("text-generation", model=str(folder),
                    model_kwargs={"loader": "fastsafetensors", "loader_options": {"threads": 2}})
    assert assert_same(ours.model, stock.model) > 0
    assert calls["stock"] == 0 and calls["ours"] == len(shards(folder))
    prompt = "w3 w4 w5"
    assert (ours(prompt, max_new_tokens=4, do_sample=False)[0]["generated_text"]
            == stock(prompt, max_new_tokens=4, do_sample=False)[0]["generated_text"])


def test_hub_repo_id(models: dict[str, Path], hub_server: Any, tmp_path: Path,
                     calls: Counter[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A repo id on the loopback Hub: huggingface_hub downloads into an empty cache, then this
    package reads the cached shards."""
    from transformers import AutoModelForCausalLM

    commit = hub_server.add_folder("org/tiny-llama", models["llama"])
    opened: list[str] = []
    real_open = seam.Load.open   # the calls fixture's counting spy

    def record(self: Any, path: Any) -> Any:
        opened.append(os.fspath(path))
        return real_open(self, path)

    monkeypatch.setattr(seam.Load, "open", record)
    model = AutoModelForCausalLM.from_pretrained("org/tiny-llama", loader="fastsafetensors")
    names = sorted(p.name for p in shards(models["llama"]))
    assert sorted(Path(p).name for p in opened) == names
    assert all(Path(p).is_relative_to(tmp_path / "hf") and commit in p for p in opened)
    assert set(names) | {"config.json", "model.safetensors.index.json"} <= set(
        hub_server.fetched())
    assert calls["stock"] == 0 and STATS.bytes_read == weight_bytes(models["llama"])
    assert_same(model, AutoModelForCausalLM.from_pretrained(models["llama"]))


def test_a_damaged_cached_shard_says_how_to_recover(models: dict[str, Path], hub_server: Any,
                                                    tmp_path: Path) -> None:
    # huggingface_hub keeps a blob once its size matched: every later load would fail the same
    # way without the advice it takes (force_download=True).
    from transformers import AutoModelForCausalLM

    hub_server.add_folder("org/tiny-llama", models["llama"])
    AutoModelForCausalLM.from_pretrained("org/tiny-llama", loader="fastsafetensors")
    cached = sorted((tmp_path / "hf").rglob("snapshots/*/model-00001-of-*.safetensors"))
    assert len(cached) == 1
    blob = os.path.realpath(cached[0])
    Path(blob).write_bytes(b"\xff" * os.path.getsize(blob))
    with pytest.raises(HeaderError, match="force_download=True") as info:
        AutoModelForCausalLM.from_pretrained("org/tiny-llama", loader="fastsafetensors")
    assert blob in str(info.value)
    model = AutoModelForCausalLM.from_pretrained("org/tiny-llama", loader="fastsafetensors",
                                                 force_download=True)
    assert_same(model, AutoModelForCausalLM.from_pretrained(models["llama"]))


def test_model_class_overriding_from_pretrained(models: dict[str, Path],
                                                calls: Counter[str]) -> None:
    from transformers import LlamaForCausalLM

    class Custom(LlamaForCausalLM):
        seen: list[Any] = []

        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
            cls.seen.append(kwargs.get("loader"))
            return super().from_pretrained(*args, **kwargs)

    reference = Custom.from_pretrained(models["llama"])
    calls.clear()
    model = Custom.from_pretrained(models["llama"], loader="fastsafetensors")
    assert Custom.seen == [None, "fastsafetensors"] and type(model) is Custom
    assert assert_same(model, reference) > 0
    assert calls["stock"] == 0 and calls["ours"] == len(shards(models["llama"]))


@pytest.mark.parametrize("how", ["default", "off", "stock", "failing"])
def test_the_collector_is_paused_for_our_loads_only(models: dict[str, Path], how: str) -> None:
    """Python's collector is off while transformers builds the model under our loader, on
    again afterwards (a failed load too), and left alone by stock loads and pause_gc='off'."""
    import gc

    from transformers import LlamaForCausalLM

    from fastsafetensors import gcpause

    class Recording(LlamaForCausalLM):
        seen: list[bool] = []

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            Recording.seen.append(gc.isenabled())
            if how == "failing":
                raise RuntimeError("a model that cannot be built")
            super().__init__(*args, **kwargs)

    kwargs: dict[str, Any] = {
        "default": {"loader": "fastsafetensors"}, "failing": {"loader": "fastsafetensors"},
        "off": {"loader": "fastsafetensors", "loader_options": {"pause_gc": "off"}},
        "stock": {}}[how]
    assert gc.isenabled()
    if how == "failing":
        with pytest.raises(RuntimeError, match="cannot be built"):
            Recording.from_pretrained(models["llama"], **kwargs)
    else:
        assert_same(Recording.from_pretrained(models["llama"], **kwargs),
                    LlamaForCausalLM.from_pretrained(models["llama"]))
    assert Recording.seen == [how in ("off", "stock")]
    assert gc.isenabled() and gcpause._depth == 0


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_a_paused_load_leaves_no_tensor_to_the_collector(models: dict[str, Path],
                                                        kind: str) -> None:
    """With the collector off for the call, a tensor kept only by a reference cycle would live
    until after it, above stock's peak memory: there is none, converters (Mixtral) included."""
    import gc

    from transformers import AutoModelForCausalLM

    gc.collect()
    gc.disable()   # off from the call to the check, so that no pass frees what is looked for
    try:
        model = AutoModelForCausalLM.from_pretrained(models[kind], loader="fastsafetensors")
        gc.set_debug(gc.DEBUG_SAVEALL)
        assert gc.collect() > 0   # the check sees cyclic garbage: the call leaves some
        left = [o for o in gc.garbage if isinstance(o, (torch.Tensor, torch.UntypedStorage))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == [] and assert_same(model, AutoModelForCausalLM.from_pretrained(models[kind]))



@pytest.mark.parametrize("how", ["per tensor", "batched"])
def test_a_load_leaves_nothing_of_ours_to_the_collector(models: dict[str, Path], how: str,
                                                        request: pytest.FixtureRequest) -> None:
    """The load's handles and batches point back at it; once the call is over nothing of this
    package is left in a reference cycle (headers, locks, futures), waiting for the collector."""
    import gc

    from transformers import AutoModelForCausalLM

    if how == "batched":
        request.getfixturevalue("batched")
    gc.collect()
    gc.disable()
    try:
        model = AutoModelForCausalLM.from_pretrained(models["mixtral"], device_map="cpu",
                                                     loader="fastsafetensors")
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        ours = sorted({type(o).__qualname__ for o in gc.garbage
                       if type(o).__module__.startswith("fastsafetensors")})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert ours == [] and assert_same(model, AutoModelForCausalLM.from_pretrained(
        models["mixtral"], device_map="cpu"))

def test_device_map_cpu(models: dict[str, Path], calls: Counter[str]) -> None:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(models["llama"], device_map="cpu")
    calls.clear()
    model = AutoModelForCausalLM.from_pretrained(models["llama"], device_map="cpu",
                                                 loader="fastsafetensors")
    assert assert_same(model, reference) > 0
    assert calls["stock"] == 0 and STATS.bytes_read == weight_bytes(models["llama"])


@pytest.fixture
def few_descriptors() -> Iterator[int]:
    """The soft limit of open files lowered to 64 for the test (the hard one left as it is)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 256:
        pytest.skip(f"the hard limit of open files is {hard}: too low to test raising to it")
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        yield 64
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("how", ["per tensor", "batched"])
def test_more_shards_than_the_soft_limit_of_open_files(tmp_path: Path, few_descriptors: int,
                                                       how: str,
                                                       request: pytest.FixtureRequest) -> None:
    """safetensors maps a shard and closes it: transformers' stock loader holds no descriptor
    however many shards a checkpoint has. Each of ours holds one until the load ends (two
    while a batch reads ahead): a checkpoint of more shards than the soft limit of open files
    failed with EMFILE where stock loaded it. The load raises the soft limit meanwhile (up to
    the hard one), and puts it back after."""
    import resource

    from transformers import LlamaForCausalLM

    counts = request.getfixturevalue("batched") if how == "batched" else None
    torch.manual_seed(0)
    folder = tmp_path / "many"
    LlamaForCausalLM(tf_models.llama_config(num_hidden_layers=12, hidden_size=64,
                                            intermediate_size=64)).save_pretrained(
        folder, max_shard_size="10KB")
    assert len(shards(folder)) > few_descriptors
    reference = LlamaForCausalLM.from_pretrained(folder, device_map="cpu")
    model = LlamaForCausalLM.from_pretrained(folder, device_map="cpu", loader="fastsafetensors")
    assert assert_same(model, reference) > 0
    assert counts is None or counts["batch"] == 1   # the engine opened them all again
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == few_descriptors


def test_device_map_auto_with_disk_offload(models: dict[str, Path], tmp_path: Path,
                                           calls: Counter[str]) -> None:
    """Everything offloaded: the fused expert tensors are converted, then written to the
    offload folder; the files written must match the stock loader's byte for byte."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    def load(folder: Path, **kwargs: Any) -> Any:
        return AutoModelForCausalLM.from_pretrained(
            models["mixtral"], device_map="auto", max_memory={"cpu": "300KB"},
            offload_folder=folder, **kwargs)

    reference = load(tmp_path / "stock")
    calls.clear()
    model = load(tmp_path / "ours", loader="fastsafetensors")
    assert calls["ours"] >= len(shards(models["mixtral"])) and calls["stock"] == 0
    assert STATS.bytes_read == weight_bytes(models["mixtral"])
    assert any(p.device.type == "meta" for p in model.parameters())   # really on disk
    assert_same(model, reference)
    written = sorted(p.name for p in (tmp_path / "stock").glob("*.safetensors"))
    assert written and written == sorted(p.name for p in (tmp_path / "ours").glob("*.safetensors"))
    for name in written:
        a, b = load_file(tmp_path / "ours" / name), load_file(tmp_path / "stock" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    try:
        expected = logits(reference)
    except RuntimeError as exc:   # 5.0 to 5.12: a Mixtral wholly on disk cannot run forward
        if not BEFORE_5_13:
            raise
        with pytest.raises(type(exc)):   # and ours fails the same way
            logits(model)
        pytest.skip(f"stock transformers {transformers.__version__} cannot run this offloaded "
                    f"model ({exc}); its weights were compared above")
    assert torch.equal(logits(model), expected)


def test_materialize_sends_our_slices_straight_to_cuda(models: dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The replaced _materialize_copy asks this package for CUDA targets (its pinned staging),
    and leaves every other device, and safetensors' own slices, to transformers."""
    from transformers import core_model_loading

    asked: list[tuple[str, Any]] = []
    steps: list[str] = []

    def fake_get(self: Any, info: Any, device: Any = None, dtype: Any = None) -> Any:
        asked.append((device, dtype))
        steps.append(f"read to {device}")
        return torch.zeros(1)

    path = shards(models["llama"])[0]
    load = seam.Load({})
    handle = load.open(path)
    name = handle.keys()[0]
    materialize: Any = core_model_loading._materialize_copy

    class Stream:
        def __init__(self, device: Any):
            self.device = str(device)

        def query(self) -> bool:   # copies still queued: waited for
            return False

        def synchronize(self) -> None:
            steps.append(f"wait on {self.device}")

    # what materialize() reads with
    monkeypatch.setattr(seam.FastSafetensorsFile, "_get", fake_get)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    materialize(handle.get_slice(name), torch.device("cuda", 1), torch.float16)
    materialize(handle.get_slice(name), "cuda:0", None)
    assert asked == [("cuda:1", torch.float16), ("cuda:0", None)]
    # complete before transformers' thread gets it: the copies ran on the pool thread's stream
    assert steps == ["read to cuda:1", "wait on cuda:1", "read to cuda:0", "wait on cuda:0"]
    monkeypatch.undo()
    on_meta = materialize(handle.get_slice(name), "meta", None)   # host read, then .to("meta")
    assert on_meta.device.type == "meta" and asked == [("cuda:1", torch.float16), ("cuda:0", None)]
    plain = torch.ones(3)
    assert materialize(plain, None, None).data_ptr() == plain.data_ptr()   # stock: a view
    load.close()


@pytest.mark.gpu
@pytest.mark.parametrize("groups", ["off", "on"])
def test_device_map_cuda(models: dict[str, Path], calls: Counter[str],
                         monkeypatch: pytest.MonkeyPatch, groups: str) -> None:
    from transformers import AutoModelForCausalLM

    # Whole tensors bound for a CUDA device are read in one batch per load (Batch), each
    # tensor of a converter too; with small_tensor_groups, the small ones share allocations.
    batches: list[str] = []
    read = seam.Batch._read

    def counted(self: Any, sources: Any, files: Any) -> None:
        batches.append(self.device)
        read(self, sources, files)

    monkeypatch.setattr(seam.Batch, "_read", counted)
    for kind in ("llama", "mixtral"):
        reference = AutoModelForCausalLM.from_pretrained(models[kind], device_map="cuda")
        calls.clear()
        STATS.reset()   # the fixture reset it once; the second model must not count the first
        model = AutoModelForCausalLM.from_pretrained(
            models[kind], device_map="cuda", loader="fastsafetensors",
            loader_options={"small_tensor_groups": groups})
        assert all(p.device.type == "cuda" for p in model.parameters())
        assert assert_same(model, reference) > 0
        if kind == "llama":   # no converters: each parameter is a tensor read
            storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
            count = len(list(model.parameters()))
            # Each its own memory, or (the tiny model's tensors all small) shared by groups.
            assert len(storages) == count if groups == "off" else len(storages) < count
        assert calls["stock"] == 0 and STATS.bytes_read == weight_bytes(models[kind])
    assert batches == [f"cuda:{torch.cuda.current_device()}"] * 2


def test_parameters_sharing_a_group_save_and_load_back(models: dict[str, Path],
                                                       tmp_path: Path) -> None:
    # small_tensor_groups (on by default for loads to a GPU) hands small tensors over as views
    # of one allocation. A model so loaded must still save: here its small parameters are made
    # views of one buffer on the CPU, as a GPU load would give them.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models["llama"], device_map="cpu")
    small = [p for p in model.parameters() if p.nbytes < 1 << 20 and p.dim() == 1]
    assert len(small) > 2
    block = torch.empty(sum(p.nbytes for p in small), dtype=torch.uint8)
    at = 0
    with torch.no_grad():
        for p in small:
            view = block[at:at + p.nbytes].view(p.dtype).view(p.shape)
            view.copy_(p)
            p.data = view
            at += p.nbytes
    assert len({p.untyped_storage().data_ptr() for p in small}) == 1
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", device_map="cpu",
                                                 loader="fastsafetensors")
    assert assert_same(again, model) > 0


@pytest.mark.parametrize("case", ["bfloat16", "float16", "auto-from-config", "auto-probe"])
def test_dtype_casts(models: dict[str, Path], calls: Counter[str], case: str) -> None:
    from transformers import AutoModelForCausalLM

    folder, dtype = {
        "bfloat16": (models["llama"], torch.bfloat16),
        "float16": (models["llama"], torch.float16),
        "auto-from-config": (models["llama_bf16_config"], "auto"),  # F32 files, bf16 config
        "auto-probe": (models["llama_no_dtype"], "auto"),   # reads the first shard's dtype
    }[case]
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    calls.clear()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, loader="fastsafetensors")
    assert model.dtype == reference.dtype
    if case == "auto-from-config":
        assert model.dtype == torch.bfloat16
    assert assert_same(model, reference) > 0
    probe = 1 if case == "auto-probe" else 0   # the dtype probe opens the first shard too
    assert calls == Counter(ours=len(shards(folder)) + probe)


def test_loader_options_apply_on_transformers_worker_threads(models: dict[str, Path],
                                                             calls: Counter[str]) -> None:
    """transformers reads in its own thread pool, where the caller's configure() is unset:
    a small chunk_bytes must still split the reads."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(models["llama"])
    STATS.reset()
    AutoModelForCausalLM.from_pretrained(models["llama"], loader="fastsafetensors")
    default_reads = STATS.reads
    STATS.reset()
    model = AutoModelForCausalLM.from_pretrained(
        models["llama"], loader="fastsafetensors",
        loader_options={"chunk_bytes": 16384, "threads": 2})
    assert STATS.reads >= 2 * default_reads
    assert STATS.bytes_read == weight_bytes(models["llama"])
    assert_same(model, reference)


def test_a_configure_block_around_the_call_reaches_transformers_worker_threads(
        models: dict[str, Path], calls: Counter[str]) -> None:
    """The caller's configure() goes with the load to transformers' pool, below loader_options
    (the explicit ones), as every other option does."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(models["llama"])
    STATS.reset()
    AutoModelForCausalLM.from_pretrained(models["llama"], loader="fastsafetensors")
    default_reads = STATS.reads
    STATS.reset()
    with configure(chunk_bytes=16384):
        model = AutoModelForCausalLM.from_pretrained(models["llama"], loader="fastsafetensors")
        assert STATS.reads >= 2 * default_reads
        assert_same(model, reference)
        STATS.reset()
        AutoModelForCausalLM.from_pretrained(models["llama"], loader="fastsafetensors",
                                             loader_options={"chunk_bytes": 16 << 20})
        assert STATS.reads == default_reads
        STATS.reset()
        with ft.enabled(threads=2):
            AutoModelForCausalLM.from_pretrained(models["llama"])
        assert STATS.reads >= 2 * default_reads


def test_disable_mmap_is_met_by_positioned_reads(models: dict[str, Path],
                                                 calls: Counter[str]) -> None:
    """disable_mmap=True would make transformers read whole files itself; this package never
    maps files, so it keeps the load."""
    from transformers import AutoModelForCausalLM

    try:
        reference = AutoModelForCausalLM.from_pretrained(models["llama"], disable_mmap=True)
    except TypeError as exc:   # releases without disable_mmap= pass it to the model's __init__
        if "disable_mmap" not in str(exc):
            raise
        pytest.skip(f"transformers {transformers.__version__}: no from_pretrained(disable_mmap=)")
    calls.clear()
    model = AutoModelForCausalLM.from_pretrained(models["llama"], disable_mmap=True,
                                                 loader="fastsafetensors")
    assert_same(model, reference)
    assert calls == Counter(ours=len(shards(models["llama"])))
    assert STATS.bytes_read == weight_bytes(models["llama"])


def test_enabled_block(models: dict[str, Path], calls: Counter[str]) -> None:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(models["llama"])
    calls.clear()
    with ft.enabled(threads=2):
        model = AutoModelForCausalLM.from_pretrained(models["llama"])
        assert calls["ours"] == len(shards(models["llama"]))
        AutoModelForCausalLM.from_pretrained(models["llama"], loader="safetensors")
        assert calls["stock"] == len(shards(models["llama"]))
    assert_same(model, reference)
    calls.clear()
    AutoModelForCausalLM.from_pretrained(models["llama"])
    assert calls == Counter(stock=len(shards(models["llama"])))
    with pytest.raises(ConfigError, match="option='nope'"):
        with ft.enabled(nope=1):
            pass


def test_concurrent_loads_in_threads_stay_apart(models: dict[str, Path],
                                                calls: Counter[str]) -> None:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(models["llama"])
    calls.clear()
    results: dict[str, list[Any]] = {"fastsafetensors": [], "safetensors": []}
    errors: list[BaseException] = []

    def run(loader: str) -> None:
        try:
            for _ in range(3):
                results[loader].append(AutoModelForCausalLM.from_pretrained(models["llama"],
                                                                           loader=loader))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    n = len(shards(models["llama"]))
    assert calls == Counter(ours=3 * n, stock=3 * n)
    assert STATS.bytes_read == 3 * weight_bytes(models["llama"])
    for model in results["fastsafetensors"] + results["safetensors"]:
        assert_same(model, reference)


# -- the stock path and its fallbacks ------------------------------------------------------------

@pytest.mark.parametrize("loader", [None, "safetensors"])
def test_stock_loader_untouched(models: dict[str, Path], calls: Counter[str],
                                caplog: pytest.LogCaptureFixture, loader: Any) -> None:
    from transformers import AutoModelForCausalLM

    caplog.set_level(logging.INFO, logger=LOGGER)
    reference = AutoModelForCausalLM.from_pretrained(models["llama"])
    model = AutoModelForCausalLM.from_pretrained(models["llama"], loader=loader)
    assert_same(model, reference)
    assert calls == Counter(stock=2 * len(shards(models["llama"])))
    assert STATS.bytes_read == 0 and our_records(caplog) == []


def test_unknown_loader_lists_the_valid_names(models: dict[str, Path],
                                              calls: Counter[str]) -> None:
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError) as info:
        AutoModelForCausalLM.from_pretrained(models["llama"], loader="fastsafetensor")
    assert isinstance(info.value, ConfigError)
    assert "'fastsafetensors', 'safetensors', None" in str(info.value)
    with pytest.raises(ConfigError, match="option='threadz'"):
        AutoModelForCausalLM.from_pretrained(models["llama"], loader="fastsafetensors",
                                             loader_options={"threadz": 4})
    with pytest.raises(ConfigError, match="loader_options"):
        AutoModelForCausalLM.from_pretrained(models["llama"], loader_options={"threads": 4})
    assert not calls   # refused before anything was opened


def _fallback(caplog: pytest.LogCaptureFixture, calls: Counter[str], reason: str) -> None:
    """The load went through safetensors (or torch.load), not here, and said why once."""
    assert calls["ours"] == 0 and STATS.bytes_read == 0
    (line,) = our_records(caplog)
    assert reason in line and "own loader" in line


def test_fallback_bin_weights(models: dict[str, Path], calls: Counter[str],
                              caplog: pytest.LogCaptureFixture) -> None:
    from transformers import AutoModelForCausalLM

    folder = models["llama_bin"]
    assert not shards(folder) and list(folder.glob("*.bin"))
    reference = AutoModelForCausalLM.from_pretrained(folder)
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = AutoModelForCausalLM.from_pretrained(folder, loader="fastsafetensors")
    assert_same(model, reference)
    _fallback(caplog, calls, "no safetensors weights were read")


def test_fallback_user_state_dict(models: dict[str, Path], calls: Counter[str],
                                  caplog: pytest.LogCaptureFixture) -> None:
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    state: dict[str, Any] = {}
    for path in shards(models["llama"]):
        state.update(load_file(path))
    config = tf_models.llama_config()
    reference = LlamaForCausalLM.from_pretrained(None, config=config, state_dict=state)
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = LlamaForCausalLM.from_pretrained(None, config=config, state_dict=state,
                                             loader="fastsafetensors")
    assert_same(model, reference)
    _fallback(caplog, calls, "state_dict=")


def test_fallback_gguf(models: dict[str, Path], calls: Counter[str], tmp_path: Path,
                       caplog: pytest.LogCaptureFixture) -> None:
    """GGUF goes to transformers untouched: whatever it does with the file (here: reject it),
    it does the same with and without the loader."""
    from transformers import AutoConfig, LlamaForCausalLM

    folder = tmp_path / "gguf"
    shutil.copytree(models["llama"], folder)
    (folder / "tiny.gguf").write_bytes(b"GGUF" + bytes(60))   # not a valid GGUF file
    config = AutoConfig.from_pretrained(folder)

    def attempt(**kwargs: Any) -> str:
        try:
            LlamaForCausalLM.from_pretrained(folder, config=config, gguf_file="tiny.gguf",
                                             **kwargs)
        except Exception as exc:  # the stock outcome, compared below
            return f"{type(exc).__name__}: {exc}"
        return "loaded"

    expected = attempt()
    calls.clear()
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert attempt(loader="fastsafetensors") == expected
    _fallback(caplog, calls, "GGUF")


def test_fallback_deepspeed_zero3(models: dict[str, Path], calls: Counter[str],
                                  caplog: pytest.LogCaptureFixture,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.integrations.deepspeed as ds
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(models["llama"])
    calls.clear()
    # Only the seam's view of ZeRO-3 is switched on (modeling_utils holds its own binding).
    monkeypatch.setattr(ds, "is_deepspeed_zero3_enabled", lambda: True)
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = AutoModelForCausalLM.from_pretrained(models["llama"], loader="fastsafetensors")
    assert_same(model, reference)
    assert calls["stock"] == len(shards(models["llama"]))
    _fallback(caplog, calls, "DeepSpeed ZeRO-3")


# -- tensor parallelism over 2 processes ---------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tensor_parallel_two_ranks_read_their_half(models: dict[str, Path],
                                                   tmp_path: Path) -> None:
    worker = Path(__file__).with_name("tp_worker.py")
    port = _free_port()
    # transformers 5.0's own loader cannot shard Mixtral's per-expert tensors onto a CPU rank
    # (integrations/tensor_parallel.py get_tensor_shard: torch.empty(..., device=rank)).
    kinds = ["llama"] if BEFORE_5_1 else ["llama", "mixtral"]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        args = [sys.executable, str(worker)]
        for kind in kinds:
            args += [str(models[kind]), str(tmp_path / f"{kind}-{rank}.json")]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for proc in procs:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out[-3000:]
    for rank in range(2):
        results = {kind: json.loads((tmp_path / f"{kind}-{rank}.json").read_text())
                   for kind in kinds}
        llama = results["llama"]
        for result in results.values():
            assert result["rank"] == rank
            assert result["mismatched"] == [] and result["compared"] > 0
            assert result["logits_equal"]
        # Llama's rows are wide enough that every column split is read exactly: this rank's
        # half of every sharded tensor plus the replicated ones, nothing else. Which ones are
        # replicated is transformers' choice: the norms, and before 5.21 the input embeddings
        # (5.21 shards them on the vocabulary; 5.0 and 5.12 also replicate lm_head).
        total = weight_bytes(models["llama"])
        assert llama["sharded_bytes"] + llama["replicated_bytes"] == total
        assert llama["bytes_read"] == llama["local_bytes"]
        assert llama["bytes_read"] <= llama["sharded_bytes"] // 2 + llama["replicated_bytes"]
        assert llama["sharded_bytes"] > 0.9 * total
        if not BEFORE_5_21:   # the embeddings are sharded too
            assert llama["bytes_read"] < 0.51 * total
        # Mixtral's 64-wide rows are narrower than MERGE_GAP, so its column splits read whole
        # rows; the experts and the row splits still halve.
        if "mixtral" in results:
            assert results["mixtral"]["bytes_read"] < 0.7 * weight_bytes(models["mixtral"])


# -- pre-quantized checkpoints -------------------------------------------------------------------

#: compressed-tensors formats that transformers loads on the CPU: (format, weight arguments).
#: Between them: int8 weights with float scales and int8 zero points, int4 weights packed into
#: int32 with their original shape stored beside them, and float8_e4m3fn weights.
QUANTIZED = {
    "naive-int8-asym": ("naive-quantized", dict(num_bits=8, type="int", strategy="group",
                                                group_size=32, symmetric=False)),
    "pack-int4": ("pack-quantized", dict(num_bits=4, type="int", strategy="group",
                                         group_size=32, symmetric=True)),
    "fp8": ("float-quantized", dict(num_bits=8, type="float", strategy="channel",
                                    symmetric=True)),
}


def build_compressed_tensors(folder: Path, fmt: str, weights: dict[str, Any]) -> Path:
    """A tiny Llama (hidden 64, 2 layers) quantized and saved by compressed-tensors itself, as
    llm-compressor would: min/max qparams per group or channel, compressed, save_pretrained."""
    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tf_models.llama_config(hidden_size=64,
                                                    intermediate_size=128)).eval()
    args = QuantizationArgs(**weights)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme},
                                                        ignore=["lm_head"],
                                                        quantization_status="initialized"))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                w = module.weight
                groups = w.reshape(w.shape[0], -1, args.group_size or w.shape[1])
                scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
                module.weight_scale.copy_(scale)
                if not args.symmetric:
                    module.weight_zero_point.copy_(zero_point)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(folder, max_shard_size="40KB")
    compressor.update_config(folder)
    return folder


@pytest.mark.parametrize("case", list(QUANTIZED))
def test_pre_quantized_compressed_tensors_pass_through(case: str, tmp_path: Path,
                                                       calls: Counter[str]) -> None:
    """A pre-quantized checkpoint is read as stored: the quantized weights, scales and zero
    points reach transformers' compressed-tensors quantizer unchanged, exactly as from stock."""
    pytest.importorskip("compressed_tensors", minversion="0.15",
                        reason="needs compressed-tensors>=0.15 (pip install compressed-tensors)")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    fmt, weights = QUANTIZED[case]
    folder = build_compressed_tensors(tmp_path / case, fmt, weights)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["format"] == fmt
    stored: dict[str, Any] = {}
    for path in shards(folder):
        stored.update(load_file(path))
    quantized_dtypes = {t.dtype for t in stored.values()} - {torch.float32, torch.int64}
    assert quantized_dtypes, "the checkpoint holds no quantized tensors"
    calls.clear()
    reference = AutoModelForCausalLM.from_pretrained(folder)
    assert calls == Counter(stock=len(shards(folder))) and STATS.bytes_read == 0
    calls.clear()
    model = AutoModelForCausalLM.from_pretrained(folder, loader="fastsafetensors")
    assert calls == Counter(ours=len(shards(folder)))
    assert STATS.bytes_read == weight_bytes(folder)
    assert type(model.hf_quantizer) is type(reference.hf_quantizer)
    assert assert_same(model, reference) > len(stored) // 2
    # Still compressed, and every stored tensor is in the model as it is in the file.
    mine = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, tensor in stored.items():
        assert mine[name].dtype == tensor.dtype and torch.equal(mine[name], tensor), name
    assert {mine[name].dtype for name in stored} >= quantized_dtypes
    assert torch.equal(logits(model), logits(reference))
    assert_same(model, reference)   # and identical once the forward pass decompressed both


def test_io_option_reaches_the_per_tensor_reads(models: dict[str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """loader_options={"io": "direct"} reads with O_DIRECT (tensors this small would stay
    buffered, so the size threshold is lowered)."""
    from transformers import AutoModelForCausalLM

    require_o_direct(shards(models["llama"])[0])
    monkeypatch.setattr("fastsafetensors.file.DIRECT_MIN_BYTES", 0)
    reference = AutoModelForCausalLM.from_pretrained(models["llama"])
    for io, direct in (("buffered", False), ("direct", True)):
        STATS.reset()
        model = AutoModelForCausalLM.from_pretrained(models["llama"], loader="fastsafetensors",
                                                     loader_options={"io": io})
        assert (STATS.direct_reads > 0) is direct, io
        assert_same(model, reference)


# -- many tensors for one device in one engine run (Batch) ---------------------------------------

@pytest.fixture
def batched(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Batches for CPU targets too (by default only CUDA targets are batched), counting engine
    runs of batches (``batch``) and per-tensor reads (``single``)."""
    counts: Counter[str] = Counter()
    monkeypatch.setattr(ahead, "BATCH_DEVICE_TYPES", ("cuda", "cpu"))
    read = seam.Batch._read
    single = seam.FastSafetensorsFile._get

    def counted_read(self: Any, sources: Any, files: Any) -> None:
        counts["batch"] += 1
        counts["files"] += len(sources)
        read(self, sources, files)

    def counted_single(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["single"] += 1
        return single(self, *args, **kwargs)

    monkeypatch.setattr(seam.Batch, "_read", counted_read)
    monkeypatch.setattr(seam.FastSafetensorsFile, "_get", counted_single)
    yield counts


def fail_after_the_first_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches on the CPU read the first file, then fail (``ReadError``, 3 of 10 bytes)."""
    import fastsafetensors.loading
    from fastsafetensors.errors import ReadError

    real = fastsafetensors.loading._host_stream

    def failing(sources: Any, fw: Any, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        yield from real(sources[:1], fw, **kwargs)
        raise ReadError(sources[1][0], 0, 10, 3)

    monkeypatch.setattr(fastsafetensors.loading, "_host_stream", failing)


@pytest.mark.parametrize("kind", ["llama", "mixtral", "bert"])
def test_a_batch_reads_every_tensor_in_one_engine_run(models: dict[str, Path],
                                                      calls: Counter[str],
                                                      batched: Counter[str],
                                                      caplog: pytest.LogCaptureFixture,
                                                      kind: str) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    import fastsafetensors

    auto = AutoModelForMaskedLM if kind == "bert" else AutoModelForCausalLM
    folder = models[kind]
    reference = auto.from_pretrained(folder)
    calls.clear()
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = auto.from_pretrained(folder, loader="fastsafetensors")
    assert assert_same(model, reference) > 0
    # One run of the engine over every shard, no tensor read on its own, every byte once (the
    # host loader these CPU targets go through reads each file from and to page boundaries).
    assert batched == Counter(batch=1, files=len(shards(folder)))
    slack = 2 * max(mmap.PAGESIZE, DIRECT_ALIGN) * len(shards(folder))
    assert 0 <= STATS.bytes_read - weight_bytes(folder) < slack
    (line,) = our_records(caplog)
    tensors = 0
    for path in shards(folder):
        with fastsafetensors.FastSafetensorsFile(path) as f:
            tensors += len(f.keys())
    assert f"read {seam.human_size(weight_bytes(folder))} ({tensors} tensor reads" in line


def test_a_batch_casts_each_tensor_to_the_dtype_asked(models: dict[str, Path],
                                                      calls: Counter[str],
                                                      batched: Counter[str]) -> None:
    from transformers import AutoModelForCausalLM

    for folder, dtype in ((models["llama"], torch.bfloat16),
                          (models["llama_bf16_config"], "auto")):
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                     loader="fastsafetensors")
        assert model.dtype == reference.dtype == torch.bfloat16
        assert_same(model, reference)
        assert torch.equal(logits(model), logits(reference))
    assert batched["batch"] == 2 and batched["single"] == 0


def test_a_failed_batch_fails_the_load_with_its_error(models: dict[str, Path],
                                                      calls: Counter[str],
                                                      batched: Counter[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A read that fails halfway: from_pretrained raises that error (no hang, no partial model).
    from transformers import AutoModelForCausalLM

    from fastsafetensors.errors import ReadError

    fail_after_the_first_file(monkeypatch)
    with pytest.raises(ReadError, match="read of 10 bytes at offset 0 returned 3"):
        AutoModelForCausalLM.from_pretrained(models["llama"], loader="fastsafetensors")
    assert not [t for t in threading.enumerate() if t.name.startswith(
        "fastsafetensors-transformers-batch")]


def test_a_stopped_batch_leaves_no_waiter_hanging(models: dict[str, Path]) -> None:
    load = seam.Load({})
    handle = load.open(shards(models["llama"])[0])
    batch = load.batch("cpu")
    futures = [batch.add(handle.get_slice(name), None) for name in handle.keys()[:3]]
    assert all(f is not None and not f.done() for f in futures)
    load.close()   # transformers failed before it waited on any of them
    for future in futures:
        assert future is not None
        with pytest.raises(RuntimeError, match="load ended before this tensor was read"):
            future.result(timeout=5)


def test_what_the_spawner_leaves_to_transformers(models: dict[str, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import Future

    passed: list[tuple[Any, ...]] = []

    def original(*args: Any, **kwargs: Any) -> str:
        passed.append(args + tuple(sorted(kwargs.items())))
        return "stock"

    spawn = seam.make_spawner(original)
    load = seam.Load({})
    handle = load.open(shards(models["llama"])[0])
    name = handle.keys()[0]
    pool = object()
    # No pool (transformers then loads one tensor at a time), a sharding op, not our slice,
    # not a torch device, the CPU (not batched by default): transformers' own spawn.
    assert spawn(None, handle.get_slice(name), "cuda:0", None) == "stock"
    assert spawn(pool, handle.get_slice(name), "cuda:0", None, sharding_op=object(),
                 tensor_idx=0) == "stock"
    assert spawn(pool, torch.ones(2), "cuda:0", None) == "stock"
    assert spawn(pool, handle.get_slice(name), "disk", None) == "stock"
    assert spawn(pool, handle.get_slice(name), "cpu", torch.float16) == "stock"
    assert len(passed) == 5 and passed[-1][2:4] == ("cpu", torch.float16)
    # A CUDA target: a future of the device's batch (tensor_idx alone is no sharding).
    future = spawn(pool, handle.get_slice(name), torch.device("cuda", 1), None, tensor_idx=3)
    assert isinstance(future, Future) and not future.done() and len(passed) == 5
    assert set(load.batches) == {"cuda:1"} and load.devices == {"cuda:1"}
    # Once the batch has started, a late tensor is read on its own.
    load.batches["cuda:1"].thread = threading.Thread(target=lambda: None)
    assert spawn(pool, handle.get_slice(name), "cuda:1", None) == "stock"
    load.batches["cuda:1"].thread = None
    load.close()
    with pytest.raises(RuntimeError):
        future.result(timeout=5)


def test_a_batch_nobody_waits_on_starts_by_itself(models: dict[str, Path]) -> None:
    # A release that waited on the futures another way than result() must not hang the load.
    load = seam.Load({})
    handle = load.open(shards(models["llama"])[0])
    batch = load.batch("cpu")
    names = handle.keys()
    futures = [batch.add(handle.get_slice(name), None) for name in names]
    import concurrent.futures

    done, _ = concurrent.futures.wait(futures, timeout=10)   # no result() call
    assert len(done) == len(names)
    want = {}
    for name in names:
        want[name] = handle.get_tensor(name)
    for name, future in zip(names, futures):
        assert future is not None and torch.equal(future.result(), want[name])
    load.close()


@pytest.mark.parametrize("device_map", [None, "cpu"])   # on demand; read ahead
def test_a_batch_keeps_no_tensor_it_handed_over(models: dict[str, Path], calls: Counter[str],
                                                batched: Counter[str],
                                                monkeypatch: pytest.MonkeyPatch,
                                                device_map: str | None) -> None:
    # transformers frees a checkpoint tensor once it is converted (here: Mixtral's experts,
    # fused into one tensor per layer); a batch holding on to what it handed over would keep
    # them all on the device until the load ends.
    import gc
    import weakref

    from transformers import MixtralForCausalLM

    handed: list[weakref.ref[Any]] = []
    batches: list[Any] = []
    set_result = seam._Pending.set_result
    init = seam.Batch.__init__

    def record(self: Any, result: Any) -> None:
        handed.append(weakref.ref(result))
        set_result(self, result)

    def born(self: Any, *args: Any) -> None:
        init(self, *args)
        batches.append(self)

    monkeypatch.setattr(seam._Pending, "set_result", record)
    monkeypatch.setattr(seam.Batch, "__init__", born)
    monkeypatch.setenv("FASTSAFETENSORS_READ_AHEAD", "on")   # with device_map="cpu": ahead
    model = MixtralForCausalLM.from_pretrained(models["mixtral"], loader="fastsafetensors",
                                               device_map=device_map)
    gc.collect()
    assert [b.ahead for b in batches] == [device_map is not None]
    kept = {p.untyped_storage().data_ptr() for p in model.parameters()}
    alive = [r() for r in handed if r() is not None]
    assert handed and batches and batched["batch"] == 1
    assert [t for t in alive if t.untyped_storage().data_ptr() not in kept] == []
    assert all(not wanted for batch in batches for _, wanted in batch.wanted.values())


def test_a_stopped_batch_never_starts(models: dict[str, Path]) -> None:
    # The idle watchdog may decide to start a batch just as the load ends: once stopped, a
    # batch starts no thread (one would read after the load returned, unjoined).
    load = seam.Load({})
    handle = load.open(shards(models["llama"])[0])
    batch = load.batch("cpu")
    future = batch.add(handle.get_slice(handle.keys()[0]), None)
    load.close()
    batch.start()
    assert batch.thread is None and future is not None
    with pytest.raises(RuntimeError, match="load ended"):
        future.result(timeout=5)


def test_a_batch_without_a_thread_fails_its_waiters(models: dict[str, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    load = seam.Load({})
    handle = load.open(shards(models["llama"])[0])
    batch = load.batch("cpu")
    monkeypatch.setattr(batching, "IDLE_START", 60.0)   # only result() starts it here
    future = batch.add(handle.get_slice(handle.keys()[0]), None)
    start = threading.Thread.start

    def refuse(self: threading.Thread) -> None:
        if self.name == "fastsafetensors-transformers-batch":
            raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", refuse)
    assert future is not None
    with pytest.raises(RuntimeError, match="can't start new thread"):
        future.result(timeout=5)
    assert future.done()   # the error is the future's too, for any other waiter
    monkeypatch.undo()
    load.close()   # nothing to join, no error of its own


def test_a_batch_tells_files_apart_and_gives_each_request_its_own_tensor(
        tmp_path: Path) -> None:
    # The engine yields names only; a name in two files, and a key asked for twice, must each
    # get their own tensor (as from the stock path).
    from safetensors.torch import save_file

    paths = []
    for i in range(2):
        path = tmp_path / f"part-{i}.safetensors"
        save_file({"w": torch.full((4,), float(i)), f"only{i}": torch.ones(2) * i}, str(path))
        paths.append(path)
    load = seam.Load({})
    batch = load.batch("cpu")
    handles = [load.open(p) for p in paths]
    futures = [batch.add(h.get_slice("w"), None) for h in handles]
    twice = batch.add(handles[1].get_slice("w"), None)
    cast = batch.add(handles[0].get_slice("only0"), torch.float16)
    assert all(f is not None for f in (*futures, twice, cast))
    first, second = (f.result(timeout=10) for f in futures)   # type: ignore[union-attr]
    assert first.tolist() == [0.0] * 4 and second.tolist() == [1.0] * 4
    again = twice.result(timeout=10)   # type: ignore[union-attr]
    assert torch.equal(again, second) and again.data_ptr() != second.data_ptr()
    assert cast.result(timeout=10).dtype == torch.float16   # type: ignore[union-attr]
    load.close()
