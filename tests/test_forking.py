"""A forked child keeps only the thread that forked: a lock another thread held then, or a read
it had in flight, must not make the child wait for ever (fastsafetensors/forking.py and the
modules that register with it). Each test holds the lock, or the read, on a thread across the
fork, and the child then does what would wait for it."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import torch
from fake_device import FakeSink
from safetensors.torch import save_file

import fastsafetensors
from fastsafetensors.file import _DEVICE_READS
from fastsafetensors.loader import native
from fastsafetensors.loader.posix import STATS
from fastsafetensors.loader.stream import PHASES, StreamOptions, stream_tensors

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture
def shard(tmp_path: Path) -> str:
    path = tmp_path / "a.safetensors"
    save_file({f"w{i}": torch.full((4096,), float(i)) for i in range(12)}, str(path))
    return str(path)


def child_finishes(action: Callable[[], Any], held: Callable[[], AbstractContextManager[Any]]
                   ) -> None:
    """Fork while a thread is inside ``held()``; the child runs ``action`` and must exit 0."""
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with held():
            inside.set()
            leave.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    inside.wait()
    pid = os.fork()
    if pid == 0:   # pragma: no cover - the child
        code = 1
        try:
            action()
            code = 0
        finally:
            os._exit(code)
    leave.set()
    holder.join()
    deadline = time.monotonic() + 30   # not a timing: a hung child would hang the suite
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child waits for something of the parent's other thread")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(done[1]) == 0, "the child's action failed"


def test_a_load_in_the_child_while_the_read_statistics_were_held(shard: str) -> None:
    child_finishes(lambda: fastsafetensors.load_file(shard), lambda: STATS._lock)


def test_an_engine_load_in_the_child_while_the_phases_were_held(shard: str) -> None:
    def load() -> None:
        got = stream_tensors([(shard, None, None)], FakeSink(delay=0),
                             StreamOptions(threads=2, staging_bytes=4 * 16384))
        assert len(dict(got)) == 12

    child_finishes(load, lambda: PHASES._lock)


def test_a_parents_load_closed_in_the_child_while_a_files_lock_was_held(shard: str) -> None:
    # Closing it there took the work queue's lock to drain it (a queue.Queue then), and in one
    # CI run waited for ever; a file's lock is what a close takes now, outside a child.
    parents = stream_tensors([(shard, None, None)], FakeSink(delay=0),
                             StreamOptions(threads=2, staging_bytes=4 * 16384))
    next(parents)
    (opened,) = parents.gi_frame.f_locals["files"]
    try:
        child_finishes(parents.close, lambda: opened.lock)
    finally:
        parents.close()


def test_the_native_calls_in_the_child_while_a_first_build_held_their_lock() -> None:
    # The build compiles C under this lock (some 0.2 s): a fork then left it held.
    child_finishes(lambda: native.load_into({}, Path(native.__file__), {}), lambda: native._lock)


def test_the_device_reads_share_in_the_child_while_its_lock_was_held() -> None:
    def share() -> None:
        with _DEVICE_READS.share(1 << 20) as (threads, _):
            assert threads >= 1 and _DEVICE_READS._active == 1

    child_finishes(share, lambda: _DEVICE_READS._lock)


@pytest.mark.parametrize("integration", ["accelerate", "transformers"])
def test_an_integration_uninstalled_in_the_child_while_install_held_its_lock(
        integration: str) -> None:
    # install() holds it through its first import of the library (seconds).
    pytest.importorskip(integration)
    if integration == "accelerate":
        from fastsafetensors.integrations import accelerate as module

        lock = module._lock
    else:
        from fastsafetensors.integrations import _transformers_seam as module

        lock = module._install_lock
    child_finishes(module.uninstall, lambda: lock)


def test_a_file_closed_in_the_child_while_a_read_was_in_flight(shard: str) -> None:
    handle = fastsafetensors.FastSafetensorsFile(shard)
    try:
        # A read in flight on another thread: close() waited for it, in the child for ever.
        child_finishes(handle.close, handle._in_use)
        # The lock itself held on another thread.
        child_finishes(lambda: (handle["w3"], handle.close()), lambda: handle._lock)
        assert torch.equal(handle["w3"], torch.full((4096,), 3.0))   # the parent's still reads
    finally:
        handle.close()


def test_a_load_asked_for_more_in_the_child_says_it_cannot_go_on(shard: str) -> None:
    from contextlib import nullcontext

    from fastsafetensors.errors import ForkedLoadError

    parents = stream_tensors([(shard, None, None)], FakeSink(delay=0),
                             StreamOptions(threads=2, staging_bytes=4 * 16384))
    first = next(parents)

    def go_on() -> None:
        with pytest.raises(ForkedLoadError, match="forked child") as info:
            next(parents)
        assert info.value.parent == os.getppid() and info.value.child == os.getpid()

    try:
        child_finishes(go_on, nullcontext)
        assert len(dict([first, *parents])) == 12   # the parent's load goes on
    finally:
        parents.close()
