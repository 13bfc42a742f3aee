"""Upstream's ``ParallelLoader``, as recent vLLM imports it (``fastsafetensors.parallel_loader``).

With one rank (``pg`` None, a ``SingleGroup`` or a group of one) or ``all_local=True`` (every rank
reads every file itself), the files stream through :func:`fastsafetensors.iter_tensors`: each
tensor is yielded as soon as it is on the device, and ``device_memory_budget`` bounds what the
engine holds. With several ranks, files are taken in batches of one file per rank (or, when the
budget holds no whole file, one part of a file per rank): rank r reads file r of each batch,
then every rank yields every tensor of the batch (broadcast from its reader). A background
thread reads the next batch while the current one is yielded; it only reads local files, so
every collective runs on the caller's thread, in the same order on every rank.
"""

from __future__ import annotations

import contextvars
import logging
import math
import operator
import os
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

from .compat import FilesBufferOnDevice, SafeTensorsFileLoader, SingleGroup, checked, file_list
from .config import configure
from .errors import BudgetInfeasibleError, ConfigError
from .format import TensorInfo, read_header
from .loader.stream import device_bytes

__all__ = ["ParallelLoader"]

logger = logging.getLogger(__name__)

_MIB = 1 << 20


def _bytes_option(option: str, value: Any) -> int | None:
    """A budget as an int (numpy ints and 0-d tensors, as a MIN all_reduce returns, too; a
    float, as upstream takes one, rounded down)."""
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        number = int(value) if isinstance(value, float) and math.isfinite(value) \
            else operator.index(value)
    except TypeError:
        number = -1
    if number < 0:   # 0 is what vLLM passes for a checkpoint of empty tensors (2 x largest)
        raise ConfigError(option, value, ["None (no bound)", "a number of bytes"])
    return number


class _Files:
    """Files and the names wanted of each (None: all), read as given, for iter_tensors."""

    def __init__(self, wanted: dict[str, list[str] | None]):
        self._wanted = wanted
        self.headers: dict[str, Any] = {}   # none read yet: each is read as its file opens

    def wanted(self) -> dict[str, list[str] | None]:
        return self._wanted


class ParallelLoader:
    """Iterate ``(name, tensor)`` over ``hf_weights_files``, pipelined, on one or many ranks.

    ``queue_size`` is how far reading runs ahead: -1 reads a batch only after the previous one
    was yielded (one batch in memory), 0 reads one batch ahead (two in memory), n > 0 reads n
    ahead; with one rank, where tensors stream one by one, the same number of files' bytes.
    ``max_concurrent_producers`` must be 1, as upstream. ``use_tqdm_on_load``
    shows a progress bar on rank 0 when tqdm is installed. The loader options (``device``,
    ``max_threads``, ``nogds``, ...) are :class:`~fastsafetensors.SafeTensorsFileLoader`'s,
    with the same accepted-and-ignored ones.

    Upstream's fit-planner options, as vLLM passes them:

    * ``all_local=True``: every rank reads every file itself (no broadcast).
    * ``tensor_filter(name) -> bool``: read and yield only those tensors (one rank or
      ``all_local`` only, as upstream).
    * ``device_memory_budget`` (bytes): the load's device footprint, the tensors the consumer
      keeps included, stays within it; checked from the headers when the loader is built, which
      raises :class:`~fastsafetensors.BudgetInfeasibleError` when it cannot.
      ``accumulate_resident=True`` (the default) means the consumer keeps every yielded tensor;
      False, that it copies each one into memory of its own before asking for the next.
    * ``max_batch_bytes``: with one rank, at most this many bytes of tensors are read ahead of
      the consumer; with several it is ignored: whole files are read, or, when the budget holds
      no whole file, parts of files cut to fit the budget.

    >>> loader = ParallelLoader(None, ["model.safetensors"], device="cpu")   # doctest: +SKIP
    >>> for name, tensor in loader.iterate_weights():   # doctest: +SKIP
    ...     model.load_param(name, tensor)
    >>> loader.close()   # doctest: +SKIP
    """

    def __init__(self, pg: Any, hf_weights_files: Sequence[str], max_concurrent_producers: int = 1,
                 queue_size: int = 0, use_tqdm_on_load: bool = True, device: Any = "cpu",
                 bbuf_size_kb: int = 16 * 1024, max_threads: int | None = None, nogds: bool = False,
                 set_numa: bool = True, debug_log: bool = False, framework: str = "pytorch",
                 *, all_local: bool = False, tensor_filter: Callable[[str], bool] | None = None,
                 device_memory_budget: int | None = None, max_batch_bytes: int | None = None,
                 accumulate_resident: bool = True, **kwargs: Any):
        if max_concurrent_producers != 1:
            raise ConfigError("max_concurrent_producers", max_concurrent_producers, ["1"])
        try:   # queue_size="2" failed on "<" while planning; 1.5 made a fractional read-ahead
            ahead = None if isinstance(queue_size, bool) else operator.index(queue_size)
        except TypeError:
            ahead = None
        if ahead is None:
            raise ConfigError("queue_size", queue_size, ["-1 (no reading ahead)", "0",
                                                         "n (batches read ahead)"])
        queue_size = ahead
        device_memory_budget = _bytes_option("device_memory_budget", device_memory_budget)
        max_batch_bytes = _bytes_option("max_batch_bytes", max_batch_bytes)
        self.pg: Any = SingleGroup() if pg is None else pg
        # all_local: each rank a group of its own, so nothing is broadcast.
        group_pg = SingleGroup() if all_local else pg
        self._options: dict[str, Any] = dict(
            device=device, bbuf_size_kb=bbuf_size_kb, max_threads=max_threads, nogds=nogds,
            set_numa=set_numa, debug_log=debug_log, framework=framework, **kwargs)
        # Built now so that a bad device, framework or group fails here, not mid-iteration.
        self.loader = SafeTensorsFileLoader(group_pg, **self._options)
        # Batches load on a thread of their own, where a bare "cuda" would mean cuda:0.
        self._options["device"] = self.loader.device
        self._group_pg = group_pg
        self._local = self.loader._group.size == 1
        if tensor_filter is not None and not self._local:
            raise ConfigError("tensor_filter", repr(tensor_filter),   # a lambda does not pickle
                              ["None when several ranks share the files (get_tensor broadcasts "
                               "what one rank read); pass all_local=True to filter per rank"])
        files = file_list(hf_weights_files, "hf_weights_files")
        size = self.loader._group.size
        self.weight_files_batches = [files[i:i + size] for i in range(0, len(files), size)]
        self.queue_size = queue_size
        self.use_tqdm_on_load = use_tqdm_on_load
        self._tensor_filter = tensor_filter
        if not self._local:
            # Every rank must plan the same batches, or their collectives pair up wrongly and
            # wait until the group's timeout. Budgets come from each GPU's free memory, so they
            # differ: all plan with the smallest (a rank without one reads the headers too).
            agreed = self.loader._group.smallest(device_memory_budget, self.loader.device)
            if agreed != device_memory_budget:
                logger.info("ParallelLoader: device_memory_budget=%s on this rank, %s on another:"
                            " planning with %s", device_memory_budget, agreed, agreed)
            device_memory_budget = agreed
        self._budget = device_memory_budget
        self._accumulate = accumulate_resident
        self._streams: weakref.WeakSet[Generator[tuple[str, Any], None, None]] = weakref.WeakSet()
        self._kept: list[tuple[str, list[TensorInfo]]] | None = None
        if self._local or device_memory_budget is not None:
            # Headers only: what to read, how much of it, and where each file ends.
            def read() -> list[tuple[str, list[TensorInfo]]]:
                return [(path, [i for i in read_header(path).tensors.values()
                                if tensor_filter is None or tensor_filter(i.name)])
                        for path in files]

            # Under several ranks every rank reads every header here (for the budget): a shard
            # missing on one node must stop every rank, not leave the others in a collective.
            self._kept = read() if self._local else checked(
                self.loader._group, self.loader.device, dict.fromkeys(range(size), files), read,
                lambda kept: ((info, -1) for _, infos in kept for info in infos))
        self._read_ahead: int | None = None
        self._part_bytes: int | None = None   # several ranks: files read in parts of this size
        if self._local:
            assert self._kept is not None
            # As many files ahead as queue_size asks for under several ranks (the pipeline
            # holds whole files there), unless max_batch_bytes or the budget says less.
            per_file = self._largest_file()
            files_ahead = 1 if queue_size < 0 else max(1, queue_size) + 1
            self._read_ahead = max(files_ahead * per_file, 1)
            if max_batch_bytes is not None:
                self._read_ahead = max(min(self._read_ahead, max_batch_bytes), 1)
        if device_memory_budget is not None:
            # Checked for a CPU target too (host memory then), where files are read one at a
            # time whatever the budget.
            self._fit(device_memory_budget, accumulate_resident)

    def _largest_file(self) -> int:
        """Device bytes of the kept tensors of the largest file."""
        assert self._kept is not None
        return max((sum(device_bytes(i.nbytes) for i in infos) for _, infos in self._kept),
                   default=0)

    def _fit(self, budget: int, accumulate_resident: bool) -> None:
        """Check the budget against the headers; set how far reading may run ahead."""
        assert self._kept is not None
        sizes = [device_bytes(info.nbytes) for _, infos in self._kept for info in infos]
        kept, largest = sum(sizes), max(sizes, default=0)
        # Kept by the consumer: every yielded tensor, or, while it asks for the next one, the
        # last one (still bound to its loop variable). Under several ranks the one being
        # handed over is allocated outside the files read (a broadcast's receiving tensor).
        held = kept if accumulate_resident else largest if self._local else 2 * largest
        what = ("every tensor it yields (accumulate_resident=True)" if accumulate_resident
                else "the tensor the consumer holds while it asks for the next "
                     "(accumulate_resident=False)" if self._local
                else "the tensors being handed over (accumulate_resident=False)")
        if self._local:
            if accumulate_resident:
                # What is read ahead is kept too, so the kept bytes bound everything held.
                if budget < kept:
                    raise self._infeasible(budget, kept, f"{_mib(kept)} for {what}", True)
                return
            # The tensor held stays outside the read-ahead, which must itself hold the largest
            # one (the read-ahead counts a tensor until the consumer asks for the next one, so
            # a budget of twice the largest tensor reads one tensor at a time).
            needed = held + largest
            if budget < needed:
                raise self._infeasible(budget, needed, f"{_mib(held)} for {what} and "
                                       f"{_mib(largest)} to read the largest tensor",
                                       False)
            ahead = max(budget - held, 1)   # 1: tensors of no bytes only
            if self._read_ahead is None or self._read_ahead > ahead:
                self._read_ahead = ahead
            return
        # Several ranks: this rank holds what it read of the batches in flight: whole files, or
        # when even one does not fit, files cut into parts of whole tensors (as upstream's
        # planner cuts them), down to the largest tensor.
        per_file = self._largest_file()
        wanted = 1 if self.queue_size < 0 else max(1, self.queue_size) + 1
        depth = wanted
        while depth > 1 and held + depth * per_file > budget:
            depth -= 1
        if held + per_file > budget:
            depth = wanted
            while depth > 1 and (budget - held) // depth < largest:
                depth -= 1
            if budget - held < largest:
                raise self._infeasible(budget, held + largest, f"{_mib(held)} for {what} and "
                                       f"{_mib(largest)} for the largest tensor a rank reads",
                                       accumulate_resident)
            self._part_bytes = (budget - held) // depth
            logger.info("ParallelLoader: device_memory_budget=%s holds no whole file: ranks "
                        "read parts of at most %s", _mib(budget), _mib(self._part_bytes))
        elif depth == 1 and self.queue_size >= 0:
            logger.info("ParallelLoader: device_memory_budget=%s fits one batch of files at a "
                        "time; reading ahead is off (queue_size=-1)", _mib(budget))
        self.queue_size = depth - 1 if depth > 1 else -1

    @staticmethod
    def _infeasible(budget: int, needed: int, parts: str, accumulate_resident: bool
                    ) -> BudgetInfeasibleError:
        fixes = ["a budget of at least that", "device_memory_budget=None"]
        if accumulate_resident:
            fixes.insert(1, "accumulate_resident=False if each tensor is copied into memory of "
                            "its own before the next one is asked for")
        return BudgetInfeasibleError(
            f"device_memory_budget={budget} ({_mib(budget)}) cannot hold this load: it needs at "
            f"least {needed} bytes ({parts}). Pass {', or '.join(fixes)}", budget, needed)

    def _load(self, batch: list[Any], stream: Any = None) -> FilesBufferOnDevice:
        """Read this rank's file (or part of a file) of ``batch``; on the prefetch thread,
        ``stream`` is the caller's CUDA stream, which the reads are allocated and ordered on as
        if the caller had made them (vLLM loads on a stream of its own: were they on this
        thread's default stream instead, memory the caller frees would be handed out again
        while the caller's copies out of it still run)."""
        if stream is None:
            return self._read_batch(batch)
        import torch

        with torch.cuda.device(self.loader.device), torch.cuda.stream(stream):
            return self._read_batch(batch)

    def _read_batch(self, batch: list[Any]) -> FilesBufferOnDevice:
        group = self.loader._group
        if self._part_bytes is not None:
            parts: list[tuple[str, list[TensorInfo]]] = batch
            mine = parts[group.rank] if group.rank < len(parts) else None
            tensors = {} if mine is None else self.loader._read(
                [mine[0]], [info.name for info in mine[1]])
            return FilesBufferOnDevice(
                [(path, {i.name: i for i in infos}, rank) for rank, (path, infos)
                 in enumerate(parts)], tensors, group, self.loader.device, pg=self._group_pg)
        loader = SafeTensorsFileLoader(self._group_pg, **self._options)
        try:
            loader._add({rank: [path] for rank, path in enumerate(batch)})
            return loader._copy()
        finally:
            loader.close()

    def _batches(self) -> list[list[Any]]:
        """Batches of one file per rank; or, when whole files do not fit the budget, of one
        part per rank: each file cut, in file order, into runs of whole tensors of at most
        ``_part_bytes`` device bytes."""
        if self._part_bytes is None:
            return self.weight_files_batches
        assert self._kept is not None
        parts: list[tuple[str, list[TensorInfo]]] = []
        for path, infos in self._kept:
            part: list[TensorInfo] = []
            size = 0
            for info in infos:
                nbytes = device_bytes(info.nbytes)
                if part and size + nbytes > self._part_bytes:
                    parts.append((path, part))
                    part, size = [], 0
                part.append(info)
                size += nbytes
            if part:
                parts.append((path, part))
        ranks = self.loader._group.size
        return [parts[i:i + ranks] for i in range(0, len(parts), ranks)]

    def _group_of(self, batch: list[Any]) -> tuple[Any, str, dict[int, list[str]]]:
        """What compat.checked needs to check a batch: group, device, files by rank."""
        return (self.loader._group, self.loader.device,
                {rank: [item if isinstance(item, str) else item[0]]
                 for rank, item in enumerate(batch)})

    def _progress(self, total: int) -> Any:
        if not self.use_tqdm_on_load or int(self.pg.rank()) != 0:
            return None
        try:
            from tqdm.auto import tqdm  # type: ignore[import-untyped]
        except ImportError:
            return None
        return tqdm(total=total,
                    desc="Loading safetensors using fastsafetensors")

    def iterate_weights(self) -> Iterator[tuple[str, Any]]:
        """Yield every tensor of every file, in the same order on every rank. ``close()`` also
        closes a stream still suspended (its files and reads end then, not at collection)."""
        stream = self._iterate()
        self._streams.add(stream)
        return stream

    def _iterate(self) -> Generator[tuple[str, Any], None, None]:
        if self._local:
            yield from self._stream()
            return
        batches = self._batches()
        ahead = 0 if self.queue_size < 0 else max(1, self.queue_size)
        bar = self._progress(len(batches))
        pid = os.getpid()
        try:
            if ahead == 0:
                for batch in batches:
                    yield from self._drain(checked(*self._group_of(batch),
                                                   partial(self._load, batch),
                                                   FilesBufferOnDevice.layout), bar)
                return
            stream = None
            if self.loader.device != "cpu":
                import torch

                stream = torch.cuda.current_stream(self.loader.device)
            with ThreadPoolExecutor(1, thread_name_prefix="fastsafetensors-prefetch") as pool:
                pending: deque[tuple[list[Any], Future[FilesBufferOnDevice]]] = deque()
                queued = 0
                try:
                    while True:
                        while queued < len(batches) and len(pending) <= ahead:
                            batch = batches[queued]
                            # In the caller's context, as queue_size=-1 reads it: its
                            # configure() blocks are not open on the prefetch thread.
                            read = contextvars.copy_context().run
                            pending.append((batch, pool.submit(read, self._load, batch, stream)))
                            queued += 1
                        if not pending:
                            break
                        # The future is not kept in a variable of this frame: see
                        # compat.checked. Collectives run here, never on the prefetch thread.
                        yield from self._drain(checked(*self._group_of(pending[0][0]),
                                                       pending.popleft()[1].result,
                                                       FilesBufferOnDevice.layout), bar)
                finally:
                    # Stopped early or failed: drop reads not started, free those done. Not
                    # in a forked child (the stream closed there): the prefetch thread is not
                    # there, and a read it had begun would be waited for for ever.
                    for _, future in pending:
                        future.cancel()
                    for _, future in pending if os.getpid() == pid else ():
                        if not future.cancelled() and future.exception() is None:
                            future.result().close()
        finally:
            if bar is not None:
                bar.close()

    def _stream(self) -> Iterator[tuple[str, Any]]:
        from .loading import iter_tensors

        assert self._kept is not None
        kept = [(path, infos) for path, infos in self._kept if infos]
        names = None
        if self._tensor_filter is not None:
            names = [info.name for _, infos in kept for info in infos]
        ends = {infos[-1].name for _, infos in kept}   # a file is done after its last tensor
        if not kept:
            return
        device = self.loader.device
        if device == "cpu" and (self._budget is not None or names is not None):
            # Whole-file reads hand out views of one buffer per file, so a kept tensor would
            # keep its whole file (or its group of nearby tensors) in memory: more than a
            # budget counts, or than a filter keeps. Here each tensor gets memory of its own.
            stream = self._owned_host_tensors(kept)
        else:
            # The files as a resolved source (iter_tensors takes what a Checkpoint says): a name
            # in two files comes from each, as upstream and vLLM's safetensors iterator yield
            # it; a list of files would refuse it (which copy load() should keep is a guess).
            wanted = {path: None if names is None else [i.name for i in infos]
                      for path, infos in kept}
            stream = iter_tensors(_Files(wanted), device=device,
                                  threads=self.loader.max_threads,
                                  backend="posix" if self.loader.nogds else None,
                                  max_device_bytes=self._read_ahead if device != "cpu" else None)
        bar = self._progress(len(kept))
        try:
            for name, tensor in stream:
                yield name, tensor
                del tensor   # the consumer's loop variable is what the budget counts
                if bar is not None and name in ends:
                    bar.update(1)
        finally:
            stream.close()
            if bar is not None:
                bar.close()

    def _owned_host_tensors(self, kept: list[tuple[str, list[TensorInfo]]]
                            ) -> Generator[tuple[str, Any], None, None]:
        from .file import FastSafetensorsFile

        threads = self.loader.max_threads
        for path, infos in kept:
            with FastSafetensorsFile(path) as f:
                # Not around the yield: a generator runs in its caller's context, so a
                # configure() block held open across yields would apply to the caller too. And
                # in a copy of that context: a Ctrl-C as the block's __enter__ or __exit__ ran
                # (Python functions, where CPython runs its handler) left the option set there
                # for good.
                read = f.get_tensor if threads is None else configure(threads=threads)(
                    f.get_tensor)
                for info in infos:
                    tensor = contextvars.copy_context().run(read, info.name)
                    yield info.name, tensor

    def _drain(self, fb: FilesBufferOnDevice, bar: Any) -> Iterator[tuple[str, Any]]:
        # To the CPU, a tensor this rank read is a view of its file's (or part's) buffer, and
        # the one the consumer holds while asking for the next would keep that buffer past the
        # budget: it gets memory of its own. A tensor received from a peer has its own already.
        # (A consumer that keeps every tensor keeps every buffer whole anyway: the same bytes.)
        group = self.loader._group
        copy_own = (self.loader.device == "cpu" and self._budget is not None
                    and not self._accumulate)
        try:
            for name, (owner, _) in list(fb.key_to_rank_lidx.items()):
                # Every rank drains the same batch in the same order: no call to agree on.
                tensor = fb._whole(name)
                yield name, tensor.clone() if copy_own and owner == group.rank else tensor
                del tensor
        finally:
            fb.close()
        if bar is not None:
            bar.update(1)

    def close(self) -> None:
        """Idempotent."""
        for stream in list(self._streams):
            stream.close()
        self.loader.close()

    def __enter__(self) -> ParallelLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mib(nbytes: int) -> str:
    return f"{nbytes / _MIB:.1f} MiB"
