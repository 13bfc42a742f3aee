"""accelerate's ``load_checkpoint_in_model`` / ``load_checkpoint_and_dispatch`` through
``fastsafetensors.integrations.accelerate``, checked against accelerate's own reads.

Every load test compares every parameter and buffer with ``torch.equal`` against the same load
done by stock accelerate, and against the tensors that were saved (so two loads that both failed
to load would not pass), and counts the bytes that went through this package
(fastsafetensors.loader.posix.STATS).
"""

from __future__ import annotations

import inspect
import json
import logging
import pickle
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
accelerate = pytest.importorskip("accelerate")
pytest.importorskip("safetensors")

import accelerate.utils.modeling as modeling  # noqa: E402
import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
from accelerate import load_checkpoint_and_dispatch, load_checkpoint_in_model  # noqa: E402
from torch import nn  # noqa: E402

import fastsafetensors.integrations.accelerate as fa  # noqa: E402
from fastsafetensors.errors import (  # noqa: E402
    ConfigError,
    FrameworkNotInstalledError,
    IncompatibleVersionError,
)
from fastsafetensors.loader.posix import STATS  # noqa: E402

LOGGER = "fastsafetensors.integrations.accelerate"


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(48))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(96, 48)
        self.norm = Scale()   # a buffer in the checkpoint
        self.blocks = nn.ModuleList(nn.Linear(48, 48) for _ in range(4))
        self.head = nn.Linear(48, 96, bias=False)

    def forward(self, ids: Any) -> Any:
        x = self.embed(ids) * self.norm.scale
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


def fresh(seed: int = 1) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A folder with three shards and an index, as ``save_pretrained`` writes them."""
    folder = tmp_path_factory.mktemp("accelerate")
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) for k, v in Tiny().state_dict().items()}
    names = list(state)
    weight_map = {}
    for i, part in enumerate((names[:3], names[3:8], names[8:])):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        safetensors.torch.save_file({k: state[k] for k in part}, str(folder / shard),
                                    metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder, state


def weight_bytes(state: dict[str, Any]) -> int:
    """What tensor-by-tensor reads take (every CPU path reads tensor by tensor)."""
    return sum(t.numel() * t.element_size() for t in state.values())


@pytest.fixture(autouse=True)
def clean() -> Iterator[None]:
    fa.uninstall()
    STATS.reset()
    yield
    fa.uninstall()


def offloaded(model: Any) -> dict[str, Any]:
    """The values behind parameters and buffers left on the meta device by accelerate's offload
    hooks (CPU offload under a GPU device map): each hook's ``weights_map`` holds them."""
    out: dict[str, Any] = {}
    for prefix, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or [hook]:   # a SequentialHook holds several
            weights = getattr(h, "weights_map", None)
            if weights is None:
                continue
            for local, tensor in [*module.named_parameters(recurse=False),
                                  *module.named_buffers(recurse=False)]:
                if tensor.device.type == "meta":
                    out[f"{prefix}.{local}" if prefix else local] = weights[local]
    return out


def assert_same(model: Any, reference: Any, saved_state: dict[str, Any] | None = None) -> None:
    """Equal values, dtypes and devices, and no tensor tied to a file's buffer (views of one
    buffer would tie every parameter to the whole shard): each has storage of its own, as with
    stock accelerate, except small tensors loaded to a GPU, which share allocations of at most
    GROUP_BYTES (small_tensor_groups, on by default). An offloaded tensor (on meta, its value
    held by a hook) is compared by that value."""
    from fastsafetensors.loader.stream import GROUP_BYTES, GROUP_MEMBER

    mine = dict(model.named_parameters()) | dict(model.named_buffers())
    ref = dict(reference.named_parameters()) | dict(reference.named_buffers())
    assert mine.keys() == ref.keys() and ref
    placed = [t for t in mine.values() if t.device.type != "meta"]
    storages: dict[int, list[Any]] = {}
    for t in placed:
        storages.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    for shared in storages.values():
        if len(shared) > 1:
            assert shared[0].device.type == "cuda", "shared storage"
            assert shared[0].untyped_storage().nbytes() <= GROUP_BYTES, "shared storage"
            assert all(t.nbytes < GROUP_MEMBER for t in shared), "shared storage"
    mine_off, ref_off = offloaded(model), offloaded(reference)
    assert mine_off.keys() == ref_off.keys(), "offloaded to different places"
    for name, expected in ref.items():
        got = mine[name]
        assert got.dtype == expected.dtype and got.device == expected.device, name
        if got.device.type == "meta":
            assert name in mine_off, f"{name} is on meta with no offloaded value"
            got, expected = mine_off[name], ref_off[name]
            assert got.dtype == expected.dtype and got.device == expected.device, name
        assert torch.equal(got, expected), f"{name} differs from stock accelerate's"
        if saved_state is not None:
            want = saved_state[name].to(device=got.device, dtype=got.dtype)
            assert torch.equal(got, want), f"{name} was not loaded"


# -- loads ---------------------------------------------------------------------------------------

def test_importing_changes_nothing(saved: tuple[Path, dict[str, Any]]) -> None:
    folder, state = saved
    assert not fa.is_installed()
    model = fresh()
    load_checkpoint_in_model(model, str(folder))
    assert STATS.bytes_read == 0
    assert_same(model, model, state)


def test_load_checkpoint_in_model(saved: tuple[Path, dict[str, Any]],
                                  caplog: pytest.LogCaptureFixture) -> None:
    folder, state = saved
    stock = fresh()
    load_checkpoint_in_model(stock, str(folder))
    assert STATS.bytes_read == 0
    ours = fresh()
    with caplog.at_level(logging.INFO, logger=LOGGER), fa.enabled(threads=2):
        load_checkpoint_in_model(ours, str(folder))
    assert_same(ours, stock, state)
    assert STATS.bytes_read == weight_bytes(state)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 3 and all("with fastsafetensors" in line for line in lines)
    assert "model-00001-of-00003.safetensors: read" in lines[0]


def test_single_file_and_dtype_cast(saved: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    _, state = saved
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(state, str(path), metadata={"format": "pt"})
    # float32 in the file, bfloat16 in the model: accelerate casts to the parameters' dtype.
    stock = fresh().to(torch.bfloat16)
    load_checkpoint_in_model(stock, str(path), dtype=torch.bfloat16)
    ours = fresh().to(torch.bfloat16)
    with fa.enabled():
        load_checkpoint_in_model(ours, str(path), dtype=torch.bfloat16)
    assert_same(ours, stock, state)
    assert ours.head.weight.dtype == torch.bfloat16
    assert STATS.bytes_read == weight_bytes(state)


def test_dispatch_to_one_device(saved: tuple[Path, dict[str, Any]]) -> None:
    # One device in the map: accelerate reads each whole file with safe_load_file(device=).
    folder, state = saved
    stock = load_checkpoint_and_dispatch(fresh(), str(folder), device_map={"": "cpu"})
    with fa.enabled():
        ours = load_checkpoint_and_dispatch(fresh(), str(folder), device_map={"": "cpu"})
    assert_same(ours, stock, state)
    assert STATS.bytes_read == weight_bytes(state)


def test_dispatch_with_disk_offload(saved: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    # Several devices: accelerate opens one safe_open handle per device and reads tensor by
    # tensor; the disk-offloaded weights are read too (onto the CPU) and written to the folder.
    folder, state = saved
    device_map = {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "cpu",
                  "blocks.3": "disk", "head": "cpu", "norm": "cpu"}
    ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
    stock = load_checkpoint_and_dispatch(fresh(), str(folder), device_map=device_map,
                                         offload_folder=str(tmp_path / "stock"))
    with fa.enabled():
        ours = load_checkpoint_and_dispatch(fresh(), str(folder), device_map=device_map,
                                            offload_folder=str(tmp_path / "ours"))
    assert STATS.bytes_read == weight_bytes(state)
    assert ours.blocks[1].weight.device.type == "meta"   # offloaded, as in the stock model
    reference = fresh()
    reference.load_state_dict(state)
    with torch.no_grad():
        want = reference(ids)
        assert torch.equal(stock(ids), want) and torch.equal(ours(ids), want)
    for name in ("embed.weight", "blocks.0.weight", "head.weight", "norm.scale"):
        assert torch.equal(ours.state_dict()[name], state[name]), name


def test_enabled_is_scoped_to_its_context(saved: tuple[Path, dict[str, Any]]) -> None:
    folder, _ = saved
    seen: list[int] = []

    def other_thread() -> None:
        before = STATS.bytes_read
        load_checkpoint_in_model(fresh(), str(folder))
        seen.append(STATS.bytes_read - before)

    with fa.enabled():
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert seen == [0]        # a thread started in the block does not inherit it
    load_checkpoint_in_model(fresh(), str(folder))
    assert STATS.bytes_read == 0   # after the block: stock again


def test_install_routes_every_load_and_uninstall_restores(
        saved: tuple[Path, dict[str, Any]]) -> None:
    folder, state = saved
    fa.install(threads=1)
    fa.install(threads=2)   # again: new options, the originals are kept
    assert fa.is_installed()
    load_checkpoint_in_model(fresh(), str(folder))
    assert STATS.bytes_read == weight_bytes(state)
    fa.uninstall()
    fa.uninstall()
    assert not fa.is_installed()
    assert modeling.safe_open is safetensors.safe_open
    assert modeling.safe_load_file is safetensors.torch.load_file


# -- what stays with accelerate, and errors -------------------------------------------------------

@pytest.mark.parametrize("device, routed", [
    ("cpu", "cpu"), (0, "cuda:0"), ("cuda:1", "cuda:1"), ("cuda", "cuda"),
    ("mps", None), ("npu:0", None), ("hpu", None), ("meta", None), (True, None),
])
def test_devices_this_package_reads_to(device: Any, routed: str | None) -> None:
    assert fa._target(device) == routed
    if isinstance(device, str) and device != "npu:0":   # torch has no npu device type
        assert fa._target(torch.device(device)) == routed


def test_bare_indices_of_another_accelerator_go_to_accelerate(
        saved: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    # On an Intel GPU (or MLU, MUSA) machine accelerate's "auto" maps hold ints, which it passes
    # on to safetensors, and torch reads them as the current accelerator's (xpu:N), not cuda:N.
    if not hasattr(torch, "accelerator"):
        pytest.skip("torch.accelerator needs torch 2.6")
    monkeypatch.setattr(torch.accelerator, "current_accelerator",
                        lambda *args, **kwargs: torch.device("xpu"))
    assert fa._target(0) is None and fa._target("cuda:0") == "cuda:0"
    folder, _ = saved
    calls: list[tuple[Any, ...]] = []
    dispatch = fa._make_safe_open(lambda f, framework, device: calls.append((framework, device)))
    load = fa._make_load_file(lambda f, device: calls.append(("load", device)))
    shard = str(next(folder.glob("*.safetensors")))
    with fa.enabled():
        dispatch(shard, framework="pt", device=1)
        load(shard, device=0)
    assert calls == [("pt", 1), ("load", 0)]
    assert STATS.bytes_read == 0


def test_other_devices_and_frameworks_go_to_accelerate(saved: tuple[Path, dict[str, Any]]) -> None:
    folder, _ = saved
    calls: list[tuple[Any, ...]] = []
    dispatch = fa._make_safe_open(lambda f, framework, device: calls.append((framework, device)))
    load = fa._make_load_file(lambda f, device: calls.append(("load", device)))
    shard = str(next(folder.glob("*.safetensors")))
    with fa.enabled():
        dispatch(shard, framework="pt", device="mps")
        dispatch(shard, framework="np", device="cpu")
        load(shard, device="npu:0")
        handle = dispatch(shard, framework="pt", device="cpu")
    assert calls == [("pt", "mps"), ("np", "cpu"), ("load", "npu:0")]
    assert handle.keys() and not calls[3:]
    handle.close()
    dispatch(shard, framework="pt", device="cpu")   # outside any block
    assert calls[-1] == ("pt", "cpu")


def test_safetensors_keywords_go_to_safetensors(saved: tuple[Path, dict[str, Any]]) -> None:
    # The dispatchers stay in accelerate's module after a block: safetensors' own keywords
    # (backend=, safetensors 0.8) must still reach it, inside a block or after one.
    folder, state = saved
    shard = str(next(folder.glob("*.safetensors")))
    if "backend" not in inspect.signature(safetensors.torch.load_file).parameters:
        pytest.skip("backend= needs safetensors 0.8")
    want = safetensors.torch.load_file(shard, backend="pread")
    with fa.enabled():
        inside = modeling.safe_load_file(shard, backend="pread")
    after = modeling.safe_load_file(shard, device="cpu", backend="pread")
    for got in (inside, after):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert STATS.bytes_read == 0


def test_unknown_options_raise() -> None:
    with pytest.raises(ConfigError, match="thread"):
        with fa.enabled(thredas=2):
            pass
    with pytest.raises(ConfigError):
        fa.install(io="sometimes")
    assert not fa.is_installed()


def test_version_and_signature_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accelerate, "__version__", "2.0.0")
    with pytest.raises(IncompatibleVersionError, match=r"accelerate 2\.0\.0 .*accelerate>=1\.0,<2"):
        fa.install()
    monkeypatch.undo()

    def load_state_dict(checkpoint_file: str) -> None: ...

    monkeypatch.setattr(modeling, "load_state_dict", load_state_dict)
    with pytest.raises(IncompatibleVersionError, match="lacks device_map") as info:
        fa.install()
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.library == "accelerate"
    assert modeling.safe_open is safetensors.safe_open   # nothing was replaced


def test_missing_accelerate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(FrameworkNotInstalledError,
                       match="pip install 'accelerate>=1.0,<2'") as info:
        fa.install()
    assert isinstance(info.value, ModuleNotFoundError)


# -- CUDA ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("device_map", [{"": 0}, {"embed": 0, "blocks": "cpu", "head": 0,
                                                  "norm": 0}])
def test_dispatch_to_cuda(saved: tuple[Path, dict[str, Any]], device_map: dict[str, Any]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU and a CUDA build of torch")
    folder, state = saved
    stock = load_checkpoint_and_dispatch(fresh(), str(folder), device_map=device_map)
    with fa.enabled():
        ours = load_checkpoint_and_dispatch(fresh(), str(folder), device_map=device_map)
    assert_same(ours, stock, state)
    assert STATS.bytes_read == weight_bytes(state)
