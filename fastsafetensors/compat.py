"""The upstream-compatible API used by vLLM and SGLang (``--load-format fastsafetensors``).

vLLM and SGLang call the API of the original ``fastsafetensors`` project (foundation-model-stack):
a loader that is given ``{rank: [files]}``, reads each rank's own files, and hands back a buffer
from which every rank takes tensors in the same order::

    loader = SafeTensorsFileLoader(pg, device, nogds=True)
    loader.add_filenames({0: ["a.safetensors"], 1: ["b.safetensors"]})
    fb = loader.copy_files_to_device()          # rank r reads only the files given to rank r
    for name in list(fb.key_to_rank_lidx):      # same order on every rank
        tensor = fb.get_tensor(name)            # broadcast from the rank that read it
    fb.close()
    loader.close()

Here that API runs on this package's loaders: the threaded CPU loader for host memory, the
streaming engine (or GDS) for CUDA. Tensors own their memory, so unlike upstream they stay valid
after ``fb.close()``. With a ``torch.distributed`` group of more than one rank, the tensors move
with collectives (broadcast, scatter, send/recv) on their raw bytes, so every dtype works with
gloo as well as NCCL. See docs/compat.md for what is supported, ignored and missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import operator
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from .errors import (
    ClosedFileError,
    ConfigError,
    HeaderError,
    PeerLoadError,
    RankMismatchError,
    TensorNotFoundError,
)
from .format import DTYPES, Header, TensorInfo, read_header
from .frameworks import FRAMEWORKS, get_framework, resolve_device
from .gcpause import paused

__all__ = ["ProcessGroupLike", "SingleGroup", "SafeTensorsFileLoader", "FilesBufferOnDevice"]

logger = logging.getLogger(__name__)

_GIB = 1 << 30
_T = TypeVar("_T")


class ProcessGroupLike(Protocol):
    """What a process group must offer: its size and this process's rank in it."""

    def rank(self) -> int: ...

    def size(self) -> int: ...


class SingleGroup:
    """The process group of a single process (rank 0 of 1), for loads without torch.distributed.

    >>> SingleGroup().rank(), SingleGroup().size()
    (0, 1)
    """

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 1

    def __repr__(self) -> str:
        return "SingleGroup()"


class _Group:
    """A resolved ``pg``: this rank, the world size and, when there are several ranks, the
    ``torch.distributed`` group the collectives run on."""

    def __init__(self, pg: Any):
        self.pg: Any = None
        self.rank, self.size = 0, 1
        if pg is None or isinstance(pg, SingleGroup):
            return
        rank, size = int(pg.rank()), int(pg.size())
        if size == 1:
            return
        import torch.distributed as dist

        if not isinstance(pg, dist.ProcessGroup):
            raise ConfigError("pg", type(pg).__name__,
                              ["None", "SingleGroup()", "a torch.distributed.ProcessGroup"])
        self.pg, self.rank, self.size = pg, rank, size

    def _global(self, group_rank: int) -> int:
        # Collectives name peers by global rank; on a subgroup that is not a prefix of the
        # world, group rank r is a different process than global rank r.
        import torch.distributed as dist

        return int(dist.get_global_rank(self.pg, group_rank))

    def broadcast(self, tensor: Any, owner: int) -> None:
        import torch.distributed as dist

        dist.broadcast(_raw(tensor), src=self._global(owner), group=self.pg)

    def scatter(self, out: Any, parts: list[Any] | None, owner: int) -> None:
        import torch.distributed as dist

        dist.scatter(_raw(out), None if parts is None else [_raw(p) for p in parts],
                     src=self._global(owner), group=self.pg)

    def send(self, tensor: Any, dst: int) -> None:
        import torch.distributed as dist

        dist.send(_raw(tensor), dst=self._global(dst), group=self.pg)

    def recv(self, tensor: Any, src: int) -> None:
        import torch.distributed as dist

        dist.recv(_raw(tensor), src=self._global(src), group=self.pg)

    def smallest(self, value: int | None, device: str) -> int | None:
        """The smallest of the ranks' ``value`` (None: no bound), known to all (one
        all_reduce, which every rank must reach)."""
        if self.pg is None:
            return value
        import torch
        import torch.distributed as dist

        no_bound = 2 ** 63 - 1
        mine = torch.tensor([no_bound if value is None else value], dtype=torch.int64,
                            device=device)
        dist.all_reduce(mine, op=dist.ReduceOp.MIN, group=self.pg)
        agreed = int(mine.item())
        return None if agreed == no_bound else agreed

    def exchange(self, failed: bool, digest: int, device: str
                 ) -> tuple[list[int], dict[int, int]]:
        """Every rank says whether it failed and the digest of what it did (the headers it read,
        or the buffer call it makes); all learn which ranks failed, and the digest of each rank
        whose digest differs from this rank's (one all_reduce, which every rank must reach, on
        the device: NCCL moves device memory only). The load checks and the buffer calls send
        this same tensor, so ranks a step apart (one taking a tensor, another already checking
        its next load) pair up and raise: tensors of different sizes made gloo abort them."""
        if self.pg is None:
            return [], {}
        import torch
        import torch.distributed as dist

        # One slot per rank, summed. Built on the host and moved in one copy: on CUDA an
        # indexed write is a copy each.
        mine = [0] * (2 * self.size)
        mine[self.rank], mine[self.size + self.rank] = int(failed), digest
        flags = torch.tensor(mine, dtype=torch.int64, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=self.pg)
        values = flags.tolist()
        failed_ranks = [rank for rank in range(self.size) if values[rank]]
        other = {rank: values[self.size + rank] for rank in range(self.size)
                 if rank not in failed_ranks and values[self.size + rank] != digest}
        return failed_ranks, other


def layout_digest(tensors: Iterable[tuple[TensorInfo, int]]) -> int:
    """62 bits that differ when the tensors' names, dtypes, shapes, offsets or owning ranks do
    (whatever the files' paths on each node)."""
    layout = sorted((i.name, i.dtype, tuple(i.shape), tuple(i.data_offsets), owner)
                    for i, owner in tensors)
    raw = hashlib.blake2b(repr(layout).encode(), digest_size=8).digest()
    return (int.from_bytes(raw, "little") >> 2) & ~1   # even: a load step (call_digest: odd)


def check_peers(group: _Group, device: str, files_by_rank: Mapping[int, Sequence[str]], *,
                failed: bool = False, fb: FilesBufferOnDevice | None = None,
                digest: int = 0) -> None:
    """After each rank read its files: every rank says whether it failed (one all_reduce, which
    every rank must reach). A rank that failed raises its own error after this; the others
    raise PeerLoadError here (closing ``fb``) instead of waiting in their next collective for
    tensors that never come, until the group's timeout. Where none failed but their headers
    differ (a shard whose copy differs between nodes), every rank raises HeaderError: a rank
    would size what it receives from its own copy, and get part of a tensor, or wait."""
    ranks, other = group.exchange(failed, digest, device)
    if failed or not (ranks or other):
        return
    if fb is not None:
        fb.close()
    if ranks:
        raise PeerLoadError(ranks,
                            [path for rank in ranks for path in files_by_rank.get(rank, ())])
    ahead = sorted(rank for rank, theirs in other.items() if theirs & 1)
    if ahead:   # they are taking tensors from a buffer: not a header that differs
        raise RankMismatchError(group.rank, "a load step (add_filenames, copy_files_to_device "
                                "or a ParallelLoader batch)", ahead)
    files = [path for paths in files_by_rank.values() for path in paths]
    raise HeaderError(files[0] if files else None,
                      f"the ranks read different headers for the same files "
                      f"({', '.join(os.path.basename(f) for f in dict.fromkeys(files))}): a "
                      f"shard differs between nodes. Give every node the same copy of the "
                      f"checkpoint")


def call_digest(call: tuple[Any, ...]) -> int:
    """62 bits (positive, so that ranks' digests sum without overflow) that differ when the
    buffer calls do; odd, so that a rank checking a load step can tell it from a layout."""
    raw = hashlib.blake2b(repr(call).encode(), digest_size=8).digest()
    return (int.from_bytes(raw, "little") >> 2) | 1


def _raw(tensor: Any) -> Any:
    """A contiguous tensor's bytes as a flat uint8 view: collectives then move any dtype (gloo
    has no float8, bool or float4 reductions, and a byte copy needs none)."""
    import torch

    return tensor.reshape(-1).view(torch.uint8)


def checked(group: _Group, device: str, files_by_rank: Mapping[int, Sequence[str]],
            read: Callable[[], _T],
            layout: Callable[[_T], Iterable[tuple[TensorInfo, int]]] | None = None) -> _T:
    """``read()``, then check_peers: every rank stops if any rank's read failed, or if the
    tensors (with their owning ranks) ``layout`` gives from the result differ between ranks."""
    try:
        result = read()
        digest = 0 if layout is None or group.pg is None else layout_digest(layout(result))
    except Exception:
        # read may be a prefetch future's result(): the future holds the exception, whose
        # traceback holds this frame. Left in place, that cycle keeps the loader and its
        # process group alive until the interpreter exits (and gloo aborts there).
        del read
        check_peers(group, device, files_by_rank, failed=True)
        raise   # this rank's own error, once the others know
    check_peers(group, device, files_by_rank,
                fb=result if isinstance(result, FilesBufferOnDevice) else None, digest=digest)
    return result


def _as_bytes(tensor: Any) -> Any:
    """A tensor of a one-byte dtype as uint8 (same shape and bytes), any other as it is: torch
    has no cat kernel for float4, and copy kernels for the 8-bit floats differ by device."""
    import torch

    return tensor.view(torch.uint8) if tensor.element_size() == 1 else tensor


def _device_name(device: Any) -> Any:
    """``"cuda:0"``, ``torch.device("cuda:0")``, an int (``cuda:N``) or upstream's ``Device``
    (``as_str()``)."""
    if isinstance(device, int) and not isinstance(device, bool):
        return device   # resolve_device reads it as cuda:N
    as_str = getattr(device, "as_str", None)
    return str(as_str() if callable(as_str) else device)


def _torch_dtype(dtype: Any) -> Any:
    """None, a torch dtype, a file dtype name ("BF16"), a torch name ("bfloat16") or upstream's
    ``DType`` enum (whose ``AUTO`` means: keep the file's dtype)."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(dtype, "value", dtype)
    if value == "AUTO":
        return None
    if isinstance(value, str):
        if value in DTYPES:
            from .frameworks.torch import torch_dtype

            return torch_dtype(value)
        found = getattr(torch, value, None)
        if isinstance(found, torch.dtype):
            return found
    raise ConfigError("dtype", dtype, ["None", "a torch.dtype", *DTYPES])


def _empty(shape: Sequence[int], info: TensorInfo, device: str) -> Any:
    import torch

    from .frameworks.torch import torch_dtype

    return torch.empty(tuple(shape), dtype=torch_dtype(info.dtype, info.name), device=device)


def _native_shape(info: TensorInfo) -> tuple[int, ...]:
    from .frameworks.torch import torch_shape

    return torch_shape(info)


def file_list(paths: Any, what: str) -> list[str]:
    """``paths`` as a list of path strings; a lone path (a string) is refused, not read as a
    list of one-letter file names."""
    if isinstance(paths, (str, bytes, os.PathLike)) or not isinstance(paths, Iterable):
        raise TypeError(f"{what} must be a list of file paths, got {type(paths).__name__} "
                        f"{paths!r:.80}; wrap a single path in a list: [path]")
    return [os.fspath(p) for p in paths]


def _paths_by_rank(filenames: Any) -> dict[int, list[str]]:
    if not isinstance(filenames, Mapping):
        raise TypeError(f"add_filenames takes {{rank: [file paths]}}, got "
                        f"{type(filenames).__name__}; for one process: {{0: paths}}")
    by_rank: dict[int, list[str]] = {}
    for rank, paths in filenames.items():
        try:   # numpy ints too
            number = -1 if isinstance(rank, bool) else operator.index(rank)
        except TypeError:
            number = -1
        if number < 0:
            raise ConfigError("rank", rank, ["a rank of the process group (an int from 0)"])
        by_rank[number] = file_list(paths, f"add_filenames()[{rank!r}]")
    return by_rank


class SafeTensorsFileLoader:
    """Upstream's loader: register files per rank, then read this rank's files in one go.

    ``pg`` is None, :class:`SingleGroup` or a ``torch.distributed.ProcessGroup``. ``device`` is a
    string, a ``torch.device`` or upstream's ``Device``. ``max_threads`` sets the reader threads;
    left out (None), this package's default applies (upstream's is 16; to a GPU, 12 C readers
    through the ring, which loaded faster on an H200).
    ``nogds=True`` forces plain positioned reads; ``nogds=False`` uses GPUDirect Storage where it
    works and falls back to plain reads with one warning (upstream raises instead).
    ``bbuf_size_kb``, ``set_numa``, ``disable_cache``, ``debug_log`` and any other upstream-only
    keyword (``**kwargs``) are accepted and ignored: staging is sized by
    ``FASTSAFETENSORS_STAGING_BYTES`` (or a ``configure(staging_bytes=...)`` block), and logs go
    to the ``fastsafetensors`` logger.
    ``framework`` must name PyTorch ("pytorch", "pt" or "torch"); paddle is not supported.

    >>> loader = SafeTensorsFileLoader(SingleGroup(), "cpu", nogds=True)   # doctest: +SKIP
    >>> loader.add_filenames({0: ["model.safetensors"]})   # doctest: +SKIP
    >>> fb = loader.copy_files_to_device()   # doctest: +SKIP
    >>> fb.get_tensor("lm_head.weight")   # doctest: +SKIP
    """

    def __init__(self, pg: ProcessGroupLike | Any, device: Any = "cpu",
                 bbuf_size_kb: int = 16 * 1024, max_threads: int | None = None, nogds: bool = False,
                 set_numa: bool = True, disable_cache: bool = True, debug_log: bool = False,
                 framework: str = "pytorch", **kwargs: Any):
        if FRAMEWORKS.get(framework) != "pt":
            raise ConfigError("framework", framework, ["pytorch", "pt", "torch"])
        get_framework("pt")   # without torch: how to install it, now rather than mid-load
        self.pg: Any = SingleGroup() if pg is None else pg
        self._group = _Group(pg)
        # ParallelLoader reads batches on a thread of its own: "cuda" must mean the caller's GPU.
        self.device = resolve_device(_device_name(device), "pt", pin_index=True)
        if max_threads is not None:
            # Checked now: at copy_files_to_device it failed as "threads=-1", an option the
            # caller never passed, after every rank had registered its files.
            from . import config

            try:
                config.get("threads", max_threads)
            except ConfigError as exc:
                raise ConfigError("max_threads", max_threads, ["None", *exc.valid]) from None
        self.max_threads = max_threads
        self.nogds = nogds
        if kwargs:
            logger.debug("SafeTensorsFileLoader: ignoring upstream-only options %s", sorted(kwargs))
        self.meta: dict[str, tuple[Header, int]] = {}
        self.frames: dict[str, TensorInfo] = {}
        self._owner: dict[str, str] = {}
        self._closed = False

    # -- registration ---------------------------------------------------------------------
    def add_filenames(self, filenames: Mapping[int, Sequence[str | os.PathLike[str]]]) -> None:
        """Register ``{rank: [files]}``: rank r will read those files. Every rank reads the
        headers of all files (to know shapes and owners), and only headers; with several
        ranks, one all_reduce then checks that every rank could (as copy_files_to_device does:
        a shard missing on one node must not leave the others waiting)."""
        by_rank = _paths_by_rank(filenames)   # once: a generator of paths reads only once
        every = [path for paths in by_rank.values() for path in paths]
        headers = {rank: every for rank in range(self._group.size)}
        checked(self._group, self.device, headers, lambda: self._add(by_rank),
                lambda _: ((info, rank) for rank, paths in by_rank.items() for path in paths
                           for info in self.meta[path][0].tensors.values()))

    def _add(self, filenames: Mapping[int, Sequence[str | os.PathLike[str]]]) -> None:
        """add_filenames without the check (ParallelLoader's prefetch thread runs no
        collective; it checks on the caller's thread)."""
        self._check_open()
        # Registered all at once, after every header was read and checked: a bad file leaves
        # the loader as it was, not holding the files before it.
        owner, frames, meta = dict(self._owner), dict(self.frames), dict(self.meta)
        for rank, paths in _paths_by_rank(filenames).items():
            if not 0 <= rank < self._group.size:
                raise ConfigError("rank", rank, [str(r) for r in range(self._group.size)])
            for path in paths:
                header = read_header(path)
                for name, info in header.tensors.items():
                    other = owner.get(name)
                    if other is not None and other != path:
                        raise HeaderError(path, f"is also in {other}; each tensor name must be "
                                          f"in one file only (pass each shard once)", name)
                    owner[name] = path
                    frames[name] = info
                meta[path] = (header, rank)
        self._owner, self.frames, self.meta = owner, frames, meta

    def get_keys(self) -> list[str]:
        return list(self.frames)

    def get_shape(self, tensor_name: str) -> list[int]:
        try:
            return list(self.frames[tensor_name].shape)
        except KeyError:
            raise TensorNotFoundError(tensor_name, None, self.frames) from None

    # -- reading --------------------------------------------------------------------------
    def copy_files_to_device(self, dtype: Any = None, use_buf_register: bool = True,
                             max_copy_block_size: int = 16 * _GIB, allow_inflight: bool = False,
                             borrowed_tensors: bool = False) -> FilesBufferOnDevice:
        """Read this rank's files onto the device, then check with one all_reduce that every
        rank did: where one failed, it raises its own error and every other rank
        :class:`~fastsafetensors.PeerLoadError` (instead of waiting in ``get_tensor``).

        ``dtype`` casts every tensor as upstream does (None or ``DType.AUTO``: keep the file's
        dtype). ``use_buf_register`` and ``max_copy_block_size`` are accepted and ignored: our
        engine bounds its pinned staging itself. So are upstream's ``allow_inflight`` and
        ``borrowed_tensors``: tensors here are complete when this returns and own their memory,
        which is what either asks for at the least. As upstream, ``borrowed_tensors=True`` is
        refused under several ranks."""
        if borrowed_tensors and self._group.size > 1:
            # Refused before any collective, and every rank passes the same arguments: all
            # ranks raise, none waits.
            raise ConfigError("borrowed_tensors", borrowed_tensors,
                              ["False under several ranks (a borrowed tensor is not broadcast;"
                               " upstream refuses it too)"])
        return checked(self._group, self.device, self._files_by_rank(),
                       lambda: self._copy(dtype), FilesBufferOnDevice.layout)

    def _copy(self, dtype: Any = None) -> FilesBufferOnDevice:
        """copy_files_to_device without the check that every rank read its files (ParallelLoader
        reads batches on a thread where no collective may run, and checks on the caller's)."""
        self._check_open()
        target = _torch_dtype(dtype)
        files = sorted(((path, header.tensors, rank) for path, (header, rank) in self.meta.items()),
                       key=lambda f: (f[2], f[0]))
        own = [path for path, _, rank in files if rank == self._group.rank]
        return FilesBufferOnDevice(files, self._read(own), self._group, self.device, pg=self.pg,
                                   dtype=target)

    def _files_by_rank(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for path, (_, rank) in self.meta.items():
            out.setdefault(rank, []).append(path)
        return out

    def _read(self, paths: list[str], names: list[str] | None = None) -> dict[str, Any]:
        """The tensors of ``paths`` (only ``names``, when given) onto this loader's device."""
        if not paths:
            return {}
        with paused():   # gcpause.py: a whole result, many objects that live on
            return self._read_all(paths, names)

    def _read_all(self, paths: list[str], names: list[str] | None) -> dict[str, Any]:
        if self.device != "cpu":
            from .loading import _checked

            # Every tensor kept (StreamOptions.keeps_all).
            return dict(_checked(True, "copy_files_to_device", paths, device=self.device,
                                 tensors=names, threads=self.max_threads,
                                 backend="posix" if self.nogds else None))
        from .frameworks import get_framework
        from .loader.cpu import close_job, load_host, open_job

        jobs = []
        try:
            for path in paths:
                jobs.append(open_job(path, names))
            out: dict[str, Any] = {}
            for part in load_host(jobs, get_framework("pt"), threads=self.max_threads):
                out.update(part)
            return out
        finally:
            for job in jobs:
                close_job(job)

    # -- lifetime -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the registered files, to register another set."""
        self.meta, self.frames, self._owner = {}, {}, {}

    def close(self) -> None:
        """Idempotent. Buffers already returned stay usable."""
        self.reset()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedFileError("SafeTensorsFileLoader")

    def __enter__(self) -> SafeTensorsFileLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FilesBufferOnDevice:
    """The tensors of one ``copy_files_to_device()``, handed out by name.

    With several ranks every rank must call these methods in the same order (they run
    collectives). ``get_tensor`` gives every rank the whole tensor; ``get_sharded(name, dim)``
    gives rank r its part of ``dim`` cut in ``ceil(n / world)`` blocks (``dim=-1``: the whole
    tensor); ``push_tensor`` sends one tensor to one rank. ``device``/``dtype`` arguments move and
    cast the result. An unknown name raises :class:`~fastsafetensors.TensorNotFoundError`.
    """

    def __init__(self, files: Sequence[tuple[str, Mapping[str, TensorInfo], int]],
                 tensors: dict[str, Any],
                 group: _Group, device: str, *, pg: Any = None, dtype: Any = None):
        self.pg: Any = SingleGroup() if pg is None else pg
        # Cast when a tensor is handed out, after any collective: ranks exchange the file's
        # bytes, which every rank can size from the headers alone.
        self._dtype = dtype
        self._group = group
        self._device = device
        self._tensors = tensors
        self._infos: dict[str, tuple[TensorInfo, str]] = {}
        self.key_to_rank_lidx: dict[str, tuple[int, int]] = {}
        count: dict[int, int] = {}
        for path, infos, rank in files:   # a file, or a part of one (ParallelLoader)
            lidx = count.get(rank, 0)
            count[rank] = lidx + 1
            for name, info in infos.items():
                self.key_to_rank_lidx[name] = (rank, lidx)
                self._infos[name] = (info, path)
        self._label = files[0][0] if files else "FilesBufferOnDevice"
        self._closed = False

    def layout(self) -> list[tuple[TensorInfo, int]]:
        """Every tensor here, every rank's, with the rank that reads it."""
        return [(info, self.key_to_rank_lidx[name][0])
                for name, (info, _) in self._infos.items()]

    def keys(self) -> list[str]:
        """Tensor names in the order every rank must ask for them."""
        return list(self.key_to_rank_lidx)

    def get_filename(self, tensor_name: str) -> str:
        """The file holding ``tensor_name``, or "" (as upstream) when no file has it."""
        found = self._infos.get(tensor_name)
        return "" if found is None else found[1]

    def get_shape(self, tensor_name: str) -> list[int]:
        return list(self._info(tensor_name)[0].shape)

    def _info(self, name: str) -> tuple[TensorInfo, int]:
        found = self._infos.get(name)
        if found is None:
            raise TensorNotFoundError(str(name), None, self._infos)
        if self._closed:
            raise ClosedFileError(self._label)
        return found[0], self.key_to_rank_lidx[name][0]

    def _agree(self, call: str, check: Callable[[], tuple[_T, tuple[Any, ...]]]) -> _T:
        """``check()`` validates this rank's call (the name, ``dim``, ``dst_rank``) and returns
        what the call needs and the call in a normal form. Under several ranks, one all_reduce
        then tells every rank whether each rank could make the call and made the same one: the
        collectives that follow pair up only then. Without it, a rank that asked for another
        tensor of the same owner and size got that tensor's bytes silently; another owner or
        dim waited until the group's timeout, or gloo aborted the process on a size mismatch.
        Now a rank whose check failed raises its own error, and every other rank
        RankMismatchError."""
        g = self._group
        try:
            value, key = check()
        except Exception:
            if g.size > 1:
                # The others wait for this rank's word. A group already destroyed (a buffer
                # used after the load) must not hide this rank's own error.
                with contextlib.suppress(Exception):
                    g.exchange(True, 0, self._device)
            raise
        if g.size > 1:
            failed, other = g.exchange(False, call_digest(key), self._device)
            if failed or other:
                raise RankMismatchError(g.rank, call, sorted(other), failed)
        return value

    def _finish(self, tensor: Any, device: Any, dtype: Any) -> Any:
        target = None if device is None else resolve_device(_device_name(device), "pt")
        cast = _torch_dtype(dtype)
        cast = self._dtype if cast is None else cast
        if target is None and cast is None:
            return tensor
        return tensor.to(device=target, dtype=cast)

    # -- whole tensors --------------------------------------------------------------------
    def get_tensor(self, tensor_name: str, device: Any = None, dtype: Any = None) -> Any:
        """The whole tensor on every rank (broadcast from the rank that read it)."""
        self._agree(f"get_tensor({tensor_name!r})", lambda: self._whole_call(tensor_name))
        return self._finish(self._whole(tensor_name), device, dtype)

    def _whole_call(self, tensor_name: str) -> tuple[None, tuple[str, str]]:
        # get_tensor(name) and get_sharded(name, -1): the same collective, the same call.
        return None, ("whole", self._info(tensor_name)[0].name)

    def _whole(self, tensor_name: str) -> Any:
        """get_tensor without the check that every rank asks for it (ParallelLoader, which
        orders the calls itself)."""
        info, owner = self._info(tensor_name)
        g = self._group
        if g.size == 1 or g.rank == owner:
            tensor = self._tensors[tensor_name]
        else:
            tensor = _empty(_native_shape(info), info, self._device)
        if g.size > 1 and info.nbytes:
            g.broadcast(tensor, owner)
        return tensor

    def push_tensor(self, tensor_name: str, dst_rank: int, device: Any = None,
                    dtype: Any = None) -> Any | None:
        """Send the tensor to ``dst_rank`` only; there it is returned, elsewhere None."""
        g = self._group

        def check() -> tuple[tuple[TensorInfo, int, int], tuple[Any, ...]]:
            info, owner = self._info(tensor_name)
            try:   # numpy ints too
                dst = None if isinstance(dst_rank, bool) else operator.index(dst_rank)
            except TypeError:
                dst = None
            if dst is None or not 0 <= dst < g.size:
                # One rank returned the tensor for any dst_rank; several sent it to a rank
                # that does not exist (torch's error on the owner, None everywhere else).
                raise ConfigError("dst_rank", dst_rank,
                                  [f"a rank of the process group (0 to {g.size - 1})"])
            return (info, owner, dst), ("push", info.name, dst)

        info, owner, dst_rank = self._agree(f"push_tensor({tensor_name!r}, {dst_rank!r})", check)
        if g.size == 1:
            return self._finish(self._tensors[tensor_name], device, dtype)
        if g.rank not in (owner, dst_rank):
            return None
        if g.rank == owner == dst_rank:
            return self._finish(self._tensors[tensor_name].clone(), device, dtype)
        if g.rank == owner:
            if info.nbytes:
                g.send(self._tensors[tensor_name], dst_rank)
            return None
        tensor = _empty(_native_shape(info), info, self._device)
        if info.nbytes:
            g.recv(tensor, owner)
        return self._finish(tensor, device, dtype)

    # -- shards ---------------------------------------------------------------------------
    def get_sharded(self, tensor_name: str, dim: int, device: Any = None,
                    dtype: Any = None) -> Any:
        """This rank's block of ``dim`` (``dim=-1``: the whole tensor, like get_tensor)."""
        if dim == -1:
            self._agree(f"get_sharded({tensor_name!r}, -1)", lambda: self._whole_call(tensor_name))
            return self._finish(self._whole(tensor_name), device, dtype)
        axis = self._agree(f"get_sharded({tensor_name!r}, {dim!r})",
                           lambda: self._shard_call(tensor_name, dim))
        return self._finish(self._shard(tensor_name, axis), device, dtype)

    def _shard_call(self, name: str, dim: Any) -> tuple[int, tuple[str, str, int]]:
        axis = self._axis(name, dim)
        return axis, ("shard", name, axis)

    def _axis(self, name: str, dim: Any) -> int:
        """``dim`` of tensor ``name`` counted from 0 (a negative ``dim`` counts from the end)."""
        shape = _native_shape(self._info(name)[0])
        valid = range(-len(shape), len(shape))
        try:   # numpy ints too; dim="1" failed on "<", dim=1.0 as a tuple index (TypeErrors)
            number = None if isinstance(dim, bool) else operator.index(dim)
        except TypeError:
            number = None
        if number is None or number not in valid:
            raise ConfigError("dim", dim, [str(d) for d in valid])
        return number + len(shape) if number < 0 else number

    def _shard(self, name: str, axis: int) -> Any:
        info, owner = self._info(name)
        g = self._group
        shape = _native_shape(info)
        block = math.ceil(shape[axis] / g.size)
        spans = [(min(r * block, shape[axis]), min((r + 1) * block, shape[axis]))
                 for r in range(g.size)]
        parts = None
        if g.rank == owner:
            whole = self._tensors[name]
            parts = [_as_bytes(whole).narrow(axis, lo, hi - lo).contiguous().view(whole.dtype)
                     for lo, hi in spans]
            if g.size == 1:
                return parts[0]
        lo, hi = spans[g.rank]
        mine = _empty((*shape[:axis], hi - lo, *shape[axis + 1:]), info, self._device)
        if not info.nbytes:
            return mine
        if len({hi - lo for lo, hi in spans}) == 1:
            g.scatter(mine, parts, owner)
            return mine
        # Uneven blocks (the last rank gets fewer rows): scatter needs equal sizes, so the
        # owner sends each block on its own.
        if parts is not None:
            for rank, part in enumerate(parts):
                if rank != owner and part.numel():
                    g.send(part, rank)
            own = parts[owner]
            # A block of dim 0 is a view of the whole tensor: kept, it would keep all of it.
            return own.clone() if own.untyped_storage().nbytes() > own.nbytes else own
        if mine.numel():
            g.recv(mine, owner)
        return mine

    def get_multi_cols(self, tensor_names: Sequence[str], dim: int, device: Any = None,
                       dtype: Any = None) -> Any:
        """This rank's blocks of several tensors, concatenated along ``dim``; grouped by file
        (ordered by owner rank and file) as upstream does."""
        import torch

        def check() -> tuple[list[tuple[str, int]], tuple[Any, ...]]:
            # A string was read letter by letter as names; an empty list failed in torch.cat.
            names = [] if isinstance(tensor_names, str) else list(tensor_names)
            if not names:
                raise ConfigError("tensor_names", tensor_names,
                                  ["a non-empty list of tensor names, such as ['q_proj.weight']"])
            groups: dict[tuple[int, int], list[tuple[str, int]]] = {}
            others: dict[tuple[int, ...], str] = {}   # each shape without dim: a name of it
            for name in names:
                axis = self._axis(name, dim)
                groups.setdefault(self.key_to_rank_lidx[name], []).append((name, axis))
                shape = _native_shape(self._info(name)[0])
                others.setdefault((len(shape), *shape[:axis], *shape[axis + 1:]), name)
            if len(others) > 1:
                # Checked before any block moves: torch.cat raised a bare RuntimeError on
                # every rank after the collectives.
                shapes = ", ".join(f"{name}: {tuple(self.get_shape(name))}"
                                   for name in others.values())
                raise ConfigError("tensor_names", names,
                                  [f"tensors whose shapes differ only along dim {dim} "
                                   f"({shapes})"])
            # Upstream's order: by owning rank and file, then the order given. The order
            # decides which block lands where: the ranks must agree on it too.
            ordered = [part for key in sorted(groups) for part in groups[key]]
            return ordered, ("multi", tuple(ordered))

        names = list(tensor_names) if isinstance(tensor_names, (list, tuple)) else tensor_names
        ordered = self._agree(f"get_multi_cols({names!r:.200}, {dim!r})", check)
        names = [name for name, _ in ordered]
        parts = [self._shard(name, axis) for name, axis in ordered]
        if len({p.dtype for p in parts}) == 1:
            # As bytes: torch.cat has no kernel for some dtypes (float4)
            joined = torch.cat([_as_bytes(p) for p in parts], dim=dim).view(parts[0].dtype)
        else:
            try:   # torch's type promotion, as upstream's torch.cat gives
                joined = torch.cat(parts, dim=dim)
            except (RuntimeError, TypeError) as exc:
                raise ConfigError("tensor_names", names,
                                  [f"tensors whose dtypes torch.cat can combine ({exc})"]
                                  ) from None
        return self._finish(joined, device, dtype)

    def as_dict(self, tensor_shard_dim: Mapping[str, int]) -> dict[str, Any]:
        """``{name: get_sharded(name, dim)}`` for each ``name: dim`` given."""
        if not isinstance(tensor_shard_dim, Mapping):   # a list failed on .items()
            raise TypeError(f"as_dict takes {{tensor name: dim}}, got "
                            f"{type(tensor_shard_dim).__name__} {tensor_shard_dim!r:.80}; "
                            f"for whole tensors: {{name: -1}}")
        return {name: self.get_sharded(name, dim) for name, dim in tensor_shard_dim.items()}

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Drop this buffer's references to the tensors; idempotent. Tensors already returned
        own their memory and stay valid (upstream's become invalid)."""
        self._tensors = {}
        self._closed = True

    def __enter__(self) -> FilesBufferOnDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())
