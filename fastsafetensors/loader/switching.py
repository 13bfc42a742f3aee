"""Python's thread switch interval, shortened while the engine's reader threads run.

A reader thread that returns from a read (or from any call that released the GIL) needs the GIL
back to go on. When another thread is running Python meanwhile (transformers building the model
while the batch reads ahead, a consumer converting each tensor), CPython hands the GIL over only
when that thread blocks or when the switch interval (5 ms by default) has passed: each reader
then waits up to 5 ms several times a chunk. On the H200 machine a transformers batch read
8.21 GB in 0.41-0.44 s once transformers waited for it, but took 0.71-0.81 s when it ran while
transformers built the model (docs/benchmarks.md, section 4). On the 2-core CPU VM an engine
load of 0.81 GB beside a thread running Python took 196-252 ms with the default interval and
123-148 ms with 500 us, while that thread's own work took as long either way, and a load with
no such thread took as long either way too (``benchmarks/bench_beside_python.py``).

So an engine load sets the interval to ``switch_interval_us`` (500 us by default) while it runs,
if it is longer, and sets it back when the last load running ends, unless something else set
another value meanwhile (that value stays). The interval is the process's: other threads switch
more often meanwhile too. 0 leaves it alone.
"""

from __future__ import annotations

import sys
import threading

from ..forking import in_child

__all__ = ["shorten", "restore"]

# Reentrant: a load collected by the garbage collector restores from a finalizer, which may run
# on this thread inside one of the few statements below (sys.getswitchinterval allocates).
_lock = threading.RLock()
_depth = 0                  # loads running that asked for a shorter interval
_saved: float | None = None   # the interval before the first of them, if it was changed
_set: float | None = None     # what it was changed to


def shorten(seconds: float, due: list[bool] | None = None) -> bool:
    """Shorten the interval to ``seconds`` (if it is longer) until :func:`restore`; returns
    whether a matching :func:`restore` is due (False for 0: nothing was done). ``due`` gets
    True appended as soon as it is: a Ctrl-C (which CPython raises as a call returns) anywhere
    in here after that still leaves the caller knowing that it must restore."""
    global _depth, _saved, _set
    if seconds <= 0:
        return False
    with _lock:
        _depth += 1
        if due is not None:
            due.append(True)
        if _depth == 1:
            _saved = _set = None
            current = sys.getswitchinterval()
            if seconds < current:
                # Saved before the call: interrupted as it returns, _set stays None and
                # restore() sets the interval back all the same.
                _saved = current
                sys.setswitchinterval(seconds)
                _set = sys.getswitchinterval()
    return True


def restore(due: list[bool] | None = None) -> None:
    """One load that :func:`shorten` ed ended: the last one sets the interval back, unless it was
    changed meanwhile. ``due``: the list shorten() marked, unmarked here as the load's count
    goes: a restore cut short by a Ctrl-C can be called again, and does nothing once done."""
    global _depth, _saved, _set
    with _lock:
        if _depth == 0 or (due is not None and not due):   # a fork's reset, or done already
            return
        # Set back before the count goes: a Ctrl-C as a call below returns leaves the count
        # (and the mark) as they were, and the next call finishes. It left the interval short
        # and _saved for good when the count had gone first.
        if _depth == 1 and _saved is not None:
            if _set is None or sys.getswitchinterval() == _set:
                sys.setswitchinterval(_saved)
            _saved = _set = None
        _depth -= 1   # and the mark, with no call in between
        if due is not None:
            del due[:]


def _after_fork() -> None:
    # A child keeps the forking thread only: loads other threads were running never end there.
    global _lock, _depth, _saved, _set
    _lock = threading.RLock()
    if _depth and _saved is not None and (_set is None or sys.getswitchinterval() == _set):
        sys.setswitchinterval(_saved)
    _depth = 0
    _saved = _set = None


in_child(_after_fork)
