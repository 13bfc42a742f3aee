"""Many tensors for one device in one run of the streaming engine (internal, for the
transformers seam).

A :class:`Batch` holds the whole tensors one ``from_pretrained`` call wants on one device and
reads them in one engine run: files in name order (shards are numbered), each in file order.
transformers gets a Future per tensor from its ``spawn_materialize`` (replaced by the seam);
a tensor's futures complete as soon as it is on the device.

A batch starts in one of two ways:

* **on demand**: it collects the tensors transformers spawns, and starts when transformers
  first waits on one of them (it waits only once it has spawned them all), or by itself once
  none was added for ``IDLE_START`` seconds;
* **read ahead**: it starts as soon as the checkpoint's files are known, before transformers
  builds the model, with every tensor of those files (the seam decides when: one device, no
  quantization or sharding, the model's dtype, room on the device). A tensor read before
  transformers asks for it waits in ``ready``. transformers' first wait marks the end of its
  requests: what nobody asked for (a key the model does not use) is dropped then, or as it
  arrives. A request the batch cannot serve (a key asked twice, a file that is not the one
  read, a stopped run) gets None, and the caller reads that tensor on its own; once a read has
  failed, a request for a tensor not read yet gets that error, as before the failure.
  With ``read_ahead="quiet"`` (to a GPU through the ring), transformers' thread waits until
  every chunk is submitted, and the load's Python (reports, hand-overs) waits for its first
  wait, so that none of it competes for the GIL while transformers builds the model and the
  ring's C threads read (stream.AheadGate).

A batch keeps no tensor it has handed over: what transformers frees after converting it (fused
experts, quantized weights) is freed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..file import FastSafetensorsFile
    from ._transformers_seam import Load, TransformersSlice

logger = logging.getLogger("fastsafetensors.integrations.transformers")

#: Seconds without a new tensor after which an on-demand batch starts without a wait on its
#: futures.
IDLE_START = 0.05

#: A batch's tensors of one file: name -> [(dtype, future)], one entry per request.
_Wanted = dict[str, list[tuple[Any, Future[Any]]]]

_ENDED = "fastsafetensors: the load ended before this tensor was read"

#: Seconds transformers' thread waits at most for a quiet batch's planner (read_ahead="quiet").
PLAN_WAIT = 5.0


def complete(device: Any) -> None:
    """Wait until the work queued so far on this thread's current stream of ``device`` ran.
    Asks first, keeping the GIL: a wait gives it away, and taking it back waits behind any
    thread running Python (transformers building the model) for up to a switch interval, once
    per tensor; where the copies already ran there is nothing to wait for."""
    import torch

    stream = torch.cuda.current_stream(device)
    if not stream.query():
        stream.synchronize()


class _Pending(Future[Any]):
    """A tensor of a batch. The first ``result()`` of a load starts its on-demand batches and
    ends the requests of its read-ahead ones."""

    def __init__(self, batch: Batch):
        super().__init__()
        self._batch = batch

    def result(self, timeout: float | None = None) -> Any:
        # Every device's batch: a tensor on one device may wait on a converter's tensor that
        # another device's batch reads.
        for batch in list(self._batch.load.batches.values()):
            batch.requests_done()
        return super().result(timeout)


def same_file(a: FastSafetensorsFile, b: FastSafetensorsFile) -> bool:
    """Whether two handles read the same file (not just the same path)."""
    return a is b or os.path.samestat(a._fstat(), b._fstat())


class Batch:
    """The whole tensors of one load on one device, read by one run of the streaming engine."""

    def __init__(self, load: Load, device: str):
        self.load = load
        self.device = device
        self.wanted: dict[str, tuple[FastSafetensorsFile, _Wanted]] = {}   # by path
        self.ready: dict[tuple[str, str], Any] = {}   # read ahead, not asked for yet
        self.same: dict[FastSafetensorsFile, bool] = {}   # a requester's handle reads our file?
        self.ahead = False          # reads every tensor of its files, from the start
        self.gate: Any = None       # stream.AheadGate of a quiet read-ahead, else None
        self.asked = False          # transformers has made all its requests
        self.finished = False       # the engine run is over
        self.error: BaseException | None = None   # what ended it, if it failed
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.stopped = threading.Event()
        self.last_add = 0.0
        self.watchdog: threading.Thread | None = None
        # perf_counter() when the engine run started and ended, when transformers first
        # waited and when the engine yielded its last tensor: where a load's time went, for
        # its INFO line.
        self.times: dict[str, float] = {}

    def timeline(self, since: float) -> str:
        """When this batch read and when transformers first waited, in seconds from
        ``since``."""
        t = {k: v - since for k, v in self.times.items()}
        reads = (f"read {t['started']:.2f}-{t['finished']:.2f} s" if "finished" in t
                 else f"read from {t['started']:.2f} s" if "started" in t else "not read")
        waited = f", first waited on at {t['asked']:.2f} s" if "asked" in t else ""
        if "planned" in t:   # read_ahead="quiet": transformers' thread waited until then
            waited = f", planned by {t['planned']:.2f} s{waited}"
        # The last tensor's reads landed then; after it the engine's threads are joined.
        last = f", last tensor at {t['last']:.2f} s" if "last" in t else ""
        return f"{self.device}: {reads}{waited}{last}"

    # -- requests ---------------------------------------------------------------------------

    def add(self, handle: TransformersSlice, dtype: Any) -> Future[Any] | None:
        """A future for ``handle`` cast to ``dtype``; None when the batch cannot serve it (the
        caller reads that tensor on its own)."""
        future = _Pending(self)
        file = handle._file
        with self.lock:
            if self.thread is None:
                entries = self.wanted.setdefault(file.path, (file, {}))[1]
                entries.setdefault(handle.name, []).append((dtype, future))
                self.last_add = time.monotonic()
                if self.watchdog is None:
                    self.watchdog = threading.Thread(target=self._start_when_idle, daemon=True,
                                                     name="fastsafetensors-transformers-idle")
                    self.watchdog.start()
                return future
            if not self.ahead or self.asked or file.path not in self.wanted:
                return None
            ours = self.wanted[file.path][0]
            same = self.same.get(file)
        if same is None:   # once per handle: a checkpoint of 20,000 tensors has a few files
            same = same_file(ours, file)
            with self.lock:
                self.same[file] = same
        if not same:   # the path names another file by now
            return None
        with self.lock:
            entries = self.wanted[file.path][1]
            tensor = self.ready.pop((file.path, handle.name), None)
            if tensor is None:
                if self.asked or handle.name not in entries:
                    return None   # handed over already, or not read for nobody asked
                if not self.finished:
                    entries[handle.name].append((dtype, future))
                    return future
                if self.error is None:   # a stopped run
                    return None
                # The run failed before this tensor: the load fails with that error, as it
                # would have had this request come before the failure.
                future.set_exception(self.error)
                return future
        self._hand_over(tensor, [(dtype, future)])
        return future

    def requests_done(self) -> None:
        """transformers waits on a tensor: it has made every request it will make. An on-demand
        batch starts; a read-ahead one drops what nobody asked for."""
        self.start()
        with self.lock:
            if not self.asked:
                self.times["asked"] = time.perf_counter()
            self.asked = True
            self.ready.clear()
            gate = self.gate
        if gate is not None:
            gate.release()   # the reports, held while transformers built the model

    # -- the engine run ---------------------------------------------------------------------

    def read_ahead(self, files: Sequence[FastSafetensorsFile], quiet: bool = False) -> None:
        """Start reading every tensor of ``files`` now, before any request; ``quiet``: return
        once every chunk is submitted, and hold the load's reports until transformers first
        waits (stream.AheadGate)."""
        from ..loader.stream import AheadGate

        with self.lock:
            if self.thread is not None or self.wanted:
                return
            self.ahead = True
            self.gate = AheadGate() if quiet else None
            for file in files:
                self.wanted[file.path] = (file, {name: [] for name in file.keys()})
        try:
            self.start()
        except BaseException:
            with self.lock:   # requests then collect on demand, as without reading ahead
                self.ahead = False
                self.wanted.clear()
                self.gate = None
            raise
        if self.gate is not None and self.gate.wait_planned(PLAN_WAIT):
            self.times["planned"] = time.perf_counter()

    def _start_when_idle(self) -> None:
        while not self.stopped.wait(IDLE_START / 2):
            with self.lock:
                if self.thread is not None:
                    return
                idle = time.monotonic() - self.last_add >= IDLE_START
            if idle:
                self.start()
                return

    def start(self) -> None:
        with self.lock:
            if self.thread is not None or self.stopped.is_set():
                return
            thread = threading.Thread(target=self._run, daemon=True,
                                      name="fastsafetensors-transformers-batch")
            try:
                thread.start()
                self.thread = thread
                return
            except BaseException as exc:   # noqa: BLE001 - no thread to be had
                error = exc
        self._fail(error)   # the waiters get the error (outside the lock _fail takes)
        raise error

    def stop(self) -> None:
        with self.lock:   # under the lock: start() either ran before or starts nothing
            self.stopped.set()
            watchdog = self.watchdog
            gate = self.gate
        if gate is not None:
            gate.release()
        if watchdog is not None:
            watchdog.join()
        with self.lock:
            thread = self.thread
        if thread is not None:
            thread.join()
        with self.lock:
            self.ready.clear()
            self.same.clear()
        self._fail(RuntimeError(_ENDED))

    def _run(self) -> None:
        self.times["started"] = time.perf_counter()
        try:
            with self.load.configured(), contextlib.ExitStack() as stack:
                sources = []
                files = {}
                for path in sorted(self.wanted):
                    file, names = self.wanted[path]
                    # The file transformers opened, even if the path names another one by now.
                    source = stack.enter_context(file._engine_source())
                    files[source] = (file, names)
                    sources.append((source, file.header, list(names)))
                self._read(sources, files)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on a future
            if self.gate is not None:
                self.gate.release()   # transformers' thread waits no more
            with self.lock:
                self.finished = True
                self.error = exc
            if not self._fail(exc):
                logger.warning("fastsafetensors: a batch of tensors for %s failed %s: %r",
                               self.device, "while reading ahead" if self.ahead else
                               "after every tensor was handed over", exc)
        with self.lock:
            self.finished = True
            self.times["finished"] = time.perf_counter()
        # Whatever the engine did not yield (a stopped batch): failed, not left waiting.
        self._fail(RuntimeError(_ENDED))

    def _read(self, sources: list[Any], files: dict[str, Any]) -> None:
        import torch

        from ..loading import _host_stream, device_stream

        cuda = torch.device(self.device).type == "cuda"
        # The engine yields names only, one file after the other in the order of sources:
        # `current` is the file being yielded (a name may be in two files of a checkpoint).
        order = [files[source] for source, _, _ in sources]
        current = 0
        if cuda:
            # Read ahead, every tensor is held until transformers takes it: the engine may
            # allocate them all ahead of their reads. On demand, transformers may convert and
            # free each as it comes (a cast here, fused experts): not then.
            stream = device_stream(sources, self.device, keeps_all=self.ahead, gate=self.gate)
        else:
            if self.gate is not None:   # Python readers: nothing to hold back
                self.gate.not_needed()
            stream = _host_stream(sources, files[sources[0][0]][0]._framework, threads=None,
                                  io=None)
        try:
            for name, tensor in stream:
                self.times["last"] = time.perf_counter()
                if self.stopped.is_set():
                    return
                while name not in order[current][1]:
                    current += 1
                file, wanted = order[current]
                with file._lock:
                    file.bytes_read += file.header.tensors[name].nbytes
                if cuda:
                    # Complete for any stream of any thread, as the stock path's tensors are
                    # (the engine ordered the copies on this thread's stream only).
                    complete(self.device)
                with self.lock:
                    # Dropped here: transformers frees a tensor once it is converted (MoE
                    # experts fused, weights quantized), and the batch must not keep it.
                    entries = wanted.pop(name)
                    if not entries and self.ahead and not self.asked:
                        self.ready[(file.path, name)] = tensor
                if entries:
                    self._hand_over(tensor, entries)
                del tensor, entries
        finally:
            close = getattr(stream, "close", None)   # joins the engine's threads
            if close is not None:
                close()

    def _hand_over(self, tensor: Any, entries: list[tuple[Any, Future[Any]]]) -> None:
        """Complete the futures of one tensor, each with its own tensor in its dtype."""
        for i, (dtype, future) in enumerate(entries):
            try:
                if dtype is not None and dtype != tensor.dtype:
                    result = tensor.to(dtype)
                elif i == 0:
                    result = tensor
                else:   # a key asked twice gets two tensors, as from the stock path
                    result = tensor.clone()
                if result is not tensor and result.device.type == "cuda":
                    # The cast or copy ran on this thread's stream: complete it for every
                    # stream.
                    complete(result.device)
            except BaseException as exc:  # noqa: BLE001 - out of memory while casting, ...
                # These futures are out of `wanted` already: _fail would not reach them.
                future.set_exception(exc)
                continue
            self.load.count_read()
            future.set_result(result)

    def _fail(self, exc: BaseException) -> bool:
        """Every future not completed yet gets ``exc`` (no waiter is left hanging); whether
        there was one."""
        with self.lock:
            pending = [future for _, wanted in self.wanted.values()
                       for entries in wanted.values() for _, future in entries
                       if not future.done()]
        for future in pending:
            future.set_exception(exc)
        return bool(pending)
