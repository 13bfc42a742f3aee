"""Python's garbage collector, paused while from_pretrained loads through this package
(fastsafetensors/integrations/_collector.py, option ``pause_gc``)."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

from fastsafetensors.integrations import _collector as collector


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    """Each test starts with the collector on and no pause open, and leaves them so."""
    assert collector._depth == 0
    gc.enable()
    yield
    assert collector._depth == 0, "a pause was left open"
    gc.enable()


def test_paused_then_back_on_when_the_last_call_ends() -> None:
    collector.pause()
    assert not gc.isenabled()
    collector.pause()   # a second call running
    collector.resume()
    assert not gc.isenabled()
    collector.resume()
    assert gc.isenabled()


def test_a_collector_the_program_turned_off_stays_off() -> None:
    gc.disable()
    collector.pause()
    collector.resume()
    assert not gc.isenabled()


def test_turned_on_meanwhile_stays_on() -> None:
    collector.pause()
    gc.enable()   # the program's own choice, made during the call
    collector.resume()
    assert gc.isenabled()


def test_a_resume_without_a_pause_does_nothing() -> None:
    gc.disable()
    collector.resume()
    assert not gc.isenabled()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_gets_the_collector_back() -> None:
    """The child keeps only the forking thread: calls of other threads never end there."""
    collector.pause()
    try:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:   # pragma: no cover - the child
            os.write(write, b"%d %d" % (gc.isenabled(), collector._depth))
            os._exit(0)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        said = os.read(read, 64)
        os.close(read)
    finally:
        collector.resume()
    assert os.waitstatus_to_exitcode(status) == 0
    assert said == b"1 0"
    assert gc.isenabled()


def test_the_option_is_checked() -> None:
    from fastsafetensors import config
    from fastsafetensors.errors import ConfigError

    with pytest.raises(ConfigError, match="pause_gc"):
        with config.configure(pause_gc="sometimes"):
            pass
    assert config.get("pause_gc") == "on"
