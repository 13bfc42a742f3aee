"""A load's planning and reports through the ring (``cuda_calls="ring"``, ring.py): the planner
hands ring.c a group of tensors at a time, which ring.c cuts into chunks, and each report says
how many of them are complete."""

from __future__ import annotations

import os
import queue
import threading
import time
from array import array
from collections import defaultdict, deque
from collections.abc import Callable
from functools import partial
from itertools import compress
from typing import Any

from .cpu import CACHED_ENOUGH, IOPolicy
from .posix import DIRECT_ALIGN, STATS
from .ring import RingFailure
from .streamparts import (
    PHASES,
    AheadGate,
    Sink,
    StreamOptions,
    _allocated,
    _Budget,
    _Completion,
    _File,
    _files_done,
    _Tensor,
)
from .waiting import Latch


class RingPlan:
    """Ring mode's planning and reports. The planner allocates each file's wanted tensors in
    order and hands their bytes to the ring a group at a time (:meth:`plan_file`), which
    ring.c cuts into chunks; the reporter takes each report (:meth:`take`), which says how many
    of those tensors are complete. Python's work is per tensor and per report: cutting chunks
    in Python took some 20 us each on the 2-core VM, 2,000 of them for 8 GB, and beside
    transformers' thread, which holds the GIL half the time or more, the readers then waited
    for chunks (H200 runs 8-10)."""

    def __init__(self, ring: Any, sink: Sink, options: StreamOptions, policy: IOPolicy,
                 completion: _Completion, ready: queue.SimpleQueue[Any], files: list[_File],
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
                  cancelled: Latch) -> None:
        """Allocate ``f``'s wanted tensors (file ``number`` of the load) and hand them to
        the ring and to the caller: a group once its tensors reach ``staging_bytes`` (the
        readers start on the first ones while the rest are allocated), before the planner
        waits for budget, and at the file's end."""
        options, sink = self.options, self.sink
        spent: dict[str, float] = defaultdict(float)
        clock = time.perf_counter
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

        def before_wait() -> None:
            hand_over()
            self.submit_held()
            if self.gate is not None:
                self.gate.release()   # the consumer frees budget once reports come

        try:
            for info, members, flat in _allocated(f, sink, options, budget, cancelled,
                                                  before_wait, spent):
                first, last = info.data_offsets
                size = last - first
                group.append(_Tensor(info, flat, pieces=1 if size else 0, members=members))
                begin.append(start + first)
                end.append(start + last)
                dst.append(flat.data_ptr() if flat is not None else 0)
                nbytes += size
                if nbytes >= options.staging_bytes:
                    hand_over()
            if not cancelled.is_set():
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


def ring_error(failure: RingFailure, files: list[_File]) -> BaseException:
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
