"""What one streamed load is made of, shared by the engine (stream.py) and the ring's planning
(ringplan.py): its options and the device it writes to (:class:`Sink`), the tensors, chunks and
files it plans, its memory budget, how a tensor's completion is tracked, the files' opening,
closing and page-cache lookups, the phases' clock, and the gate that keeps a load read ahead
quiet."""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..forking import renew_lock
from ..format import Header, TensorInfo, header_of, open_readonly
from .cpu import IOPolicy
from .pagecache import map_file, munmap, resident_map
from .posix import DIRECT_ALIGN, open_direct
from .waiting import Latch, Tokens, Wakeups

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
renew_lock(PHASES)   # every engine thread takes it: a forked child must not find it held
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
    gets no reader threads of Python: the planner hands the ring groups of tensors (device
    addresses from ``data_ptr()``), which it cuts into chunks (ringplan.py), one thread opens
    it on a stream of ``new_stream`` and on
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
    # by the first Python reader that needs it (see _resident; the ring's C readers count
    # their own chunks' cached pages).
    segments: dict[int, bytes | None] = field(default_factory=dict, repr=False)
    looking: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Address of a read-only mapping of the whole file (None: none), made once under io="auto"
    # for the residency lookups and for mapped readers; kept until the load's threads are
    # done, since copies out of it may still run after the last chunk was taken.
    mapping: int | None = None
    mapped: bool = False          # mapped readers may copy from it
    # The planner's bound on open files (OPEN_FILES), given back once when the file is shut.
    gate: Tokens | None = field(default=None, repr=False)

    @property
    def span(self) -> tuple[int, int]:
        """File offsets of the first and past the last wanted byte."""
        start = self.header.data_start
        return start + self.infos[0].data_offsets[0], start + self.infos[-1].data_offsets[1]


#: Bytes of a file whose page-cache residency one lookup takes (mincore: some 40 ns a page).
SEGMENT = 32 << 20


class _Budget:
    """Device bytes allocated and not yet given up, held under ``limit`` (None: unbounded).
    A yielded tensor counts until the consumer asks for the next one. The caller releases,
    so no Condition (waiting.py): a C lock for the count, and wake-ups for the planner."""

    def __init__(self, limit: int | None, cancelled: Latch):
        self.limit = limit
        self.used = 0
        self.cancelled = cancelled
        self.lock = threading.Lock()
        self.freed = Wakeups()

    def would_block(self, nbytes: int) -> bool:
        if self.limit is None:
            return False
        with self.lock:
            return self.used > 0 and self.used + nbytes > self.limit

    def acquire(self, nbytes: int) -> bool:
        """Count ``nbytes`` once they fit; False (nothing counted) when the load stopped while
        waiting: the tensor must not be allocated past the budget then."""
        if self.limit is None:   # nothing to hold to: no lock per tensor
            return True
        while True:
            with self.lock:
                if self.cancelled.is_set():
                    return False
                # A tensor larger than the whole budget still goes when nothing else is held.
                if not (self.used > 0 and self.used + nbytes > self.limit):
                    self.used += nbytes
                    return True
            self.freed.wait(0.1)

    def release(self, nbytes: int) -> None:
        if self.limit is None:
            return
        with self.lock:
            self.used -= nbytes
        self.freed.notify()


class _Completion:
    """When each tensor of one load has all its pieces queued for copy: one lock for every
    tensor's count, and the caller woken once per chunk. (An Event per tensor costs more to
    create than planning the tensor does, which shows with tens of thousands of small
    tensors.) No Condition: the caller waits here (waiting.py)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.progress = Wakeups()

    def planned(self, t: _Tensor, pieces: int, seen: bool) -> None:
        """The planner made all ``pieces`` of ``t``. ``seen``: some may be queued already
        (a chunk holding them went to the readers while ``t`` was planned); if none can be,
        no reader has touched the count, and the caller gets ``t`` only after this, so it is
        set without the lock (most tensors: a chunk holds many)."""
        if not seen:
            t.pieces = pieces
            return
        with self.lock:
            # Not 0 yet (no wake-up): the last piece is in the chunk being filled, which goes
            # to the readers after this.
            t.pieces += pieces - UNCOUNTED

    def queued(self, chunks: list[list[_Piece]], event: Any) -> None:
        """The copies of ``chunks`` (their pieces each) are queued, ``event`` marking the end
        of all of them."""
        with self.lock:
            for pieces in chunks:
                for piece in pieces:
                    piece.tensor.events.append(event)
                    piece.tensor.pieces -= 1
        self.progress.notify()

    def reported(self, tensors: list[_Tensor | None], start: int, stop: int,
                 event: Any) -> None:
        """Ring mode: ``tensors[start:stop]`` are complete once ``event`` is (dropped from
        the list: the caller holds them)."""
        with self.lock:
            for i in range(start, stop):
                t = tensors[i]
                tensors[i] = None
                if t is not None and t.pieces:
                    t.events = [event]
                    t.pieces = 0
        self.progress.notify()

    def wait(self, t: _Tensor, errors: list[BaseException]) -> None:
        # 0 once it is final (its events appended before), so no lock is needed to see it
        # reach 0; a failed thread wakes nobody: looked at every 0.05 s.
        while t.pieces and not errors:
            self.progress.wait(0.05)


class AheadGate:
    """For a load read ahead of a thread that runs Python meanwhile (transformers building the
    model): its caller waits until every chunk is submitted (:meth:`wait_planned`), and the
    ring's reports wait until the caller lets them go (:meth:`release`), so that while the
    C threads read and copy, none of the load's Python competes for the GIL. The load lets
    them go itself before its planner would wait on a report (the ring full, too many files
    open); without a ring there is nothing to hold. The caller waits and releases here, so
    latches rather than a Condition (waiting.py)."""

    def __init__(self) -> None:
        self._planned = Latch()
        self._released = Latch()
        self._either = Latch()   # planned or released: what wait_planned() waits for

    @property
    def planned(self) -> bool:
        return self._planned.is_set()

    @property
    def released(self) -> bool:
        return self._released.is_set()

    def set_planned(self) -> None:
        self._planned.set()
        self._either.set()

    def release(self) -> None:
        self._released.set()
        self._either.set()

    def not_needed(self) -> None:
        """Nothing to hold back (no ring): planned and released at once."""
        self._planned.set()
        self._released.set()
        self._either.set()

    def wait_planned(self, timeout: float) -> bool:
        """Until every chunk is submitted (True), or the reports were let go or ``timeout``
        seconds passed (False)."""
        self._either.wait(timeout)
        return self.planned

    def wait_released(self, cancelled: Latch,
                      failed: Callable[[], bool] = lambda: False) -> None:
        """Until the caller lets the reports go, the load stops, or ``failed()`` says the
        ring failed (asked every WORKER_POLL): a failed load must not wait for the caller,
        who would meanwhile go on building a model for it."""
        while not self._released.is_set() and not cancelled.is_set() and not failed():
            self._released.wait(WORKER_POLL)


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
    size = f.header.file_size
    with f.lock:
        _shut(f)
        # As in _shut: taken off the file first (a retry must not unmap an address given to
        # another mapping since), then unmapped by the C function itself, no Python function
        # starting in between: a Ctrl-C as unmap() started lost the mapping for good.
        address, f.mapping = f.mapping, None
        if address is not None:
            munmap(address, size)


def _shut(f: _File) -> None:
    """Close the file's descriptors (the caller holds ``f.lock``); idempotent, even when a
    close is interrupted (the fields are cleared first: a retry must not close numbers that
    another file may have been given since)."""
    fd, direct_fd, gate = f.fd, f.direct_fd, f.gate
    f.fd, f.direct_fd, f.gate = -1, None, None
    # Closed by os.close itself, with no Python function starting between the fields' clearing
    # and the closes (CPython runs a Ctrl-C's handler as one starts, or as a C call returns):
    # a Ctrl-C as close_fds() started lost both descriptors for good.
    try:
        if fd >= 0:
            os.close(fd)
    finally:
        try:
            if direct_fd is not None and direct_fd >= 0:
                os.close(direct_fd)
        finally:
            if gate is not None:
                gate.give()   # the planner may open another file


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


def _allocated(f: _File, sink: Sink, options: StreamOptions, budget: _Budget,
               cancelled: Latch, before_wait: Callable[[], None],
               spent: dict[str, float]
               ) -> Iterator[tuple[TensorInfo, list[tuple[TensorInfo, int]] | None, Any]]:
    """A planner's walk of ``f``'s wanted tensors in file order: ``(info, members, memory)``
    for each, allocated once the budget allowed it (``before_wait()`` first where the planner
    must wait for the consumer, who frees budget as it consumes the tensors planned so far).
    With ``small_tensor_groups`` a run of small tensors comes as one group (``info`` naming
    them, ``members`` each with its offset in it). Ends early once the load stops (then
    ``cancelled`` is set)."""
    infos = f.infos
    bounded = budget.limit is not None
    # Where the caller keeps every tensor, the file's memory is reserved at once.
    reserve = getattr(sink, "reserve", None) if options.keeps_all and not bounded else None
    if reserve is not None and infos:
        t0 = time.perf_counter()
        reserve(sum(device_bytes(info.nbytes) for info in infos))
        spent["planner: reserve"] += time.perf_counter() - t0
    # Under a budget every tensor is counted and released on its own.
    grouping = (options.small_tensor_groups and not bounded
                and getattr(sink, "finisher", None) is not None)
    i = 0
    while i < len(infos) and not cancelled.is_set():
        info = infos[i]
        begin, end = info.data_offsets
        members = None
        last = _group_end(infos, i) if grouping and 0 < end - begin < GROUP_MEMBER else i + 1
        if last > i + 1:
            members = [(m, m.data_offsets[0] - begin) for m in infos[i:last]]
            end = infos[last - 1].data_offsets[1]
            info = TensorInfo(f"{info.name} and the {last - i - 1} tensors after it", "U8",
                              (end - begin,), (begin, end))
        i = last
        if bounded:
            footprint = device_bytes(end - begin)
            if budget.would_block(footprint):
                before_wait()
            t0 = time.perf_counter()
            taken = budget.acquire(footprint)
            spent["planner: wait for budget"] += time.perf_counter() - t0
            if not taken:
                return
        t0 = time.perf_counter()
        memory = sink.alloc(info) if end > begin else None
        spent["planner: allocate"] += time.perf_counter() - t0
        yield info, members, memory


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


def _resident(f: _File, begin: int, end: int) -> tuple[bytes | None, int]:
    """Page-cache residency of file bytes ``[begin, end)``, per page, and the page-aligned
    offset it starts at. Looked up one segment at a time, by the first reader that needs it,
    before that segment is read (read-ahead from buffered reads of a segment would make its
    cold pages look cached: each segment is a snapshot of the state before this load).

    Taken for a whole file by the planner, before planning it, the lookup cost some 20 ms per
    2 GB file in series with the reads: on the H200 machine io="auto" ran 10% slower than
    io="buffered" warm (15.09 against 16.72 GB/s, first loads). Readers look segments up in
    parallel (ctypes releases the GIL). The ring's readers count their own chunk's cached
    pages instead, in C, as each read starts (ring.c, read_direct).
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
