"""No cyclic garbage collection while a whole load builds its result.

A load makes a few objects per tensor (its header entry, the engine's bookkeeping, the tensor
itself), and most of them live on. Python's collector (before 3.14's incremental one) runs a
full collection each time the objects that survived since the last one reach a quarter of all
tracked objects, and a process with torch imported tracks some 170,000: on the 2-core CPU VM a
load of 20,000 tensors ran three full collections, 0.32 s of its 0.89 s. The calls that return
a whole result (``load``, ``load_file``, upstream's ``copy_files_to_device``, and so
accelerate's ``safe_load_file`` and each batch ``ParallelLoader`` reads on its own thread for
vLLM) therefore pause the collector until they return. Reference counting frees memory as
usual meanwhile; only reference cycles wait, and a load makes almost none (9-27 objects a load
there).

Streams handed to the caller (``iter_tensors``) do not pause it: the caller's own code runs
between two tensors, for as long as it likes. (A ``load`` of a Hub repo id keeps it paused
while it waits for its downloads too: cycles made meanwhile wait for them.) Loads that overlap
share one pause: the collector is enabled again when the last of them returns, if it was
enabled when the first began.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["paused"]

# Reentrant: a collection that runs a finalizer inside this module's few statements could not
# come back here with a plain lock held (none of them allocates, but the rule is cheap).
_lock = threading.RLock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No automatic cyclic collection inside the ``with`` block (nor in other threads
    meanwhile: the collector is the process's)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
