"""More open files while a transformers load holds every shard of a checkpoint open.

safetensors' ``safe_open`` maps a file and closes its descriptor, so transformers' stock loader
holds no descriptor however many shards it keeps open (the mappings count against
``vm.max_map_count``, 65,530 by default, instead). A :class:`FastSafetensorsFile` reads with
positioned reads and keeps its descriptor until it is closed, and transformers keeps a handle
on every shard until ``from_pretrained`` ends: one descriptor a shard, two while a batch reads
ahead, one more a file for ``O_DIRECT`` reads, and the engine's own while a batch runs. A
checkpoint of some hundreds of shards then needs more than a common soft limit of 1,024 open
files, where the stock loader needed none.

So the transformers seam calls :func:`widen` when the descriptors it gets come near the soft
limit (``RLIMIT_NOFILE``), or an open fails with ``EMFILE``: the soft limit doubles, up to the
hard limit (which an unprivileged process may do). Each widening is undone by one
:func:`restore` once the load's files are closed; when the last load that widened it ends, the
soft limit goes back to what it was, unless something else changed it meanwhile. Where the hard
limit is reached, the open fails as before (``ulimit -Hn`` says what it is).
"""

from __future__ import annotations

import sys
import threading

from .forking import renew_lock

__all__ = ["widen", "restore", "near"]

_lock = threading.Lock()
renew_lock(sys.modules[__name__])
_widened = 0                   # widen() calls not restored yet, all threads
_before: int | None = None     # the soft limit before the first of them
_set: int | None = None        # the soft limit the last of them set


def near(fd: int) -> bool:
    """Whether a descriptor just opened as ``fd`` is past half the soft limit. A new descriptor
    takes the lowest free number, so at least ``fd`` others are open: half is left for what
    the load opens later (the ``O_DIRECT`` and the engine's descriptors)."""
    try:
        import resource
    except ImportError:   # not a POSIX system: no such limit
        return False
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft != resource.RLIM_INFINITY and 2 * fd >= soft


def widen() -> bool:
    """Double the soft limit of open files, up to the hard one; whether it rose. Each True is
    to be undone by one :func:`restore`."""
    global _widened, _before, _set
    try:
        import resource
    except ImportError:
        return False
    with _lock:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft == hard:
            return False
        new = 2 * max(soft, 64)
        if hard != resource.RLIM_INFINITY:
            new = min(new, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):   # past the kernel's own bound (fs.nr_open)
            return False
        if not _widened:
            _before = soft
        _widened += 1
        _set = new
        return True


def restore() -> None:
    """One :func:`widen` is over: the last puts the soft limit back as it was before the first,
    if it is still the one they set. Descriptors open beyond it stay usable."""
    global _widened, _before, _set
    import resource

    with _lock:
        if not _widened:
            return
        _widened -= 1
        if _widened:
            return
        before, ours, _before, _set = _before, _set, None, None
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if before is not None and soft == ours:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (before, hard))
            except (ValueError, OSError):
                pass
