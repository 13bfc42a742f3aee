"""Which files make a checkpoint, and the rules that make a sharded index safe to follow.

A checkpoint is one ``.safetensors`` file, or shards named by an index
(``model.safetensors.index.json``: ``{"metadata": {...}, "weight_map": {tensor: shard}}``). The
index comes from whoever published the model, so it is treated as hostile input: a shard name
must be a plain file name beside the index, the file must be a regular file that stays inside
the checkpoint's folder (symlinks included), and each shard's header must agree with the index
tensor for tensor. Pure: no network, no torch. :mod:`fastsafetensors.hub` finds the files.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointIndexError, CheckpointNotFoundError, ConfigError, TensorNotFoundError
from .format import (
    MAX_HEADER_SIZE,
    DuplicateKey,
    Header,
    TensorInfo,
    reject_duplicate_keys,
    unusable_path,
)

__all__ = ["Checkpoint", "CheckpointSummary", "WeightFiles", "choose_weights", "parse_index",
           "check_inside", "variant_name"]

#: File stems of weights, in the order they are looked for: transformers, then diffusers.
WEIGHT_STEMS = ("model", "diffusion_pytorch_model")
_DRIVE = re.compile(r"^[A-Za-z]:")
_LAYER = re.compile(r"(?<=\.)\d+(?=\.)")
_SHARD = re.compile(r"-\d{5}-of-\d{5}")
#: a weights stem with a variant: model.fp16.safetensors (a variant's file, not the default)
_VARIANT = re.compile(r"(?:model|diffusion_pytorch_model)\.[^.]+\.safetensors")


def variant_name(name: str, variant: str | None) -> str:
    """transformers' variant rule: the variant goes before the last suffix.

    >>> variant_name("model.safetensors.index.json", "fp16")
    'model.safetensors.index.fp16.json'
    """
    if not variant:
        return name
    head, _, tail = name.rpartition(".")
    return f"{head}.{variant}.{tail}"


@dataclass(frozen=True)
class WeightFiles:
    """The weights file chosen in a folder: a single file or an index."""

    name: str
    is_index: bool
    standard: bool = True   # a name transformers looks for (not the last resort)


def is_index_name(name: str) -> bool:
    """Whether ``name`` is a sharded checkpoint's index: ``<stem>.safetensors.index.json``,
    or ``<stem>.safetensors.index.<variant>.json`` (a ``.json`` file may be weights too)."""
    return re.fullmatch(r".+\.safetensors\.index(\.[^.]+)?\.json", name) is not None


def is_index_file(path: str | os.PathLike[str]) -> bool:
    """Whether the file ``path``, given by name, is an index: named as one (is_index_name), or
    a ``.json`` file that does not start as a safetensors file does (an 8-byte header length
    under 100 MB, so zero in its upper four bytes; JSON text is not). Weights saved under a
    ``.json`` name load as weights, and ``weights.json`` holding a weight map is an index."""
    name = os.path.basename(os.fsdecode(path))
    if is_index_name(name):
        return True
    if not name.endswith(".json"):
        return False
    # O_NONBLOCK: a FIFO opened for reading would wait for a writer for ever.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False   # opened again later, which says what is wrong
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False   # neither (a FIFO, a device): opened again later, and refused
        prefix = os.pread(fd, 8, 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    return len(prefix) < 8 or prefix[4:] != bytes(4)


def choose_weights(names: Collection[str], *, variant: str | None, where: str) -> WeightFiles:
    """Pick the weights among the file ``names`` of one folder, the way transformers and
    diffusers do: ``model.safetensors``, then ``model.safetensors.index.json`` (with the variant
    inserted), then the diffusers stem; then, as a last resort (``WeightFiles.standard``
    False), the only index or only ``.safetensors`` file that is neither a shard
    (``-00001-of-00002``) nor, without ``variant``, a variant's file."""
    for stem in WEIGHT_STEMS:
        single = variant_name(f"{stem}.safetensors", variant)
        if single in names:
            return WeightFiles(single, False)
        index = variant_name(f"{stem}.safetensors.index.json", variant)
        if index in names:
            return WeightFiles(index, True)
    index_suffix = f".safetensors.index.{variant}.json" if variant else ".safetensors.index.json"
    single_suffix = f".{variant}.safetensors" if variant else ".safetensors"
    indexes = sorted(n for n in names if n.endswith(index_suffix))
    singles = sorted(n for n in names if n.endswith(single_suffix) and not _SHARD.search(n)
                     and (variant or not _VARIANT.fullmatch(n)))
    weights = sorted(n for n in names if n.endswith((".safetensors", ".json")))
    if len(indexes) == 1:
        return WeightFiles(indexes[0], True, standard=False)
    if not indexes and len(singles) == 1:
        return WeightFiles(singles[0], False, standard=False)
    if indexes or singles:
        hint = (f"several candidates ({', '.join(indexes or singles)}) and no index to say which "
                f"belong together; pass the file itself")
    else:
        wanted = variant_name("model.safetensors", variant)
        hint = (f"no {wanted} or {variant_name('model.safetensors.index.json', variant)} here"
                f" (found: {', '.join(weights[:8]) or 'no weights'}); pass subfolder= "
                f"(--subfolder on the command line) for a diffusers pipeline (unet, "
                f"text_encoder, ...) or the right variant= (--variant)")
    raise CheckpointNotFoundError(where, hint)


def check_shard_name(name: Any, index: str, tensor: str) -> str:
    """A shard name from a weight map must be a plain ``.safetensors`` file name beside the index:
    no path, no drive, no way out of the folder."""
    def bad(why: str) -> CheckpointIndexError:
        return CheckpointIndexError(index, f"the weight map names shard {name!r}, {why}; shard "
                                           f"names must be plain .safetensors file names beside "
                                           f"the index", tensor, shard=str(name))
    if not isinstance(name, str) or not name:
        raise bad("which is not a file name")
    if "\0" in name:
        raise bad("which contains a NUL byte")
    if _DRIVE.match(name):
        raise bad("which starts with a drive letter")
    if name.startswith(("/", "\\")):
        raise bad("an absolute path")
    if "\\" in name:
        raise bad("which contains a backslash")
    if ".." in name.split("/") or name == ".":
        raise bad("which climbs out of the folder with '..'")
    if "/" in name:
        raise bad("which is in another folder")
    if not name.endswith(".safetensors"):
        raise bad("which is not a .safetensors file")
    return name


def parse_index(raw: bytes, index: str) -> dict[str, str]:
    """The weight map of an index file's bytes, every shard name checked. A tensor listed twice
    (which JSON would silently keep once) is an error."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=reject_duplicate_keys)
    except DuplicateKey as dup:
        raise CheckpointIndexError(index, "the index names this key twice (a tensor may be "
                                          "listed, and stored, once only)", str(dup)) from None
    except (ValueError, RecursionError) as exc:   # bad UTF-8 or JSON, a 5000-digit number,
        # arrays nested 100,000 deep: all say the file is no index
        reason = str(exc) if isinstance(exc, ValueError) else "nested too deep"
        raise CheckpointIndexError(index, f"is not a valid JSON index ({reason[:200]}); "
                                          f"re-download it") from None
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointIndexError(index, "has no \"weight_map\" object of tensor name -> shard "
                                          "file (not a safetensors index?)")
    seen: set[str] = set()
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or shard not in seen:  # a list is not hashable
            check_shard_name(shard, index, tensor)
            seen.add(shard)
    return weight_map


def read_index(path: str) -> dict[str, str]:
    """Read and check an index file (bounded: a hostile index must not allocate gigabytes)."""
    with open(path, "rb") as f:
        raw = f.read(MAX_HEADER_SIZE + 1)
    if len(raw) > MAX_HEADER_SIZE:
        raise CheckpointIndexError(path, f"is larger than {MAX_HEADER_SIZE} bytes; not an index")
    return parse_index(raw, path)


def check_inside(path: str, roots: tuple[str, ...], *, index: str | None, shard: str,
                 hint: str) -> str:
    """``path`` if it is a regular file whose real location (symlinks followed) is inside one
    of the folders ``roots``; else CheckpointIndexError (escapes, not a file) or
    CheckpointNotFoundError."""
    real = os.path.realpath(path)
    if not any(os.path.commonpath([real, r]) == r for r in map(os.path.realpath, roots)):
        raise CheckpointIndexError(index or path, f"{shard} leads to {real}, outside "
                                                  f"{' and '.join(roots)} "
                                                  f"(a symlink out of the checkpoint folder is "
                                                  f"refused)", shard=shard)
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise CheckpointNotFoundError(path, hint) from None
    except (OSError, ValueError) as exc:
        unusable = unusable_path(path, exc)
        if unusable is None:
            raise
        raise unusable from None
    if not stat.S_ISREG(mode):
        raise CheckpointIndexError(index or path, f"{shard} is not a regular file (a folder, "
                                                  f"FIFO or device)", shard=shard)
    return os.path.abspath(path)


def check_shard(index: str, shard: str, header: Header, listed: Sequence[str],
                owner: dict[str, str]) -> None:
    """The shard's header must hold exactly the tensors the index puts in it."""
    for tensor in header.tensors:
        mapped = owner.get(tensor)
        if mapped is None:
            raise CheckpointIndexError(index, f"{shard} holds it but the index does not list it "
                                              f"(stale index? regenerate it)", tensor, shard)
        if mapped != shard:
            raise CheckpointIndexError(index, f"it is in both {mapped} (per the index) and "
                                              f"{shard}; a tensor must be in one shard only",
                                       tensor, shard)
    for tensor in listed:
        if tensor not in header.tensors:
            raise CheckpointIndexError(index, f"the index puts it in {shard} but that shard's "
                                              f"header does not list it (stale index or wrong "
                                              f"shard; re-download both)", tensor, shard)


def requested(tensors: Iterable[str] | None) -> list[str] | None:
    """``tensors=`` as a list without repeats (None: all)."""
    if tensors is None:
        return None
    if isinstance(tensors, str):
        raise ConfigError("tensors", tensors, [f"a list of tensor names, such as [{tensors!r}]"])
    if not isinstance(tensors, Iterable):   # tensors=3: list() would say only "not iterable"
        raise ConfigError("tensors", tensors, ["a list of tensor names (strings)"])
    names = list(tensors)
    try:
        return list(dict.fromkeys(names))
    except TypeError:   # a list in the list: no name at all (a name not found is a KeyError)
        raise ConfigError("tensors", tensors, ["a list of tensor names (strings)"]) from None


def check_requested(names: Sequence[str], available: Collection[str], where: str) -> None:
    for name in names:
        if name not in available:
            raise TensorNotFoundError(name, where, available)


@dataclass
class Checkpoint:
    """A checkpoint resolved to local files: what :func:`fastsafetensors.resolve` returns.

    ``files`` are the shards to load, in order (only those holding a requested tensor);
    ``weight_map`` maps every tensor of those files to its file; ``headers`` holds their
    validated headers; ``commit`` is the Hub commit the files came from (None for local sources).

    >>> ckpt = fastsafetensors.resolve("org/model", tensors=["lm_head.weight"])  # doctest: +SKIP
    >>> ckpt.wanted()                                                    # doctest: +SKIP
    {'/.../model-00002-of-00002.safetensors': ['lm_head.weight']}
    """

    source: str
    commit: str | None
    folder: str
    files: list[str]
    weight_map: dict[str, str]
    headers: dict[str, Header]
    tensors: list[str] | None = None
    index: str | None = None

    def wanted(self) -> dict[str, list[str] | None]:
        """Shard path -> names of the tensors to load from it (None: all of it), in file order."""
        if self.tensors is None:
            return {path: None for path in self.files}
        out: dict[str, list[str] | None] = {path: [] for path in self.files}
        for name in self.tensors:
            out[self.weight_map[name]].append(name)  # type: ignore[union-attr]
        return out

    @property
    def total_bytes(self) -> int:
        """Data bytes of the requested tensors."""
        total = 0
        for path, names in self.wanted().items():
            infos = self.headers[path].tensors
            total += sum(i.nbytes for i in infos.values()) if names is None else sum(
                infos[n].nbytes for n in names)
        return total

    def __repr__(self) -> str:
        at = f"@{self.commit[:12]}" if self.commit else ""
        return (f"Checkpoint({self.source!r}{at}, {len(self.files)} files, "
                f"{len(self.weight_map)} tensors, {self.total_bytes} bytes)")


def _human(n: float, units: Sequence[str]) -> str:
    for unit in units[:-1]:
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == units[0] else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} {units[-1]}"


def human_bytes(n: float) -> str:
    return _human(n, ("B", "kB", "MB", "GB", "TB"))


def human_count(n: float) -> str:
    return _human(n, ("", "K", "M", "B", "T")).rstrip()


@dataclass
class CheckpointSummary:
    """What :func:`fastsafetensors.inspect` returns: every shard's header, no tensor data.

    ``files`` are shard names relative to the checkpoint folder, ``headers`` their headers.
    ``print(summary)`` shows the shards, the dtypes and the tensors (layers folded together).
    """

    source: str
    commit: str | None
    files: list[str]
    headers: dict[str, Header]
    index: str | None = None

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor, in shard then file order."""
        return {n: i for f in self.files for n, i in self.headers[f].tensors.items()}

    @property
    def parameters(self) -> int:
        return sum(i.numel for i in self.tensors.values())

    @property
    def total_bytes(self) -> int:
        """Tensor data bytes (headers excluded)."""
        return sum(h.data_size for h in self.headers.values())

    def dtypes(self) -> dict[str, tuple[int, int, int]]:
        """dtype -> (tensors, parameters, bytes)."""
        out: dict[str, tuple[int, int, int]] = {}
        for info in self.tensors.values():
            count, params, nbytes = out.get(info.dtype, (0, 0, 0))
            out[info.dtype] = (count + 1, params + info.numel, nbytes + info.nbytes)
        return out

    def groups(self) -> list[tuple[str, str, tuple[int, ...], int]]:
        """(name with layer numbers as ``*``, dtype, shape, count), in first-seen order."""
        counts: dict[tuple[str, str, tuple[int, ...]], int] = {}
        for name, info in self.tensors.items():
            key = (_LAYER.sub("*", name), info.dtype, info.shape)
            counts[key] = counts.get(key, 0) + 1
        return [(n, d, s, c) for (n, d, s), c in counts.items()]

    def __str__(self) -> str:
        at = f" @ {self.commit[:12]}" if self.commit else ""
        title = (f"{self.source}{at}: {len(self.files)} file(s), {len(self.tensors)} tensors, "
                 f"{self.parameters:,} parameters ({human_count(self.parameters)}), "
                 f"{human_bytes(self.total_bytes)}")
        lines = [title, ""]
        rows = [("file", "tensors", "parameters", "bytes")]
        for name in self.files:
            infos = self.headers[name].tensors.values()
            rows.append((name, str(len(infos)), human_count(sum(i.numel for i in infos)),
                         human_bytes(self.headers[name].data_size)))
        lines += _table(rows) + [""]
        rows = [("dtype", "tensors", "parameters", "bytes")]
        rows += [(d, str(c), human_count(p), human_bytes(b)) for d, (c, p, b) in
                 self.dtypes().items()]
        lines += _table(rows) + [""]
        rows = [("tensor", "dtype", "shape", "count")]
        rows += [(n, d, str(list(s)), str(c)) for n, d, s, c in self.groups()]
        lines += _table(rows)
        return "\n".join(lines)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                      enumerate(zip(row, widths, strict=True))).rstrip() for row in rows]
