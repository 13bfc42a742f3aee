"""Backend selection: GPUDirect Storage through kvikio, and the fallback to posix reads."""

from __future__ import annotations

import os
import sys
import types
import warnings

import pytest
import torch
from fake_device import FakeSink, as_bytes
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

from fastsafetensors.errors import BackendUnavailableError, ConfigError, HeaderError
from fastsafetensors.format import read_header
from fastsafetensors.loader import gds


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    gds.gds_status.cache_clear()
    monkeypatch.setattr(gds, "_warned", False)
    yield
    gds.gds_status.cache_clear()


#: kvikio's probing API changed twice; the fakes model each generation.
GENERATIONS = ("24.10", "24.12", "26.10")


class _CompatMode:
    """kvikio.CompatMode (24.12 on): AUTO is the default and, being 2, is truthy."""
    OFF, ON, AUTO = 0, 1, 2


def _fake_kvikio(monkeypatch, *, generation="26.10", compat=False, available=True,
                 broken=False) -> types.ModuleType:
    """A kvikio module of ``generation``, installed in sys.modules (with its cufile_driver
    submodule where that generation has one)."""
    module = types.ModuleType("kvikio")

    def fail_if_broken():
        if broken:
            raise RuntimeError("cuFile driver failed to initialise")

    class DriverProperties:
        @property
        def is_gds_available(self):
            fail_if_broken()
            return available

    defaults = types.SimpleNamespace()
    if generation == "24.10":
        defaults.compat_mode = lambda: fail_if_broken() or compat
        module.DriverProperties = DriverProperties  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "kvikio.cufile_driver", None)
    else:
        driver = types.ModuleType("kvikio.cufile_driver")
        module.cufile_driver = driver  # type: ignore[attr-defined]
        module.CompatMode = _CompatMode  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "kvikio.cufile_driver", driver)
        if generation == "24.12":
            mode = _CompatMode.ON if compat else _CompatMode.AUTO
            defaults.compat_mode = lambda: fail_if_broken() or mode
            driver.DriverProperties = DriverProperties  # type: ignore[attr-defined]
        else:   # 25.04 on; compat_mode() itself is gone in 26.02
            defaults.is_compat_mode_preferred = lambda: fail_if_broken() or compat
            driver.properties = DriverProperties()  # type: ignore[attr-defined]
    module.defaults = defaults  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kvikio", module)
    return module


def test_missing_kvikio_is_reported_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "kvikio", None)
    usable, reason = gds.gds_status()
    assert not usable and "fastsafetensors[gds]" in reason
    assert gds.gds_available() is False


def test_auto_falls_back_to_posix_with_one_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "kvikio", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert gds.select_backend("auto", device="cuda:0") == "posix"
        assert gds.select_backend("auto", device="cuda:0") == "posix"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "kvikio is not installed" in messages[0]


def test_gds_by_name_raises_typed_error_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "kvikio", None)
    with pytest.raises(BackendUnavailableError) as info:
        gds.select_backend("gds", device="cuda:0")
    assert isinstance(info.value, RuntimeError) and "kvikio" in str(info.value)


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("kwargs, fragment", [
    ({"compat": True}, "compatibility mode"),
    ({"available": False}, "reports GDS unavailable"),
    ({"broken": True}, "cuFile driver failed"),
])
def test_present_but_failing_kvikio(monkeypatch, generation, kwargs, fragment):
    _fake_kvikio(monkeypatch, generation=generation, **kwargs)
    usable, reason = gds.gds_status()
    assert not usable and fragment in reason
    with pytest.raises(BackendUnavailableError, match=fragment):
        gds.select_backend("gds", device="cuda:0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert gds.select_backend("auto", device="cuda:0") == "posix"


@pytest.mark.parametrize("generation", GENERATIONS)
def test_working_kvikio_is_selected(monkeypatch, generation):
    # 24.12's default compat mode is AUTO, a truthy enum: it must not read as "compat mode on".
    _fake_kvikio(monkeypatch, generation=generation)
    assert gds.gds_status() == (True, "GDS available through kvikio")
    assert gds.gds_available()
    assert gds.select_backend("auto", device="cuda:0") == "gds"
    assert gds.select_backend("posix", device="cuda:0") == "posix"
    assert gds.select_backend("auto", device="cpu") == "posix"


def test_backend_option_is_validated():
    with pytest.raises(ConfigError, match="auto, gds, posix"):
        gds.select_backend("nvme")


def test_env_variable_selects_backend(monkeypatch):
    _fake_kvikio(monkeypatch)
    monkeypatch.setenv("FASTSAFETENSORS_BACKEND", "posix")
    assert gds.select_backend(None, device="cuda:0") == "posix"


class _IOFuture:
    """kvikio's IOFuture: get() blocks until the read finished and returns the bytes read."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes

    def get(self) -> int:
        return self.nbytes


class _CuFile:
    """cuFile stand-in: reads into a (CPU) tensor and returns a finished future."""

    opened: list[str] = []

    def __init__(self, path, mode):
        self.fd = os.open(path, os.O_RDONLY)
        _CuFile.opened.append(path)

    def pread(self, buf, size, file_offset):
        data = os.pread(self.fd, size, file_offset)
        buf[:len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return _IOFuture(len(data))

    def close(self):
        os.close(self.fd)


def test_stream_gds_reads_every_tensor_bit_for_bit(tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = {"a": torch.randn(33, 7), "b": torch.arange(10, dtype=torch.int64),
               "e": torch.zeros(0), "h": torch.randn(5).to(torch.bfloat16)}
    save_file(tensors, str(path))
    kvikio = types.SimpleNamespace(CuFile=_CuFile)
    got = dict(gds.stream_gds([(str(path), None, None)], FakeSink(delay=0), kvikio=kvikio))
    want = st_load_file(str(path))
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(as_bytes(got[name]), as_bytes(want[name])), name



def test_stream_gds_refuses_a_file_replaced_since_its_header_was_read(tmp_path):
    # load([a, b]) and a resolved Checkpoint hand over headers read earlier; the other engines
    # check the file they open against them (format.check_same_file). cuFile read the file now
    # at that path at the old offsets: neither file's tensors, and no error.
    path = tmp_path / "b.safetensors"
    save_file({"p": torch.full((256,), 2.0), "q": torch.full((256,), 3.0)}, str(path))
    header = read_header(path)
    swapped = tmp_path / "c.safetensors"
    save_file({"p": torch.ones(128, 2), "q": torch.full((256,), 5.0)}, str(swapped))
    os.replace(swapped, path)
    kvikio = types.SimpleNamespace(CuFile=_CuFile)
    with pytest.raises(HeaderError, match="changed after its header was read"):
        list(gds.stream_gds([(str(path), header, None)], FakeSink(delay=0), kvikio=kvikio))
    # Read afresh (no header given), the new file loads whole.
    got = dict(gds.stream_gds([(str(path), None, None)], FakeSink(delay=0), kvikio=kvikio))
    assert torch.equal(got["q"], torch.full((256,), 5.0))


def test_stream_gds_reads_the_file_whose_header_it_checked(tmp_path, monkeypatch):
    # Checked through one open, read through another by path: a file replaced in between
    # would be read unchecked. cuFile opens the checked file itself (/proc/self/fd/N).
    path = tmp_path / "b.safetensors"
    save_file({"p": torch.full((256,), 2.0)}, str(path))
    header = read_header(path)

    class ReplacedOnOpen(_CuFile):
        def __init__(self, source, mode):
            swapped = tmp_path / "c.safetensors"
            save_file({"p": torch.full((256,), 9.0)}, str(swapped))
            os.replace(swapped, path)   # after the check, before cuFile opens it
            super().__init__(source, mode)

    kvikio = types.SimpleNamespace(CuFile=ReplacedOnOpen)
    got = dict(gds.stream_gds([(str(path), header, None)], FakeSink(delay=0), kvikio=kvikio))
    assert torch.equal(got["p"], torch.full((256,), 2.0))

def test_stream_gds_holds_no_more_than_the_budget(tmp_path):
    # Reads in flight are handed over before the next allocation would pass the budget.
    path = tmp_path / "m.safetensors"
    tensors = {f"w{i}": torch.full((64, 64), float(i)) for i in range(12)}   # 16 KiB each
    save_file(tensors, str(path))
    sink = FakeSink(delay=0)
    kvikio = types.SimpleNamespace(CuFile=_CuFile)
    budget = 40 << 10
    for name, tensor in gds.stream_gds([(str(path), None, None)], sink, kvikio=kvikio,
                                       max_device_bytes=budget):
        assert torch.equal(tensor, tensors[name])
        sink.consumed(tensor.nbytes)
    assert sink.peak_outstanding <= budget
