"""fastsafetensors/fdlimit.py: the soft limit of open files, raised for a load and put back.

The transformers load that needs it is in tests/test_transformers.py
(test_more_shards_than_the_soft_limit_of_open_files)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from fastsafetensors import fdlimit

resource = pytest.importorskip("resource")


@pytest.fixture
def limits() -> Iterator[tuple[int, int]]:
    """A soft limit of 100 under a hard one of at least 300, for the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 300:
        pytest.skip(f"the hard limit of open files is {hard}: too low to raise 100 to 300")
    resource.setrlimit(resource.RLIMIT_NOFILE, (100, hard))
    try:
        yield 100, hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        fdlimit._widened, fdlimit._before, fdlimit._set = 0, None, None


def soft() -> int:
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def test_widenings_double_and_the_last_restore_puts_the_limit_back(
        limits: tuple[int, int]) -> None:
    assert not fdlimit.near(49) and fdlimit.near(50)
    assert fdlimit.widen() and soft() == 200
    assert fdlimit.widen() and soft() == min(400, limits[1])
    fdlimit.restore()
    assert soft() > 100   # one load still holds its files
    fdlimit.restore()
    assert soft() == 100
    fdlimit.restore()     # one too many: nothing to undo
    assert soft() == 100


def test_a_limit_changed_meanwhile_is_left_as_it_is(limits: tuple[int, int]) -> None:
    assert fdlimit.widen()
    resource.setrlimit(resource.RLIMIT_NOFILE, (150, limits[1]))
    fdlimit.restore()
    assert soft() == 150


def test_no_widening_past_the_hard_limit() -> None:
    # In a child: a process may not raise its hard limit again once it lowered it.
    code = ("import resource; from fastsafetensors import fdlimit; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100)); "
            "print(fdlimit.widen(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "100"]
