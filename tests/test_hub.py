"""Checkpoints from a folder or the Hub: resolve, stream, inspect, and the index's safety rules.

Hub tests run against the loopback server of tests/hub_server.py (fixture ``hub_server``): no
internet. They count requests, never seconds.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import save_file

import fastsafetensors
from fastsafetensors import hub
from fastsafetensors.checkpoint import variant_name
from fastsafetensors.cli import main as cli_main
from fastsafetensors.errors import (
    CheckpointIndexError,
    CheckpointNotFoundError,
    ConfigError,
    HeaderError,
    TensorNotFoundError,
)

INDEX = "model.safetensors.index.json"


def shard_name(i: int, n: int, stem: str = "model") -> str:
    return f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"


def write_sharded(folder: Path, n: int = 3, *, stem: str = "model", variant: str | None = None,
                  numel: int = 4) -> dict[str, torch.Tensor]:
    """``n`` shards of two tensors each and their index; returns every tensor."""
    folder.mkdir(parents=True, exist_ok=True)
    everything: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    for i in range(n):
        name = variant_name(shard_name(i, n, stem), variant)
        tensors = {f"layers.{i}.weight": torch.arange(numel, dtype=torch.float32) + 100 * i,
                   f"layers.{i}.bias": torch.full((2,), float(i), dtype=torch.float16)}
        save_file(tensors, str(folder / name))
        everything.update(tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    index = variant_name(f"{stem}.safetensors.index.json", variant)
    total = sum(t.numel() * t.element_size() for t in everything.values())
    (folder / index).write_text(json.dumps({"metadata": {"total_size": total},
                                            "weight_map": weight_map}))
    return everything


def write_single(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"embed.weight": torch.randn(3, 4), "norm.weight": torch.ones(4)}
    save_file(tensors, str(folder / name))
    return tensors


def edit_index(folder: Path, change: Any) -> None:
    index = json.loads((folder / INDEX).read_text())
    change(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index))


# --- local sources ---------------------------------------------------------------------------


def test_single_file(tmp_path: Path) -> None:
    tensors = write_single(tmp_path)
    path = str(tmp_path / "model.safetensors")
    ckpt = fastsafetensors.resolve(path)
    assert (ckpt.commit, ckpt.files, ckpt.folder, ckpt.index) == (None, [path], str(tmp_path), None)
    assert ckpt.weight_map == dict.fromkeys(tensors, path)
    assert ckpt.wanted() == {path: None}
    assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_folder_with_single_file(tmp_path: Path) -> None:
    write_single(tmp_path)
    ckpt = fastsafetensors.resolve(tmp_path)
    assert ckpt.files == [str(tmp_path / "model.safetensors")]


def test_sharded_folder(tmp_path: Path) -> None:
    tensors = write_sharded(tmp_path, 3)
    ckpt = fastsafetensors.resolve(str(tmp_path))
    files = [str(tmp_path / shard_name(i, 3)) for i in range(3)]
    assert ckpt.files == files and ckpt.index == str(tmp_path / INDEX)
    assert set(ckpt.headers) == set(files)
    assert ckpt.weight_map["layers.1.bias"] == files[1]
    assert ckpt.wanted() == dict.fromkeys(files)
    assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_index_file_as_source(tmp_path: Path) -> None:
    write_sharded(tmp_path, 2)
    ckpt = fastsafetensors.resolve(tmp_path / INDEX)
    assert len(ckpt.files) == 2 and ckpt.index == str(tmp_path / INDEX)
    # load and iter_tensors take it as docs/hub.md says (they read it as a .safetensors file)
    whole = fastsafetensors.load(tmp_path)
    assert len(whole) > 1
    got = fastsafetensors.load(tmp_path / INDEX)
    assert got.keys() == whole.keys() and all(torch.equal(got[k], whole[k]) for k in whole)
    last = list(whole)[-1]
    assert [n for n, _ in fastsafetensors.iter_tensors(str(tmp_path / INDEX), tensors=[last])
            ] == [last]


@pytest.mark.parametrize("sharded", [False, True])
def test_variant(tmp_path: Path, sharded: bool) -> None:
    write_single(tmp_path)  # the default weights sit beside the variant
    if sharded:
        write_sharded(tmp_path, 2, variant="fp16")
        expected = INDEX.replace(".json", ".fp16.json")
    else:
        write_single(tmp_path, "model.fp16.safetensors")
        expected = "model.fp16.safetensors"
    ckpt = fastsafetensors.resolve(tmp_path, variant="fp16")
    assert (ckpt.index or ckpt.files[0]).endswith(expected)
    assert fastsafetensors.resolve(tmp_path).files == [str(tmp_path / "model.safetensors")]
    with pytest.raises(CheckpointNotFoundError, match="model.bf16.safetensors"):
        fastsafetensors.resolve(tmp_path, variant="bf16")


def test_diffusers_subfolder(tmp_path: Path) -> None:
    write_sharded(tmp_path / "unet", 2, stem="diffusion_pytorch_model")
    write_single(tmp_path / "text_encoder")
    ckpt = fastsafetensors.resolve(tmp_path, subfolder="unet")
    assert ckpt.folder == str(tmp_path / "unet") and len(ckpt.files) == 2
    assert fastsafetensors.resolve(tmp_path, subfolder="text_encoder/").files == [
        str(tmp_path / "text_encoder" / "model.safetensors")]
    with pytest.raises(CheckpointNotFoundError, match="subfolder="):
        fastsafetensors.resolve(tmp_path)
    for bad in ("../x", "/etc", "a/../b", "C:x"):
        with pytest.raises(ConfigError, match="subfolder"):
            fastsafetensors.resolve(tmp_path, subfolder=bad)


def test_tensors_subset_reads_needed_shards_only(tmp_path: Path) -> None:
    write_sharded(tmp_path, 3)
    ckpt = fastsafetensors.resolve(tmp_path, tensors=["layers.2.bias", "layers.0.weight",
                                                      "layers.2.weight"])
    first, last = str(tmp_path / shard_name(0, 3)), str(tmp_path / shard_name(2, 3))
    assert ckpt.files == [first, last]
    assert ckpt.wanted() == {first: ["layers.0.weight"], last: ["layers.2.bias", "layers.2.weight"]}
    assert ckpt.total_bytes == 4 + 16 + 16
    with pytest.raises(TensorNotFoundError, match="layers.0.weight"):
        fastsafetensors.resolve(tmp_path, tensors=["layers.0.weigth"])
    with pytest.raises(ConfigError, match="a list of tensor names"):
        fastsafetensors.resolve(tmp_path, tensors="layers.0.weight")
    for variant in ({"subfolder": "unet"}, {"variant": "fp16"}):
        with pytest.raises(ConfigError, match="not to the file"):
            fastsafetensors.resolve(tmp_path / shard_name(0, 3), **variant)


@pytest.mark.parametrize("option", [{"subfolder": "unet"}, {"variant": "fp16"}])
def test_a_file_given_subfolder_or_variant_is_refused_by_every_entry(tmp_path: Path,
                                                                    option: dict[str, str]
                                                                    ) -> None:
    # A file where a folder was meant: resolve() and inspect() refused subfolder= and
    # variant=, load() and iter_tensors() loaded the file as if neither had been given.
    write_sharded(tmp_path, 2)
    path = tmp_path / shard_name(0, 2)
    calls = {"load": lambda: fastsafetensors.load(path, **option),
             "iter_tensors": lambda: list(fastsafetensors.iter_tensors(path, **option)),
             "load_list": lambda: fastsafetensors.load([path], **option),
             "resolve": lambda: fastsafetensors.resolve(path, **option),
             "inspect": lambda: fastsafetensors.inspect(path, **option)}
    for entry, call in calls.items():
        with pytest.raises(ConfigError, match="not to the file") as excinfo:
            call()
        assert path.name in str(excinfo.value), entry


def test_stream_local_in_order(tmp_path: Path) -> None:
    write_sharded(tmp_path, 3)
    got = list(hub.stream(tmp_path, tensors=["layers.1.bias"]))
    assert [(p, names) for p, _, names in got] == [(str(tmp_path / shard_name(1, 3)),
                                                    ["layers.1.bias"])]
    assert [os.path.basename(p) for p, _, _ in hub.stream(tmp_path)] == [
        shard_name(i, 3) for i in range(3)]
    with pytest.raises(ConfigError):
        next(hub.stream(tmp_path, max_downloads=0))


@pytest.mark.parametrize("source", ["./nope", "nope.safetensors", "a/b/c", "~/nope"])
def test_missing_path_is_not_a_repo_id(tmp_path: Path, source: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointNotFoundError) as info:
        fastsafetensors.resolve(source)
    # Said once, then what to do: it read "No such file or directory: ... (no such file or
    # folder (a Hub repo id looks like 'org/name'))".
    message = str(info.value)
    assert message.startswith("[Errno 2] No such file or directory: ")
    assert message.endswith("(check the path; a Hub repo id looks like 'org/name')")


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        fastsafetensors.resolve(tmp_path)
    write_single(tmp_path, "a.safetensors")
    write_single(tmp_path, "b.safetensors")
    with pytest.raises(CheckpointNotFoundError, match="several candidates") as info:
        fastsafetensors.resolve(tmp_path)
    # The folder exists: the message must not say it does not.
    assert "No such file" not in str(info.value) and "holds no checkpoint" in str(info.value)
    with pytest.raises(HeaderError, match="not in a list") as folder:
        fastsafetensors.load([tmp_path])
    assert isinstance(folder.value, IsADirectoryError)   # safetensors raises an OSError there


def test_a_lone_shard_or_variant_file_is_not_the_checkpoint(tmp_path: Path) -> None:
    # The fallback to "the only .safetensors file" took one shard of a sharded checkpoint whose
    # index was missing, and a variant's file when no variant was asked for.
    write_sharded(tmp_path / "shards", 2)
    (tmp_path / "shards" / INDEX).unlink()
    (tmp_path / "shards" / shard_name(1, 2)).unlink()
    with pytest.raises(CheckpointNotFoundError, match="no model.safetensors"):
        fastsafetensors.resolve(tmp_path / "shards")
    write_single(tmp_path / "fp16", "model.fp16.safetensors")
    with pytest.raises(CheckpointNotFoundError, match="variant="):
        fastsafetensors.resolve(tmp_path / "fp16")
    assert len(fastsafetensors.resolve(tmp_path / "fp16", variant="fp16").files) == 1
    write_single(tmp_path / "other", "weights.safetensors")   # any other lone file still goes
    assert len(fastsafetensors.resolve(tmp_path / "other").files) == 1


# --- the index is hostile input --------------------------------------------------------------


@pytest.mark.parametrize("entry, why", [
    ("/etc/model.safetensors", "absolute"),
    ("\\\\server\\share\\model.safetensors", "absolute"),
    ("../model.safetensors", "'..'"),
    ("..", "'..'"),
    ("C:model.safetensors", "drive letter"),
    ("sub\\model.safetensors", "backslash"),
    ("sub/model.safetensors", "another folder"),
    ("config.json", "not a .safetensors"),
    ("", "not a file name"),
])
def test_unsafe_shard_names(tmp_path: Path, entry: str, why: str) -> None:
    write_sharded(tmp_path / "ckpt", 2)
    edit_index(tmp_path / "ckpt", lambda wm: wm.update({"layers.1.weight": entry}))
    with pytest.raises(CheckpointIndexError, match=why) as info:
        fastsafetensors.resolve(tmp_path / "ckpt")
    assert info.value.path == str(tmp_path / "ckpt" / INDEX)
    assert info.value.tensor == "layers.1.weight" and info.value.shard == entry
    assert INDEX in str(info.value)


@pytest.mark.parametrize("entry", [["x.safetensors"], {"a": 1}, 3, None])
def test_shard_name_that_is_not_a_string(tmp_path: Path, entry: Any) -> None:
    write_sharded(tmp_path / "ckpt", 2)
    edit_index(tmp_path / "ckpt", lambda wm: wm.update({"layers.1.weight": entry}))
    with pytest.raises(CheckpointIndexError, match="not a file name"):
        fastsafetensors.resolve(tmp_path / "ckpt")


def test_no_tensors_wanted_is_an_empty_checkpoint(tmp_path: Path) -> None:
    write_sharded(tmp_path / "sharded", 2)
    write_single(tmp_path / "single")
    for source in (tmp_path / "sharded", tmp_path / "single",
                   tmp_path / "single" / "model.safetensors"):
        ckpt = fastsafetensors.resolve(source, tensors=[])
        assert ckpt.files == [] and ckpt.weight_map == {}
        assert fastsafetensors.load(source, tensors=[]) == {}


def test_symlink_leaving_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    write_sharded(folder, 2)
    outside = tmp_path / "elsewhere.safetensors"
    (folder / shard_name(1, 2)).rename(outside)
    (folder / shard_name(1, 2)).symlink_to(outside)
    with pytest.raises(CheckpointIndexError, match="outside") as info:
        fastsafetensors.resolve(folder)
    assert info.value.shard == shard_name(1, 2)
    # A symlink that stays inside is fine.
    (folder / shard_name(1, 2)).unlink()
    (folder / "real").mkdir()
    outside.rename(folder / "real" / "x.safetensors")
    (folder / shard_name(1, 2)).symlink_to(Path("real") / "x.safetensors")
    assert len(fastsafetensors.resolve(folder).files) == 2


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_shard_that_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    write_sharded(tmp_path, 2)
    shard = tmp_path / shard_name(0, 2)
    shard.unlink()
    if kind == "folder":
        shard.mkdir()
    else:
        os.mkfifo(shard)
    with pytest.raises(CheckpointIndexError, match="not a regular file"):
        fastsafetensors.resolve(tmp_path)


def test_listed_file_missing(tmp_path: Path) -> None:
    write_sharded(tmp_path, 2)
    (tmp_path / shard_name(1, 2)).unlink()
    with pytest.raises(CheckpointNotFoundError, match=INDEX) as info:
        fastsafetensors.resolve(tmp_path)
    assert info.value.path == str(tmp_path / shard_name(1, 2))


def test_indexed_tensor_absent_from_its_shard(tmp_path: Path) -> None:
    write_sharded(tmp_path, 2)
    edit_index(tmp_path, lambda wm: wm.update({"ghost.weight": shard_name(1, 2)}))
    with pytest.raises(CheckpointIndexError) as info:
        fastsafetensors.resolve(tmp_path)
    err = info.value
    assert (err.tensor, err.shard, err.path) == ("ghost.weight", shard_name(1, 2),
                                                 str(tmp_path / INDEX))
    assert INDEX in str(err) and shard_name(1, 2) in str(err)


def test_tensor_in_two_shards(tmp_path: Path) -> None:
    write_sharded(tmp_path, 2)
    # The second shard also holds layers.0.weight, which the index puts in the first.
    save_file({"layers.1.weight": torch.zeros(4), "layers.1.bias": torch.zeros(2).half(),
               "layers.0.weight": torch.zeros(4)}, str(tmp_path / shard_name(1, 2)))
    with pytest.raises(CheckpointIndexError, match="one shard only") as info:
        fastsafetensors.resolve(tmp_path)
    assert shard_name(0, 2) in str(info.value) and info.value.shard == shard_name(1, 2)


def test_tensor_listed_twice_in_the_index(tmp_path: Path) -> None:
    write_sharded(tmp_path, 2)
    a, b = shard_name(0, 2), shard_name(1, 2)
    # json.loads would silently keep the last of two equal keys.
    (tmp_path / INDEX).write_text(
        f'{{"weight_map": {{"layers.0.weight": "{a}", "layers.0.bias": "{a}", '
        f'"layers.1.weight": "{b}", "layers.1.bias": "{b}", "layers.0.weight": "{b}"}}}}')
    with pytest.raises(CheckpointIndexError, match="twice") as info:
        fastsafetensors.resolve(tmp_path)
    assert info.value.tensor == "layers.0.weight"


def test_shard_tensor_missing_from_the_index(tmp_path: Path) -> None:
    write_sharded(tmp_path, 2)
    edit_index(tmp_path, lambda wm: wm.pop("layers.1.bias"))
    with pytest.raises(CheckpointIndexError, match="does not list it"):
        fastsafetensors.resolve(tmp_path)


def test_index_errors_pickle() -> None:
    err = CheckpointIndexError("/m/" + INDEX, "bad", "w", shard="model-1.safetensors")
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), str(back), back.shard, back.tensor) == (type(err), str(err),
                                                                "model-1.safetensors", "w")
    assert isinstance(back, ValueError)


# --- the Hub -----------------------------------------------------------------------------------


@pytest.fixture
def repo(hub_server: Any, tmp_path: Path) -> tuple[str, str, dict[str, torch.Tensor]]:
    """org/model on the loopback Hub: 3 shards, an index and a config; (repo id, commit,
    tensors)."""
    tensors = write_sharded(tmp_path / "src", 3)
    (tmp_path / "src" / "config.json").write_text("{}")
    return "org/model", hub_server.add_folder("org/model", tmp_path / "src"), tensors


def shard_requests(server: Any) -> list[Any]:
    return [r for r in server.requests if (r.file or "").endswith(".safetensors")]


def test_hub_fetches_the_index_then_the_shards(hub_server: Any, repo: Any) -> None:
    repo_id, commit, _ = repo
    ckpt = fastsafetensors.resolve(repo_id)
    assert ckpt.commit == commit and len(ckpt.files) == 3
    assert ckpt.folder.endswith(os.path.join("snapshots", commit))
    assert hub_server.fetched()[0] == INDEX
    assert sorted(hub_server.fetched()) == sorted([INDEX] + [shard_name(i, 3) for i in range(3)])
    # One request pins the revision and lists the files; every file after that is fetched by
    # commit.
    api = [r.path for r in hub_server.requests if r.path.startswith("/api/")]
    assert api == [f"/api/models/{repo_id}"]
    assert all(f"/resolve/{commit}/" in r.path for r in hub_server.requests
               if r.server == "hub" and "/resolve/" in r.path)
    # A snapshot folder of the cache is a valid local source (its symlinks point into blobs/).
    assert fastsafetensors.resolve(ckpt.folder).files == ckpt.files


def test_cache_snapshot_by_index_file_or_symlink(hub_server: Any, repo: Any,
                                                 tmp_path: Path) -> None:
    # Its shards are symlinks into ../../blobs: still inside the repo's cache folder.
    ckpt = fastsafetensors.resolve(repo[0])
    assert fastsafetensors.resolve(os.path.join(ckpt.folder, INDEX)).files == ckpt.files
    link = tmp_path / "my-model"
    link.symlink_to(ckpt.folder)
    assert [os.path.basename(f) for f in fastsafetensors.resolve(link).files] == [
        os.path.basename(f) for f in ckpt.files]


def test_hub_cache_shared_blob_store(hub_server: Any, repo: Any) -> None:
    # huggingface_hub 2.x moves each Xet download (most Hub files) into the cache's shared
    # store, <cache>/blobs/<2 hex>/<xet hash>, and makes the repo's blob a link to it
    # (utils/_shared_blobs.py, publish_blob_to_shared_store): every load of such a repo was
    # refused as "a symlink out of the checkpoint folder".
    first = fastsafetensors.resolve(repo[0])
    cache = Path(hf_constants.HF_HUB_CACHE)
    for path in first.files:
        blob = Path(os.path.realpath(path))
        digest = blob.name
        shared = cache / "blobs" / digest[:2] / digest
        shared.parent.mkdir(parents=True, exist_ok=True)
        blob.rename(shared)
        blob.symlink_to(Path("..", "..", "blobs", digest[:2], digest))
    for source, options in ((repo[0], {}), (repo[0], {"local_files_only": True}),
                            (first.folder, {})):
        state = fastsafetensors.load(source, **options)
        assert state.keys() == repo[2].keys()
        assert all(torch.equal(state[k], v) for k, v in repo[2].items())
    # Only the store: a link elsewhere in the cache is still refused.
    blob = Path(os.path.realpath(first.files[0]))
    elsewhere = cache / "elsewhere.safetensors"
    blob.rename(elsewhere)
    blob.symlink_to(elsewhere)
    with pytest.raises(CheckpointIndexError, match="outside"):
        fastsafetensors.resolve(repo[0])


def test_hub_no_tensors_wanted_downloads_nothing(hub_server: Any, repo: Any,
                                                 tmp_path: Path) -> None:
    write_single(tmp_path / "one")
    hub_server.add_folder("org/one", tmp_path / "one")
    for repo_id in (repo[0], "org/one"):
        assert fastsafetensors.resolve(repo_id, tensors=[]).files == []
        assert fastsafetensors.load(repo_id, tensors=[]) == {}
    assert hub_server.fetched() == []   # not even the index


def test_hub_load_order_is_file_order_once_cached(hub_server: Any, repo: Any) -> None:
    local = list(fastsafetensors.load(fastsafetensors.resolve(repo[0]).folder))
    for _ in range(5):
        assert list(fastsafetensors.load(repo[0])) == local


def test_hub_offline_variable_wins_over_local_files_only_false(
        hub_server: Any, repo: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fastsafetensors.resolve(repo[0])
    hub_server.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert len(fastsafetensors.resolve(repo[0], local_files_only=False).files) == 3
    assert hub_server.requests == []


def test_hub_subset_fetches_fewer_shards(hub_server: Any, repo: Any) -> None:
    ckpt = fastsafetensors.resolve(repo[0], tensors=["layers.1.weight"])
    assert [os.path.basename(f) for f in ckpt.files] == [shard_name(1, 3)]
    assert hub_server.fetched() == [INDEX, shard_name(1, 3)]


def test_hub_revisions(hub_server: Any, tmp_path: Path) -> None:
    write_single(tmp_path / "v1")
    old = hub_server.add_folder("org/m", tmp_path / "v1", tags=("v1.0",))
    write_sharded(tmp_path / "v2", 2)
    new = hub_server.add_folder("org/m", tmp_path / "v2")
    assert fastsafetensors.resolve("org/m").commit == new
    for revision in ("v1.0", old):
        ckpt = fastsafetensors.resolve("org/m", revision=revision)
        assert ckpt.commit == old and [os.path.basename(f) for f in ckpt.files] == [
            "model.safetensors"]
    with pytest.raises(RevisionNotFoundError):
        fastsafetensors.resolve("org/m", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        fastsafetensors.resolve("org/no-such-model")


def test_hub_second_load_from_cache_with_server_stopped(hub_server: Any, repo: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    first = fastsafetensors.resolve(repo[0])
    hub_server.stop()
    count = len(hub_server.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    again = fastsafetensors.resolve(repo[0])
    assert (again.files, again.commit) == (first.files, first.commit)
    assert fastsafetensors.resolve(repo[0], local_files_only=True).files == first.files
    assert len(hub_server.requests) == count


def test_hub_unreachable_falls_back_to_the_cache(hub_server: Any, repo: Any,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    first = fastsafetensors.resolve(repo[0])
    hub_server.stop()
    again = fastsafetensors.resolve(repo[0])
    assert again.files == first.files
    assert "using the cached snapshot" in caplog.text
    with pytest.raises(CheckpointNotFoundError, match="not in the Hugging Face cache"):
        fastsafetensors.resolve("org/never-downloaded")


def test_a_header_read_is_tried_again_after_a_dropped_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # inspect() reads headers with HTTP range requests of its own: one dropped connection
    # failed it, where load() went on (huggingface_hub resumes a download).
    from huggingface_hub.utils import get_session

    get_session()   # its HTTP client imported, whose errors hub._network_errors lists
    transport = hub._network_errors()[-1]
    attempts: list[int] = []

    def flaky(url: str, headers: Any, start: int, length: int) -> tuple[bytes, int]:
        attempts.append(start)
        if len(attempts) < hub.RANGE_TRIES:
            raise transport("peer closed connection")
        return b"x" * length, 100

    monkeypatch.setattr(hub, "_get_range_once", flaky)
    monkeypatch.setattr(hub.time, "sleep", lambda s: None)
    assert hub._get_range("http://h/f", {}, 0, 8) == (b"x" * 8, 100)
    assert len(attempts) == hub.RANGE_TRIES

    def dropped(url: str, headers: Any, start: int, length: int) -> tuple[bytes, int]:
        attempts.append(start)
        raise transport("peer closed connection")

    attempts.clear()
    monkeypatch.setattr(hub, "_get_range_once", dropped)
    with pytest.raises(transport):   # as huggingface_hub raises it once its own tries are spent
        hub._get_range("http://h/f", {}, 0, 8)
    assert len(attempts) == hub.RANGE_TRIES


def test_the_cli_says_the_hub_could_not_be_reached(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from huggingface_hub.utils import get_session

    get_session()
    transport = hub._network_errors()[-1]

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise transport("timed out")

    monkeypatch.setattr(hub, "inspect", unreachable)
    assert cli_main(["inspect", "org/model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastsafetensors: the Hub could not be reached: ") and "timed out" in err
    assert len(err.strip().splitlines()) == 1


def test_offline_a_shard_missing_from_the_cache_fails_before_any_tensor(hub_server: Any,
                                                                        repo: Any) -> None:
    # As a folder is checked: a stream handed out part of the checkpoint, then failed.
    files = fastsafetensors.resolve(repo[0]).files
    os.unlink(files[-1])   # the snapshot's link to the last shard
    stream = fastsafetensors.iter_tensors(repo[0], local_files_only=True)
    with pytest.raises(CheckpointNotFoundError, match="in the cache without this file"):
        next(stream)
    # Only the shards needed count: the tensors of the others still load offline.
    some = fastsafetensors.load(repo[0], local_files_only=True,
                                tensors=[n for n in repo[2] if n.startswith("layers.0.")])
    assert all(torch.equal(t, repo[2][n]) for n, t in some.items()) and some


def test_force_download_is_never_served_from_the_cache(hub_server: Any, repo: Any) -> None:
    # The cached copy is what force_download=True is for replacing (a damaged shard): offline,
    # or with the Hub down, it was used anyway, and its error asked for force_download=True.
    from huggingface_hub.errors import HfHubHTTPError

    fastsafetensors.resolve(repo[0])
    with pytest.raises(ConfigError, match="force_download=True .*downloads are off"):
        fastsafetensors.resolve(repo[0], force_download=True, local_files_only=True)
    hub_server.fail("^/api/", 503)
    with pytest.raises(HfHubHTTPError):
        fastsafetensors.resolve(repo[0], force_download=True)
    assert fastsafetensors.resolve(repo[0]).files   # without it, the cache still serves


def test_hub_down_falls_back_to_the_cache(hub_server: Any, repo: Any,
                                          caplog: pytest.LogCaptureFixture) -> None:
    # A 5xx from the Hub is the Hub being down, as huggingface_hub and transformers treat it:
    # a cached repo still loads.
    first = fastsafetensors.resolve(repo[0])
    hub_server.fail("^/api/", 503)
    again = fastsafetensors.resolve(repo[0])
    assert (again.files, again.commit) == (first.files, first.commit)
    assert "could not answer" in caplog.text
    # A repo not cached says why it cannot come: the Hub, not offline mode.
    with pytest.raises(CheckpointNotFoundError, match="could not answer") as info:
        fastsafetensors.resolve("org/never-downloaded")
    assert "local_files_only" not in str(info.value)


@pytest.mark.parametrize("status", [429, 408])
def test_hub_rate_limited_falls_back_to_the_cache(hub_server: Any, repo: Any, status: int,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    # A rate limit (429) or a request timeout (408) is the Hub busy, not an answer about the
    # repo: huggingface_hub's hf_hub_download and snapshot_download serve a cached repo then,
    # where resolve() raised HfHubHTTPError.
    first = fastsafetensors.resolve(repo[0])
    hub_server.fail("^/", status)
    again = fastsafetensors.resolve(repo[0])
    assert (again.files, again.commit) == (first.files, first.commit)
    assert "could not answer" in caplog.text
    with pytest.raises(CheckpointNotFoundError, match="could not answer"):
        fastsafetensors.resolve("org/never-downloaded")


def test_hub_damaged_cached_shard_says_how_to_recover(hub_server: Any, repo: Any) -> None:
    # huggingface_hub keeps a blob whose size matched; a damaged one failed every later load
    # with only the shard's name, and force_download= (its own advice) was refused.
    first = fastsafetensors.resolve(repo[0])
    blob = os.path.realpath(first.files[1])
    size = os.path.getsize(blob)
    Path(blob).write_bytes(b"\xff" * size)
    with pytest.raises(HeaderError, match="force_download=True") as info:
        fastsafetensors.resolve(repo[0])
    assert blob in str(info.value)
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)
    with pytest.raises(HeaderError, match="force_download=True"):   # headers only: the same
        fastsafetensors.inspect(repo[0])
    state = fastsafetensors.load(repo[0], force_download=True)
    assert set(state) == set(repo[2]) and all(torch.equal(state[k], v) for k, v in repo[2].items())
    assert fastsafetensors.resolve(repo[0]).files == first.files


@pytest.mark.parametrize("stalled", ["model info", "tree listing"])
def test_hub_that_never_answers_falls_back_to_the_cache(
        hub_server: Any, repo: Any, monkeypatch: pytest.MonkeyPatch, stalled: str) -> None:
    # Listing had no timeout: a Hub that accepted the connection and never answered hung the
    # load for good, where huggingface_hub's downloads give up after HF_HUB_ETAG_TIMEOUT. So
    # did a mirror without siblings, listed with list_repo_tree, which has no time limit.
    first = fastsafetensors.resolve(repo[0])
    if stalled == "tree listing":
        hub_server.siblings = False
    hub_server.fail("^/api/" if stalled == "model info" else "/tree/", None)
    monkeypatch.setattr(hf_constants, "HF_HUB_ETAG_TIMEOUT", 0.5)
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(fastsafetensors.resolve(repo[0])),
                              daemon=True)
    thread.start()
    thread.join(60)   # not a timing: a hang would otherwise stop the suite
    assert not thread.is_alive(), "resolve() still waits for the Hub"
    assert box[0].files == first.files


def test_hub_partial_cache_offline_is_not_the_model(hub_server: Any, tmp_path: Path) -> None:
    # Offline, the cached snapshot holds what was downloaded, not the repo: one cached shard of
    # the fp16 variant was returned as the whole default checkpoint.
    write_single(tmp_path / "src")
    write_sharded(tmp_path / "src", 2, variant="fp16")
    hub_server.add_folder("org/v", tmp_path / "src")
    fastsafetensors.resolve("org/v", variant="fp16", tensors=["layers.0.weight"])
    with pytest.raises(CheckpointNotFoundError, match="no model.safetensors"):
        fastsafetensors.resolve("org/v", local_files_only=True)
    fastsafetensors.resolve("org/v")
    assert [os.path.basename(f) for f in fastsafetensors.resolve(
        "org/v", local_files_only=True).files] == ["model.safetensors"]


def test_hub_offline_snapshot_without_weights_says_to_load_online(hub_server: Any,
                                                                  repo: Any) -> None:
    # A snapshot holding only config.json (AutoConfig ran online) was reported as a repo
    # without weights, with advice to pass subfolder= or variant=, never to go online.
    from huggingface_hub import hf_hub_download

    hf_hub_download(repo[0], "config.json")
    with pytest.raises(CheckpointNotFoundError, match="load it once online") as info:
        fastsafetensors.resolve(repo[0], local_files_only=True)
    assert "downloads are off" in str(info.value) and "config.json" in str(info.value)
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)


def test_hub_lone_weights_file_loads_offline_too(hub_server: Any, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    # A repo whose only weights file has another name loads online; offline (or with the Hub
    # down) the same choice is made, with a warning that the cache may not be the whole repo.
    write_single(tmp_path / "src", "weights.safetensors")
    hub_server.add_folder("org/w", tmp_path / "src")
    online = fastsafetensors.resolve("org/w")
    offline = fastsafetensors.resolve("org/w", local_files_only=True)
    assert offline.files == online.files
    assert "only weights file in the cached snapshot" in caplog.text


def test_local_files_only_never_touches_the_network(hub_server: Any, repo: Any) -> None:
    with pytest.raises(CheckpointNotFoundError, match="local_files_only"):
        fastsafetensors.resolve(repo[0], local_files_only=True)
    assert hub_server.requests == []
    fastsafetensors.resolve(repo[0], tensors=["layers.0.bias"])
    hub_server.clear()
    # The index and shard 0 are cached; shard 2 is not.
    assert len(fastsafetensors.resolve(repo[0], tensors=["layers.0.weight"],
                                       local_files_only=True).files) == 1
    with pytest.raises(CheckpointNotFoundError, match="in the cache without"):
        fastsafetensors.resolve(repo[0], local_files_only=True)
    with pytest.raises(CheckpointNotFoundError):
        fastsafetensors.resolve(repo[0], revision="v9", local_files_only=True)
    assert hub_server.requests == []


def test_hub_subfolder_and_variant(hub_server: Any, tmp_path: Path) -> None:
    write_sharded(tmp_path / "src" / "unet", 2, stem="diffusion_pytorch_model", variant="fp16")
    write_single(tmp_path / "src" / "unet", "diffusion_pytorch_model.safetensors")
    write_single(tmp_path / "src" / "vae", "diffusion_pytorch_model.safetensors")
    hub_server.add_folder("org/pipe", tmp_path / "src")
    with pytest.raises(CheckpointNotFoundError, match="subfolder="):
        fastsafetensors.resolve("org/pipe")
    with pytest.raises(CheckpointNotFoundError, match="no weights"):
        fastsafetensors.resolve("org/pipe", subfolder="nothing-here")
    hub_server.clear()
    ckpt = fastsafetensors.resolve("org/pipe", subfolder="unet", variant="fp16")
    assert len(ckpt.files) == 2 and ckpt.folder.endswith("unet")
    assert sorted(hub_server.fetched()) == sorted(
        ["unet/diffusion_pytorch_model.safetensors.index.fp16.json"] +
        [f"unet/{variant_name(shard_name(i, 2, 'diffusion_pytorch_model'), 'fp16')}"
         for i in range(2)])


def test_hub_mirror_without_siblings_is_listed_page_by_page(hub_server: Any,
                                                           tmp_path: Path) -> None:
    """A mirror whose model info leaves out ``siblings``: the folder comes from the tree API,
    every page of it, and the checkpoint is the one the Hub's own listing gives."""
    write_sharded(tmp_path / "src" / "unet", 3, stem="diffusion_pytorch_model")
    write_single(tmp_path / "src" / "vae", "diffusion_pytorch_model.safetensors")
    hub_server.add_folder("org/pipe", tmp_path / "src")
    expected = fastsafetensors.resolve("org/pipe", subfolder="unet").files
    hub_server.siblings, hub_server.tree_page = False, 2
    hub_server.clear()
    ckpt = fastsafetensors.resolve("org/pipe", subfolder="unet")
    assert ckpt.files == expected and len(expected) == 3
    pages = [r for r in hub_server.requests if "/tree/" in r.path]
    assert len(pages) == 2 and all(r.path.endswith("/unet") for r in pages)   # 4 files, 2 a page


def test_hub_mirror_whose_pages_loop_says_so(hub_server: Any, tmp_path: Path) -> None:
    # A next link back to a page already read listed the same files for ever.
    write_sharded(tmp_path / "src", 3)
    hub_server.add_folder("org/m", tmp_path / "src")
    hub_server.siblings, hub_server.tree_page, hub_server.tree_loops = False, 2, True
    with pytest.raises(CheckpointNotFoundError, match="leads back to a page") as info:
        fastsafetensors.resolve("org/m")
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)
    assert len([r for r in hub_server.requests if "/tree/" in r.path]) == 2


def test_hub_unsafe_index_is_refused_before_any_shard(hub_server: Any, tmp_path: Path) -> None:
    write_sharded(tmp_path / "src", 2)
    edit_index(tmp_path / "src", lambda wm: wm.update({"layers.0.bias": "../../x.safetensors"}))
    hub_server.add_folder("org/evil", tmp_path / "src")
    with pytest.raises(CheckpointIndexError, match="'..'"):
        fastsafetensors.resolve("org/evil")
    assert hub_server.fetched() == [INDEX]


def test_hub_index_naming_a_missing_file(hub_server: Any, tmp_path: Path) -> None:
    write_sharded(tmp_path / "src", 2)
    (tmp_path / "src" / shard_name(1, 2)).unlink()
    hub_server.add_folder("org/partial", tmp_path / "src")
    with pytest.raises(CheckpointNotFoundError, match="no such file"):
        fastsafetensors.resolve("org/partial")
    assert hub_server.fetched() == [INDEX]


def test_hub_token_is_sent(hub_server: Any, repo: Any) -> None:
    fastsafetensors.resolve(repo[0], token="hf_secret")
    hub = [r for r in hub_server.requests if r.server == "hub"]
    assert hub and all(r.authorization == "Bearer hf_secret" for r in hub)
    # The CDN is another origin: the token must not follow the redirect.
    assert all(r.authorization is None for r in hub_server.requests if r.server == "cdn")


def test_inspect_reads_headers_only(hub_server: Any, repo: Any) -> None:
    repo_id, commit, tensors = repo
    summary = fastsafetensors.inspect(repo_id)
    assert summary.commit == commit and summary.files == [shard_name(i, 3) for i in range(3)]
    assert summary.parameters == sum(t.numel() for t in tensors.values())
    assert summary.dtypes() == {"F32": (3, 12, 48), "F16": (3, 6, 12)}
    requests = shard_requests(hub_server)
    assert requests and all(r.method == "GET" and r.range for r in requests)
    for r in requests:  # no byte past the header: 8 + its length
        end = int(r.range.rsplit("-", 1)[1])
        assert end < summary.headers[r.file].data_start
    assert sum(r.sent for r in requests if r.server == "cdn") == 3 * summary.headers[
        shard_name(0, 3)].data_start
    text = str(summary)
    assert shard_name(2, 3) in text and "layers.*.weight" in text and "[4]" in text
    blobs = Path(hf_constants.HF_HUB_CACHE) / "models--org--model" / "blobs"
    assert len(list(blobs.iterdir())) == 1  # the index only


def test_inspect_local_and_cached(hub_server: Any, repo: Any, tmp_path: Path) -> None:
    local = fastsafetensors.inspect(tmp_path / "src")
    fastsafetensors.resolve(repo[0])
    hub_server.clear()
    cached = fastsafetensors.inspect(repo[0], local_files_only=True)
    assert hub_server.requests == []
    assert cached.tensors == local.tensors and cached.parameters == local.parameters


def test_cli_inspect_repo_id(hub_server: Any, repo: Any, capsys: pytest.CaptureFixture[str]
                             ) -> None:
    assert cli_main(["inspect", repo[0], "--revision", repo[1]]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 6 and "layers.0.weight\tF32\t[4]\t16" in out
    assert "3 file(s), 6 tensors" in err and "6 tensors, 60 data bytes" in err


def test_load_by_repo_id(hub_server: Any, repo: Any) -> None:
    loaded = fastsafetensors.load(repo[0])
    assert loaded.keys() == repo[2].keys()
    assert all(torch.equal(loaded[k], v) for k, v in repo[2].items())
    ckpt = fastsafetensors.resolve(repo[0], tensors=["layers.2.bias"])
    assert list(fastsafetensors.load(ckpt)) == ["layers.2.bias"]


def test_server_speaks_huggingface_hub(hub_server: Any, repo: Any, tmp_path: Path) -> None:
    """The loopback Hub answers huggingface_hub's own calls the way the Hub does."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url

    api = HfApi()
    assert api.model_info(repo[0]).sha == repo[1]
    tree = {e.path for e in api.list_repo_tree(repo[0], recursive=True)}
    assert tree == {"config.json", INDEX} | {shard_name(i, 3) for i in range(3)}
    meta = get_hf_file_metadata(hf_hub_url(repo[0], shard_name(0, 3)))
    assert meta.commit_hash == repo[1] and meta.xet_file_data is None
    assert meta.size == (tmp_path / "src" / shard_name(0, 3)).stat().st_size
    assert meta.location.startswith(hub_server.cdn_url)
    config = hf_hub_download(repo[0], "config.json", revision="main")
    assert Path(config).read_text() == "{}"


# --- overlap and cancellation (a bandwidth cap makes downloads slow; counts decide) ----------


@pytest.fixture
def slow_repo(hub_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """org/big: 8 shards of 256 kB behind a 2 MB/s link; huggingface_hub reads 32 kB chunks
    (its 10 MB default would make each tiny shard one chunk). Returns the shards' total size."""
    write_sharded(tmp_path / "big", 8, numel=64 * 1024)
    hub_server.add_folder("org/big", tmp_path / "big")
    hub_server.link.rate = 2e6
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 32 * 1024)
    return sum(p.stat().st_size for p in (tmp_path / "big").glob("*.safetensors"))


def test_stream_yields_while_later_shards_download(hub_server: Any, slow_repo: int) -> None:
    shards = hub.stream("org/big", max_downloads=2)
    path, header, names = next(shards)
    sent = sum(r.sent for r in hub_server.requests if r.server == "cdn")
    assert header.path == path and names is None
    assert sent < slow_repo / 2  # most of the checkpoint is still on the server
    rest = list(shards)
    assert len(rest) == 7 and len({p for p, _, _ in rest} | {path}) == 8


def test_a_download_that_cannot_stop_does_not_hold_up_closing(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: Any) -> None:
    # A download waiting for another process's lock on its file, or for a stalled connection,
    # never sees the stop: closing the stream (and a Ctrl-C, and the first error) waited for it,
    # 20-65 s against the helper's loopback server. Now at most CLOSE_WAIT.
    from types import SimpleNamespace

    monkeypatch.setattr(hub, "CLOSE_WAIT", 0.2)
    stuck, release = threading.Event(), threading.Event()

    def path(name: str, bar: Any = None) -> str:
        if name == "b.safetensors":
            stuck.set()
            release.wait(30)   # deaf to the stop, as a download inside huggingface_hub is
        return str(tmp_path / name)

    plan = SimpleNamespace(shards=["a.safetensors", "b.safetensors"], folder=str(tmp_path),
                           path=path, source="org/model")
    downloads = hub._Downloads(plan, 2)  # type: ignore[arg-type]
    assert stuck.wait(10)
    with caplog.at_level("INFO", logger="fastsafetensors.hub"):
        started = time.monotonic()
        downloads.close()
        assert time.monotonic() - started < 5
    assert "still running after the stream closed" in caplog.text and "b.safetensors" in caplog.text
    release.set()


def test_closing_the_stream_stops_the_downloads(hub_server: Any, slow_repo: int) -> None:
    shards = hub.stream("org/big", max_downloads=2)
    next(shards)
    shards.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("fastsafetensors-download")]
    blobs = Path(hf_constants.HF_HUB_CACHE) / "models--org--big" / "blobs"
    assert not list(blobs.glob("*.incomplete"))
    complete = [p for p in blobs.iterdir() if p.stat().st_size > 100_000]
    assert 1 <= len(complete) <= 4
    started = {r.file for r in hub_server.requests if r.server == "cdn"}
    assert len(started) <= 4


@pytest.mark.parametrize("status", [401, 403, 404])
def test_hub_refusing_a_cached_repo_serves_the_cache(hub_server: Any, repo: Any, status: int,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    # A token expired, a repo made gated or taken down: huggingface_hub's hf_hub_download and
    # snapshot_download serve what is cached, and raise the Hub's error when nothing is.
    from huggingface_hub.errors import HfHubHTTPError

    first = fastsafetensors.resolve(repo[0])
    hub_server.fail("^/api/", status)
    again = fastsafetensors.resolve(repo[0])
    assert (again.files, again.commit) == (first.files, first.commit)
    assert "refused" in caplog.text and str(status) in caplog.text
    state = fastsafetensors.load(repo[0])
    assert set(state) == set(repo[2]) and all(torch.equal(state[k], v) for k, v in repo[2].items())
    with pytest.raises(HfHubHTTPError) as info:
        fastsafetensors.resolve("org/never-downloaded")
    assert info.value.response.status_code == status


def test_hub_a_revision_it_no_longer_has_is_not_served_from_the_cache(hub_server: Any,
                                                                         tmp_path: Path) -> None:
    # A deleted branch or tag is an answer about the revision, not a refusal: as in
    # huggingface_hub, the cached commit it used to name is not loaded in its place.
    write_single(tmp_path / "src")
    hub_server.add_folder("org/m", tmp_path / "src", tags=("v1.0",))
    fastsafetensors.resolve("org/m", revision="v1.0")
    del hub_server.repos["org/m"].refs["v1.0"]
    with pytest.raises(RevisionNotFoundError):
        fastsafetensors.resolve("org/m", revision="v1.0")


@pytest.mark.parametrize("at", ["second submit", "third submit", "after init"])
def test_a_ctrl_c_as_downloads_start_stops_them(hub_server: Any, slow_repo: int, at: str) -> None:
    # CPython raises a Ctrl-C as a Python function starts: one as the second download was
    # submitted, or as the next function started once they all were (a with block's
    # __enter__), left the ones already started running on to their end, in threads nobody
    # waited for.
    import sys
    from concurrent.futures import ThreadPoolExecutor

    init, submit = hub._Downloads.__init__.__code__, ThreadPoolExecutor.submit.__code__
    nth = {"second submit": 2, "third submit": 3}.get(at)
    seen, made = [0], [False]

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "return" and frame.f_code is init:
            made[0] = True
        elif event == "call" and (frame.f_code is submit if nth else made[0]):
            seen[0] += 1
            if seen[0] == (nth or 1):
                sys.setprofile(None)
                raise KeyboardInterrupt

    stream = hub.stream("org/big", max_downloads=2)
    sys.setprofile(profile)
    try:
        with pytest.raises(KeyboardInterrupt):
            next(stream)
    finally:
        sys.setprofile(None)
    assert not [t for t in threading.enumerate() if t.name.startswith("fastsafetensors-download")]
    blobs = Path(hf_constants.HF_HUB_CACHE) / "models--org--big" / "blobs"
    assert not list(blobs.glob("*.incomplete"))
    assert len(list(hub.stream("org/big"))) == 8   # the next call works
