"""Whole-checkpoint verbs: ``load`` (a dict) and ``iter_tensors`` (a stream of ``(name, tensor)``).

A source is a ``.safetensors`` file, a list of files, a folder, a Hub repo id or a resolved
:class:`~fastsafetensors.hub.Checkpoint`. The target picks the engine: host memory goes through
the threaded CPU loader (one buffer per file, or per group of nearby tensors for a subset;
tensors are views), a CUDA device through the
streaming engine (pinned staging, per-worker copy streams) or GPUDirect Storage.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import Any

from . import config
from .checkpoint import is_index_file, requested
from .errors import CheckpointIndexError, CheckpointNotFoundError, ConfigError, TensorNotFoundError
from .format import read_header
from .frameworks import get_framework, resolve_device
from .gcpause import paused

__all__ = ["load", "iter_tensors"]

PathLike = str | os.PathLike[str]


#: Keywords that only a Hub repo id uses; a local source accepts and ignores them (as
#: transformers ignores revision= for a local folder).
HUB_OPTIONS = frozenset({"revision", "subfolder", "variant", "cache_dir", "token",
                         "local_files_only", "max_downloads", "force_download"})


def _local_files(paths: Sequence[PathLike], tensors: Sequence[str] | None
                 ) -> list[tuple[str, Any, list[str] | None]]:
    """The files' headers (read once, handed on) and the names wanted from each. A tensor in two
    of the files is an error, as in an index: which copy to return would be a guess."""
    if tensors is None and len(paths) == 1:
        return [(os.fspath(paths[0]), None, None)]
    wanted = None if tensors is None else set(tensors)
    owner: dict[str, str] = {}
    seen: set[str] = set()
    out: list[tuple[str, Any, list[str] | None]] = []
    for p in paths:
        path = os.fspath(p)
        if path in seen:
            raise ConfigError("source", path, ["a list naming each file once"])
        seen.add(path)
        header = read_header(path)
        for name in header.tensors:
            other = owner.setdefault(name, path)
            if other != path:
                raise CheckpointIndexError(path, f"also stored in {os.path.basename(other)}; a "
                                                 f"tensor must live in one file only", name)
        if wanted is None:
            out.append((path, header, None))
        elif names := [n for n in header.tensors if n in wanted]:
            out.append((path, header, names))
    missing = sorted((wanted or set()) - owner.keys(), key=str)
    if missing:
        where = os.fspath(paths[0]) if len(paths) == 1 else None
        raise TensorNotFoundError(missing[0], where, list(owner))
    return out


def sources_of(source: Any, *, tensors: Sequence[str] | None = None, **hub_options: Any
               ) -> Iterable[tuple[str, Any, list[str] | None]]:
    """``(path, header or None, names or None)`` per file to load, lazily where the source is
    downloaded (so loading can start while later shards still download)."""
    if hasattr(source, "wanted") and hasattr(source, "headers"):  # a resolved Checkpoint
        return [(path, source.headers.get(path), names) for path, names in source.wanted().items()]
    if not isinstance(source, (str, os.PathLike, list, tuple)):
        raise TypeError(f"expected a file, folder or Hub repo id (a str or os.PathLike), a list "
                        f"of files or a resolved Checkpoint; got {type(source).__name__} "
                        f"{source!r:.80}")
    tensors = requested(tensors)   # a string is one name, not a list of letters
    if isinstance(source, str) and not source:
        # os.path reads "" as the current folder: a load of whatever lies there.
        raise CheckpointNotFoundError(source, "the path is empty; name a file, a folder or a "
                                              "Hub repo id")
    # An index file goes the way of a folder (hub.stream), which reads its shards.
    local = isinstance(source, (list, tuple)) or (
        isinstance(source, (str, os.PathLike)) and os.path.isfile(source)
        and not is_index_file(source))
    if local:
        unknown = sorted(set(hub_options) - HUB_OPTIONS)
        if unknown:   # for a folder or repo id, hub.stream() refuses them the same way
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
        for given in ("subfolder", "variant"):
            # A file where a folder was meant: refused, as resolve() refuses it (not ignored).
            if hub_options.get(given) is not None:
                files = source if isinstance(source, (list, tuple)) else [source]
                what = f"the file {', '.join(repr(os.fspath(f)) for f in files[:3])}" + (
                    ", ..." if len(files) > 3 else "")
                raise ConfigError(given, hub_options[given],
                                  [f"None: {given}= applies to folders and repo ids, not to "
                                   f"{what}"])
        return _local_files(source if isinstance(source, (list, tuple)) else [source], tensors)
    from . import hub

    assert not isinstance(source, (list, tuple))   # lists are local
    return hub.stream(source, tensors=list(tensors) if tensors is not None else None,
                      **hub_options)


def iter_tensors(source: Any, *, device: str = "cpu", dtype: Any = None, framework: str = "pt",
                 tensors: Sequence[str] | None = None, threads: int | None = None,
                 io: str | None = None, backend: str | None = None,
                 staging_bytes: int | None = None, max_device_bytes: int | None = None,
                 **hub_options: Any) -> Generator[tuple[str, Any], None, None]:
    """Yield ``(name, tensor)`` as soon as each tensor is complete, in file order (for a Hub
    repo id: shards already cached first, in order, then the others as their downloads end).

    On a CUDA device each tensor is safe to use on the caller's current stream when yielded.
    ``max_device_bytes`` bounds the device memory held by tensors read ahead, the tensor last
    yielded included until the next one is asked for; a consumer that keeps that one while it
    asks holds one tensor more (staging is separate, ``staging_bytes`` in total). To the CPU,
    files are read one whole file at a time and ``max_device_bytes`` is checked but bounds
    nothing more.
    ``hub_options`` (revision, subfolder, variant, cache_dir, token, local_files_only,
    max_downloads, force_download) apply to Hub repo ids. The options in force where it is
    called (``configure`` blocks) hold for the whole stream, wherever it is consumed.

    >>> for name, t in fastsafetensors.iter_tensors(  # doctest: +SKIP
    ...         "model.safetensors", device="cuda:0"):
    ...     model.load_param(name, t)
    """
    return _checked(False, "iter_tensors", source, device=device, dtype=dtype,
                    framework=framework, tensors=tensors, threads=threads, io=io, backend=backend,
                    staging_bytes=staging_bytes, max_device_bytes=max_device_bytes,
                    **hub_options)


def _checked(keeps_all: bool, caller: str, source: Any, /, *, device: str = "cpu",
             dtype: Any = None,
             framework: str = "pt", tensors: Sequence[str] | None = None,
             threads: int | None = None, io: str | None = None, backend: str | None = None,
             staging_bytes: int | None = None, max_device_bytes: int | None = None,
             **hub_options: Any) -> Generator[tuple[str, Any], None, None]:
    """iter_tensors, and for a caller that keeps every tensor (load()) with ``keeps_all``;
    ``caller`` names the public function in errors."""
    # Checked when called, not at the first next(): a missing GPU or a typo shows where it is.
    unknown = sorted(set(hub_options) - HUB_OPTIONS)
    if unknown:
        raise TypeError(_unexpected(unknown[0], caller))
    fw = get_framework(framework)
    target = resolve_device(device, framework)
    for option, value in (("threads", threads), ("io", io), ("backend", backend),
                          ("staging_bytes", staging_bytes)):   # on the CPU too
        config.get(option, value)
    _budget(max_device_bytes)
    stream = _iter_tensors(source, fw, target, dtype, tensors, hub_options, threads=threads,
                           io=io, backend=backend, staging_bytes=staging_bytes,
                           max_device_bytes=max_device_bytes, keeps_all=keeps_all)
    # load() consumes its stream at once, where it was made.
    return stream if keeps_all else _in_context(contextvars.copy_context(), stream)


def _in_context(context: contextvars.Context, stream: Generator[tuple[str, Any], None, None]
                ) -> Generator[tuple[str, Any], None, None]:
    """``stream`` run in ``context``, the one iter_tensors was called in: a generator reads
    the options (configure blocks) of whoever calls next(), and a stream made in a block and
    consumed after it, or on another thread, would read its first files with them and the rest
    without."""
    try:
        while True:
            try:
                item = context.run(next, stream)
            except StopIteration:
                return
            yield item
    finally:
        context.run(stream.close)


def _unexpected(name: str, caller: str) -> str:
    """The message of a keyword neither load() nor iter_tensors() takes, as Python words it,
    with what they take (iter_tensors' keywords, which load() passes on)."""
    import difflib
    import inspect

    options = [p.name for p in inspect.signature(iter_tensors).parameters.values()
               if p.kind is inspect.Parameter.KEYWORD_ONLY]
    close = difflib.get_close_matches(name, [*options, *sorted(HUB_OPTIONS)], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"{caller}() got an unexpected keyword argument {name!r}{hint}; it takes "
            f"{', '.join(options)}, and for a Hub repo id {', '.join(sorted(HUB_OPTIONS))}")


def _iter_tensors(source: Any, fw: Any, target: str, dtype: Any,
                  tensors: Sequence[str] | None, hub_options: dict[str, Any], *,
                  threads: int | None, io: str | None, backend: str | None,
                  staging_bytes: int | None, max_device_bytes: int | None,
                  keeps_all: bool = False) -> Generator[tuple[str, Any], None, None]:
    files = sources_of(source, tensors=tensors, **hub_options)
    if target == "cpu":
        stream = _host_stream(files, fw, threads=threads, io=io)
    else:
        stream = device_stream(files, target, threads=threads, io=io, backend=backend,
                               staging_bytes=staging_bytes, max_device_bytes=max_device_bytes,
                               keeps_all=keeps_all)
    try:
        for name, tensor in stream:
            yield name, tensor if dtype is None else fw.convert(tensor, device=None, dtype=dtype)
            del tensor   # not kept (nor its uncast original) while the next one is read
    finally:
        # Closed here, not left to its collection, which can come later (on the H200 machine,
        # Python 3.12, 9 engine tasks still ran after close() returned): a consumer that stops
        # early gets the engine's threads joined and its copies finished when close() returns.
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def load(source: Any, *, device: str = "cpu", dtype: Any = None, **options: Any
         ) -> dict[str, Any]:
    """Every tensor of a checkpoint (file, files, folder or Hub repo id): ``{name: tensor}``.
    ``dtype`` casts every tensor, integer and bool ones included, as ``.to(dtype)`` would; a
    tensor name found in two of the files given is an error.

    >>> state = fastsafetensors.load("org/model", device="cuda:0")   # doctest: +SKIP
    """
    # gcpause.py: full collections would cost a third of a 20,000-tensor load. Not for a Hub
    # repo id, whose load may wait for downloads, too long to pause the collector.
    hub = isinstance(source, (str, os.PathLike)) and not os.path.exists(source)
    # Each tensor is kept, unless cast: then its original is dropped once cast (and the engine
    # must not allocate all the originals ahead of their reads).
    with contextlib.nullcontext() if hub else paused():
        return dict(_checked(dtype is None, "load", source, device=device, dtype=dtype,
                             **options))


def _host_stream(files: Iterable[tuple[str, Any, list[str] | None]], fw: Any, *,
                 threads: int | None, io: str | None) -> Iterator[tuple[str, Any]]:
    from .loader.cpu import close_job, load_host, open_job

    for path, header, names in files:
        job = open_job(path, names, header)
        try:
            (tensors,) = load_host([job], fw, threads=threads, io=io)
        finally:
            close_job(job)
        yield from tensors.items()


def device_stream(files: Iterable[tuple[str, Any, list[str] | None]], device: str, *,
                  threads: int | None = None, io: str | None = None,
                  backend: str | None = None, staging_bytes: int | None = None,
                  max_device_bytes: int | None = None, keeps_all: bool = False,
                  gate: Any = None) -> Iterator[tuple[str, Any]]:
    """``(path, header or None, names or None)`` sources to a resolved CUDA ``device``, with
    the engine (or GDS); options not given come from the configuration. ``keeps_all``: the
    caller keeps every tensor until the load ends (StreamOptions.keeps_all); ``gate``: a
    stream.AheadGate (GDS has nothing to hold back)."""
    from .loader import cuda
    from .loader.gds import select_backend, stream_gds
    from .loader.stream import StreamOptions, stream_tensors

    calls = config.get("cuda_calls")
    blocking = config.get("event_wait") == "block"
    huge_pages = config.get("huge_pages") != "off"
    # Every option checked before the backend is chosen: GDS uses few of them, and a typo
    # must not pass silently there.
    options = StreamOptions(threads=config.device_threads(threads),
                            staging_bytes=config.get("staging_bytes", staging_bytes),
                            io=config.get("io", io), max_device_bytes=_budget(max_device_bytes),
                            mapped_readers=config.get("mapped_readers"),
                            small_tensor_groups=config.get("small_tensor_groups") == "on",
                            switch_interval=config.get("switch_interval_us") / 1e6,
                            chunk_bytes=config.get("chunk_bytes"), keeps_all=keeps_all)
    gds = select_backend(backend, device=device) == "gds"
    if not config.is_set("cuda_calls") and (gds or not cuda.ring_usable()):
        calls = "torch"   # the default where the ring's C threads do not run (GDS reads alone)
    sink = cuda.TorchCudaSink(device, blocking=blocking, huge_pages=huge_pages,
                              reserve=config.get("reserve_memory") == "on",
                              driver=calls == "driver", native=calls == "native",
                              ring=calls == "ring")
    if gds:
        if gate is not None:
            gate.not_needed()
        return stream_gds(files, sink, max_device_bytes=max_device_bytes)
    if getattr(sink, "ring", None) is not None and not options.mapped_readers:
        # C readers never wait for the GIL: more of them by default than of Python readers,
        # and less staging (config.RING_STAGING).
        options = dataclasses.replace(options, threads=config.device_threads(threads, ring=True),
                                      staging_bytes=config.device_staging(staging_bytes,
                                                                          ring=True))
    return stream_tensors(files, sink, options, gate)


def _budget(max_device_bytes: int | None) -> int | None:
    if max_device_bytes is not None and (type(max_device_bytes) is not int
                                         or max_device_bytes <= 0):
        raise ConfigError("max_device_bytes", max_device_bytes,
                          ["None (no bound)", "a positive number of bytes"])
    return max_device_bytes
