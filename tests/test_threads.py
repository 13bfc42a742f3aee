"""The engine's thread pool (fastsafetensors/loader/threads.py): threads are reused across
loads, every task of a load runs at once however many there are, and idle threads end."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from fastsafetensors.loader import threads as pool


def _hold_every_idle_thread(release: threading.Event) -> list[threading.Event]:
    """Keep pooled threads busy until one had to be started: then no idle thread is left, and
    the next task starts a new one."""
    held = []
    while True:
        before = pool.started()
        held.append(pool.start(release.wait, "hold"))
        if pool.started() > before:
            return held


def _run_all(tasks: int, task) -> None:
    done = [pool.start(task, f"fastsafetensors-test-{i}") for i in range(tasks)]
    for event in done:
        assert event.wait(timeout=20), "a pooled task never ran"


def test_finished_threads_run_the_next_tasks() -> None:
    _run_all(4, threading.Barrier(4, timeout=20).wait)   # four threads at once, idle after
    before = pool.started()
    for _ in range(20):
        _run_all(4, lambda: None)
    assert pool.started() == before
    assert pool.busy() == 0


def test_tasks_that_wait_for_each_other_all_run() -> None:
    # A load's readers wait for its planner: tasks started together must run together.
    barrier = threading.Barrier(40, timeout=20)
    _run_all(40, barrier.wait)
    assert pool.busy() == 0


def test_a_running_task_carries_its_name() -> None:
    names: list[str] = []
    _run_all(1, lambda: names.append(threading.current_thread().name))
    assert names == ["fastsafetensors-test-0"]
    assert not [t for t in threading.enumerate() if t.name == "fastsafetensors-test-0"]


def test_idle_threads_end(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool, "IDLE_SECONDS", 0.01)
    mine: list[threading.Thread] = []
    _run_all(3, lambda: mine.append(threading.current_thread()))
    for thread in mine:
        thread.join(timeout=20)
        assert not thread.is_alive()


def test_tasks_handed_over_while_threads_time_out_all_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # An idle thread may time out just as a task is handed to it: the task must still run.
    monkeypatch.setattr(pool, "IDLE_SECONDS", 0.0005)
    for _ in range(300):
        _run_all(2, lambda: None)
    assert pool.busy() == 0


def test_a_task_that_raises_leaves_its_thread_in_the_pool(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    def broken() -> None:
        raise RuntimeError("boom")

    _run_all(1, broken)
    assert "a pooled task raised" in caplog.text
    _run_all(8, lambda: None)   # counted idle threads are all alive to take tasks
    assert pool.busy() == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_starts_threads_of_its_own() -> None:
    _run_all(2, threading.Barrier(2, timeout=20).wait)   # idle threads in this process
    pid = os.fork()
    if pid == 0:   # the child: the parent's idle threads do not exist here
        ran = pool.start(lambda: None, "fastsafetensors-test-child").wait(timeout=10)
        os._exit(0 if ran else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_an_idle_thread_keeps_nothing_of_its_last_task() -> None:
    import weakref

    class State:
        pass

    state = State()
    alive = weakref.ref(state)
    _run_all(1, lambda state=state: None)
    del state
    assert alive() is None, "an idle thread still holds the last task's state"


def test_a_new_thread_keeps_nothing_of_its_first_task() -> None:
    # A thread started for a task got it as a parameter, which kept it (and through the
    # closure the finished load's state) for the thread's whole life.
    import weakref

    class State:
        pass

    busy = threading.Event()
    held = _hold_every_idle_thread(busy)
    before = pool.started()
    state = State()
    alive = weakref.ref(state)
    pool.start(lambda state=state: None, "first").wait()
    assert pool.started() == before + 1, "the task did not start a new thread"
    del state
    busy.set()
    for done in held:
        done.wait()
    assert alive() is None, "a new thread still holds its first task's state"


def test_a_thread_that_cannot_start_is_not_counted_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    busy = threading.Event()
    held = _hold_every_idle_thread(busy)
    before = pool.busy()

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    with pytest.raises(RuntimeError, match="can't start"):
        pool.start(lambda: None, "never")
    monkeypatch.undo()
    assert pool.busy() == before
    busy.set()
    for done in held:
        done.wait()


def test_an_idle_thread_that_loses_a_task_to_another_stays_counted_right(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A thread whose wait timed out saw a task, but another idle thread (they take without the
    # lock) got it first: the thread died on queue.Empty still counted idle, and a later task
    # handed to it was never run.
    import queue

    class Raced:
        taken = False

        def get(self, timeout: float) -> None:
            raise queue.Empty

        def empty(self) -> bool:
            return self.taken

        def get_nowait(self) -> None:
            self.taken = True   # the other thread took it between the look and the take
            raise queue.Empty

    monkeypatch.setattr(pool, "_tasks", Raced())
    monkeypatch.setattr(pool, "_idle", 1)
    assert pool._next() is None
    assert pool._idle == 0


class _Interrupted(Exception):
    pass


def _garbage(on_finalize: Callable[[], None], objects: int) -> None:
    """Leave a cycle for the collector: a finalizer, then ``objects`` lists to delete after it."""
    class Finalized:
        def __del__(self) -> None:
            on_finalize()

    cycle: list[object] = [Finalized(), [[i] for i in range(objects)]]
    cycle.append(cycle)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer")
def test_a_signal_during_a_collection_reaches_the_program() -> None:
    # The timer fires while the collector deletes the cycle's lists, after the finalizer ran:
    # CPython runs the handler at the first Python code after that. Our gc callbacks run no
    # Python code, so that is the caller's (the collector drops what its callbacks raise).
    def interrupt(signum: int, frame: object) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    was_enabled = gc.isenabled()
    gc.disable()
    # Only ours: another library's Python callback (hypothesis installs one) would drop it.
    everyone = gc.callbacks[:]
    gc.callbacks[:] = [c for c in everyone if c in pool._callbacks]
    try:
        _garbage(lambda: signal.setitimer(signal.ITIMER_REAL, 0.001), 300_000)
        with pytest.raises(_Interrupted):
            gc.collect()
            for _ in range(1000):   # where the handler runs, if it did not run in the collector
                time.sleep(0.001)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        gc.callbacks[:] = everyone
        if was_enabled:
            gc.enable()


def test_only_the_collecting_thread_counts_as_collecting() -> None:
    seen: dict[str, bool] = {}

    def on_other_thread() -> None:
        seen["other thread, during"] = pool.collecting()

    def in_finalizer() -> None:
        seen["collecting thread, during"] = pool.collecting()
        other = threading.Thread(target=on_other_thread)
        other.start()
        other.join()   # the collecting thread waits; the other one runs

    seen["before"] = pool.collecting()
    _garbage(in_finalizer, 0)
    gc.collect()
    seen["after"] = pool.collecting()
    assert seen == {"before": False, "collecting thread, during": True,
                    "other thread, during": False, "after": False}


def test_a_ctrl_c_as_a_thread_starts_leaves_it_counted_right(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # CPython raises a Ctrl-C as a call returns or a function starts: one as the pool's lock
    # was let go after counting the task left it counted busy for good; one inside
    # Thread.start, after the thread had started, uncounted a task that its thread counted
    # off again when done (busy() -1).
    import sys

    monkeypatch.setattr(pool, "IDLE_SECONDS", 0.01)   # no idle thread left between tries
    # In threading.py only Thread.start and the start of the wait for the thread: deeper, a
    # Ctrl-C breaks CPython's own Condition ("release unlocked lock").
    starting = (threading.Thread.start.__code__, threading.Event.wait.__code__)
    point = 0
    while True:
        point += 1
        passed = [0]

        def profile(frame, event, arg, passed=passed, point=point) -> None:
            inside = frame.f_code.co_filename == pool.__file__ or (
                frame.f_code is starting[0] or (frame.f_code is starting[1] and event == "call"))
            if event in ("call", "c_return") and inside:
                passed[0] += 1
                if passed[0] == point:
                    sys.setprofile(None)
                    raise KeyboardInterrupt

        release = threading.Event()
        deadline = time.monotonic() + 20
        while pool._idle and time.monotonic() < deadline:
            time.sleep(0.005)
        assert pool._idle == 0
        sys.setprofile(profile)
        try:
            pool.start(release.wait, "fastsafetensors-test")
        except KeyboardInterrupt:
            pass
        finally:
            sys.setprofile(None)
        release.set()
        while pool.busy() > 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert pool.busy() == 0, point
        if passed[0] < point:   # ran to its end
            break
    assert point > 5


@pytest.mark.parametrize("idle", [True, False])
def test_a_ctrl_c_in_start_leaves_every_task_that_runs_known(idle: bool,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    # A Ctrl-C as start() returned, its task handed to an idle thread, lost the task's event:
    # a load's cleanup then did not wait for that thread. With `finished` the event is the
    # caller's before the task is handed over, and set at once if the task never runs.
    from builders import each_ctrl_c

    if not idle:
        monkeypatch.setattr(pool, "IDLE_SECONDS", 0.01)   # no idle thread left between tries
    # As above: in threading.py only Thread.start and the start of the wait for the thread.
    counted = (pool.start.__code__, threading.Thread.start.__code__)
    ran: list[threading.Event] = []
    finished: list[threading.Event] = []

    def start_one() -> None:
        finished.clear()
        ran.clear()
        deadline = time.monotonic() + 20
        while (pool._idle > 0) != idle and time.monotonic() < deadline:
            time.sleep(0.005)
        assert (pool._idle > 0) == idle
        pool.start(lambda: ran.append(finished[0]), "fastsafetensors-test", finished)

    if idle:
        _run_all(1, lambda: None)   # a thread to hand the tasks to, idle after each
    for point in each_ctrl_c(start_one, lambda frame: frame.f_code in counted or (
            frame.f_code is threading.Event.wait.__code__ and frame.f_lasti <= 0)):
        assert len(finished) <= 1, point
        assert all(event.wait(5) for event in finished), (point, "an event never set")
        assert not ran or ran == finished, (point, "a task ran that the caller cannot wait for")
        deadline = time.monotonic() + 5
        while pool.busy() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.busy() == 0, point
    assert point > 3
