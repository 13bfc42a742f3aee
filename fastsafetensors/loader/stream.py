"""The device streaming engine: files -> pinned staging -> device tensors, yielded in file order.

Three kinds of thread work together (the engine's own come from a pool kept across loads,
loader/threads.py):

* the planner (one thread) walks the wanted tensors in file order, allocates each tensor's final
  device storage (holding it to the memory budget) and groups tensor bytes into chunks of at most
  one staging buffer;
* workers (``threads`` of them) each own two pinned staging buffers and one copy stream: a worker
  waits until the buffer's previous copies finished, reads a chunk into it (buffered or O_DIRECT
  by page-cache residency), makes its stream wait until the chunk's tensors were allocated
  (their memory may still be read by the consumer's earlier kernels), then queues one
  asynchronous copy per tensor piece on its stream and records an event;
* the caller's thread runs the generator: it waits until every piece of the next tensor was
  queued, makes the caller's current stream wait on those events (no host sync) and yields.

With ``mapped_readers`` (off by default) the first readers copy a chunk that is wholly in the
page cache straight from a read-only mapping of the file, registered with the device for the
length of its copies, instead of reading it into staging.

With ``cuda_calls="ring"`` (loader/ring.py) C threads do the workers' part: readers fill a ring
of pinned windows in chunk order and one thread queues the copies on one stream; the planner
hands it groups of tensors, which ring.c cuts into chunks, and one Python thread (the reporter)
takes the reports (loader/ringplan.py).

What a load is made of (options, the sink, planned tensors, chunks and files, the budget, the
completion of tensors) is in loader/streamparts.py; this module runs a load.

With ``small_tensor_groups`` (on by default, off under a memory budget) the planner gives a run
of small tensors adjacent in the file one allocation (a group, at most ``GROUP_BYTES``), and the
caller hands each over as a view of it: fewer torch calls per tensor, each of which gives the GIL
away.

No whole-shard device buffer exists: the device holds the tensors themselves and nothing else.
Device work goes through a :class:`Sink`, so the pipeline is tested on the CPU with a fake
asynchronous device (tests/test_stream.py) and runs on CUDA with ``cuda.TorchCudaSink``.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

from .. import forking
from . import switching
from . import threads as pool
from .cpu import PAGE, IOPolicy
from .posix import DIRECT_ALIGN, STATS, close_fds, pread_into
from .ring import RingFailure
from .ringplan import RingPlan, ring_error

# What a load is made of (streamparts.py); some only for the modules and tests that import
# them from here, as before the split.
from .streamparts import (  # noqa: F401
    ABANDONED,
    GROUP_BYTES,
    GROUP_MEMBER,
    OPEN_FILES,
    PHASES,
    RING_SLOTS,
    WORKER_POLL,
    AheadGate,
    Sink,
    Source,
    StreamOptions,
    _allocated,
    _Budget,
    _Chunk,
    _close,
    _Completion,
    _File,
    _file_done,
    _open,
    _Piece,
    _resident,
    _Tensor,
    device_bytes,
)
from .waiting import Handoff, Latch, Tokens

__all__ = ["Sink", "StreamOptions", "stream_tensors", "Source", "device_bytes", "PHASES"]

logger = logging.getLogger(__name__)

def stream_tensors(sources: Iterable[Source], sink: Sink, options: StreamOptions,
                   gate: AheadGate | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, tensor)`` for every wanted tensor of ``sources``, in file order, each one
    complete and ordered before later work on the consumer's current stream. ``gate``: see
    :class:`AheadGate`."""
    # What the caller waits on, or sets, in its loop and its cleanup cannot be left locked by a
    # Ctrl-C there (waiting.py): queue.Queue, Event and Semaphore could, and the load's threads
    # then waited for good, its files open.
    cancelled = Latch()
    budget = _Budget(options.max_device_bytes, cancelled)
    work: Handoff[_Chunk] = Handoff(4 * options.threads)
    # Planned tensors go to the caller in batches, one per chunk handed to the readers.
    ready: queue.SimpleQueue[list[_Tensor] | BaseException | None] = queue.SimpleQueue()
    errors: list[BaseException] = []
    files: list[_File] = []
    stats = {"bytes": 0, "direct": 0, "chunks": 0, "mapped": 0}
    stats_lock = threading.Lock()
    policy = IOPolicy(options.io)
    completion = _Completion()
    in_source = threading.Event()   # set and cleared by the planner; is_set() takes no lock
    idents: set[int] = set()   # threads that ran this load's tasks
    # Whether mapped readers may copy cached chunks straight from a file's mapping.
    mapped = (policy.mode == "auto" and options.mapped_readers > 0
              and getattr(sink, "host_source", None) is not None)
    pid, born = os.getpid(), forking.generation
    # cuda_calls="ring": C threads read and copy; the planner submits, report() takes reports.
    make_ring = None if mapped else getattr(sink, "ring", None)
    ring = None
    if make_ring is not None:
        stride = options.buffer_bytes + 2 * DIRECT_ALIGN   # an O_DIRECT chunk's widening
        # The windows in the largest power of two within staging_bytes, which torch's pinned
        # allocator would round any other size up to.
        windows = max(2, ((1 << (options.staging_bytes.bit_length() - 1)) - DIRECT_ALIGN)
                      // stride)
        # The planner and the reporter wake for a quarter of the windows' chunks at once: on
        # the H200 machine a batch read beside transformers' work moved 15 GB/s, alone 37.
        ring = make_ring(readers=options.threads, windows=windows, stride=stride,
                         capacity=max(2 * windows + options.threads,
                                      RING_SLOTS if options.keeps_all else 0),
                         batch=max(1, windows // 4))
    if gate is not None and ring is not None:
        ring.on_full = gate.release   # the planner would wait for reports
    elif gate is not None:   # Python readers: nothing to hold back
        gate.not_needed()
    ringed = None if ring is None else RingPlan(ring, sink, options, policy, completion,
                                                 ready, files, gate)
    open_files = Tokens(OPEN_FILES)   # given back as each file is shut

    def fail(exc: BaseException) -> None:
        errors.append(exc)
        cancelled.set()
        ready.put(exc)
        if gate is not None:
            gate.release()   # nothing more to hold back, and a caller waiting for it goes on

    def plan() -> None:
        idents.add(threading.get_ident())
        it = iter(sources)
        try:
            sink.enter_thread()
            while True:
                # The next source may take long (a Hub shard downloading): a consumer that
                # stops meanwhile does not wait for it, and this thread, seeing `cancelled`
                # when the source comes, opens nothing more.
                in_source.set()
                try:
                    path, header, names = next(it)
                except StopIteration:
                    break
                finally:
                    in_source.clear()
                if cancelled.is_set():
                    break
                t0 = time.perf_counter()
                opened = open_files.take(0)
                if not opened and ringed is not None:
                    ringed.submit_held()   # files close as their reports are taken
                if not opened and gate is not None:
                    gate.release()
                while not opened:
                    opened = open_files.take(WORKER_POLL)
                    if not opened and cancelled.is_set():
                        return
                t1 = time.perf_counter()
                try:
                    f = _open(path, header, policy, names, mapped)
                except BaseException:
                    open_files.give()
                    raise
                f.gate = open_files
                PHASES.add({"planner: wait for a file to close": t1 - t0,
                            "planner: open files": time.perf_counter() - t1})
                files.append(f)
                if ringed is not None:
                    ringed.plan_file(f, len(files) - 1, budget, cancelled)
                    # Once its chunks are submitted: with none yet, it would be closed now.
                    ringed.after_held(partial(_file_done, f, planned=True))
                    continue
                _plan_file(f, sink, options, budget, hand, ready, cancelled, completion, gate)
                _file_done(f, planned=True)
            if ringed is not None:
                ringed.submit_held()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            fail(exc)
        finally:
            try:
                close = getattr(it, "close", None)
                if close is not None:
                    close()   # a generator of downloads stops them
            except BaseException as exc:  # noqa: BLE001 - the markers below must still go out
                fail(exc)
            finally:
                if ring is not None:
                    ring.end()
                else:
                    work.end(options.threads)
                ready.put(None)
                if gate is not None:
                    gate.set_planned()

    def hand(chunk: _Chunk | None) -> None:
        """A planned chunk to the readers (blocks while they are busy)."""
        if chunk is not None:
            work.put(chunk, cancelled)

    def report() -> None:
        """Ring mode: pin the windows, open the ring, and take its reports, in chunk order:
        the tensors each one completes go to the caller."""
        assert ring is not None and ringed is not None
        idents.add(threading.get_ident())
        buffer = None
        t0 = time.perf_counter()
        try:
            sink.enter_thread()
            stream = sink.new_stream()
            buffer = sink.staging(ring.nbytes)
            t1 = time.perf_counter()
            ring.open(getattr(stream, "cuda_stream", stream), buffer[0].data_ptr())
            PHASES.add({"ring: pin staging": t1 - t0, "ring: open": time.perf_counter() - t1})
            if gate is not None:
                t0 = time.perf_counter()
                gate.wait_released(cancelled, ring.failed)
                PHASES.add({"ring: reports held": time.perf_counter() - t0})
            while (done := ring.next()) is not None:
                ringed.take(done, stats, stats_lock)
            if ringed.reported < ring.submitted and not cancelled.is_set():
                # Ended with chunks unreported and no error said: their tensors' waits would
                # never end.
                raise RuntimeError(f"the ring ended with {ring.submitted - ringed.reported} "
                                   f"chunks not loaded")
        except RingFailure as exc:
            fail(ring_error(exc, files))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            fail(exc)
        finally:
            # No copy may still read the windows or write a tensor once this returns.
            try:
                PHASES.add(ring.close())
            except BaseException as exc:
                # Copies may still run: the windows and the tensors not reported are kept for
                # the process, never handed back to an allocator.
                ABANDONED.extend([buffer, ringed.unreported()] if buffer is not None else
                                 [ringed.unreported()])
                fail(exc)   # the load must not pass for done
                raise
            # Tensors never reported (a failed or stopped load) go now, not whenever an error
            # that holds this frame's traceback goes.
            ringed.unreported()
            if buffer is not None:
                try:
                    sink.release_staging(buffer[0])
                except BaseException as exc:
                    fail(exc)
                    raise

    def worker(index: int) -> None:
        pending: list[Any] = [None, None]
        # Copies out of registered file ranges, oldest first: (event, source). A range is
        # released once its copies completed; two are in flight at most, as two staging
        # buffers would be.
        sources: deque[list[Any]] = deque()
        mapper = mapped and index < options.mapped_readers
        # The sink's one call per chunk (cuda_calls="native"), or None: a call per step.
        read_copy = getattr(sink, "read_copy", None)
        turn = 0

        def staged(chunk: _Chunk, event: Any, got: int, direct: bool) -> None:
            """The chunk's copies out of staging buffer ``turn`` are queued, ``event`` after
            them: the buffer is reused once it completed, the next chunk goes to the other."""
            nonlocal turn
            pending[turn] = event
            turn ^= 1
            with stats_lock:
                stats["bytes"] += got
                stats["direct"] += direct
                stats["chunks"] += 1
            completion.queued([chunk.pieces], event)

        stream = None
        spent: dict[str, float] = defaultdict(float)   # this reader's time, by what it waited on
        clock = time.perf_counter
        idents.add(threading.get_ident())
        # Each buffer is pinned when first needed. On the H200 machine a process's first warm
        # 8 GB load took 0.13 s longer than a later one (0.49 against 0.36 s, io="buffered"),
        # which can reuse the 256 MiB of pinned staging torch cached: the second buffer's
        # pinning can overlap the first chunk's read and copy (not yet measured apart), and a
        # worker of a small load that gets one chunk pins one.
        buffers: list[Any] = [None, None]
        try:
            # Inside the try: a worker that dies without fail() (pinned memory exhausted, a
            # CUDA error) would leave the consumer waiting forever for its tensors.
            sink.enter_thread()
            stream = sink.new_stream()
            while True:
                t0 = clock()
                try:
                    chunk = work.get(timeout=WORKER_POLL)
                except queue.Empty:
                    # An idle worker notices cancellation by itself too: the stop markers
                    # come after the chunks already handed over, which other workers may hold.
                    spent["reader: wait for a chunk"] += clock() - t0
                    if cancelled.is_set():
                        return
                    continue
                t1 = clock()
                spent["reader: wait for a chunk"] += t1 - t0
                if chunk is None or cancelled.is_set():
                    return
                source = _map_chunk(chunk, sink, policy) if mapper else None
                if source is not None:
                    t2 = clock()
                    spent["reader: register cached pages"] += t2 - t1
                    src, base = source
                    # Held from here: released below once its copies ran, or when the
                    # worker ends (also after a failed copy).
                    sources.append([None, src])
                    _file_done(chunk.file)
                    sink.stream_wait(stream, chunk.allocated)
                    sink.copy(stream, src, [(p.tensor.flat, p.tensor_offset,
                                             p.file_offset - base, p.length)
                                            for p in chunk.pieces])
                    event = sources[-1][0] = sink.record(stream)
                    # Read from the file too, by the copy engine: counted as one read.
                    STATS.add(chunk.end - chunk.offset, direct=False)
                    with stats_lock:
                        stats["bytes"] += chunk.end - chunk.offset
                        stats["mapped"] += 1
                        stats["chunks"] += 1
                    completion.queued([chunk.pieces], event)
                    t3 = clock()
                    spent["reader: queue copies"] += t3 - t2
                    if len(sources) > 2:
                        done, old = sources.popleft()
                        sink.host_wait(done)
                        sink.release_source(old)
                        spent["reader: wait for registered pages' copies"] += clock() - t3
                    continue
                if read_copy is not None:
                    if buffers[turn] is None:
                        buffers[turn] = sink.staging(options.buffer_bytes + 2 * DIRECT_ALIGN)
                        t2 = clock()
                        spent["reader: pin staging"] += t2 - t1
                        t1 = t2
                    f = chunk.file
                    fd, begin, length, direct = _chunk_read(chunk, policy)
                    skew = chunk.offset - begin
                    # Waits for the staging's last copies, reads, queues the copies: one call.
                    got, event, (waited, read, queued) = read_copy(
                        stream, pending[turn], fd, begin, length, chunk.end - begin,
                        buffers[turn][0], chunk.allocated,
                        [(p.tensor.flat, p.tensor_offset, skew + p.file_offset - chunk.offset,
                          p.length) for p in chunk.pieces], f.path)
                    spent["reader: wait for its staging's copies"] += waited
                    spent["reader: read"] += read
                    spent["reader: queue copies"] += queued
                    _file_done(f)
                    if event is None:
                        from ..errors import ReadError

                        raise ReadError(f.path, begin, chunk.end - begin, got)
                    STATS.add(got, direct=direct)
                    staged(chunk, event, got, direct)
                    # The call's own three parts are counted above; this is the Python around
                    # it (the pieces' addresses, the bookkeeping), the GIL waits included.
                    spent["reader: around its native call"] += (clock() - t1 - waited - read
                                                                - queued)
                    continue
                if pending[turn] is not None:
                    sink.host_wait(pending[turn])
                t2 = clock()
                spent["reader: wait for its staging's copies"] += t2 - t1
                if buffers[turn] is None:
                    buffers[turn] = sink.staging(options.buffer_bytes + 2 * DIRECT_ALIGN)
                    t3 = clock()
                    spent["reader: pin staging"] += t3 - t2
                    t2 = t3
                src, view = buffers[turn]
                skew, got, direct = _read_chunk(chunk, view, policy)
                _file_done(chunk.file)
                t3 = clock()
                spent["reader: read"] += t3 - t2
                # The tensors' memory may have been freed by the consumer just before, with its
                # kernels still reading it on the consumer's stream: copy only after those.
                sink.stream_wait(stream, chunk.allocated)
                sink.copy(stream, src, [(p.tensor.flat, p.tensor_offset,
                                         skew + p.file_offset - chunk.offset, p.length)
                                        for p in chunk.pieces])
                staged(chunk, sink.record(stream), got, direct)
                spent["reader: queue copies"] += clock() - t3
        except BaseException as exc:  # noqa: BLE001
            fail(exc)
        finally:
            # Staging must outlive the copies reading from it, and no copy may still write into
            # a tensor once the load ends (one never yielded is freed then). A copy that failed
            # halfway left earlier pieces queued with no event of their own: wait for the
            # whole stream.
            t0 = clock()
            try:
                if stream is not None:
                    sink.host_wait(sink.record(stream))
                for event in pending:
                    if event is not None:
                        sink.host_wait(event)
            except BaseException as exc:
                # Copies out of these buffers may still run (a CUDA error): kept for the
                # process, never handed back to an allocator that would lend them again (torch's
                # pinned cache knows nothing of copies queued through the driver).
                ABANDONED.extend(buffer for buffer in buffers if buffer is not None)
                # An asynchronous copy error shows here, possibly after the caller had every
                # tensor: the load must not pass for done (raised by the pool, it would only
                # be logged).
                fail(exc)
                raise
            spent["reader: wait for its last copies"] += clock() - t0
            PHASES.add(spent)
            try:
                while sources:   # their copies completed: the whole stream was waited for
                    sink.release_source(sources.popleft()[1])
                # Reached only when the waits above returned: a buffer whose copies may still
                # run (a CUDA error) is never given back for another load to overwrite.
                for buffer in buffers:
                    if buffer is not None:
                        sink.release_staging(buffer[0])
            except BaseException as exc:
                fail(exc)
                raise

    started = time.perf_counter()
    consumer: dict[str, float] = defaultdict(float)
    finished: list[Latch] = []
    count = 0
    completed = False   # the caller had every tensor and no thread had failed
    # Readers get the GIL back sooner from threads running Python (switching.py). In the try,
    # marked in a list: a Ctrl-C inside shorten() left the interval shortened for good.
    switched: list[bool] = []
    try:
        # In the try too: a Ctrl-C as track() returned left the load tracked for good.
        pool.track(cancelled, finished)
        switching.shorten(options.switch_interval, switched)
        # Started inside the try: if a thread cannot start, the cleanup below still stops
        # the ones that did and closes their files. Each one's event goes to `finished` before
        # its task is handed over: the cleanup waits for every thread that may run, also after
        # a Ctrl-C as start() returned (a planner not waited for could open a file once the
        # cleanup had closed the load's files).
        pool.start(plan, "fastsafetensors-plan", finished)
        if ring is not None:
            pool.start(report, "fastsafetensors-ring", finished)
        for i in range(0 if ring is not None else options.threads):
            pool.start(partial(worker, i), f"fastsafetensors-io-{i}", finished)
        clock = time.perf_counter
        while True:
            _same_process(pid, born)
            t0 = clock()
            batch = ready.get()
            consumer["caller: wait for the planner"] += clock() - t0
            if batch is None:
                break
            if isinstance(batch, BaseException):
                raise batch
            for item in batch:
                _same_process(pid, born)
                t0 = clock()
                completion.wait(item, errors)
                if errors:
                    raise errors[0]
                t1 = clock()
                consumer["caller: wait for a tensor's reads"] += t1 - t0
                # The ring queues every chunk's copies on one stream in chunk order, and
                # reports come in that order: a tensor's last event marks all its pieces (a
                # 64 MiB tensor has 8).
                events = item.events[-1:] if ring is not None else item.events
                if item.members is not None:
                    finish = sink.finisher(item.flat)
                    item.flat = None
                    for info, offset in item.members:
                        t1 = clock()
                        # Again for each: the consumer may switch streams between them.
                        sink.consumer_wait(events)
                        tensor = finish(offset, info)
                        count += 1
                        consumer["caller: hand a tensor over"] += clock() - t1
                        yield info.name, tensor
                        del tensor
                    del finish
                    continue
                sink.consumer_wait(events)
                tensor = sink.finish(item.flat, item.info)
                item.flat = None
                count += 1
                consumer["caller: hand a tensor over"] += clock() - t1
                yield item.info.name, tensor
                # Counted until the consumer asks for the next one: released at the yield,
                # the next tensor could be allocated while the consumer still held this one
                # and the one before it (a budget then had to leave room for both).
                del tensor
                if budget.limit is not None:
                    budget.release(device_bytes(item.info.nbytes))
        if errors:
            raise errors[0]
        completed = True
    finally:
        if forking.generation != born:
            # Collected in a forked child: the parent's threads are not here, and a lock one
            # of them held when the process forked (the work queue's, a file's, an event's,
            # the phases') stays held here for good. Only the descriptors are closed, without
            # a lock; the count (switching, pool) started again from 0 in the child.
            for f in list(files):
                close_fds(f.fd, f.direct_fd)
        else:
            try:
                if switched:   # first: what follows may be interrupted
                    switching.restore(switched)
                # _end untracks the load once its threads are done: a load ended in the
                # background stays tracked until then, so that interpreter exit waits for its
                # threads too.
                end = partial(_end, finished, in_source, files, cancelled)
                _stop(cancelled, ring, work, options.threads)
                # Collected at interpreter exit (the pool's daemon threads are frozen then), on
                # one of this load's own threads, or by the garbage collector anywhere (on a
                # thread that may hold a lock the load's threads need to finish): waiting here
                # could wait for ever, and nobody waits for a collected load. Decided in the
                # try: a Ctrl-C as one of these calls returned skipped the end, and a stopped
                # ring's files stayed open.
                elsewhere = (sys.is_finalizing() or threading.get_ident() in idents
                             or pool.collecting())
                if elsewhere:
                    pool.in_background(end)
            except BaseException:
                # A Ctrl-C in there: restored again (the mark says whether it is still due),
                # stopped and ended in the background. It skipped the rest, leaving the
                # interval shortened, a planner that waited for budget, and the files, for good.
                if switched:
                    switching.restore(switched)

                def stop_and_end() -> None:
                    _stop(cancelled, ring, work, options.threads)
                    _end(finished, in_source, files, cancelled)

                pool.in_background(stop_and_end)
                raise
            if not elsewhere:
                try:
                    end()
                except BaseException:
                    pool.in_background(end)   # interrupted again: the files still get closed
                    raise
                if completed and errors:
                    # A thread failed after the caller had every tensor: a reader's or the
                    # ring's last wait for its copies (where a CUDA error of an asynchronous
                    # copy shows), or the release of its staging. The load must not pass for
                    # done.
                    raise errors[0]
            seconds = time.perf_counter() - started
            PHASES.add({**consumer, "load: wall time": seconds})
            logger.info("streamed %d tensors, %.1f MB from %d files in %.3f s (%.2f GB/s), %d "
                        "threads, io=%s, %d of %d chunks direct, %d copied from the page cache",
                        count, stats["bytes"] / 1e6, len(files), seconds,
                        stats["bytes"] / 1e9 / max(seconds, 1e-9), options.threads, options.io,
                        stats["direct"], stats["chunks"], stats["mapped"])


def _same_process(pid: int, born: int) -> None:
    """Raise in a forked child: the threads whose answers the load waits for are not there."""
    if forking.generation != born:
        from ..errors import ForkedLoadError

        raise ForkedLoadError(pid, os.getpid())


def _end(finished: list[Latch], in_source: threading.Event, files: list[_File],
         cancelled: Latch) -> None:
    """Wait for a cancelled load's threads (not for a planner blocked in its source, see
    plan()), then close its files and untrack it."""
    for i, done in enumerate(finished):
        while not done.wait(0.05):
            if i == 0 and in_source.is_set():
                break
    for f in list(files):
        _close(f)
    pool.untrack(cancelled)


def _stop(cancelled: Latch, ring: Any, work: Handoff[_Chunk], workers: int) -> None:
    """Tell a load's threads to stop, and wake the ones that wait."""
    cancelled.set()
    if ring is not None:
        ring.cancel()   # a planner waiting for room in the ring, or the reporter, ends
    # A planner waiting for room drops its chunk; a worker waiting for a chunk ends now rather
    # than at its next 0.1 s poll (every load, not only stopped ones: per-tensor reads to a
    # device run one load per tensor), one with chunks before it ends at the first.
    work.end(workers)


def _plan_file(f: _File, sink: Sink, options: StreamOptions,
               budget: _Budget, hand: Callable[[_Chunk | None], None],
               ready: queue.SimpleQueue[list[_Tensor] | BaseException | None],
               cancelled: Latch, completion: _Completion,
               gate: AheadGate | None = None) -> None:
    """Allocate the file's wanted tensors in order, queue chunks covering their bytes, and
    hand the planned tensors to the caller, a batch per chunk."""
    header = f.header
    limit = options.buffer_bytes
    chunk: _Chunk | None = None
    # Tensors planned since the last hand-over. One queue operation per chunk rather than per
    # tensor: with 20,000 small tensors the queue cost more than planning them.
    batch: list[_Tensor] = []
    flushes = 0

    spent: dict[str, float] = defaultdict(float)
    clock = time.perf_counter
    # The last alloc_event(), and whether a tensor was allocated after it: a chunk whose
    # tensors all came before it waits on that one. A 64 MiB tensor spans 8 chunks, and each
    # event is driver calls from Python, which beside transformers' thread wait for the GIL.
    event: Any = None
    fresh = True

    def flush() -> None:
        nonlocal chunk, batch, flushes, event, fresh
        if chunk is not None and chunk.pieces:
            if fresh:
                event = sink.alloc_event()   # every tensor of the chunk is allocated by now
                fresh = False
            chunk.allocated = event
            with f.lock:
                f.pending += 1
            t0 = clock()
            hand(chunk)   # blocks while the readers are busy
            spent["planner: wait for a free reader"] += clock() - t0
            flushes += 1
        chunk = None
        if batch:
            # After their chunk: the caller waits on the tensors' reads first thing.
            ready.put(batch)
            batch = []

    def submit_held() -> None:
        """The chunks hand() held back, to the readers: before the planner may wait (for
        budget, or for a file to close), and once the file is planned."""
        t0 = clock()
        hand(None)
        spent["planner: wait for a free reader"] += clock() - t0

    def before_wait() -> None:
        flush()  # the tensors already planned complete; the consumer frees budget
        submit_held()
        if gate is not None:
            gate.release()   # the consumer frees budget once reports come

    paged = f.mapped
    try:
        for info, members, memory in _allocated(f, sink, options, budget, cancelled,
                                                before_wait, spent):
            t = _Tensor(info, memory, members=members)
            begin, end = info.data_offsets
            nbytes = end - begin
            fresh = fresh or nbytes > 0
            start = header.data_start + begin
            end = start + nbytes
            position = start
            pieces = 0
            before = flushes
            while position < end:
                if chunk is not None and (position - chunk.end > options.max_gap
                                          or position >= chunk.cap):
                    flush()
                if chunk is None:
                    chunk = _Chunk(f, position, position, [], cap=position + limit)
                    if paged and (chunk.cap - chunk.cap % PAGE) > position:
                        # Chunks that break for size break at a page boundary: a mapped
                        # reader registers whole pages, and two chunks sharing one could not
                        # both be registered at once.
                        chunk.cap -= chunk.cap % PAGE
                take = min(end - position, chunk.cap - position)
                chunk.pieces.append(_Piece(t, position - start, position, take))
                pieces += 1
                chunk.end = position + take
                position += take
            # A flush since the tensor's first piece may have handed that piece to a reader.
            completion.planned(t, pieces, seen=flushes != before)
            batch.append(t)
        if cancelled.is_set():
            return
        flush()
        submit_held()
    finally:
        PHASES.add(spent)


def _chunk_read(chunk: _Chunk, policy: IOPolicy) -> tuple[int, int, int, bool]:
    """How to read the chunk: ``(descriptor, offset, length, direct)``. An O_DIRECT read is
    widened to whole blocks at both ends (and may then end past the end of the file); the
    chunk's first byte lands ``chunk.offset - offset`` bytes into the buffer."""
    f = chunk.file
    resident, base = None, 0
    if policy.mode == "auto" and f.direct_fd is not None:
        resident, base = _resident(f, chunk.offset, chunk.end)
    direct = f.direct_fd is not None and policy.direct_range(resident, base, chunk.offset,
                                                             chunk.end)
    if direct:
        assert f.direct_fd is not None
        begin = chunk.offset - chunk.offset % DIRECT_ALIGN
        end = -(-chunk.end // DIRECT_ALIGN) * DIRECT_ALIGN
        return f.direct_fd, begin, end - begin, True
    return f.fd, chunk.offset, chunk.end - chunk.offset, False


def _read_chunk(chunk: _Chunk, view: memoryview, policy: IOPolicy) -> tuple[int, int, bool]:
    """Read the chunk into ``view``; returns (skew, bytes read, direct) where the chunk's first
    byte sits at ``view[skew]``."""
    f = chunk.file
    fd, begin, length, direct = _chunk_read(chunk, policy)
    got = pread_into(fd, view[:length], begin, path=f.path, direct=direct,
                     allow_eof=direct and begin + length > f.header.file_size)
    if begin + got < chunk.end:
        from ..errors import ReadError

        raise ReadError(f.path, begin, chunk.end - begin, got)
    return chunk.offset - begin, got, direct


def _map_chunk(chunk: _Chunk, sink: Sink, policy: IOPolicy) -> tuple[Any, int] | None:
    """``(source, file offset of its first byte)``: the chunk's pages of the file mapping, made
    readable by the device's copies, when every one of them is in the page cache; else None
    (the chunk is read into staging). Pages not cached would be faulted in one by one."""
    f = chunk.file
    if not f.mapped or f.mapping is None:
        return None
    resident, base = _resident(f, chunk.offset, chunk.end)
    if not policy.cached_range(resident, base, chunk.offset, chunk.end):
        return None
    begin = chunk.offset - chunk.offset % PAGE
    end = -(-chunk.end // PAGE) * PAGE
    source = sink.host_source(f.mapping + begin, end - begin)
    return None if source is None else (source, begin)
