"""What a load's caller shares with the load's threads, made so that a Ctrl-C cannot leave it
locked.

CPython raises KeyboardInterrupt on the main thread where it runs signal handlers: as a Python
function starts and as a call returns. ``queue.Queue``, ``threading.Condition``, ``Event`` and
``Semaphore`` are Python code around a lock: a Ctrl-C as ``Condition.__enter__``'s acquire
returns, or as its ``__exit__`` starts, leaves the lock held for good, and every thread that
touches the object next waits for ever (a planner putting to a queue the caller was reading,
a reader setting the event the caller was waiting on), and the load's files with them.

Here each lock is taken only by a single C call (``queue.SimpleQueue``'s ``put`` and ``get``)
or by ``with`` on a C lock, which runs no Python and no signal handler between taking the lock
and entering the block, nor between leaving the block and letting the lock go; a Ctrl-C as a
call inside the block returns leaves through ``__exit__``. The main thread (the caller of a
load and of its cleanup) touches only these; the load's own threads, which a Ctrl-C never
interrupts, may use anything. A Ctrl-C between two such calls of the caller loses at most a
wake-up, a stop marker or a result of a load that is stopping, and each waiter also looks
again after a timeout. tests/test_ctrl_c_waits.py raises one at each of these places, and a
real signal handler thousands of times.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Generic, TypeVar

__all__ = ["Latch", "Tokens", "Handoff", "Wakeups"]

T = TypeVar("T")

#: The longest a waiter without a timeout blocks before it looks at the flag again: a waiter
#: interrupted between taking a latch's lock and handing it on leaves it taken (see Latch.wait).
LOOK_AGAIN = 0.5


class Latch:
    """Set once and never cleared: ``threading.Event``'s ``set``, ``is_set`` and ``wait``."""

    def __init__(self) -> None:
        self._set = False
        self._guard = threading.Lock()   # two setters: only one lets go of _open
        # Taken until set(): each waiter takes it once it was let go, and lets it go again for
        # the next one.
        self._open = threading.Lock()
        self._open.acquire()

    def set(self) -> None:
        with self._guard:
            if not self._set:
                self._set = True
                self._open.release()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Whether it is set, waiting up to ``timeout`` seconds (None: until it is)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._set:
            left = LOOK_AGAIN if deadline is None else deadline - time.monotonic()
            if left <= 0:
                break
            # A Ctrl-C as this returns True leaves _open taken: the flag is set by then, and
            # every waiter looks at it first (one already blocked here looks again later).
            if self._open.acquire(timeout=min(left, LOOK_AGAIN)):
                self._open.release()
        return self._set


class Tokens:
    """A counting semaphore: ``take`` and ``give`` are one C call each."""

    def __init__(self, count: int) -> None:
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(count):
            self._tokens.put(None)

    def take(self, timeout: float | None = None) -> bool:
        """A token, waiting up to ``timeout`` seconds (0: not at all; None: until one comes);
        False if none came."""
        try:
            self._tokens.get(timeout=timeout)
        except queue.Empty:
            return False
        return True

    def give(self) -> None:
        self._tokens.put(None)


class Wakeups:
    """A waiter's wake-ups: ``notify`` after changing what it waits for, ``wait`` for the next
    one (or a timeout) before looking again. A wake-up that came while nobody waited is kept,
    so none is lost between looking and waiting; stale ones only make a waiter look again."""

    def __init__(self) -> None:
        self._woken: queue.SimpleQueue[None] = queue.SimpleQueue()

    def notify(self) -> None:
        self._woken.put(None)

    def wait(self, timeout: float) -> None:
        try:
            self._woken.get(timeout=timeout)
        except queue.Empty:
            pass


class Handoff(Generic[T]):
    """Items from one producer to several consumers, at most ``size`` handed over and not yet
    taken (the producer waits for room), and an end marker (None) for each consumer."""

    def __init__(self, size: int) -> None:
        self._items: queue.SimpleQueue[T | None] = queue.SimpleQueue()
        self._room = Tokens(size)

    def put(self, item: T, stop: Latch, poll: float = 0.1) -> None:
        """Hand ``item`` over once there is room; dropped once ``stop`` is set."""
        while not stop.is_set():
            if self._room.take(poll):
                if not stop.is_set():
                    self._items.put(item)
                return

    def get(self, timeout: float) -> T | None:
        """The next item, or None for an end marker; raises ``queue.Empty`` after ``timeout``
        seconds without one."""
        item = self._items.get(timeout=timeout)
        if item is not None:
            self._room.give()
        return item

    def end(self, consumers: int) -> None:
        """An end marker for each consumer, after the items already handed over (markers take
        no room), and room for a producer that waits for it (stopped: it then drops its
        item)."""
        for _ in range(consumers):
            self._items.put(None)
        self._room.give()
