"""Locks made anew in a forked child.

A child keeps only the thread that forked. A lock another thread held at that moment stays
held in the child for good, and the child's first call that takes it waits for ever: a load
(its statistics), a first build of the native calls, an integration's ``install()``. Each
module-level lock that other threads take registers here, and the child gets a fresh one.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["generation", "in_child", "renew_lock"]

#: Forks between the first process and this one: a load begun under another number was begun
#: in a parent (a global read, where ``os.getpid()`` is a system call, for a check per tensor).
generation = 0


def in_child(action: Callable[[], None]) -> None:
    """Run ``action`` in every child forked from now on (nothing where there is no fork)."""
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=action)


def _count() -> None:
    global generation
    generation += 1


in_child(_count)


def renew_lock(owner: Any, name: str = "_lock",
               make: Callable[[], Any] = threading.Lock) -> None:
    """Give ``owner`` (a module or an object) a fresh ``make()`` as ``name`` in each child."""
    in_child(lambda: setattr(owner, name, make()))
