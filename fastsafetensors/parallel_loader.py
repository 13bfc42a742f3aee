"""Upstream's ``ParallelLoader``, as recent vLLM imports it (``fastsafetensors.parallel_loader``).

Files are taken in batches of one file per rank: rank r reads file r of each batch, then every
rank yields every tensor of the batch (broadcast from its reader). A background thread reads the
next batch while the current one is yielded; it only reads local files, so every collective runs
on the caller's thread, in the same order on every rank.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .compat import FilesBufferOnDevice, SafeTensorsFileLoader, SingleGroup
from .errors import ConfigError

__all__ = ["ParallelLoader"]

logger = logging.getLogger(__name__)


class ParallelLoader:
    """Iterate ``(name, tensor)`` over ``hf_weights_files``, pipelined, on one or many ranks.

    ``queue_size`` is how far reading runs ahead: -1 reads a batch only after the previous one
    was yielded (one batch in memory), 0 reads one batch ahead (two in memory), n > 0 reads n
    ahead. ``max_concurrent_producers`` must be 1, as upstream. ``use_tqdm_on_load`` shows a
    progress bar on rank 0 when tqdm is installed. The loader options (``device``,
    ``max_threads``, ``nogds``, ...) are :class:`~fastsafetensors.SafeTensorsFileLoader`'s,
    with the same accepted-and-ignored ones.

    >>> loader = ParallelLoader(None, ["model.safetensors"], device="cpu")   # doctest: +SKIP
    >>> for name, tensor in loader.iterate_weights():
    ...     model.load_param(name, tensor)
    >>> loader.close()
    """

    def __init__(self, pg: Any, hf_weights_files: Sequence[str], max_concurrent_producers: int = 1,
                 queue_size: int = 0, use_tqdm_on_load: bool = True, device: Any = "cpu",
                 bbuf_size_kb: int = 16 * 1024, max_threads: int = 16, nogds: bool = False,
                 set_numa: bool = True, debug_log: bool = False, framework: str = "pytorch",
                 **kwargs: Any):
        if max_concurrent_producers != 1:
            raise ConfigError("max_concurrent_producers", max_concurrent_producers, ["1"])
        self.pg: Any = SingleGroup() if pg is None else pg
        self._options: dict[str, Any] = dict(
            device=device, bbuf_size_kb=bbuf_size_kb, max_threads=max_threads, nogds=nogds,
            set_numa=set_numa, debug_log=debug_log, framework=framework, **kwargs)
        # Built now so that a bad device, framework or group fails here, not mid-iteration.
        self.loader = SafeTensorsFileLoader(pg, **self._options)
        size = self.loader._group.size
        files = list(hf_weights_files)
        self.weight_files_batches = [files[i:i + size] for i in range(0, len(files), size)]
        self.queue_size = queue_size
        self.use_tqdm_on_load = use_tqdm_on_load

    def _load(self, batch: list[str], *, background: bool) -> FilesBufferOnDevice:
        loader = SafeTensorsFileLoader(self.pg, **self._options)
        try:
            loader.add_filenames({rank: [path] for rank, path in enumerate(batch)})
            fb = loader.copy_files_to_device()
        finally:
            loader.close()
        if background and loader.device != "cpu":
            import torch

            # The tensors are ready on this thread's current stream; the consumer's may be
            # another one, so finish here rather than hand over work in flight.
            torch.cuda.current_stream(loader.device).synchronize()
        return fb

    def _progress(self) -> Any:
        if not self.use_tqdm_on_load or self.loader._group.rank != 0:
            return None
        try:
            from tqdm.auto import tqdm  # type: ignore[import-untyped]
        except ImportError:
            return None
        return tqdm(total=len(self.weight_files_batches),
                    desc="Loading safetensors using fastsafetensors")

    def iterate_weights(self) -> Iterator[tuple[str, Any]]:
        """Yield every tensor of every file, in the same order on every rank."""
        batches = self.weight_files_batches
        ahead = 0 if self.queue_size < 0 else max(1, self.queue_size)
        bar = self._progress()
        try:
            if ahead == 0:
                for batch in batches:
                    yield from self._drain(self._load(batch, background=False), bar)
                return
            with ThreadPoolExecutor(1, thread_name_prefix="fastsafetensors-prefetch") as pool:
                pending: deque[Future[FilesBufferOnDevice]] = deque()
                queued = 0
                try:
                    while True:
                        while queued < len(batches) and len(pending) <= ahead:
                            pending.append(pool.submit(self._load, batches[queued],
                                                       background=True))
                            queued += 1
                        if not pending:
                            break
                        yield from self._drain(pending.popleft().result(), bar)
                finally:
                    # Stopped early or failed: drop reads not started, free those done.
                    for future in pending:
                        future.cancel()
                    for future in pending:
                        if not future.cancelled() and future.exception() is None:
                            future.result().close()
        finally:
            if bar is not None:
                bar.close()

    @staticmethod
    def _drain(fb: FilesBufferOnDevice, bar: Any) -> Iterator[tuple[str, Any]]:
        try:
            for name in list(fb.key_to_rank_lidx):
                yield name, fb.get_tensor(name)
        finally:
            fb.close()
        if bar is not None:
            bar.update(1)

    def close(self) -> None:
        """Idempotent."""
        self.loader.close()

    def __enter__(self) -> ParallelLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
