"""Threads kept across loads for the streaming engine, and for the reads of the CPU engine and of
a file handle (:func:`run_all`).

Starting a Python thread waits until the new thread runs, about 60 us here, and a load starts a
planner and up to 16 readers. A load to a device of a single tensor, which is what
transformers asks for tensor by tensor, would pay that on every tensor. So the engine's
threads come from this pool: a thread that finished its task waits ``IDLE_SECONDS`` for the next
one and then ends. The pool is unbounded, because a load's planner and readers must all run at
once (a reader waits for its planner's chunks), so a bounded pool shared by concurrent loads
could deadlock.

A load's caller waits for these threads with latches (waiting.py), which a Ctrl-C cannot leave
locked. Starting a new one still goes through ``Thread.start``, which waits on an Event: a
Ctrl-C there leaves that thread blocked for good before it runs anything (see :func:`start`).
"""

from __future__ import annotations

import atexit
import gc
import logging
import queue
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..forking import in_child
from .waiting import Latch

__all__ = ["start", "run_all", "busy", "started", "track", "untrack", "in_background",
           "collecting", "IDLE_SECONDS"]

T = TypeVar("T")

#: How long an idle thread waits for another task before it ends.
IDLE_SECONDS = 10.0
#: The name of a thread waiting for a task; a running one is named after its task.
IDLE_NAME = "fastsafetensors-idle"

logger = logging.getLogger(__name__)

#: At interpreter exit, how long running loads get to stop before daemon threads are frozen.
EXIT_SECONDS = 2.0

# Held only for a few integer updates and queue operations, never around anything that makes
# a container or exception object: such an allocation can start a garbage collection, which can
# finalize an abandoned load, whose cleanup waits for tasks that need this lock to finish.
_lock = threading.Lock()
# Loads running, for the exit handler. A lock of their own, reentrant: the garbage collector can
# finalize an abandoned load (which untracks itself) inside any allocation, this lock held.
_running_lock = threading.RLock()
_running: dict[int, tuple[Latch, list[Latch]]] = {}
_tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
_idle = 0        # threads waiting in _tasks.get(), each owed at most one task
_busy = 0        # threads running a task
_started = 0


def start(task: Callable[[], None], name: str, finished: list[Latch] | None = None) -> Latch:
    """Run ``task`` on a pooled thread (renamed ``name`` while it runs); the latch is set when
    it returned (a latch, not an Event: a Ctrl-C in the caller's wait for it cannot leave a
    lock held that this thread then waits for in set()). The engine's tasks report their
    errors themselves; anything else a task raises is logged, so that the thread stays in the
    pool. ``finished``: the latch is appended to it before the task is handed over, so that a
    caller interrupted (a Ctrl-C) as this returns still has the latch of every task that may
    run; one given up is set at once."""
    global _idle, _busy, _started
    done = Latch()

    def run() -> None:
        global _busy, _idle
        threading.current_thread().name = name
        try:
            task()
        except BaseException:  # noqa: BLE001 - a thread the pool counts as idle must not die
            logger.exception("a pooled task raised")
        finally:
            threading.current_thread().name = IDLE_NAME
            with _lock:
                _busy -= 1
                _idle += 1   # before done: whoever waits for it may hand this thread more
            done.set()

    # A new thread takes the task out of the box, or the cleanup below does if it never did: a
    # Ctrl-C (raised as a call returns, as the lock is let go too) can come before or after
    # the thread started. One handed to an idle thread runs whatever comes after.
    box = [run]
    handed = counted = False
    try:
        if finished is not None:
            finished.append(done)
        with _lock:
            if _idle:
                _busy += 1
                _idle -= 1
                handed = True   # no call before the put: set, the put has been made
                _tasks.put(run)   # under the lock: a thread timing out sees it (see _serve)
                return done
        with _lock:
            _busy += 1
            counted = True
            _started += 1
            number = _started
        threading.Thread(target=_serve, args=(box,), name=f"{IDLE_NAME}-{number}",
                         daemon=True).start()
    except BaseException:
        with _lock:
            runs = handed or (counted and not box)
            if counted and box:   # no thread will run it: not busy (the caller gets the error)
                box.clear()
                _busy -= 1
        if not runs:
            done.set()   # nothing to wait for
        raise
    return done


def run_all(calls: Sequence[Callable[[], T]], threads: int, name: str) -> list[T]:
    """Each of ``calls`` on up to ``threads`` pooled threads (named ``name-0``, ...); their
    results in order. The first error one raises is raised here, once the calls already
    running returned (the others are dropped: on a cold disk the rest of a file can take many
    seconds), so that none runs after this returns or raises.

    ThreadPoolExecutor did this before, but a Ctrl-C in the caller's use of its semaphore or of
    its futures' conditions could leave their lock held, and the caller then waited for good
    for its threads as it left. Here the caller and the threads share only queues of single C
    calls and latches (waiting.py)."""
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(calls)):
        todo.put(i)
    results: queue.SimpleQueue[tuple[int, Any, BaseException | None]] = queue.SimpleQueue()
    stop = Latch()

    def work() -> None:
        while not stop.is_set():
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((i, calls[i](), None))
            except BaseException as exc:  # noqa: BLE001 - raised on the caller's thread
                results.put((i, None, exc))

    out: list[Any] = [None] * len(calls)
    finished: list[Latch] = []
    try:
        for n in range(min(threads, len(calls))):
            start(work, f"{name}-{n}", finished)
        for _ in calls:
            i, value, error = results.get()
            if error is not None:
                raise error
            out[i] = value
    finally:
        stop.set()
        for done in finished:
            done.wait()
    return out


def track(cancelled: Latch, finished: list[Latch]) -> None:
    """Register a running load: at interpreter exit it is cancelled, and its tasks (``finished``
    lists their events) get a moment to end while they still can."""
    entry = (cancelled, finished)
    with _running_lock:
        _running[id(cancelled)] = entry


def untrack(cancelled: Latch) -> None:
    """The load of ``cancelled`` ended (nothing happens if it was not tracked): known by the
    latch the caller holds from the start, not by what track() returned, which a Ctrl-C as it
    returned would have lost."""
    with _running_lock:
        _running.pop(id(cancelled), None)


@atexit.register
def _stop_running_loads() -> None:
    # Runs before daemon threads are frozen: a load left suspended (a generator never closed)
    # would otherwise be collected after, its threads frozen mid-read or mid-copy.
    with _running_lock:
        loads = list(_running.values())
    for cancelled, _ in loads:
        cancelled.set()
    deadline = time.monotonic() + EXIT_SECONDS
    for _, finished in loads:
        for done in list(finished):
            done.wait(max(0.0, deadline - time.monotonic()))


# Which thread is collecting, noted by callbacks that are C methods. A Python function there is
# where CPython runs the signal handlers of signals that came during the collection, and the
# collector prints and drops what a callback raises: a Ctrl-C pressed during any collection, in
# any program that imported this package, was lost.
_phases = OrderedDict(start=None, stop=None)   # the last key: the last phase anywhere
_last_start: dict[str, object] = {}            # "start": the info of the last collection
_this_thread = threading.local()                # .start: the info of this thread's last one
_callbacks: list[Callable[..., object]] = [
    _phases.move_to_end,   # move_to_end(phase, info): info, a dict with keys, counts as True
    _last_start.__setitem__, _this_thread.__setattr__]
gc.callbacks.extend(_callbacks)


def collecting() -> bool:
    """Whether this thread is running a garbage collection (finalizers run inside it, wherever
    the thread happened to allocate, whatever locks it holds)."""
    # Another thread can run during a collection, while a finalizer waits: it is not collecting.
    return (next(reversed(_phases)) == "start"
            and getattr(_this_thread, "start", None) is _last_start.get("start"))


def in_background(task: Callable[[], None]) -> None:
    """Run ``task`` on a thread of its own, not waited for; at interpreter exit not at all (a
    thread started then never runs, and Python 3.11 waits for it for ever): the process ends
    what it would have ended."""
    if sys.is_finalizing():
        return
    try:
        threading.Thread(target=task, name="fastsafetensors-cleanup", daemon=True).start()
    except RuntimeError:   # "can't create new thread at interpreter shutdown" (3.12+)
        pass


def busy() -> int:
    """Threads running a task now (tests check that a finished load leaves none)."""
    with _lock:
        return _busy


def started() -> int:
    """Threads started since import (tests check that finished ones are reused)."""
    with _lock:
        return _started


def _serve(box: list[Callable[[], None]]) -> None:
    # The first task comes in a list emptied here: a Thread keeps its args until its target
    # returns, so a task passed directly (its closure holding the finished load's state, the
    # device tensors of a load stopped early) would live as long as the thread.
    with _lock:   # empty if start() gave the task up (a Ctrl-C as this thread started)
        run: Callable[[], None] | None = box.pop() if box else None
    while run is not None:
        run()
        run = None   # its closure holds the finished load's state: not kept while idle
        run = _next()


def _next() -> Callable[[], None] | None:
    """The next task for an idle thread, or None when none came in IDLE_SECONDS (the thread
    then ends, no longer counted as idle)."""
    global _idle
    try:
        return _tasks.get(timeout=IDLE_SECONDS)
    except queue.Empty:
        pass
    while True:
        with _lock:
            # A task handed to an idle thread is put while the lock is held, so any task
            # counted on this thread is in the queue by now. (No exception here: see _lock.)
            if _tasks.empty():
                _idle -= 1
                return None
        try:
            return _tasks.get_nowait()
        except queue.Empty:
            continue   # another idle thread took it (they take without the lock): look again


def _after_fork() -> None:
    # A forked child has none of the parent's threads: counted as idle, they would be handed
    # tasks that nobody runs (and the parent's loads do not run here).
    global _lock, _tasks, _idle, _busy, _running, _running_lock
    _lock = threading.Lock()
    _running_lock = threading.RLock()
    _tasks = queue.SimpleQueue()
    _idle = _busy = 0
    _running = {}


in_child(_after_fork)
