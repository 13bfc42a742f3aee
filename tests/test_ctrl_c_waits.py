"""A Ctrl-C inside the waits and hand-overs of a load's caller (queues, conditions, events,
semaphores, futures) on the fake device, through the ring, and on the CPU: no lock is left
held, so no thread of the load waits for good, its files close, and the next load is whole.

CPython raises KeyboardInterrupt where it runs signal handlers, as a Python function starts and
as a call returns (builders.each_ctrl_c raises it at each such place in turn). Each sweep runs
on a thread of its own and must move on within a time limit: a lock left held hangs the load's
cleanup, which must fail this test, not hang it (a hung load is left behind, and later tests
may fail from it: the first failure is the one to read).
"""

from __future__ import annotations

import concurrent.futures._base
import concurrent.futures.thread
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import each_ctrl_c, open_fds
from fake_device import FakeSink
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

# test_ring's fixture (the ring built against the stand-in driver), with those it needs.
from test_ring import RingHostSink, cache, calls, fake, fake_so  # noqa: F401

import fastsafetensors
from fastsafetensors import file as file_module
from fastsafetensors.loader import cpu, waiting
from fastsafetensors.loader import threads as pool
from fastsafetensors.loader.stream import StreamOptions, stream_tensors

PACKAGE = os.path.dirname(fastsafetensors.__file__)
# The streaming engine's modules, where the caller takes their locks and queues itself, and
# the hand-over of reads to threads of the CPU engine and of a file handle; not where files
# open and close (a Ctrl-C as os.open returns, or as cpu.close_job starts, leaks a descriptor:
# known, docs/history.md).
ENGINE = {os.path.join(os.path.dirname(waiting.__file__), f"{name}.py") for name in
          ("stream", "streamparts", "ringplan", "ring", "threads", "waiting")}
READS = {cpu._run.__code__, file_module._each.__code__}
# Code that takes and lets go of locks for its callers.
LOCKING = {threading.__file__, queue.__file__, concurrent.futures._base.__file__,
           concurrent.futures.thread.__file__, waiting.__file__}
#: Seconds a sweep may take for one place before it counts as hung.
PER_POINT = 30.0


def _in_locking_code(frame: Any) -> bool:
    """Whether ``frame`` runs the engine's code (where the caller takes the engine's locks and
    queues) or locking code called by this package (not by the fake device's own futures,
    which a real device does not have), outside ``Thread.start``: its wait for the new thread
    to start is CPython's, and interrupted there the new thread waits for good before it runs
    anything (the pool's cleanup takes its task back; see threads.start)."""
    if frame.f_code.co_filename in ENGINE or frame.f_code in READS:
        return True
    if frame.f_code.co_filename not in LOCKING:
        return False
    outer = frame
    while outer is not None and outer.f_code.co_filename in LOCKING:
        if outer.f_code is threading.Thread.start.__code__:
            return False
        outer = outer.f_back
    return outer is not None and outer.f_code.co_filename.startswith(PACKAGE)


def _stuck() -> list[str]:
    """The package's threads blocked in locking code, with their stacks (an idle pooled thread
    waits in threads.py; the load's threads are gone once it ended)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        if not names.get(ident, "").startswith("fastsafetensors"):
            continue
        if frame.f_code.co_filename in LOCKING - {waiting.__file__}:
            out.append(f"{names[ident]}:\n" + "".join(traceback.format_stack(frame)[-4:]))
    return out


def _settled(before: set[str], seconds: float = 10.0) -> None:
    """Wait until no task of a load runs, no cleanup is under way and its descriptors are
    closed; then no thread of the package may be blocked in locking code."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        cleaning = any(t.name == "fastsafetensors-cleanup" for t in threading.enumerate())
        if pool.busy() == 0 and not cleaning and open_fds() == before:
            break
        time.sleep(0.02)
    assert pool.busy() == 0, f"{pool.busy()} tasks still running"
    assert open_fds() == before, f"descriptors left open: {open_fds() - before}"
    stuck = _stuck()
    assert not stuck, "threads blocked for good:\n" + "\n".join(stuck)


def _sweep(action: Callable[[], Any], check: Callable[[], None]) -> int:
    """``action`` interrupted at each place in locking code, ``check()`` after each; on a
    thread of its own, failing if one place takes over PER_POINT seconds. Returns the number
    of places."""
    progress: queue.SimpleQueue[int | BaseException | None] = queue.SimpleQueue()
    place = [""]   # the last one counted: where the run was interrupted

    def counted(frame: Any) -> bool:
        if not _in_locking_code(frame):
            return False
        code = frame.f_code
        place[0] = f"{os.path.basename(code.co_filename)}:{frame.f_lineno} in {code.co_name}"
        return True

    def run() -> None:
        try:
            for point in each_ctrl_c(action, counted):
                try:
                    check()
                except BaseException as exc:
                    raise AssertionError(f"interrupted at place {point}, {place[0]}") from exc
                progress.put(point)
        except BaseException as exc:  # noqa: BLE001 - raised on the test's thread
            progress.put(exc)
        progress.put(None)

    threading.Thread(target=run, name="ctrl-c-sweep", daemon=True).start()
    last = 0
    while True:
        try:
            got = progress.get(timeout=PER_POINT)
        except queue.Empty:
            stacks = "\n".join(f"{t.name}:\n" + "".join(traceback.format_stack(
                sys._current_frames()[t.ident])[-3:]) for t in threading.enumerate()
                if t.ident in sys._current_frames() and t.name != "MainThread")
            pytest.fail(f"hung after place {last} (interrupted at place {last + 1}, {place[0]})"
                        f":\n{stacks}")
        if got is None:
            return last
        if isinstance(got, BaseException):
            raise got
        last = got


def _shard(tmp_path: Path) -> Path:
    path = tmp_path / "a.safetensors"
    save_file({f"w{i}": torch.full((1 << 12,), float(i)) for i in range(6)}, str(path))
    return path


def _equal(got: dict[str, torch.Tensor], path: Path) -> None:
    want = st_load_file(str(path))
    assert list(got) == list(want) and all(torch.equal(got[k], v) for k, v in want.items())


def _stream_sweep(path: Path, make_sink: Callable[[], Any], options: StreamOptions,
                  stopped: bool) -> int:
    def load() -> dict[str, torch.Tensor]:
        return dict(stream_tensors([(str(path), None, None)], make_sink(), options))

    def action() -> None:
        if not stopped:
            load()
            return
        stream = stream_tensors([(str(path), None, None)], make_sink(), options)
        next(stream)
        stream.close()

    _equal(load(), path)   # the pool's threads started (see _in_locking_code)
    before = open_fds()

    def check() -> None:
        _settled(before)
        _equal(load(), path)

    return _sweep(action, check)


@pytest.mark.parametrize("stopped", [False, True], ids=["whole", "stopped"])
def test_a_ctrl_c_in_a_streamed_loads_waits_leaves_nothing_locked(tmp_path, stopped):
    # Python readers on the fake device. The planner waits for budget, which the caller frees
    # tensor by tensor; a stopped stream's cleanup wakes a planner and readers that wait. Before
    # (queue.Queue, Event, Semaphore, Condition): hung at the 37th place, the caller's
    # ready.get() left the queue's lock held, the planner waited for it in ready.put() and the
    # caller's cleanup for the planner.
    options = StreamOptions(threads=2, staging_bytes=4 * 16384, max_device_bytes=3 << 14)
    assert _stream_sweep(_shard(tmp_path), lambda: FakeSink(delay=0), options, stopped) > 100


@pytest.mark.parametrize("stopped", [False, True], ids=["whole", "stopped"])
def test_a_ctrl_c_in_a_ringed_loads_waits_leaves_nothing_locked(calls, tmp_path,  # noqa: F811
                                                                 stopped):
    # cuda_calls="ring": the caller cancels the ring in its cleanup (a Condition before).
    options = StreamOptions(threads=2, staging_bytes=4 * 16384, io="buffered")
    assert _stream_sweep(_shard(tmp_path), RingHostSink, options, stopped) > 100


def test_a_ctrl_c_in_a_cpu_loads_waits_leaves_nothing_locked(tmp_path):
    # Reads of 4 KiB from three files on three threads. Before (ThreadPoolExecutor): a Ctrl-C
    # inside its semaphore's Condition.wait came out as "RuntimeError: release unlocked lock",
    # and one as its acquire returned left it held: a reader waited for good to release it,
    # and the caller for the reader as it left.
    paths = []
    for s in range(3):
        paths.append(tmp_path / f"c{s}.safetensors")
        save_file({f"s{s}.w{i}": torch.full((1 << 10,), float(i)) for i in range(4)},
                  str(paths[-1]))
    want: dict[str, torch.Tensor] = {}
    for p in paths:
        want.update(st_load_file(str(p)))

    def load() -> dict[str, torch.Tensor]:
        with fastsafetensors.configure(chunk_bytes=4096):
            return fastsafetensors.load([str(p) for p in paths], threads=3)

    assert load().keys() == want.keys()
    before = open_fds()

    def check() -> None:
        _settled(before)
        got = load()
        assert all(torch.equal(got[k], v) for k, v in want.items())

    assert _sweep(load, check) > 100


def test_a_ctrl_c_in_a_file_handles_parallel_read_leaves_nothing_locked(tmp_path):
    # One tensor of 64 KiB read by a handle in pieces of 4 KiB on three threads (a
    # ThreadPoolExecutor before).
    path = tmp_path / "big.safetensors"
    want = torch.arange(1 << 14, dtype=torch.float32)
    save_file({"w": want}, str(path))

    def read() -> torch.Tensor:
        with fastsafetensors.configure(chunk_bytes=4096, threads=3):
            with fastsafetensors.FastSafetensorsFile(path) as f:
                return f.get_tensor("w")

    assert torch.equal(read(), want)
    before = open_fds()

    def check() -> None:
        _settled(before)
        assert torch.equal(read(), want)

    assert _sweep(read, check) > 20


class _Interrupt(Exception):
    pass


def test_with_on_a_c_lock_never_leaves_it_held_under_real_signals():
    # The premise of loader/waiting.py, on this interpreter, with a real signal handler (which
    # each_ctrl_c only mirrors) raising wherever CPython runs it, thousands of times: `with` on
    # a C lock, and a latch's set(), which takes one so, never leave it held.
    lock = threading.Lock()
    armed = [False]

    def handler(signum: int, frame: Any) -> None:
        if armed[0]:
            raise _Interrupt

    interrupted = 0
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 2e-5, 2e-5)
    try:
        for _ in range(20_000):
            latch = waiting.Latch()
            try:
                armed[0] = True
                with lock:
                    pass
                latch.set()
                latch.wait(0)
                armed[0] = False
            except _Interrupt:
                armed[0] = False
                interrupted += 1
            assert not lock.locked() and not latch._guard.locked()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    assert interrupted > 100
