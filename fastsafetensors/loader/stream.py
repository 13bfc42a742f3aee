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
submits the chunks to it and one Python thread (the reporter) takes the reports.

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
import mmap
import os
import queue
import sys
import threading
import time
from array import array
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import compress
from typing import Any, Protocol

from ..format import Header, TensorInfo, header_of, open_readonly
from . import switching
from . import threads as pool
from .cpu import CACHED_ENOUGH, PAGE, IOPolicy
from .pagecache import map_file, resident_map, unmap
from .posix import DIRECT_ALIGN, STATS, close_fds, open_direct, pread_into
from .ring import RingFailure

__all__ = ["Sink", "StreamOptions", "stream_tensors", "Source", "device_bytes", "PHASES"]

logger = logging.getLogger(__name__)

#: (path, header or None to read it here, tensor names wanted or None for all)
Source = tuple[str, "Header | None", "list[str] | None"]

#: How often an idle worker looks at ``cancelled`` (seconds). Only a fallback: a load that ends
#: hands each worker a stop marker.
WORKER_POLL = 0.1
#: Chunks the planner may submit to the ring (``cuda_calls="ring"``) before their reports are
#: taken, for a load whose caller keeps every tensor (``StreamOptions.keeps_all``): ring.c's
#: slots, some 150 bytes each; 4096 chunks of 4 MiB are 16 GiB. Once submitted, a chunk is read
#: and its copies queued by C threads alone; only taking its report needs Python's GIL. With a
#: few slots over the windows' count, a reporter kept from the GIL (by transformers building
#: the model while a batch reads ahead) holds up the reads once the slots are full: on the H200
#: machine, with 76 slots, they moved 14.9 GB/s beside transformers and 36.9 alone (eighteenth
#: session). The planner allocates a group's tensors before it submits them, so only a caller
#: that keeps them all gets this: for the others the tensors allocated ahead of the reads stay
#: a staging's worth and a few windows'. A memory budget still holds the planner back.
RING_SLOTS = 4096
#: Files the planner keeps open, read or not, before it waits for one to be done: a file is
#: closed once its last chunk is reported, and with a reporter kept from the GIL a load of
#: hundreds of small files could otherwise run out of descriptors (two a file with O_DIRECT).
OPEN_FILES = 64


class PhaseStats:
    """Where the engine's threads spent their time, in seconds summed over threads and loads,
    process-wide (as ``posix.STATS`` counts bytes): readers waiting for a chunk, for their
    staging's copies, pinning, reading, queuing copies; the planner opening files, allocating
    and waiting for a free reader or for budget; the caller waiting for the planner, for a
    tensor's reads, and handing it over; and each load's wall time (loads running at once add
    theirs up). A benchmark resets it before a load and reads it after: a
    diagnosis in one run of a lent GPU machine, not a tuning knob."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = defaultdict(float)

    def add(self, spent: dict[str, float]) -> None:
        with self._lock:
            for phase, seconds in spent.items():
                self._seconds[phase] += seconds

    def reset(self) -> None:
        with self._lock:
            self._seconds.clear()

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)


PHASES = PhaseStats()
#: Staging whose copies could not be waited for (a CUDA error): held until the process ends.
ABANDONED: list[Any] = []

#: torch's CUDA caching allocator hands out multiples of 512 bytes.
ALLOC_GRANULE = 512


def device_bytes(nbytes: int) -> int:
    """Device memory a tensor of ``nbytes`` takes, as ``torch.cuda.memory_allocated`` counts
    it: memory budgets count this, not ``nbytes`` (thousands of 4-byte scales take 512 each)."""
    return -(-nbytes // ALLOC_GRANULE) * ALLOC_GRANULE


class Sink(Protocol):
    """The device side of the pipeline. Events are opaque; streams are per worker.

    Optional, not declared here: ``read_copy(stream, staged, fd, offset, length, needed,
    buffer, allocated, pieces, path) -> (bytes read, event, seconds)``, an attribute that may
    be None.
    A sink that has it gets each staged chunk in one call: ``host_wait(staged)`` (None:
    nothing to wait for), read ``length`` bytes of ``fd`` at ``offset`` into ``buffer`` (from
    ``staging``), then, if at least ``needed`` came, ``stream_wait(stream, allocated)``,
    ``copy(stream, buffer, pieces)`` and ``record(stream)``; the event is None when fewer than
    ``needed`` came (nothing was queued; the engine raises ReadError). ``seconds``: the time
    spent waiting for ``staged``, reading and queuing, for ``PHASES``.

    Optional, not declared here: ``ring(readers=, windows=, stride=, capacity=, batch=)``, an
    attribute that may be None, returning an unopened ``loader.ring.Ring``. A sink that has it
    gets no reader threads of Python: the planner submits each chunk to the ring (device
    addresses from ``data_ptr()``), one thread opens it on a stream of ``new_stream`` and on
    ``staging``, and takes its reports; ``alloc_event`` and ``consumer_wait`` then deal in the
    ring's driver events.

    Optional, not declared here: ``reserve(nbytes)``, an attribute that may be None: ``alloc``
    is about to be called for ``nbytes`` in all (one file's tensors, in a load whose caller
    keeps every tensor and sets no budget), and the sink may prepare for it (have its
    allocator hold that much at once)."""

    def enter_thread(self) -> None:
        """Called first on each thread the engine starts, before any other call there."""

    def alloc(self, info: TensorInfo) -> Any:
        """Final storage of one tensor: a flat uint8 device tensor of ``info.nbytes``."""

    def staging(self, nbytes: int) -> tuple[Any, memoryview]:
        """A pinned host buffer (4096-aligned) and a writable view of it."""

    def release_staging(self, buffer: Any) -> None:
        """A buffer from ``staging`` is no longer used (the copies out of it completed)."""

    def host_source(self, address: int, nbytes: int) -> Any:
        """Optional. Make ``[address, +nbytes)`` of a read-only file mapping (page-aligned,
        cached) readable by the device's copies, and return a buffer over it for ``copy``;
        None where it cannot be (the chunk then goes through staging)."""

    def release_source(self, source: Any) -> None:
        """Optional. Undo ``host_source`` (the copies out of ``source`` completed)."""

    def alloc_event(self) -> Any:
        """An event on the stream ``alloc`` allocates on, recorded after the allocations so far.

        The allocator may hand out memory whose previous tensor is still read by work queued on
        that stream; writes from another stream (or by DMA) must wait for this event first."""

    def new_stream(self) -> Any: ...

    def stream_wait(self, stream: Any, event: Any) -> None:
        """Make later work on ``stream`` wait for ``event`` (without blocking the host)."""

    def copy(self, stream: Any, src: Any, pieces: list[tuple[Any, int, int, int]]) -> None:
        """Queue ``dst[dst_offset:+length] = src[src_offset:+length]`` on ``stream`` for each
        ``(dst, dst_offset, src_offset, length)`` of ``pieces`` (one call per chunk: switching
        streams costs more than a small copy). ``src`` is always a buffer of ``staging`` or a
        ``host_source``: pinned memory, which a device sink may copy from asynchronously."""

    def record(self, stream: Any) -> Any:
        """An event completed once everything queued on ``stream`` so far has run."""

    def host_wait(self, event: Any) -> None:
        """Block this thread until ``event`` completed (staging may then be overwritten)."""

    def consumer_wait(self, events: list[Any]) -> None:
        """Make the consumer's current stream wait for ``events`` (without blocking the host)."""

    def finish(self, flat: Any, info: TensorInfo) -> Any:
        """The flat storage viewed with the tensor's dtype and shape."""

    def finisher(self, block: Any) -> Callable[[int, TensorInfo], Any]:
        """Optional; a sink that has it gets runs of small tensors in one allocation (a group:
        ``alloc`` of the run's span). Returns ``finish(offset, info)``: the tensor at byte
        ``offset`` of ``block`` viewed with its dtype and shape, called once per tensor of the
        group, in file order, each right after a ``consumer_wait``."""


@dataclass(frozen=True)
class StreamOptions:
    threads: int
    staging_bytes: int
    io: str = "auto"
    max_device_bytes: int | None = None
    max_gap: int = 1 << 20
    #: Readers (the first ones) that copy chunks already in the page cache straight from a
    #: mapping of the file (io="auto", a sink with ``host_source``); the others stage them.
    mapped_readers: int = 0
    #: Runs of small tensors in one allocation, where the sink can finish them from it
    #: (``Sink.finisher``) and no memory budget is set.
    small_tensor_groups: bool = False
    #: Python's thread switch interval while the load runs, in seconds, if shorter than the
    #: interpreter's (switching.py); 0 leaves it alone.
    switch_interval: float = 0.0
    #: The largest chunk (one read, one staging buffer, one ring window), if smaller than
    #: the share of staging_bytes a buffer gets; 0: that share.
    chunk_bytes: int = 0
    #: The caller keeps every tensor until the load ends (``load()`` without a cast, a
    #: transformers batch reading ahead): allocating them all ahead of their reads costs it
    #: nothing, so the ring may take the whole load at once (RING_SLOTS), and each file's
    #: memory is reserved at once (``Sink.reserve``).
    keeps_all: bool = False

    @property
    def buffer_bytes(self) -> int:
        """Size of each of a worker's two staging buffers (chunks never exceed it)."""
        # torch's pinned allocator rounds each request up to a power of two, so each
        # buffer's share is the largest power of two within staging_bytes / (2 * threads)
        # (with 6 threads, 16 MiB rather than 21.3 MiB that would pin 32 MiB). The buffer also
        # carries 3 blocks of slack (O_DIRECT widening at both ends, and alignment), so that
        # the pinned request is exactly that share.
        share = self.staging_bytes // (2 * self.threads)
        if self.chunk_bytes:
            share = min(share, self.chunk_bytes)
        per = (1 << (share.bit_length() - 1) if share else 0) - 3 * DIRECT_ALIGN
        per -= per % DIRECT_ALIGN
        return max(per, 2 * DIRECT_ALIGN)


#: What a tensor's piece count starts at, until the planner has counted its pieces (see
#: _Completion.planned): readers may queue the first pieces of a large tensor before the
#: planner made the last, and no count of pieces queued can bring it down to 0.
UNCOUNTED = 1 << 62


#: Tensors smaller than this, adjacent in the file, share one allocation (a group) with
#: ``small_tensor_groups``, where the sink can finish them from it (``Sink.finisher``) and no
#: memory budget is set: one allocation and one copy per group, and one torch call per tensor
#: to view it (``as_strided`` on a typed view of the group), in place of an allocation, a share
#: of a batched copy and two calls to view it. Each of those calls releases the GIL and must
#: take it back behind the engine's other threads: on the 2-core VM two threads making such
#: calls at once took 1.6-2.4x as long as one thread making them all, 1.0x with both on one
#: core (benchmarks/probe_gil_handoff.py).
GROUP_MEMBER = 1 << 20
#: The largest group: its memory is freed only once every tensor of it is.
GROUP_BYTES = 8 << 20
#: A tensor joins a group only at a multiple of this from the group's first byte, so that every
#: tensor of a group starts 16-byte aligned, as kernels that load 16 bytes at a time without
#: checking need (a tensor allocated alone starts 512-byte aligned); another starts a new
#: group. The small tensors of real checkpoints (norms, biases, scales) are whole multiples of
#: 16 bytes, so this rarely splits a run.
GROUP_ALIGN = 16


@dataclass(slots=True)
class _Tensor:
    info: TensorInfo
    flat: Any = None
    # Pieces not yet queued for copy (UNCOUNTED plus that, minus the pieces queued, while the
    # planner is still counting).
    pieces: int = UNCOUNTED
    events: list[Any] = field(default_factory=list)
    # A group: its tensors and their byte offsets in ``flat`` (``info`` then names the span).
    members: list[tuple[TensorInfo, int]] | None = None


@dataclass(slots=True)
class _Piece:
    tensor: _Tensor
    tensor_offset: int            # where in the tensor
    file_offset: int
    length: int


@dataclass
class _Chunk:
    file: _File
    offset: int                   # file offset of the first byte wanted
    end: int
    pieces: list[_Piece]
    allocated: Any = None         # alloc_event() after its tensors were allocated
    cap: int = 0                  # file offset the chunk must end at or before


@dataclass
class _File:
    path: str
    header: Header
    fd: int
    direct_fd: int | None
    infos: list[TensorInfo]       # the wanted tensors, in file order
    # Chunks queued but not read yet, and whether the planner is done with the file: the file
    # is closed when both say nothing more will be read (a load of hundreds of shards would
    # otherwise hold every descriptor until it ends).
    pending: int = 0
    planned: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # io="auto": page-cache residency per segment of the wanted bytes, looked up once each,
    # by the first reader that needs it (see _resident).
    segments: dict[int, bytes | None] = field(default_factory=dict, repr=False)
    looking: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Address of a read-only mapping of the whole file (None: none), made once under io="auto"
    # for the residency lookups and for mapped readers; kept until the load's threads are
    # done, since copies out of it may still run after the last chunk was taken.
    mapping: int | None = None
    mapped: bool = False          # mapped readers may copy from it
    # The planner's bound on open files (OPEN_FILES), released once when the file is shut.
    gate: threading.Semaphore | None = field(default=None, repr=False)

    @property
    def span(self) -> tuple[int, int]:
        """File offsets of the first and past the last wanted byte."""
        start = self.header.data_start
        return start + self.infos[0].data_offsets[0], start + self.infos[-1].data_offsets[1]


#: Bytes of a file whose page-cache residency one lookup takes (mincore: some 40 ns a page).
SEGMENT = 32 << 20


class _Budget:
    """Device bytes allocated and not yet given up, held under ``limit`` (None: unbounded).
    A yielded tensor counts until the consumer asks for the next one."""

    def __init__(self, limit: int | None, cancelled: threading.Event):
        self.limit = limit
        self.used = 0
        self.cancelled = cancelled
        self.cond = threading.Condition()

    def would_block(self, nbytes: int) -> bool:
        if self.limit is None:
            return False
        with self.cond:
            return self.used > 0 and self.used + nbytes > self.limit

    def acquire(self, nbytes: int) -> bool:
        """Count ``nbytes`` once they fit; False (nothing counted) when the load stopped while
        waiting: the tensor must not be allocated past the budget then."""
        if self.limit is None:   # nothing to hold to: no lock per tensor
            return True
        with self.cond:
            # A tensor larger than the whole budget still goes when nothing else is held.
            while (self.limit is not None and self.used > 0 and self.used + nbytes > self.limit
                   and not self.cancelled.is_set()):
                self.cond.wait(0.1)
            if self.cancelled.is_set():
                return False
            self.used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        if self.limit is None:
            return
        with self.cond:
            self.used -= nbytes
            self.cond.notify_all()


class _Completion:
    """When each tensor of one load has all its pieces queued for copy: one condition for every
    tensor, notified once per chunk. (An Event per tensor costs more to create than planning
    the tensor does, which shows with tens of thousands of small tensors.)"""

    def __init__(self) -> None:
        self.cond = threading.Condition()

    def planned(self, t: _Tensor, pieces: int, seen: bool) -> None:
        """The planner made all ``pieces`` of ``t``. ``seen``: some may be queued already
        (a chunk holding them went to the readers while ``t`` was planned); if none can be,
        no reader has touched the count, and the caller gets ``t`` only after this, so it is
        set without the lock (most tensors: a chunk holds many)."""
        if not seen:
            t.pieces = pieces
            return
        with self.cond:
            # Not 0 yet (no notify): the last piece is in the chunk being filled, which goes
            # to the readers after this.
            t.pieces += pieces - UNCOUNTED

    def queued(self, chunks: list[list[_Piece]], event: Any) -> None:
        """The copies of ``chunks`` (their pieces each) are queued, ``event`` marking the end
        of all of them."""
        with self.cond:
            for pieces in chunks:
                for piece in pieces:
                    piece.tensor.events.append(event)
                    piece.tensor.pieces -= 1
            self.cond.notify_all()

    def reported(self, tensors: list[_Tensor | None], start: int, stop: int,
                 event: Any) -> None:
        """Ring mode: ``tensors[start:stop]`` are complete once ``event`` is (dropped from
        the list: the caller holds them)."""
        with self.cond:
            for i in range(start, stop):
                t = tensors[i]
                tensors[i] = None
                if t is not None and t.pieces:
                    t.events = [event]
                    t.pieces = 0
            self.cond.notify_all()

    def wait(self, t: _Tensor, errors: list[BaseException]) -> None:
        if t.pieces == 0:   # 0 once it is final, so no lock is needed to see it reach 0
            return
        with self.cond:
            while t.pieces and not errors:
                self.cond.wait(0.05)


class AheadGate:
    """For a load read ahead of a thread that runs Python meanwhile (transformers building the
    model): its caller waits until every chunk is submitted (:meth:`wait_planned`), and the
    ring's reports wait until the caller lets them go (:meth:`release`), so that while the
    C threads read and copy, none of the load's Python competes for the GIL. The load lets
    them go itself before its planner would wait on a report (the ring full, too many files
    open); without a ring there is nothing to hold."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.planned = False
        self.released = False

    def set_planned(self) -> None:
        with self._cond:
            self.planned = True
            self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self.released = True
            self._cond.notify_all()

    def not_needed(self) -> None:
        """Nothing to hold back (no ring): planned and released at once."""
        with self._cond:
            self.planned = self.released = True
            self._cond.notify_all()

    def wait_planned(self, timeout: float) -> bool:
        """Until every chunk is submitted (True), or the reports were let go or ``timeout``
        seconds passed (False)."""
        with self._cond:
            self._cond.wait_for(lambda: self.planned or self.released, timeout)
            return self.planned

    def wait_released(self, cancelled: threading.Event,
                      failed: Callable[[], bool] = lambda: False) -> None:
        """Until the caller lets the reports go, the load stops, or ``failed()`` says the
        ring failed (asked every WORKER_POLL): a failed load must not wait for the caller,
        who would meanwhile go on building a model for it."""
        with self._cond:
            while not self.released and not cancelled.is_set() and not failed():
                self._cond.wait(WORKER_POLL)


class _RingPlan:
    """Ring mode's planning and reports. The planner allocates each file's wanted tensors in
    order and hands their bytes to the ring a group at a time (:meth:`plan_file`), which
    ring.c cuts into chunks; the reporter takes each report (:meth:`take`), which says how many
    of those tensors are complete. Python's work is per tensor and per report: cutting chunks
    in Python took some 20 us each on the 2-core VM, 2,000 of them for 8 GB, and beside
    transformers' thread, which holds the GIL half the time or more, the readers then waited
    for chunks (H200 runs 8-10)."""

    def __init__(self, ring: Any, sink: Sink, options: StreamOptions, policy: IOPolicy,
                 completion: _Completion, ready: queue.Queue[Any], files: list[_File],
                 gate: AheadGate | None) -> None:
        self.ring, self.sink, self.options, self.policy = ring, sink, options, policy
        self.completion, self.ready, self.files, self.gate = completion, ready, files, gate
        # Tensors handed to the ring, in order (None once complete), and the events after
        # their allocations, which the ring's copies wait on: kept until the ring is closed.
        self.tensors: list[_Tensor | None] = []
        self.events: list[Any] = []
        # Submissions planned while the ring opens (its staging pinned: 0.04-0.06 s in a
        # process's first load), so that the planner plans on meanwhile.
        self.held: deque[Callable[[], None]] = deque()
        self.done = 0        # tensors complete, as the reports count them
        self.reported = 0    # chunks reported

    def plan_file(self, f: _File, number: int, budget: _Budget,
                  cancelled: threading.Event) -> None:
        """Allocate ``f``'s wanted tensors (file ``number`` of the load) and hand them to
        the ring and to the caller: a group once its tensors reach ``staging_bytes`` (the
        readers start on the first ones while the rest are allocated), before the planner
        waits for budget, and at the file's end."""
        options, sink = self.options, self.sink
        infos = f.infos
        spent: dict[str, float] = defaultdict(float)
        clock = time.perf_counter
        bounded = budget.limit is not None
        reserve = getattr(sink, "reserve", None) if options.keeps_all and not bounded else None
        if reserve is not None and infos:
            t0 = clock()
            reserve(sum(device_bytes(info.nbytes) for info in infos))
            spent["planner: reserve"] += clock() - t0
        grouping = (options.small_tensor_groups and not bounded
                    and getattr(sink, "finisher", None) is not None)
        start = f.header.data_start
        group: list[_Tensor] = []
        begin, end, dst = array("q"), array("q"), array("Q")
        nbytes = 0

        def hand_over() -> None:
            nonlocal group, begin, end, dst, nbytes
            if not group:
                return
            t0 = clock()
            event = sink.alloc_event() if nbytes else None
            spent["planner: allocate"] += clock() - t0
            self._hand(f, number, begin, end, dst, event, group)
            group, begin, end, dst = [], array("q"), array("q"), array("Q")
            nbytes = 0

        i = 0
        try:
            while i < len(infos):
                if cancelled.is_set():
                    return
                info = infos[i]
                i += 1
                first, last = info.data_offsets
                members = None
                if grouping and 0 < last - first < GROUP_MEMBER:
                    stop = _group_end(infos, i - 1)
                    if stop > i:
                        members = [(m, m.data_offsets[0] - first) for m in infos[i - 1:stop]]
                        last = infos[stop - 1].data_offsets[1]
                        info = TensorInfo(f"{info.name} and the {stop - i} tensors after it",
                                          "U8", (last - first,), (first, last))
                        i = stop
                size = last - first
                t0 = clock()
                if bounded:
                    footprint = device_bytes(size)
                    if budget.would_block(footprint):
                        # The consumer frees budget once these are complete.
                        hand_over()
                        self.submit_held()
                        if self.gate is not None:
                            self.gate.release()
                        t0 = clock()
                    if not budget.acquire(footprint):
                        return
                t1 = clock()
                flat = sink.alloc(info) if size else None
                spent["planner: wait for budget"] += t1 - t0
                spent["planner: allocate"] += clock() - t1
                group.append(_Tensor(info, flat, pieces=1 if size else 0, members=members))
                begin.append(start + first)
                end.append(start + last)
                dst.append(flat.data_ptr() if flat is not None else 0)
                nbytes += size
                if nbytes >= options.staging_bytes:
                    hand_over()
            hand_over()
        finally:
            PHASES.add(spent)

    def _hand(self, f: _File, number: int, begin: array[int], end: array[int],
              dst: array[int], event: Any, group: list[_Tensor]) -> None:
        """One group of ``f``'s tensors to the ring (held while it opens) and to the caller."""
        first = len(self.tensors)
        self.tensors.extend(group)   # before: their reports may come at once
        if event is not None:
            self.events.append(event)
        file = (number, f.fd, f.direct_fd, f.mapping, self.policy.mode)
        self.after_held(partial(self._submit, f, file, begin, end, dst, event, first))
        self.ready.put(group)

    def _submit(self, f: _File, file: tuple[Any, ...], begin: array[int], end: array[int],
                dst: array[int], event: Any, first: int) -> None:
        t0 = time.perf_counter()
        before = self.ring.submitted   # this thread is the only one submitting
        chunks = self.ring.submit_file(file, begin, end, dst, event, self.options.buffer_bytes,
                                       self.options.max_gap, first, align=DIRECT_ALIGN,
                                       cached=CACHED_ENOUGH)
        PHASES.add({"planner: wait for a free reader": time.perf_counter() - t0})
        with f.lock:
            # Those placed, also when the ring stopped meanwhile. Their reports may have come
            # first: the count went below 0 meanwhile, and the file stays open, since it is
            # closed only once planned.
            f.pending += self.ring.submitted - before
        if chunks is None and self.gate is not None:   # the ring stopped; the reporter says why
            self.gate.release()

    def after_held(self, job: Callable[[], None]) -> None:
        """``job`` now, or after the submissions held until the ring opens."""
        if self.held or (self.options.keeps_all and not self.ring.opened):
            self.held.append(job)
            if self.ring.opened:
                self.submit_held()
        else:
            job()

    def submit_held(self) -> None:
        """What was held until the ring opened, now (waiting for it to open)."""
        while self.held:
            self.held.popleft()()

    def take(self, report: Any, stats: dict[str, int], lock: threading.Lock) -> None:
        """A report of the ring: its chunks' bytes counted, its complete tensors to the
        caller, and the files read to the end closed."""
        got, direct = report.got, report.direct
        nbytes = sum(got)
        direct_chunks = sum(direct)
        direct_bytes = sum(compress(got, direct)) if direct_chunks else 0
        if direct_chunks < len(got):
            STATS.add(nbytes - direct_bytes, direct=False, reads=len(got) - direct_chunks)
        if direct_chunks:
            STATS.add(direct_bytes, direct=True, reads=direct_chunks)
        with lock:
            stats["bytes"] += nbytes
            stats["direct"] += direct_chunks
            stats["chunks"] += len(got)
        self.reported += len(got)
        if report.done > self.done:
            self.completion.reported(self.tensors, self.done, report.done, report.event)
            self.done = report.done
        _files_done([self.files[n] for n in report.files])

    def unreported(self) -> list[Any]:
        """The tensors and events the ring may still have written or waited on (once it is
        closed: nothing), no longer held here."""
        kept = [t for t in self.tensors[self.done:] if t is not None] + self.events
        self.tensors[:] = []
        self.events = []
        self.done = 0
        return kept


def stream_tensors(sources: Iterable[Source], sink: Sink, options: StreamOptions,
                   gate: AheadGate | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, tensor)`` for every wanted tensor of ``sources``, in file order, each one
    complete and ordered before later work on the consumer's current stream. ``gate``: see
    :class:`AheadGate`."""
    cancelled = threading.Event()
    budget = _Budget(options.max_device_bytes, cancelled)
    work: queue.Queue[_Chunk | None] = queue.Queue(maxsize=4 * options.threads)
    # Planned tensors go to the caller in batches, one per chunk handed to the readers.
    ready: queue.Queue[list[_Tensor] | BaseException | None] = queue.Queue()
    errors: list[BaseException] = []
    files: list[_File] = []
    stats = {"bytes": 0, "direct": 0, "chunks": 0, "mapped": 0}
    stats_lock = threading.Lock()
    policy = IOPolicy(options.io)
    completion = _Completion()
    in_source = threading.Event()
    idents: set[int] = set()   # threads that ran this load's tasks
    # Whether mapped readers may copy cached chunks straight from a file's mapping.
    mapped = (policy.mode == "auto" and options.mapped_readers > 0
              and getattr(sink, "host_source", None) is not None)
    pid = os.getpid()
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
    ringed = None if ring is None else _RingPlan(ring, sink, options, policy, completion,
                                                 ready, files, gate)
    open_files = threading.Semaphore(OPEN_FILES)   # released as each file is shut

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
                opened = open_files.acquire(blocking=False)
                if not opened and ringed is not None:
                    ringed.submit_held()   # files close as their reports are taken
                if not opened and gate is not None:
                    gate.release()
                while not opened:
                    opened = open_files.acquire(timeout=WORKER_POLL)
                    if not opened and cancelled.is_set():
                        return
                t1 = time.perf_counter()
                try:
                    f = _open(path, header, policy, names, mapped)
                except BaseException:
                    open_files.release()
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
                    for _ in range(options.threads):
                        _put(work, None, cancelled)
                ready.put(None)
                if gate is not None:
                    gate.set_planned()

    def hand(chunk: _Chunk | None) -> None:
        """A planned chunk to the readers (blocks while they are busy)."""
        if chunk is not None:
            _put(work, chunk, cancelled)

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
            fail(_ring_error(exc, files))
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
                sink.release_staging(buffer[0])

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
                    # The consumer may have drained the queue (stop markers included) when it
                    # cancelled, so an idle worker must notice cancellation by itself.
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
            except BaseException:
                # Copies out of these buffers may still run (a CUDA error): kept for the
                # process, never handed back to an allocator that would lend them again (torch's
                # pinned cache knows nothing of copies queued through the driver).
                ABANDONED.extend(buffer for buffer in buffers if buffer is not None)
                raise
            spent["reader: wait for its last copies"] += clock() - t0
            PHASES.add(spent)
            while sources:   # their copies completed: the whole stream was waited for
                sink.release_source(sources.popleft()[1])
            # Reached only when the waits above returned: a buffer whose copies may still run
            # (a CUDA error) is never given back for another load to overwrite.
            for buffer in buffers:
                if buffer is not None:
                    sink.release_staging(buffer[0])

    started = time.perf_counter()
    consumer: dict[str, float] = defaultdict(float)
    finished: list[threading.Event] = []
    count = 0
    tracked = pool.track(cancelled, finished)
    # Readers get the GIL back sooner from threads running Python (switching.py).
    switched = switching.shorten(options.switch_interval)
    try:
        # Started inside the try: if a thread cannot start, the cleanup below still stops
        # the ones that did and closes their files.
        finished.append(pool.start(plan, "fastsafetensors-plan"))
        if ring is not None:
            finished.append(pool.start(report, "fastsafetensors-ring"))
        for i in range(0 if ring is not None else options.threads):
            finished.append(pool.start(partial(worker, i), f"fastsafetensors-io-{i}"))
        clock = time.perf_counter
        while True:
            t0 = clock()
            batch = ready.get()
            consumer["caller: wait for the planner"] += clock() - t0
            if batch is None:
                break
            if isinstance(batch, BaseException):
                raise batch
            for item in batch:
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
    finally:
        # First: what follows may be interrupted. Not in a forked child, whose count started
        # again from 0 (switching._after_fork): this load was counted in the parent.
        if switched and os.getpid() == pid:
            switching.restore()
        cancelled.set()
        if ring is not None and os.getpid() == pid:
            ring.cancel()   # a planner waiting for room in the ring, or the reporter, returns
        _drain(work)
        # The drain may have taken the planner's stop markers: give each worker one back, or
        # a worker waits out its 0.1 s poll before it notices (every load, not only stopped
        # ones: per-tensor reads to a device run one load per tensor).
        _wake(work, options.threads)
        # _end untracks the load once its threads are done: a load ended in the background stays
        # tracked until then, so that interpreter exit waits for its threads too.
        end = partial(_end, finished, in_source, files, tracked)
        if os.getpid() != pid:
            # Collected in a forked child: the parent's threads are not here to wait for.
            for f in list(files):
                _close(f)
            pool.untrack(tracked)
        elif sys.is_finalizing() or threading.get_ident() in idents or pool.collecting():
            # Collected at interpreter exit (the pool's daemon threads are frozen then), on
            # one of this load's own threads, or by the garbage collector anywhere (on a thread
            # that may hold a lock the load's threads need to finish): waiting here could wait
            # for ever, and nobody waits for a collected load.
            pool.in_background(end)
        else:
            try:
                end()
            except BaseException:
                pool.in_background(end)   # interrupted again: the files still get closed
                raise
        seconds = time.perf_counter() - started
        PHASES.add({**consumer, "load: wall time": seconds})
        logger.info("streamed %d tensors, %.1f MB from %d files in %.3f s (%.2f GB/s), %d "
                    "threads, io=%s, %d of %d chunks direct, %d copied from the page cache",
                    count, stats["bytes"] / 1e6, len(files), seconds,
                    stats["bytes"] / 1e9 / max(seconds, 1e-9), options.threads, options.io,
                    stats["direct"], stats["chunks"], stats["mapped"])


def _end(finished: list[threading.Event], in_source: threading.Event, files: list[_File],
         tracked: int) -> None:
    """Wait for a cancelled load's threads (not for a planner blocked in its source, see
    plan()), then close its files and untrack it."""
    for i, done in enumerate(finished):
        while not done.wait(0.05):
            if i == 0 and in_source.is_set():
                break
    for f in list(files):
        _close(f)
    pool.untrack(tracked)


def _drain(work: queue.Queue[Any]) -> None:
    # Unblock a planner waiting on a full queue; workers see `cancelled` and leave.
    try:
        while True:
            work.get_nowait()
    except queue.Empty:
        pass


def _wake(work: queue.Queue[Any], workers: int) -> None:
    """Put up to ``workers`` stop markers without blocking (a planner still running may have
    filled the queue again; the workers then notice ``cancelled`` on their next poll)."""
    for _ in range(workers):
        try:
            work.put_nowait(None)
        except queue.Full:
            return


def _open(path: str, header: Header | None, policy: IOPolicy, names: list[str] | None,
          mapped: bool = False) -> _File:
    fd = open_readonly(path)
    try:
        header = header_of(fd, path, header)
        infos = header.select(names)
        direct_fd = open_direct(fd, path) if policy.mode != "buffered" else None
        f = _File(os.fspath(path), header, fd, direct_fd, infos)
        # Only for what uses it: residency lookups (which choose O_DIRECT) and mapped readers.
        if policy.mode == "auto" and infos and (direct_fd is not None or mapped):
            f.mapping = map_file(fd, header.file_size)
            f.mapped = mapped and f.mapping is not None
        return f
    except BaseException:
        os.close(fd)
        raise


def _close(f: _File) -> None:
    """Close the file and drop its mapping: only once no copy can read from it any more."""
    with f.lock:
        _shut(f)
        address, f.mapping = f.mapping, None
    if address is not None:
        unmap(address, f.header.file_size)


def _shut(f: _File) -> None:
    """Close the file's descriptors (the caller holds ``f.lock``); idempotent, even when a
    close is interrupted (the fields are cleared first: a retry must not close numbers that
    another file may have been given since)."""
    fds, gate = (f.fd, f.direct_fd), f.gate
    f.fd, f.direct_fd, f.gate = -1, None, None
    try:
        close_fds(*fds)
    finally:
        if gate is not None:
            gate.release()   # the planner may open another file


def _file_done(f: _File, *, planned: bool = False, chunks: int = 1) -> None:
    """``chunks`` queued chunks of ``f`` were read (or, with ``planned``, the planner queued
    its last): close the file once nothing more will be read from it."""
    with f.lock:
        if planned:
            f.planned = True
        else:
            f.pending -= chunks
        if f.planned and f.pending == 0:
            _shut(f)


def _files_done(chunks_of: list[_File]) -> None:
    """:func:`_file_done` for the chunks of one report, whose files are ``chunks_of``: each
    file's lock taken once."""
    counts: dict[int, list[Any]] = {}
    for f in chunks_of:
        counts.setdefault(id(f), [f, 0])[1] += 1
    for f, chunks in counts.values():
        _file_done(f, chunks=chunks)


def _plan_file(f: _File, sink: Sink, options: StreamOptions,
               budget: _Budget, hand: Callable[[_Chunk | None], None],
               ready: queue.Queue[list[_Tensor] | BaseException | None],
               cancelled: threading.Event, completion: _Completion,
               gate: AheadGate | None = None) -> None:
    """Allocate the file's wanted tensors in order, queue chunks covering their bytes, and
    hand the planned tensors to the caller, a batch per chunk."""
    header = f.header
    infos = f.infos
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

    bounded = budget.limit is not None
    paged = f.mapped
    reserve = getattr(sink, "reserve", None) if options.keeps_all and not bounded else None
    if reserve is not None and infos:
        t0 = clock()
        reserve(sum(device_bytes(info.nbytes) for info in infos))
        spent["planner: reserve"] += clock() - t0
    # Under a budget every tensor is counted and released on its own.
    grouping = (options.small_tensor_groups and not bounded
                and getattr(sink, "finisher", None) is not None)
    i = 0
    try:
        while i < len(infos):
            info = infos[i]
            i += 1
            if cancelled.is_set():
                return
            begin, end = info.data_offsets
            members = None
            if grouping and 0 < end - begin < GROUP_MEMBER:
                last = _group_end(infos, i - 1)
                if last > i:
                    members = [(m, m.data_offsets[0] - begin) for m in infos[i - 1:last]]
                    end = infos[last - 1].data_offsets[1]
                    info = TensorInfo(f"{info.name} and the {last - i} tensors after it",
                                      "U8", (end - begin,), (begin, end))
                    i = last
            nbytes = end - begin
            t0 = clock()
            if bounded:
                footprint = device_bytes(nbytes)
                if budget.would_block(footprint):
                    flush()  # the tensors already planned complete; the consumer frees budget
                    submit_held()
                    if gate is not None:
                        gate.release()   # the consumer frees budget once reports come
                    t0 = clock()
                if not budget.acquire(footprint):
                    return
            t1 = clock()
            t = _Tensor(info, sink.alloc(info) if nbytes else None, members=members)
            fresh = fresh or nbytes > 0
            spent["planner: wait for budget"] += t1 - t0
            spent["planner: allocate"] += clock() - t1
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
        flush()
        submit_held()
    finally:
        PHASES.add(spent)


def _group_end(infos: list[TensorInfo], first: int) -> int:
    """The index past the last tensor of the group that starts at ``infos[first]`` (a small
    one): the tensors after it that are small, not empty, adjacent in the file, fit in
    GROUP_BYTES with it, and start at a multiple of GROUP_ALIGN within the group (a tensor
    that does not ends it and may start the next)."""
    base, end = infos[first].data_offsets
    j = first + 1
    while j < len(infos):
        begin, stop = infos[j].data_offsets
        if (begin != end or not 0 < stop - begin < GROUP_MEMBER
                or stop - base > GROUP_BYTES or (begin - base) % GROUP_ALIGN):
            break
        end = stop
        j += 1
    return j


def _put(work: queue.Queue[_Chunk | None], chunk: _Chunk | None, cancelled: threading.Event
         ) -> None:
    while not cancelled.is_set():
        try:
            work.put(chunk, timeout=0.1)
            return
        except queue.Full:
            continue


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


def _ring_error(failure: RingFailure, files: list[_File]) -> BaseException:
    """The public error for a chunk the ring could not load."""
    from ..errors import CudaError, ReadError
    from . import driver, ring

    path = files[failure.file_no].path if 0 <= failure.file_no < len(files) else "?"
    if failure.step == ring.SHORT:
        return ReadError(path, failure.begin, failure.end - failure.begin, failure.got)
    if failure.step == ring.READ:
        return OSError(failure.code, os.strerror(failure.code), path)
    step = ring.STEPS[failure.step] if failure.step < len(ring.STEPS) else "ring"
    return CudaError(step, failure.code, driver._name(failure.code))


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


def _resident(f: _File, begin: int, end: int) -> tuple[bytes | None, int]:
    """Page-cache residency of file bytes ``[begin, end)``, per page, and the page-aligned
    offset it starts at. Looked up one segment at a time, by the first reader that needs it,
    before that segment is read (read-ahead from buffered reads of a segment would make its
    cold pages look cached: each segment is a snapshot of the state before this load).

    Taken for a whole file by the planner, before planning it, the lookup cost some 20 ms per
    2 GB file in series with the reads: on the H200 machine io="auto" ran 10% slower than
    io="buffered" warm (15.09 against 16.72 GB/s, first loads). Readers look segments up in
    parallel (ctypes releases the GIL).
    """
    low, high = f.span
    parts: list[bytes] = []
    for s in range(max(begin, low) // SEGMENT, (min(end, high) - 1) // SEGMENT + 1):
        if s not in f.segments:
            # One lookup per segment: readers of the same file wait for it (at some 40 ns a
            # page, about 0.3 ms per 32 MiB segment, far less than reading it).
            with f.looking:
                if s not in f.segments:
                    start = max(s * SEGMENT, low)
                    f.segments[s] = resident_map(f.fd, start,
                                                 min((s + 1) * SEGMENT, high) - start,
                                                 mapping=f.mapping)
        pages = f.segments[s]
        if pages is None:
            return None, 0
        parts.append(pages)
    first = max(max(begin, low) // SEGMENT * SEGMENT, low)
    return b"".join(parts), first - first % mmap.PAGESIZE
