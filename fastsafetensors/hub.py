"""Repo id or path -> :class:`Checkpoint`: the files to load, checked, from a folder or the Hub.

A source is a ``.safetensors`` file, an index ``.json``, a folder (``model.safetensors`` or
``model.safetensors.index.json``, a ``variant`` such as ``model.fp16.safetensors``, a
``subfolder`` such as diffusers' ``unet/``) or a Hub repo id with a branch, tag or commit.

For the Hub everything goes through ``huggingface_hub`` (its cache, token, offline mode and fast
transfer backends): one model-info request (with huggingface_hub's metadata timeout) pins the
revision to a commit and lists the folder, then the index is fetched, then only the shards that
hold the requested tensors. :func:`stream` hands out each shard as soon as it is on disk while
the next ones download (``max_downloads`` at a time), so loading overlaps the download. Offline
(``local_files_only=True`` or ``HF_HUB_OFFLINE=1``) the cached snapshot is read as a local
folder and nothing touches the network; so it is, with a warning, when the Hub cannot be
reached (no connection, no answer in time, a 5xx, a 408 or 429: down or busy).

>>> ckpt = fastsafetensors.resolve("org/model", revision="v1.0")      # doctest: +SKIP
>>> print(fastsafetensors.inspect("org/model"))  # headers only       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .checkpoint import (
    Checkpoint,
    CheckpointSummary,
    WeightFiles,
    check_inside,
    check_requested,
    check_shard,
    choose_weights,
    human_bytes,
    is_index_file,
    read_index,
    requested,
)
from .errors import CheckpointNotFoundError, ConfigError, HeaderError
from .format import REMEDY, Header, header_size_from_prefix, parse_header, read_header

__all__ = ["Checkpoint", "CheckpointSummary", "resolve", "stream", "inspect"]

logger = logging.getLogger(__name__)

#: (file name, progress bar class or None) -> local path of the file, downloading it if need be
Fetch = Callable[[str, Any], str]
_TRUE = {"1", "ON", "YES", "TRUE"}
_COMMIT = re.compile(r"[0-9a-f]{40}")
#: Answers that say the Hub cannot serve now (a request timeout, a rate limit), not that the repo
#: is missing or closed: like a 5xx, huggingface_hub retries them and then serves its cache.
_BUSY = (408, 429)


@dataclass
class _Plan:
    """What to load and how to get each file, before any shard is fetched."""

    source: str
    commit: str | None
    folder: str                            # where the weights are (or will be) on disk
    root: tuple[str, ...] | None           # files must stay inside one (None: the user's file)
    fetch: Fetch
    remote: bool                           # fetch downloads (worth doing in parallel)
    missing: str                           # hint for a file that is not there
    weights: WeightFiles
    tensors: list[str] | None = None
    index: str | None = None               # local path of the index
    weight_map: dict[str, str] | None = None
    shards: list[str] | None = None        # names to load, in order
    wanted: dict[str, list[str] | None] | None = None
    listed: dict[str, list[str]] | None = None
    remote_header: Callable[[str], Header] | None = None

    def path(self, name: str, bar: Any = None) -> str:
        path = self.fetch(name, bar)
        if self.root is None:
            return path
        return check_inside(path, self.root, index=self.index, shard=name, hint=self.missing)

    def check(self, name: str, header: Header) -> None:
        assert self.wanted is not None
        if self.weight_map is None or self.index is None:
            names = self.wanted[name]
            if names:
                check_requested(names, header.tensors, header.path or name)
            return
        assert self.listed is not None
        check_shard(self.index, name, header, self.listed.get(name, []), self.weight_map)

    def follow_index(self, present: Iterable[str] | None) -> None:
        """Read the index (if any) and pick the shards holding the requested tensors.
        ``present``: the folder's complete listing, to refuse missing files before fetching."""
        if self.tensors == []:   # nothing to fetch, not even the index
            self.shards, self.wanted = [], {}
            return
        if not self.weights.is_index:
            self.shards = [self.weights.name]
            self.wanted = {self.weights.name: self.tensors}
            return
        self.index = self.path(self.weights.name)
        self.weight_map = read_index(self.index)
        listed: dict[str, list[str]] = {}
        for tensor, shard in self.weight_map.items():
            listed.setdefault(shard, []).append(tensor)
        if present is not None:
            names = set(present)
            for shard, tensors in listed.items():
                if shard not in names:
                    raise CheckpointNotFoundError(
                        os.path.join(self.folder, shard),
                        f"{self.weights.name} lists it (for {tensors[0]!r}) but {self.source} "
                        f"has no such file")
        self.listed = listed
        if self.tensors is None:
            self.shards = sorted(listed)
            self.wanted = dict.fromkeys(self.shards)
            return
        check_requested(self.tensors, self.weight_map, self.index)
        wanted: dict[str, list[str]] = {}
        for tensor in self.tensors:
            wanted.setdefault(self.weight_map[tensor], []).append(tensor)
        self.shards = sorted(wanted)
        self.wanted = {shard: wanted[shard] for shard in self.shards}


def resolve(repo_or_path: str | os.PathLike[str], *, revision: str | None = None,
            subfolder: str | None = None, variant: str | None = None,
            cache_dir: str | os.PathLike[str] | None = None, token: str | bool | None = None,
            local_files_only: bool | None = None, tensors: Iterable[str] | None = None,
            max_downloads: int = 4, force_download: bool = False) -> Checkpoint:
    """Find, fetch (for the Hub) and check the files of a checkpoint.

    Only the shards holding ``tensors`` (all by default) are fetched. ``local_files_only=None``
    follows ``HF_HUB_OFFLINE``; ``force_download=True`` downloads the files needed again (a
    damaged copy in the cache). Hub errors are huggingface_hub's (``RepositoryNotFoundError``,
    ``RevisionNotFoundError``, ...); a missing file is :class:`CheckpointNotFoundError`, an
    unsafe or inconsistent index :class:`CheckpointIndexError`.

    >>> ckpt = fastsafetensors.resolve("org/model", tensors=["lm_head.weight"])  # doctest: +SKIP
    >>> ckpt.files, ckpt.commit, ckpt.total_bytes                          # doctest: +SKIP
    """
    _check_downloads(max_downloads)
    started = time.perf_counter()
    plan = _plan(repo_or_path, revision=revision, subfolder=subfolder, variant=variant,
                 cache_dir=cache_dir, token=token, local_files_only=local_files_only,
                 tensors=tensors, force_download=force_download)
    paths: dict[str, str] = {}
    headers: dict[str, Header] = {}
    with contextlib.closing(_shards(plan, max_downloads)) as shards:
        for name, path, header in shards:
            paths[name] = path
            headers[path] = header
    assert plan.shards is not None
    files = [paths[name] for name in plan.shards]
    if plan.weight_map is not None:
        weight_map = {t: paths[s] for t, s in plan.weight_map.items() if s in paths}
    else:
        weight_map = dict.fromkeys(headers[files[0]].tensors, files[0]) if files else {}
    ckpt = Checkpoint(plan.source, plan.commit, plan.folder, files, weight_map, headers,
                      plan.tensors, plan.index)
    logger.info("resolved %s%s: %d files, %s to load, in %.2f s", plan.source,
                f"@{plan.commit[:12]}" if plan.commit else "", len(files),
                human_bytes(ckpt.total_bytes), time.perf_counter() - started)
    return ckpt


def stream(repo_or_path: str | os.PathLike[str], *, revision: str | None = None,
           subfolder: str | None = None, variant: str | None = None,
           cache_dir: str | os.PathLike[str] | None = None, token: str | bool | None = None,
           local_files_only: bool | None = None, tensors: Iterable[str] | None = None,
           max_downloads: int = 4, force_download: bool = False
           ) -> Generator[tuple[str, Header, list[str] | None], None, None]:
    """Yield ``(local path, header, tensor names wanted or None)`` for each needed shard as soon
    as it is complete on disk, while later shards keep downloading (``max_downloads`` at a
    time). Local sources yield in order. Closing the generator stops the downloads: queued ones
    never start, running ones stop at their next chunk, and the cache keeps no partial file.

    >>> for path, header, names in fastsafetensors.hub.stream("org/model"):  # doctest: +SKIP
    ...     load_shard(path, names)
    """
    _check_downloads(max_downloads)
    plan = _plan(repo_or_path, revision=revision, subfolder=subfolder, variant=variant,
                 cache_dir=cache_dir, token=token, local_files_only=local_files_only,
                 tensors=tensors, force_download=force_download)
    assert plan.wanted is not None
    with contextlib.closing(_shards(plan, max_downloads)) as shards:
        for name, path, header in shards:
            yield path, header, plan.wanted[name]


def inspect(repo_or_path: str | os.PathLike[str], *, revision: str | None = None,
            subfolder: str | None = None, variant: str | None = None,
            cache_dir: str | os.PathLike[str] | None = None, token: str | bool | None = None,
            local_files_only: bool | None = None) -> CheckpointSummary:
    """Every shard's header, without tensor data: for the Hub, two small HTTP Range reads per
    shard not yet cached (the length, then the header). ``print()`` the result for a table of
    shards, dtypes, shapes and parameter counts.

    >>> print(fastsafetensors.inspect("org/model"))                         # doctest: +SKIP
    """
    plan = _plan(repo_or_path, revision=revision, subfolder=subfolder, variant=variant,
                 cache_dir=cache_dir, token=token, local_files_only=local_files_only,
                 tensors=None, header_only=True)
    assert plan.shards is not None

    def header_of(name: str) -> Header:
        cached = os.path.join(plan.folder, name)
        if plan.remote_header is not None and not os.path.isfile(cached):
            return plan.remote_header(name)
        return _checked(plan, name, plan.path(name))

    workers = max(1, min(8, len(plan.shards)))
    with ThreadPoolExecutor(workers, thread_name_prefix="fastsafetensors-inspect") as pool:
        headers = dict(zip(plan.shards, pool.map(header_of, plan.shards), strict=True))
    for name in plan.shards:
        plan.check(name, headers[name])
    return CheckpointSummary(plan.source, plan.commit, plan.shards, headers, plan.index)


# --- where the files are -------------------------------------------------------------------


def _plan(source: str | os.PathLike[str], *, revision: str | None, subfolder: str | None,
          variant: str | None, cache_dir: str | os.PathLike[str] | None,
          token: str | bool | None, local_files_only: bool | None,
          tensors: Iterable[str] | None, header_only: bool = False,
          force_download: bool = False) -> _Plan:
    if not isinstance(source, (str, os.PathLike)):
        # resolve(None) or inspect(3) failed deep in os.path or on str.startswith.
        raise TypeError(f"expected a file, folder or Hub repo id (a str or os.PathLike); got "
                        f"{type(source).__name__} {source!r:.80}")
    if isinstance(source, str) and not source:
        # os.path reads "" as the current folder: load("") refuses it, resolve("") read it.
        raise CheckpointNotFoundError(source, "the path is empty; name a file, a folder or a "
                                              "Hub repo id")
    names = requested(tensors)
    sub = _subfolder(subfolder)
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        # cache_dir=3 failed in pathlib, with a TypeError that named no argument.
        raise ConfigError("cache_dir", cache_dir, ["None (the Hugging Face cache)",
                                                   "a folder (a str or os.PathLike)"])
    if isinstance(source, os.PathLike) or not _is_repo_id(source):
        # Like transformers, a local path ignores revision= (callers pass revision="main").
        return _local_plan(os.fspath(source), sub, variant, names)
    return _hub_plan(source, revision=revision, subfolder=sub, variant=variant,
                     cache_dir=cache_dir, token=token, offline=_offline(local_files_only),
                     tensors=names, header_only=header_only, force_download=force_download)


def _is_repo_id(source: str) -> bool:
    """A string is a repo id when no such path exists and it has the shape of one (transformers'
    rule), so a typo in a path does not turn into a network request."""
    if os.path.exists(source) or source.startswith(("/", ".", "~", "\\")) or "\\" in source:
        return False
    if source.endswith((".safetensors", ".json")) or source.count("/") > 1 or ":" in source:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def _subfolder(value: str | None) -> str | None:
    if not value:
        return None
    if not isinstance(value, str):   # subfolder=3 failed on value.rstrip, an AttributeError
        raise ConfigError("subfolder", value, ["a relative folder inside the checkpoint, such "
                                               "as 'unet' or 'text_encoder'"])
    value = value.rstrip("/")
    parts = value.split("/")
    if value.startswith("/") or "\\" in value or ":" in value or any(
            p in ("", ".", "..") for p in parts):
        raise ConfigError("subfolder", value, ["a relative folder inside the checkpoint, such "
                                               "as 'unet' or 'text_encoder'"])
    return value


def _offline(local_files_only: bool | None) -> bool:
    if local_files_only:
        return True
    from huggingface_hub import constants

    # HF_HUB_OFFLINE wins over local_files_only=False (transformers' default, often passed
    # explicitly), as it does in huggingface_hub and transformers. huggingface_hub reads it at
    # import; honour it when it is set later too.
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def _cache_roots(repo: str) -> tuple[str, str]:
    """Where the files of a repo's folder in the Hugging Face cache may lead: the folder (its
    snapshots link to ``../../blobs``) and the cache's shared blob store, ``<cache>/blobs``,
    where huggingface_hub 2.x moves each Xet download, the repo's blob becoming a link to it."""
    return repo, os.path.join(os.path.dirname(repo), "blobs")


def _root_of(folder: str) -> tuple[str, ...]:
    """The folders a checkpoint's files must stay in: the folder itself, or for a snapshot in
    the Hugging Face cache, those of :func:`_cache_roots`."""
    head = folder
    while (parent := os.path.dirname(head)) != head:
        repo = os.path.dirname(parent)
        if (os.path.basename(parent) == "snapshots" and os.path.isdir(os.path.join(repo, "blobs"))
                and os.path.basename(repo).startswith(("models--", "datasets--", "spaces--"))):
            return _cache_roots(repo)
        head = parent
    return (folder,)


def _local_plan(path: str, subfolder: str | None, variant: str | None,
                tensors: list[str] | None) -> _Plan:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise CheckpointNotFoundError(path, "check the path; a Hub repo id looks like "
                                            "'org/name'")
    missing = "the checkpoint lists it but it is not there (incomplete copy?)"
    if not os.path.isdir(path):
        if subfolder is not None or variant is not None:
            given = "subfolder" if subfolder is not None else "variant"
            raise ConfigError(given, subfolder if subfolder is not None else variant,
                              [f"None: {given}= applies to folders and repo ids, not to the "
                               f"file {path!r}"])
        folder, name = os.path.split(path)
        is_index = is_index_file(path)

        def fetch_file(name: str, bar: Any = None) -> str:
            return path if name == os.path.basename(path) else os.path.join(folder, name)

        # An index file in the Hugging Face cache has shards that link into ../../blobs.
        root = _root_of(os.path.realpath(folder)) if is_index else None
        plan = _Plan(path, None, folder, root, fetch_file, False, missing,
                     WeightFiles(name, is_index), tensors)
        plan.follow_index(os.listdir(folder) if is_index else None)
        return plan
    folder = os.path.join(path, *subfolder.split("/")) if subfolder else path
    if not os.path.isdir(folder):
        raise CheckpointNotFoundError(folder, f"{path} has no subfolder {subfolder!r}")
    names = os.listdir(folder)
    weights = choose_weights(names, variant=variant, where=folder)

    def fetch(name: str, bar: Any = None) -> str:
        return os.path.join(folder, name)

    # Symlinks followed first: a link to a snapshot in the Hugging Face cache is that snapshot.
    plan = _Plan(path, None, folder, _root_of(os.path.realpath(path)), fetch, False, missing,
                 weights, tensors)
    plan.follow_index(names)
    return plan


def _hub_plan(repo_id: str, *, revision: str | None, subfolder: str | None, variant: str | None,
              cache_dir: str | os.PathLike[str] | None, token: str | bool | None, offline: bool,
              tensors: list[str] | None, header_only: bool, force_download: bool) -> _Plan:
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.file_download import repo_folder_name

    cache = str(Path(cache_dir or constants.HF_HUB_CACHE).expanduser().resolve())
    storage = os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type="model"))
    api = HfApi()
    if offline and force_download:
        # huggingface_hub refuses the pair too: the cached files would be used as they are.
        raise ConfigError("force_download", True, ["False while downloads are off "
                                                   "(local_files_only=True or HF_HUB_OFFLINE=1)"])
    commit, present, why = _ask_hub(api, repo_id, revision, subfolder, storage, offline, token,
                                    keep_errors=force_download)
    where = f"{repo_id}@{commit[:12]}" + (f"/{subfolder}" if subfolder else "")
    parts = subfolder.split("/") if subfolder else []
    folder = os.path.join(storage, "snapshots", commit, *parts)
    offline = present is None
    names: list[str]
    if present is None:
        if not os.path.isdir(folder):
            raise CheckpointNotFoundError(folder, f"{where} is not in the Hugging Face cache and "
                                                  f"{why}; load it once online")
        names = os.listdir(folder)
        missing = f"{where} is in the cache without this file and {why}; load it once online"
    else:
        names = present
        missing = "huggingface_hub returned a path that does not exist (cache changed?)"
    try:
        weights = choose_weights(names, variant=variant, where=where)
    except CheckpointNotFoundError as exc:
        if not offline:
            raise
        # The snapshot holds what was downloaded (often a config alone, from AutoConfig), not
        # the repo: its weights may well be on the Hub.
        raise CheckpointNotFoundError(exc.path, f"{exc.hint}; that is the cached snapshot, "
                                                f"which holds only the files downloaded so far, "
                                                f"and {why}: load it once online") from None
    if offline and not weights.standard:
        # A cached snapshot holds what was downloaded, not the repo: its only weights file may
        # not be the repo's (shards and variant files are never taken, see choose_weights).
        logger.warning("%s: offline, loading %s, the only weights file in the cached snapshot; "
                       "online, the repo's listing would decide", where, weights.name)

    def download(name: str, bar: Any = None) -> str:
        import fastsafetensors

        extra = {} if bar is None else {"tqdm_class": bar}
        return str(hf_hub_download(repo_id, name, subfolder=subfolder, revision=commit,
                                   cache_dir=cache, token=token, library_name="fastsafetensors",
                                   library_version=fastsafetensors.__version__,
                                   force_download=force_download, **extra))

    def cached(name: str, bar: Any = None) -> str:
        return os.path.join(folder, name)

    plan = _Plan(repo_id, commit, folder, _cache_roots(storage), cached if offline else download,
                 not offline, missing, weights, tensors)
    if header_only and not offline:
        path_in_repo = f"{subfolder}/" if subfolder else ""
        plan.remote_header = lambda name: _remote_header(repo_id, path_in_repo + name, commit,
                                                         token)
    plan.follow_index(None if offline else names)
    if offline:
        # The shards needed, all in the cached snapshot, before any is loaded: else a stream
        # hands out part of the checkpoint, then fails (a folder is checked so, above).
        for shard in plan.shards or ():
            if not os.path.isfile(os.path.join(folder, shard)):
                raise CheckpointNotFoundError(os.path.join(folder, shard), missing)
    return plan


def _ask_hub(api: Any, repo_id: str, revision: str | None, subfolder: str | None,
             storage: str, offline: bool, token: str | bool | None, *,
             keep_errors: bool = False) -> tuple[str, list[str] | None, str]:
    """``(commit, file names in the folder, why offline)``: the revision pinned to a commit and
    the folder listed in one request, with huggingface_hub's metadata timeout. Offline, or when
    the Hub cannot answer (no connection, a timeout, a 5xx, a 408 or 429) or refuses (no such
    repo, no access: its error is raised if nothing is cached), the commit comes from the
    cache's ``refs`` and the listing is None; with ``keep_errors`` (force_download=True, which
    the cached files cannot honour) the Hub's error is raised instead. A revision the Hub does
    not have is never served from the cache."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    why = "downloads are off (local_files_only=True or HF_HUB_OFFLINE=1)"
    refused: HfHubHTTPError | None = None   # the Hub's answer, raised if nothing is cached
    if not offline:
        try:
            info = api.model_info(repo_id, revision=revision, token=token,
                                  timeout=constants.HF_HUB_ETAG_TIMEOUT)
            commit = str(info.sha or "")
            if not _COMMIT.fullmatch(commit):
                raise CheckpointNotFoundError(f"{repo_id}@{revision or 'main'}",
                                              f"the Hub's model info gave no commit "
                                              f"({info.sha!r}); pass revision=<commit sha>")
            _remember(storage, revision or constants.DEFAULT_REVISION, commit)
            return commit, _listing(api, info, repo_id, subfolder, commit, token), why
        except HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status is None or keep_errors or isinstance(exc, RevisionNotFoundError):
                raise
            if status >= 500 or status in _BUSY:
                why = f"the Hub could not answer ({exc})"
            else:
                # No such repo, no access (gated, a token expired or missing): as
                # huggingface_hub does, a cached snapshot still serves, and the Hub's own error
                # is raised when none is cached.
                why, refused = f"the Hub refused the request ({exc})", exc
        except _network_errors() as exc:
            if keep_errors:
                raise
            why = f"the Hub could not be reached ({type(exc).__name__}: {exc})"
        logger.warning("%s: %s; using the cached snapshot", repo_id, why)
    if revision is not None and _COMMIT.fullmatch(revision):
        return revision, None, why
    ref = os.path.join(storage, "refs", revision or constants.DEFAULT_REVISION)
    commit = ""
    if ".." not in (revision or "").split("/"):
        with contextlib.suppress(OSError), open(ref, encoding="utf-8") as f:
            commit = f.read().strip()
    if not _COMMIT.fullmatch(commit):
        if refused is not None:
            raise refused
        raise CheckpointNotFoundError(f"{repo_id}@{revision or 'main'}",
                                      f"not in the Hugging Face cache ({ref} is missing or "
                                      f"holds no commit) and {why}")
    return commit, None, why


def _remember(storage: str, revision: str, commit: str) -> None:
    """Write ``refs/<revision>`` as huggingface_hub does, so the revision resolves offline."""
    parts = revision.split("/")
    if revision == commit or any(p in ("", ".", "..") for p in parts):
        return
    ref = os.path.join(storage, "refs", *parts)
    try:
        with contextlib.suppress(FileNotFoundError), open(ref, encoding="utf-8") as f:
            if f.read().strip() == commit:
                return
        os.makedirs(os.path.dirname(ref), exist_ok=True)
        with open(ref, "w", encoding="utf-8") as f:
            f.write(commit)
    except OSError as exc:   # a read-only cache: the revision just will not resolve offline
        logger.warning("%s: cannot record the commit of %r (%s)", storage, revision, exc)


def _listing(api: Any, info: Any, repo_id: str, subfolder: str | None, commit: str,
             token: str | bool | None) -> list[str]:
    """The file names in the folder at ``commit``, from the model info (every file in one
    request, without the tree API's retries of a dead connection)."""
    if info.siblings is None:  # a mirror without it: the tree API
        return _tree_listing(api.endpoint, repo_id, subfolder, commit, token)
    prefix = f"{subfolder}/" if subfolder else ""
    return [s.rfilename[len(prefix):] for s in info.siblings
            if s.rfilename.startswith(prefix) and "/" not in s.rfilename[len(prefix):]]


def _tree_listing(endpoint: str, repo_id: str, subfolder: str | None, commit: str,
                  token: str | bool | None) -> list[str]:
    """The file names in the folder, from the Hub's tree API, page by page.

    huggingface_hub's ``list_repo_tree`` sets no time limit on its requests, so a mirror that
    stalls would hold ``resolve()`` up for good. Each page here is asked for once, with the
    metadata timeout that the model info had. A failure falls back to the cache like any
    other."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    import fastsafetensors

    headers = build_hf_headers(token=token, library_name="fastsafetensors",
                               library_version=fastsafetensors.__version__)
    folder = f"/{quote(subfolder.strip('/'), safe='/')}" if subfolder else ""
    url: str | None = (f"{endpoint}/api/models/{quote(repo_id, safe='/')}/tree/"
                       f"{quote(commit, safe='')}{folder}")
    names = []
    seen = set()
    while url:
        if url in seen:   # a next page already read: the listing would never end
            raise CheckpointNotFoundError(f"{repo_id}@{commit}", f"the Hub's file listing "
                                          f"leads back to a page it sent before ({url}): is "
                                          f"{endpoint} a mirror with broken paging? Pass "
                                          f"local_files_only=True to use the cache")
        seen.add(url)
        response = get_session().get(url, headers=headers,
                                     timeout=constants.HF_HUB_ETAG_TIMEOUT)
        hf_raise_for_status(response)
        names += [entry["path"].rsplit("/", 1)[-1] for entry in response.json()
                  if entry.get("type") == "file"]
        url = response.links.get("next", {}).get("url")
    return names


def _network_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):  # whichever HTTP client this huggingface_hub uses
        if module in sys.modules:
            errors.append(sys.modules[module].TransportError)
    return tuple(errors)


def _check_downloads(max_downloads: int) -> None:
    if type(max_downloads) is not int or max_downloads < 1:
        raise ConfigError("max_downloads", max_downloads, ["a positive integer"])


# --- fetching -------------------------------------------------------------------------------


def _shards(plan: _Plan, max_downloads: int) -> Generator[tuple[str, str, Header], None, None]:
    """``(name, local path, checked header)`` per needed shard: in order for local files; for
    downloads, the shards already cached first, in order, then the others as each completes."""
    assert plan.shards is not None
    if not plan.shards:
        return
    if not plan.remote or len(plan.shards) == 1:
        for name in plan.shards:
            path = plan.path(name)
            yield name, path, _checked(plan, name, path)
        return
    downloads = _Downloads(plan, max_downloads)
    # Not a with block: a Ctrl-C as its __enter__ starts (a Python function, where CPython
    # raises it) skips __exit__, and the downloads ran on.
    try:
        for name, path in downloads:
            yield name, path, _checked(plan, name, path)
    finally:
        downloads.close()


def _checked(plan: _Plan, name: str, path: str) -> Header:
    """The shard's header, checked against the index; a damaged copy in the Hugging Face cache
    (which huggingface_hub keeps once its size matched) says how to get a good one."""
    try:
        header = read_header(path)
    except HeaderError as exc:
        if plan.commit is None or type(exc) is not HeaderError:
            raise
        raise damaged_in_cache(path, exc) from exc
    plan.check(name, header)
    return header


def in_hub_cache(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file of a Hugging Face cache's snapshot
    (``.../models--org--name/snapshots/<commit>/...``)."""
    parts = Path(path).parts
    return any(part == "snapshots" and parts[i - 1].startswith(("models--", "datasets--"))
               for i, part in enumerate(parts) if i)


def damaged_in_cache(path: str | os.PathLike[str], exc: HeaderError) -> HeaderError:
    """``exc`` (a broken header of ``path``, a copy in the Hugging Face cache) saying how to get
    a good copy (huggingface_hub keeps a blob once its size matched, so every later load fails
    the same way)."""
    reason = exc.reason.removesuffix(REMEDY)
    return HeaderError(path, f"{reason}; this copy in the Hugging Face cache "
                             f"({os.path.realpath(path)}) is damaged: load it with "
                             f"force_download=True, or delete it, to download it again", exc.tensor)


class _Cancelled(Exception):
    """Raised inside a download whose stream was closed (never escapes this module)."""


def _stoppable_bar(stop: threading.Event) -> type:
    """huggingface_hub's progress bar, raising at the next chunk once ``stop`` is set: the only
    hook into a running ``hf_hub_download``, which then deletes its temporary file."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class StoppableBar(hf_tqdm):
        def update(self, n: float | None = 1) -> bool | None:
            if stop.is_set():
                raise _Cancelled("the stream was closed")
            return super().update(n)

    return StoppableBar


#: How long closing the downloads waits for a running one to stop (seconds).
CLOSE_WAIT = 2.0


class _Downloads:
    """Shards downloading ``workers`` at a time, handed out as each completes."""

    def __init__(self, plan: _Plan, workers: int):
        assert plan.shards is not None
        self._plan = plan
        self._stop = threading.Event()
        self._bar = _stoppable_bar(self._stop)
        self._futures: dict[Future[str], str] = {}
        self._pool = ThreadPoolExecutor(min(workers, len(plan.shards)),
                                        thread_name_prefix="fastsafetensors-download")
        try:
            # Cached shards are submitted first and handed out in order, so a fully cached
            # repo loads in the same order every time (their fetch is a cache hit).
            cached = [n for n in plan.shards if os.path.isfile(os.path.join(plan.folder, n))]
            self._cached = len(cached)
            for name in cached + [n for n in plan.shards if n not in cached]:
                self._futures[self._pool.submit(self._fetch, name)] = name
        except BaseException:
            # A Ctrl-C between two submits: nobody holds this object to close it, and the
            # downloads already started ran on to their end.
            self.close()
            raise

    def _fetch(self, name: str) -> str:
        if self._stop.is_set():
            raise _Cancelled(name)
        started = time.perf_counter()
        path = self._plan.path(name, self._bar)
        logger.debug("%s: %s ready in %.2f s", self._plan.source, name,
                     time.perf_counter() - started)
        return path

    def __iter__(self) -> Iterator[tuple[str, str]]:
        futures = list(self._futures)
        for future in futures[:self._cached]:
            yield self._futures[future], future.result()
        for future in as_completed(futures[self._cached:]):
            yield self._futures[future], future.result()

    def close(self) -> None:
        """Stop queued and running downloads, and wait for the workers: a running download
        stops at its next chunk. One that cannot see the stop (waiting for another process's
        lock on its file, or for a stalled connection) would hold up closing the stream, a
        Ctrl-C or the first error for as long as it waits: after ``CLOSE_WAIT`` seconds it is
        left to end in the background. huggingface_hub writes a download into an
        ``.incomplete`` file and renames it only when whole, so no partial file is ever taken
        as done."""
        self._stop.set()
        for future in self._futures:
            future.cancel()
        running = [future for future in self._futures if not future.done()]
        _, late = wait(running, timeout=CLOSE_WAIT) if running else ((), ())
        if late:
            self._pool.shutdown(wait=False)
            logger.info("%s: %d download(s) still running after the stream closed: left to end "
                        "in the background (%s)", self._plan.source, len(late),
                        ", ".join(sorted(self._futures[f] for f in late)))
        else:
            self._pool.shutdown(wait=True)   # the workers are done: their threads end now

    def __enter__(self) -> _Downloads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remote_header(repo_id: str, filename: str, commit: str, token: str | bool | None
                   ) -> Header:
    """A shard's header through two HTTP Range reads (8 bytes, then the header): no tensor
    data crosses the network."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    import fastsafetensors

    url = hf_hub_url(repo_id, filename, revision=commit)
    headers = build_hf_headers(token=token, library_name="fastsafetensors",
                               library_version=fastsafetensors.__version__)
    prefix, size = _get_range(url, headers, 0, 8)
    length = header_size_from_prefix(prefix, file_size=size, path=filename)
    raw = _get_range(url, headers, 8, length)[0] if length else b""
    return parse_header(raw, file_size=size, path=filename)


#: Tries of a header's range read when the connection fails (huggingface_hub resumes a
#: download so; one dropped connection failed inspect() where load() went on).
RANGE_TRIES = 3


def _get_range(url: str, headers: dict[str, str], start: int, length: int) -> tuple[bytes, int]:
    """``length`` bytes from ``start`` and the file's size, through huggingface_hub's session
    (which follows the Hub's redirect to its CDN), tried again after a connection error."""
    for attempt in range(RANGE_TRIES - 1):
        try:
            return _get_range_once(url, headers, start, length)
        except _network_errors() as exc:
            logger.info("%s: %s; trying again", url, exc)
            time.sleep(0.5 * 2 ** attempt)
    return _get_range_once(url, headers, start, length)   # the last try's error goes out


def _get_range_once(url: str, headers: dict[str, str], start: int, length: int
                    ) -> tuple[bytes, int]:
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session, hf_raise_for_status

    ranged = {**headers, "Range": f"bytes={start}-{start + length - 1}"}
    with get_session().stream("GET", url, headers=ranged,
                              timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
        if response.status_code >= 400:
            response.read()
            hf_raise_for_status(response)
        content_range = response.headers.get("Content-Range", "")
        if response.status_code == 206 and "/" in content_range:
            size, skip = int(content_range.rsplit("/", 1)[1]), 0
        else:  # the server ignored Range: read the start of the whole file, then hang up
            size, skip = int(response.headers.get("Content-Length", 0)), start
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) >= skip + length:
                break
    return bytes(body[skip:skip + length]), size
