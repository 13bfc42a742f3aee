"""Loads that return a whole result run without automatic cyclic garbage collection
(fastsafetensors/gcpause.py): counted with gc.callbacks, not timed."""

from __future__ import annotations

import gc
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import many_tensors, write_file

import fastsafetensors
from fastsafetensors import SafeTensorsFileLoader, SingleGroup
from fastsafetensors.gcpause import paused


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("gcpause") / "many.safetensors"
    write_file(path, many_tensors(5_000))
    return str(path)


@pytest.fixture
def collector_seen(monkeypatch) -> Iterator[list[bool]]:
    """Whether the collector was on each time a load turned a file's buffer into tensors (on
    the caller's thread, in the middle of the load). The collector is on for the test."""
    from fastsafetensors.loader import cpu

    seen: list[bool] = []
    build = cpu.tensors_from_buffer

    def recorded(*args: Any, **kwargs: Any) -> Any:
        seen.append(gc.isenabled())
        return build(*args, **kwargs)

    monkeypatch.setattr(cpu, "tensors_from_buffer", recorded)
    was = gc.isenabled()
    gc.enable()
    try:
        yield seen
    finally:
        if not was:
            gc.disable()


def _copy_files_to_device(path: str) -> dict[str, Any]:
    loader = SafeTensorsFileLoader(SingleGroup(), torch.device("cpu"))
    loader.add_filenames({0: [path]})
    try:
        buffer = loader.copy_files_to_device()
        return {name: buffer.get_tensor(name) for name in buffer.key_to_rank_lidx}
    finally:
        loader.close()


LOADS: dict[str, Callable[[str], Any]] = {
    "load_file": fastsafetensors.load_file,
    "load": fastsafetensors.load,
    "copy_files_to_device": _copy_files_to_device,
}


@pytest.mark.parametrize("how", LOADS)
def test_a_whole_load_pauses_the_collector_and_turns_it_back_on(many, collector_seen, how):
    got = LOADS[how](many)
    assert len(got) == 5_000
    assert collector_seen == [False] and gc.isenabled()
    # A stream of tensors (iter_tensors) hands control to its caller between two tensors, so
    # it leaves the collector alone.
    streamed = dict(fastsafetensors.iter_tensors(many))
    assert len(streamed) == 5_000 and collector_seen == [False, True]


def test_a_hub_repo_id_loads_without_pausing(monkeypatch, many):
    # Its load may wait for downloads: the process would run without collections meanwhile.
    import fastsafetensors.loading as loading

    seen: list[bool] = []

    def recorded(keeps_all: bool, caller: str, source: Any,
                 **options: Any) -> Iterator[tuple[str, Any]]:
        seen.append(gc.isenabled())
        return iter([])

    monkeypatch.setattr(loading, "_checked", recorded)
    assert fastsafetensors.load("org/model") == {}
    assert fastsafetensors.load(many) == {}   # a local file: paused
    assert seen == [True, False]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_during_another_threads_pause_gets_the_collector_back():
    # The thread holding the pause is not in the child, so nothing there would ever end it.
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with paused():
            inside.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    inside.wait(10)
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # fork() with threads running
        pid = os.fork()
    if pid == 0:   # the child: report, then leave without running pytest's teardown
        ok = gc.isenabled()
        with paused():
            ok = ok and not gc.isenabled()
        os.write(write, b"1" if ok and gc.isenabled() else b"0")
        os._exit(0)
    os.close(write)
    try:
        answer = os.read(read, 1)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
        release.set()
        holder.join()
    assert answer == b"1"


def test_a_collector_the_caller_disabled_stays_disabled(many):
    gc.disable()
    try:
        fastsafetensors.load_file(many)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_loads_enable_the_collector_when_the_last_ends():
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def second() -> None:
        with paused():
            second_in.set()
            first_out.wait(5)
            seen.append(gc.isenabled())   # the first load ended: still paused for this one

    thread = threading.Thread(target=second)
    with paused():
        first_in.set()
        thread.start()
        second_in.wait(5)
    first_out.set()
    thread.join()
    assert seen == [False] and gc.isenabled()


def test_a_failed_load_enables_the_collector_again(tmp_path: Path):
    path = tmp_path / "cut.safetensors"
    write_file(path, {"w": torch.ones(1000)})
    path.write_bytes(path.read_bytes()[:-100])   # the data ends early
    with pytest.raises(fastsafetensors.HeaderError):
        fastsafetensors.load_file(str(path))
    assert gc.isenabled()


@pytest.mark.parametrize("how", ["environment", "configure"])
def test_pause_gc_off_leaves_the_collector_alone(many, collector_seen, monkeypatch, how):
    if how == "environment":
        monkeypatch.setenv("FASTSAFETENSORS_PAUSE_GC", "off")
        got = fastsafetensors.load_file(many)
    else:
        with fastsafetensors.configure(pause_gc="off"):
            got = fastsafetensors.load_file(many)
    assert len(got) == 5_000 and collector_seen == [True]


def test_a_bad_pause_gc_value_says_what_it_takes(many, monkeypatch):
    from fastsafetensors.errors import ConfigError

    with pytest.raises(ConfigError, match="pause_gc") as info:
        with fastsafetensors.configure(pause_gc="sometimes"):
            pass
    assert "expected one of: off, on" in str(info.value)
    monkeypatch.setenv("FASTSAFETENSORS_PAUSE_GC", "no")
    with pytest.raises(ConfigError, match="FASTSAFETENSORS_PAUSE_GC"):
        fastsafetensors.load_file(many)
    assert gc.isenabled()


def _interrupt_at(point: int, code: Any) -> tuple[Callable[..., None], list[int]]:
    """A profile function raising KeyboardInterrupt at the ``point``-th place (from 1; 0: none)
    where CPython would run a Ctrl-C handler inside ``code``: just after one of its C calls
    returns, or as a function it calls starts. Also returns how many places it passed."""
    passed = [0]

    def profile(frame: Any, event: str, arg: Any) -> None:
        caller = frame.f_back.f_code if frame.f_back is not None else None
        if (event == "c_return" and frame.f_code is code) or (event == "call"
                                                               and caller is code):
            passed[0] += 1
            if passed[0] == point:
                sys.setprofile(None)
                raise KeyboardInterrupt

    return profile, passed


def test_ctrl_c_anywhere_in_a_pause_leaves_the_collector_on():
    # A Ctrl-C right after the pause counted itself, before it marked itself entered, left it
    # counted for good: the collector then stayed off after every later load of the process.
    from fastsafetensors import gcpause

    code = paused.__wrapped__.__code__   # type: ignore[attr-defined]
    profile, passed = _interrupt_at(0, code)
    sys.setprofile(profile)
    try:
        with paused():
            pass
    finally:
        sys.setprofile(None)
    assert passed[0] > 3
    for point in range(1, passed[0] + 1):
        profile, _ = _interrupt_at(point, code)
        sys.setprofile(profile)
        try:
            with paused():
                pass
        except KeyboardInterrupt:
            pass
        finally:
            sys.setprofile(None)
        assert gc.isenabled() and gcpause._depth == 0, point
        with paused():
            assert not gc.isenabled()
        assert gc.isenabled(), point
