"""Python's garbage collector, paused while ``from_pretrained`` loads through this package.

transformers makes many objects while it loads a checkpoint (its table of key renamings, the
model's modules). On Python 3.12 they start a full pass of the collector inside the call, which
visits every object of the process (some 400,000 with torch and transformers imported) with
the GIL held. On the H200 machine ``from_pretrained(device_map="cuda")`` with our loader took
0.41 s with the collector on and 0.25 s with it off (run 12); on the 2-core CPU VM one such
pass took 0.25-0.33 s (docs/transformers.md, "The garbage collector").

So a ``from_pretrained`` call with ``loader="fastsafetensors"`` turns the collector off, if it
is on, and the last such call running turns it back on when it ends, unless something else
turned it on meanwhile. The pass is put off, not saved: the collector makes it as the program
goes on making objects after the call, where stock makes it inside. ``pause_gc="off"`` leaves
the collector alone.
"""

from __future__ import annotations

import gc
import os
import threading

__all__ = ["pause", "resume"]

_lock = threading.Lock()
_depth = 0          # calls running that asked for a pause
_paused = False     # whether the first of them turned the collector off


def pause() -> None:
    """Turn the collector off until the matching :func:`resume` (if it is on)."""
    global _depth, _paused
    with _lock:
        if _depth == 0:
            _paused = gc.isenabled()
            if _paused:
                gc.disable()
        _depth += 1


def resume() -> None:
    """One call that :func:`pause` d ended: the last one turns the collector back on, if it
    turned it off and it is still off."""
    global _depth, _paused
    with _lock:
        if _depth == 0:   # a forked child's reset came in between
            return
        _depth -= 1
        if _depth == 0:
            if _paused and not gc.isenabled():
                gc.enable()
            _paused = False


def _after_fork() -> None:
    # A child keeps the forking thread only: calls other threads were running never end there.
    global _lock, _depth, _paused
    _lock = threading.Lock()
    if _depth and _paused and not gc.isenabled():
        gc.enable()
    _depth = 0
    _paused = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
