"""No cyclic garbage collection while a whole load builds its result.

A load makes a few objects per tensor (its header entry, the engine's bookkeeping, the tensor
itself), and most of them live on. Python's collector (before 3.14's incremental one) runs a
full collection each time the objects that survived since the last one reach a quarter of all
tracked objects, and a process with torch imported tracks some 170,000: on the 2-core CPU VM an
engine load of 20,000 tensors (host-memory sink) ran three full collections, 0.32 s of its
0.89 s. The calls that return a whole result from local files therefore pause the collector
until they return: ``load`` and ``load_file``, upstream's ``copy_files_to_device``, and what
goes through them (accelerate's ``safe_load_file`` to a GPU; the batches ``ParallelLoader``
reads on a thread of its own for several ranks). Reference counting frees memory as usual
meanwhile; only reference cycles wait, and a load makes almost none (9-27 objects a load
there).

The pause is the process's: other threads run without cyclic collection meanwhile too, and a
``gc.disable()`` they make during it is undone when it ends. Hence its limits. Streams handed
to the caller (``iter_tensors``) do not pause: the caller's own code runs between two tensors,
for as long as it likes. A Hub repo id does not either: its load may wait for downloads.
Loads that overlap share one pause: the collector is enabled again when the last of them
returns, if it was enabled when the first began.

``from_pretrained(..., loader="fastsafetensors")`` pauses it too (since the twenty-fourth
session), from the moment transformers has the checkpoint's files (its downloads are done) to
the end of the call: transformers' own new objects started a full pass there, which held the
GIL while the load's threads needed it (8 GB to an H200: 0.41 s with the collector on, 0.25 s
off; docs/transformers.md, "The garbage collector"). The option ``pause_gc="off"`` (the
environment, ``configure()``, or ``loader_options``) leaves the collector alone in all of them.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

from . import config
from .forking import in_child

__all__ = ["paused"]

# Reentrant: a collection that runs a finalizer inside this module's few statements could not
# come back here with a plain lock held (none of them allocates, but the rule is cheap).
_lock = threading.RLock()
_depth = 0                    # pauses open, all threads
_mine = threading.local()     # pauses open on this thread (a forked child keeps only its own)
_was_enabled = False


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No automatic cyclic collection inside the ``with`` block (nor in other threads
    meanwhile: the collector is the process's), unless the option ``pause_gc`` is "off"."""
    global _depth, _was_enabled
    if config.get("pause_gc") == "off":
        yield
        return
    entered = False
    try:
        with _lock:
            # The calls first, then the counts with no call among them: CPython runs a Ctrl-C
            # handler only as a call returns or a function starts, and one between a count and
            # `entered` left a pause that nothing ends (the collector then stayed off after
            # every later load of the process).
            enabled = gc.isenabled()
            mine = getattr(_mine, "depth", 0) + 1
            if _depth == 0:
                _was_enabled = enabled
            _depth += 1
            _mine.depth = mine
            entered = True
            gc.disable()
        yield
    finally:
        if entered:
            with _lock:
                _mine.depth -= 1
                _depth -= 1
                if _depth == 0 and _was_enabled:
                    gc.enable()


def _after_fork() -> None:
    # A child keeps the forking thread only: pauses other threads had open will never end
    # there, and the collector would stay off for the child's life.
    global _lock, _depth
    _lock = threading.RLock()
    inherited, _depth = _depth, getattr(_mine, "depth", 0)
    if inherited and not _depth and _was_enabled:
        gc.enable()


in_child(_after_fork)
