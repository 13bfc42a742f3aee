"""Python's switch interval, shortened while the engine's readers run
(fastsafetensors/loader/switching.py, option ``switch_interval_us``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fake_device import FakeSink
from safetensors.torch import save_file

from fastsafetensors.errors import HeaderError
from fastsafetensors.loader import switching
from fastsafetensors.loader.stream import StreamOptions, stream_tensors

DEFAULT = 0.005


@pytest.fixture(autouse=True)
def interpreter_default() -> Iterator[None]:
    """Each test starts from the interpreter's default and no load open, and leaves them so."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(DEFAULT)
    assert switching._depth == 0
    yield
    assert switching._depth == 0, "a load left the interval shortened"
    sys.setswitchinterval(before)


def test_shortened_then_set_back_by_the_last_load() -> None:
    assert switching.shorten(0.0005)
    assert sys.getswitchinterval() == pytest.approx(0.0005)
    assert switching.shorten(0.0001)   # a second load running: the first one's value holds
    assert sys.getswitchinterval() == pytest.approx(0.0005)
    switching.restore()
    assert sys.getswitchinterval() == pytest.approx(0.0005)
    switching.restore()
    assert sys.getswitchinterval() == pytest.approx(DEFAULT)


def test_a_value_set_meanwhile_stays() -> None:
    assert switching.shorten(0.0005)
    sys.setswitchinterval(0.002)   # the program's own choice, made during the load
    switching.restore()
    assert sys.getswitchinterval() == pytest.approx(0.002)


def test_a_shorter_interval_already_set_and_zero_are_left_alone() -> None:
    sys.setswitchinterval(0.0002)
    assert switching.shorten(0.0005)
    assert sys.getswitchinterval() == pytest.approx(0.0002)
    switching.restore()
    assert sys.getswitchinterval() == pytest.approx(0.0002)
    sys.setswitchinterval(DEFAULT)
    assert not switching.shorten(0)
    assert sys.getswitchinterval() == pytest.approx(DEFAULT) and switching._depth == 0


@pytest.fixture
def shard(tmp_path: Any) -> str:
    path = tmp_path / "a.safetensors"
    save_file({f"w{i}": torch.full((4096,), float(i)) for i in range(12)}, str(path))
    return str(path)


def _stream(path: str, interval: float) -> Iterator[tuple[str, Any]]:
    return stream_tensors([(path, None, None)], FakeSink(delay=0),
                          StreamOptions(threads=2, staging_bytes=4 * 16384,
                                        switch_interval=interval))


def test_the_engine_shortens_it_while_it_runs(shard: str) -> None:
    seen = []
    for _name, _tensor in _stream(shard, 0.0005):
        seen.append(sys.getswitchinterval())
    assert len(seen) == 12 and all(s == pytest.approx(0.0005) for s in seen)
    assert sys.getswitchinterval() == pytest.approx(DEFAULT)
    # 0: the load leaves it alone.
    assert all(sys.getswitchinterval() == pytest.approx(DEFAULT) for _ in _stream(shard, 0))


def test_a_load_stopped_early_or_failed_sets_it_back(shard: str, tmp_path: Any) -> None:
    stream = _stream(shard, 0.0005)
    next(stream)
    assert sys.getswitchinterval() == pytest.approx(0.0005)
    stream.close()
    assert sys.getswitchinterval() == pytest.approx(DEFAULT)
    # A load that fails: the header passed in is not the file's any more (it was cut short).
    from fastsafetensors.format import read_header

    header = read_header(shard)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(shard, "rb").read()[:header.data_start + 1000])
    with pytest.raises(HeaderError):
        list(stream_tensors([(str(cut), header, None)], FakeSink(delay=0),
                            StreamOptions(threads=2, staging_bytes=4 * 16384,
                                          switch_interval=0.0005)))
    assert sys.getswitchinterval() == pytest.approx(DEFAULT)


@pytest.mark.parametrize("value", [None, "0", "2000"])
def test_the_option_reaches_the_engine_of_a_gpu_load(shard: str, monkeypatch: Any,
                                                     value: str | None) -> None:
    import fastsafetensors.loader.cuda as cuda_module
    import fastsafetensors.loader.gds as gds_module
    import fastsafetensors.loader.stream as stream_module
    from fastsafetensors.loading import device_stream

    options: list[StreamOptions] = []
    run = stream_module.stream_tensors

    def recorded(sources: Any, sink: Any, opts: StreamOptions, gate: Any = None) -> Any:
        options.append(opts)
        return run(sources, sink, opts)

    monkeypatch.setattr(cuda_module, "TorchCudaSink", lambda device, **kw: FakeSink(delay=0))
    monkeypatch.setattr(gds_module, "select_backend", lambda backend, device: "posix")
    monkeypatch.setattr(stream_module, "stream_tensors", recorded)
    if value is not None:
        monkeypatch.setenv("FASTSAFETENSORS_SWITCH_INTERVAL_US", value)
    assert len(dict(device_stream([(shard, None, None)], "cuda:0"))) == 12
    want = {None: 0.0005, "0": 0.0, "2000": 0.002}[value]
    assert [o.switch_interval for o in options] == [pytest.approx(want)]


def test_a_forked_child_gets_the_interval_back() -> None:
    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    assert switching.shorten(0.0005)
    try:
        pid = os.fork()
        if pid == 0:   # the child: loads of the parent's other threads never end here
            ok = sys.getswitchinterval() == DEFAULT and switching._depth == 0
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
    finally:
        switching.restore()


def test_a_parents_load_closed_in_a_forked_child_leaves_the_childs_alone(shard: str) -> None:
    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    parents = _stream(shard, 0.0005)
    next(parents)
    pid = os.fork()
    if pid == 0:
        ok = sys.getswitchinterval() == DEFAULT   # the parent's load does not run here
        own = _stream(shard, 0.0005)
        next(own)
        ok = ok and sys.getswitchinterval() == pytest.approx(0.0005)
        parents.close()   # counted in the parent, not here: the child's own load still runs
        ok = ok and sys.getswitchinterval() == pytest.approx(0.0005)
        own.close()
        ok = ok and sys.getswitchinterval() == DEFAULT
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    parents.close()
    assert os.WEXITSTATUS(status) == 0
    assert sys.getswitchinterval() == pytest.approx(DEFAULT)


def test_a_ctrl_c_as_a_load_shortens_it_leaves_it_set_back(shard: str) -> None:
    # CPython raises a Ctrl-C as a call returns: one as sys.setswitchinterval returned (or as
    # shorten's lock was let go) left the interval shortened, and counted, for good.
    from builders import each_ctrl_c

    code = switching.shorten.__code__
    for point in each_ctrl_c(lambda: list(_stream(shard, 0.0005)),
                             lambda frame: frame.f_code is code):
        assert sys.getswitchinterval() == pytest.approx(DEFAULT), point
        assert switching._depth == 0, point
    assert point > 4 and len(list(_stream(shard, 0.0005))) == 12


def test_a_ctrl_c_as_a_load_restores_it_leaves_it_set_back(shard: str) -> None:
    # A Ctrl-C as restore() started (from a stream's close), or as its read of the interval
    # returned (the load's count already gone), left the interval shortened for good.
    from builders import each_ctrl_c

    code = switching.restore.__code__
    streams = []

    def close_one() -> None:
        streams.append(_stream(shard, 0.0005))
        next(streams[-1])   # outside the restore: counted places are in it only
        streams[-1].close()

    for point in each_ctrl_c(close_one, lambda frame: frame.f_code is code):
        streams.clear()
        assert sys.getswitchinterval() == pytest.approx(DEFAULT), point
        assert switching._depth == 0, point
    assert point > 3
