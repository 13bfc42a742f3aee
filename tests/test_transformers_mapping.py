"""The regular expressions transformers compiles while it loads, compiled when used during our
loads (fastsafetensors/integrations/_transformers_mapping.py): its table of key renamings and
converters, and its renaming of each key.

Each load test resets the table (transformers builds it once per process) so that the load under
test is the one that builds it, and compares every parameter and buffer with a stock load that
built the table the stock way.
"""

from __future__ import annotations

import copy
import pickle
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.transformers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tf_models  # noqa: E402  (tests/ is on sys.path via conftest)
from test_transformers import assert_same, logits  # noqa: E402

import fastsafetensors.integrations.transformers as ft  # noqa: E402
from fastsafetensors.integrations import _transformers_mapping as mapping  # noqa: E402

conversion_mapping = pytest.importorskip("transformers.conversion_mapping")
if not mapping.fits():
    pytest.skip("this transformers builds no conversion table the seam knows",
                allow_module_level=True)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tf_models.build("mixtral", tmp_path_factory.mktemp("map") / "mixtral", shard="100KB")


@pytest.fixture
def fresh_table(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's table unbuilt; the one built before is put back afterwards."""
    monkeypatch.setattr(conversion_mapping, "_checkpoint_conversion_mapping_cache", None)
    yield


def table() -> dict[str, Any]:
    built = conversion_mapping._checkpoint_conversion_mapping_cache
    assert built is not None, "no load built the table"
    return built


def patterns(built: dict[str, Any]) -> list[Any]:
    """Each transform of the table once (model types share lists and transforms)."""
    seen: dict[int, Any] = {}
    for transforms in built.values():
        for transform in transforms or ():
            seen[id(transform)] = transform.compiled_sources
    return list(seen.values())


def handed_out(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Records every transform transformers takes from the table."""
    taken: list[Any] = []
    real = conversion_mapping.get_checkpoint_conversion_mapping

    def spy(model_type: Any) -> Any:
        transforms = real(model_type)
        taken.extend(transforms or ())
        return transforms

    monkeypatch.setattr(conversion_mapping, "get_checkpoint_conversion_mapping", spy)
    return taken


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every LazyPattern made from here on."""
    patterns: list[Any] = []
    real_init = mapping.LazyPattern.__init__

    def counted(self: Any, *args: Any) -> None:
        real_init(self, *args)
        patterns.append(self)

    monkeypatch.setattr(mapping.LazyPattern, "__init__", counted)
    return patterns


def test_our_load_compiles_only_what_it_uses(mixtral: Path, fresh_table: None,
                                             monkeypatch: pytest.MonkeyPatch,
                                             made: list[Any]) -> None:
    from transformers import MixtralForCausalLM

    reference = MixtralForCausalLM.from_pretrained(mixtral)
    stock = patterns(table())
    assert stock and all(isinstance(p, re.Pattern) for p in stock)
    assert made == []

    monkeypatch.setattr(conversion_mapping, "_checkpoint_conversion_mapping_cache", None)
    taken = handed_out(monkeypatch)
    model = MixtralForCausalLM.from_pretrained(mixtral, loader="fastsafetensors")
    assert assert_same(model, reference) > 0
    assert torch.equal(logits(model), logits(reference))
    # What transformers got are compiled patterns, as stock; Mixtral's experts are fused by them.
    assert taken and all(isinstance(t.compiled_sources, re.Pattern) for t in taken)
    assert "model.layers.0.mlp.experts.gate_up_proj" in dict(model.named_parameters())
    lazy = patterns(table())
    assert len(lazy) == len(stock)
    assert all(isinstance(p, mapping.LazyPattern) for p in lazy)
    compiled = [p for p in lazy if p._compiled is not None]
    # 8 of 1,044 with 5.23 (the table of 5.0 has 36).
    assert 0 < len(compiled) <= len(taken) < len(lazy)
    # Besides the table, a renaming per key that no converter takes: not compiled either.
    others = [p for p in made if all(p is not q for q in lazy)]
    assert others and not any(p._compiled is not None for p in others)


def two_block_dory(folder: Path) -> Path:
    """A tiny Dory checkpoint in the layout of Dory's own releases: each decoder layer ``i``
    stored as an attention block ``layers.{2i}.mixer`` and an mlp block ``layers.{2i+1}.mixer``,
    with their scales as ``attn_alpha`` and ``mlp_alpha``."""
    import safetensors.torch
    from transformers import DoryConfig, DoryForCausalLM

    torch.manual_seed(0)
    config = DoryConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, max_position_embeddings=64, n_input_layers=1,
                        n_output_layers=1, n_recurrent_loops=1)
    DoryForCausalLM(config).eval().save_pretrained(folder)

    def block(match: re.Match[str]) -> str:
        layer, rest = int(match[1]), match[2]
        if rest in ("lambda_1", "lambda_2"):
            return (f"layers.{2 * layer}.attn_alpha" if rest == "lambda_1"
                    else f"layers.{2 * layer + 1}.mlp_alpha")
        part, _, name = rest.partition(".")
        name = name.replace("gate_proj.", "g_proj.") if part == "self_attn" else name
        return f"layers.{2 * layer + (part == 'mlp')}.mixer.{name}"

    path = folder / "model.safetensors"
    saved = safetensors.torch.load_file(path)
    renamed = {re.sub(r"layers\.(\d+)\.(.+)$", block, name): tensor
               for name, tensor in saved.items()}
    assert any(".mixer." in name for name in renamed) and len(renamed) == len(saved)
    safetensors.torch.save_file(renamed, path, metadata={"format": "pt"})
    return folder


def test_a_renaming_with_its_own_rule_loads_as_stock(tmp_path: Path, fresh_table: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers 5.24's LayerPairCollapse (Dory) renames keys with a pattern of its class,
    compiled when transformers is imported, not through the table's patterns: the one renaming
    of the table that a lazy pattern does not reach. Two source layers become one."""
    from transformers import core_model_loading

    if not hasattr(core_model_loading, "LayerPairCollapse"):
        pytest.skip("LayerPairCollapse and Dory came with transformers 5.24")
    from transformers import DoryForCausalLM

    folder = two_block_dory(tmp_path / "dory")
    reference, info = DoryForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info   # every key renamed onto a parameter, none left over

    monkeypatch.setattr(conversion_mapping, "_checkpoint_conversion_mapping_cache", None)
    taken = handed_out(monkeypatch)
    model, info = DoryForCausalLM.from_pretrained(folder, loader="fastsafetensors",
                                                  output_loading_info=True)
    assert not any(info.values()), info
    assert any(isinstance(t, core_model_loading.LayerPairCollapse) for t in taken)
    assert assert_same(model, reference) > 0
    assert isinstance(core_model_loading.LayerPairCollapse.pattern, re.Pattern)


def test_stock_loads_compile_as_before(mixtral: Path, fresh_table: None,
                                      made: list[Any]) -> None:
    from transformers import MixtralForCausalLM

    MixtralForCausalLM.from_pretrained(mixtral, loader="safetensors")
    assert all(isinstance(p, re.Pattern) for p in patterns(table()))
    assert made == []


def test_a_table_entry_used_in_place_works(mixtral: Path, fresh_table: None) -> None:
    from transformers import MixtralForCausalLM

    MixtralForCausalLM.from_pretrained(mixtral, loader="fastsafetensors")
    entry = next(p for p in patterns(table()) if p._compiled is None)
    expected = re.compile(entry.pattern, entry.flags)
    assert entry.groupindex == expected.groupindex
    assert entry == expected and hash(entry) == hash(expected)
    assert entry._compiled is not None


def test_lazy_pattern_copies_and_pickles_as_a_compiled_pattern() -> None:
    lazy = mapping.LazyPattern(r"(?P<g0>\.w1\.weight)", re.IGNORECASE)
    assert "w1" in repr(lazy) and lazy._compiled is None
    expected = re.compile(r"(?P<g0>\.w1\.weight)", re.IGNORECASE)
    for twin in (copy.deepcopy(lazy), copy.copy(lazy), pickle.loads(pickle.dumps(lazy))):
        assert isinstance(twin, re.Pattern) and twin == expected
    assert lazy.search("experts.0.W1.weight").group("g0") == ".W1.weight"


def test_compiles_are_lazy_only_while_ours_says_so() -> None:
    state = {"ours": True}
    lazy = mapping.lazy_re(lambda: state["ours"])
    assert isinstance(lazy.compile("a+"), mapping.LazyPattern)
    assert isinstance(lazy.compile(re.compile("a+")), re.Pattern)   # already compiled
    assert lazy.search("a+", "baa").group() == "aa" and lazy.IGNORECASE is re.IGNORECASE
    state["ours"] = False
    assert isinstance(lazy.compile("a+"), re.Pattern)


def test_lazy_only_in_the_context_of_our_load() -> None:
    """transformers' worker threads (a fresh context each) and stock loads compile as before."""
    from transformers import core_model_loading

    from fastsafetensors.integrations import _transformers_seam as seam

    seen: dict[str, Any] = {"outside": core_model_loading.re.compile("a+")}
    globs = ["*.norm.weight", "lm_head.weight"]
    stock, _, _ = core_model_loading.build_glob_alternation(globs)
    token = seam._ACTIVE.set(seam.Load({}))
    try:
        seen["inside"] = core_model_loading.re.compile("b+")
        # What transformers builds from globs (dtype plans) works lazily as it does compiled.
        lazy, _, _ = core_model_loading.build_glob_alternation(globs)
        assert isinstance(lazy, mapping.LazyPattern) and isinstance(stock, re.Pattern)
        for key in ("model.layers.0.norm.weight", "lm_head.weight", "model.embed.weight"):
            got, expected = lazy.search(key), stock.search(key)
            assert (got and got.lastgroup) == (expected and expected.lastgroup), key
        worker = threading.Thread(
            target=lambda: seen.update(worker=core_model_loading.re.compile("c+")))
        worker.start()
        worker.join()
    finally:
        seam._ACTIVE.reset(token)
    assert isinstance(seen["inside"], mapping.LazyPattern)
    assert isinstance(seen["outside"], re.Pattern) and isinstance(seen["worker"], re.Pattern)


def test_uninstall_puts_re_back() -> None:
    from transformers import core_model_loading

    assert core_model_loading.re is not re
    assert core_model_loading.re.__fastsafetensors_original__ is re
    ft.uninstall()
    try:
        assert core_model_loading.re is re
    finally:
        ft.install()
    assert core_model_loading.re.__fastsafetensors_original__ is re
