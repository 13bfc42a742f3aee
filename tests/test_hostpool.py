"""Pinned staging on huge pages (huge_pages="on"), kept for the process: loader/hostpool.py.
The CUDA registration is replaced by a recorder here; tests/gpu runs the real one."""

from __future__ import annotations

import mmap
import threading

import pytest
import torch
from fake_device import FakeSink
from safetensors.torch import save_file

from fastsafetensors.loader import hostpool
from fastsafetensors.loader.stream import StreamOptions, stream_tensors


@pytest.fixture
def registrations(monkeypatch):
    """Each (address, nbytes) registered; the pool starts empty."""
    monkeypatch.setattr(hostpool, "_free", type(hostpool._free)(list))
    monkeypatch.setattr(hostpool, "_lent", {})
    monkeypatch.setattr(hostpool, "_refused", None)
    done: list[tuple[int, int]] = []

    def register(address: int, nbytes: int) -> int:
        done.append((address, nbytes))
        return 0

    return done, register


def test_a_buffer_is_registered_once_and_lent_again(registrations):
    done, register = registrations
    first = hostpool.take(3 << 20, register)
    assert first is not None and first.tensor.numel() == 3 << 20
    assert len(first.view) == 3 << 20 and first.address % mmap.PAGESIZE == 0
    # Registered as whole huge pages (a partial one at the end would stay on 4 KiB pages).
    assert done == [(first.address, 4 << 20)]
    second = hostpool.take(3 << 20, register)   # the first is still lent: a new one
    assert second is not None and second.address != first.address and len(done) == 2
    first.view[:4] = b"abcd"
    assert hostpool.give(first.tensor) and not hostpool.give(first.tensor)   # given back once
    again = hostpool.take(3 << 20, register)
    assert again is first and len(done) == 2 and bytes(again.view[:4]) == b"abcd"
    assert not hostpool.give(torch.empty(4))   # not the pool's: left to its owner


def test_small_buffers_are_registered_in_pages_not_huge_pages(registrations):
    # Small staging (many threads, little staging_bytes) must not pin 2 MiB a buffer.
    done, register = registrations
    block = hostpool.take(508 << 10, register)
    pages = -(-(508 << 10) // mmap.PAGESIZE) * mmap.PAGESIZE   # 4 KiB here, 64 KiB on some
    assert block is not None and done == [(block.address, pages)]


def test_a_refused_registration_is_not_tried_again(registrations):
    # The first refusal stands for the process: each buffer of each load asking again would
    # map, advise, fail and unmap 16 MiB every time.
    done, register = registrations
    refusals: list[int] = []

    def refuse(address: int, nbytes: int) -> int:
        refusals.append(nbytes)
        return 801   # CUDA_ERROR_NOT_SUPPORTED

    assert hostpool.take(1 << 20, refuse) is None
    assert hostpool.take(1 << 20, refuse) is None and hostpool.take(4 << 20, register) is None
    assert refusals == [1 << 20] and done == []
    assert hostpool._free == {} and hostpool._lent == {}


def test_registration_calls_the_driver_with_the_address_size_and_flags(monkeypatch):
    calls: list[tuple[int, int, int]] = []

    class Driver:   # libcuda's two entry points, as ctypes hands them their arguments
        def cuMemHostRegister_v2(self, address, nbytes, flags):  # noqa: N802 - CUDA's name
            calls.append((address.value, nbytes, flags))
            return 0

        def cuMemHostUnregister(self, address):  # noqa: N802 - CUDA's name
            calls.append((address.value, 0, 0))
            return 0

    monkeypatch.setattr(hostpool, "_driver", Driver())
    assert hostpool.register(1 << 40, 3 << 30) == 0
    assert hostpool.register(4096, 8192, 0x08) == 0 and hostpool.unregister(1 << 40) == 0
    assert calls == [(1 << 40, 3 << 30, hostpool.PORTABLE), (4096, 8192, 0x08), (1 << 40, 0, 0)]


def test_a_forked_child_gets_neither_the_buffers_nor_the_pool(registrations):
    # MADV_DONTFORK: a child has no mapping of the buffers (copy-on-write could otherwise give
    # the parent a new page in place of a pinned one), and its pool starts empty.
    import os

    done, register = registrations
    block = hostpool.take(4 << 20, register)
    assert block is not None and hostpool.give(block.tensor)
    flags = _vm_flags(block.address)
    if flags is None:
        pytest.skip("no /proc/self/smaps here")
    assert "dc" in flags   # "do not copy on fork"
    pid = os.fork()
    if pid == 0:   # the child: exit status 0 only if all holds
        ok = _vm_flags(block.address) is None and hostpool.held()[1] == 0
        os._exit(0 if ok and hostpool._refused is None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert hostpool.take(4 << 20, register) is block   # the parent's pool is intact


def _vm_flags(address: int) -> str | None:
    """The VmFlags of this process's mapping holding ``address`` (None: no such mapping)."""
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split()[0] if line else ""
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return line
    return None


def test_registration_without_a_cuda_driver_says_so():
    # No libcuda here: the CUDA error "not found", never an exception.
    if hostpool._libcuda() is not None:
        pytest.skip("a CUDA driver is installed here")
    assert hostpool.register(0, 4096) == hostpool.NOT_FOUND


def test_every_staging_buffer_is_given_back_after_its_copies(tmp_path):
    # The engine gives each reader's buffers back when the load ends, after the copies out of
    # them ran (the fake device runs copies late and checks).
    tensors = {f"w{i}": torch.full((4096,), float(i)) for i in range(24)}   # 16 KiB each
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    sink = FakeSink(delay=0.003)
    out = dict(stream_tensors([(str(path), None, None)], sink,
                              StreamOptions(threads=3, staging_bytes=6 * 16384)))
    sink.close()
    assert all(torch.equal(out[k], v) for k, v in tensors.items())
    assert sink.staged and sorted(map(id, sink.released)) == sorted(map(id, sink.staged))
    assert sink.violations == []


def test_the_cuda_sink_takes_staging_from_the_pool_when_asked(registrations, monkeypatch):
    from fastsafetensors.loader import cuda as cuda_loader

    done, register = registrations
    order: list[str] = []   # the context is bound on the registering thread first

    def bind(device: str) -> None:
        order.append(f"bind {device}")

    def registering(address: int, nbytes: int) -> int:
        order.append("register")
        return register(address, nbytes)

    monkeypatch.setattr(hostpool, "register", registering)
    monkeypatch.setattr(torch.cuda, "mem_get_info", bind)
    monkeypatch.setattr(cuda_loader, "_bound", threading.local())   # no thread bound yet
    sink = object.__new__(cuda_loader.TorchCudaSink)   # no CUDA here: the fields staging uses
    sink.huge_pages, sink.device = True, "cuda:0"
    buffer, view = sink.staging(1 << 20)
    assert len(done) == 1 and len(view) == 1 << 20 and buffer.data_ptr() % 4096 == 0
    assert order == ["bind cuda:0", "register"]
    sink.release_staging(buffer)
    again, _ = sink.staging(1 << 20)
    assert again is buffer and len(done) == 1


def test_the_cuda_sink_pins_with_torch_when_the_pool_cannot(registrations, monkeypatch):
    from fastsafetensors.loader import cuda as cuda_loader

    monkeypatch.setattr(hostpool, "register", lambda address, nbytes: 801)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: None)
    real_empty = torch.empty
    pinned: list[bool] = []

    def empty(*args, **kwargs):   # no CUDA here: record the request, give plain memory
        pinned.append(kwargs.pop("pin_memory", False))
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    sink = object.__new__(cuda_loader.TorchCudaSink)
    sink.huge_pages, sink.device = True, "cuda:0"
    for _ in range(2):
        buffer, view = sink.staging(1 << 20)
        assert len(view) == 1 << 20 and buffer.data_ptr() % 4096 == 0
        sink.release_staging(buffer)   # not the pool's: left to torch's cache
    assert pinned == [True, True] and hostpool._lent == {}
