"""The CPU loader (fastsafetensors.loader.cpu): io modes, page-cache policy, one buffer per
file, misaligned copies, short reads, and read counts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from builders import (
    assert_aligned,
    assert_bitwise_equal,
    misaligned_entries,
    open_fds,
    opens_direct,
    write_file,
    write_raw,
)

import fastsafetensors
import fastsafetensors.api
from fastsafetensors import HeaderError, ReadError, TensorNotFoundError
from fastsafetensors.format import read_header
from fastsafetensors.frameworks import get_framework
from fastsafetensors.loader.cpu import close_job, load_host, open_job
from fastsafetensors.loader.pagecache import resident_fraction, resident_map
from fastsafetensors.loader.posix import STATS, pread_into

MiB = 1 << 20


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """About 6 MB: big tensors, small ones, odd sizes, a BF16 and an empty one."""
    gen = torch.Generator().manual_seed(4)
    tensors = {
        "a": torch.randn(512, 1024, generator=gen),                      # 2 MiB
        "b": torch.randn(1000, 1000, generator=gen).bfloat16(),          # 2 MB, not 4K-aligned
        "c": torch.arange(333, dtype=torch.int16),
        "d": torch.randn(700, 1024, generator=gen).half(),
        "e": torch.zeros(0, 8),
        "f": torch.tensor(3.5, dtype=torch.float64),
        "g": torch.randint(0, 255, (4099,), generator=gen, dtype=torch.uint8),
    }
    return write_file(tmp_path / "model.safetensors", tensors), tensors


def _direct_ok(path: Path) -> bool:
    if not opens_direct(path):
        return False
    return True


def _evict(path: Path) -> float | None:
    """Drop the file's pages from the page cache; returns the share still resident."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return resident_fraction(fd)
    finally:
        os.close(fd)


def _delta(before: tuple[int, int, int]) -> tuple[int, int, int]:
    now = STATS.snapshot()
    return now[0] - before[0], now[1] - before[1], now[2] - before[2]


@pytest.mark.parametrize("io", ["buffered", "direct", "auto"])
def test_io_modes_give_identical_tensors(ckpt: tuple[Path, dict[str, torch.Tensor]],
                                         io: str) -> None:
    path, tensors = ckpt
    reference = safetensors.torch.load_file(path)
    before = STATS.snapshot()
    ours = fastsafetensors.load_file(path, io=io)
    nbytes, reads, _ = _delta(before)
    assert set(ours) == set(reference)
    for name in tensors:
        assert_bitwise_equal(ours[name], reference[name])
        assert_aligned(ours[name])
    header = fastsafetensors.format.read_header(path)
    assert nbytes >= header.data_size
    # whole 16 MiB chunks at most, not one read per tensor
    assert 1 <= reads <= 2 + header.data_size // (16 * MiB)


def test_direct_reads_bypass_the_cache(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = ckpt
    if not _direct_ok(path):
        pytest.skip("this filesystem refuses O_DIRECT (tmpfs?); io=direct falls back there")
    before = STATS.snapshot()
    ours = fastsafetensors.load_file(path, io="direct")
    _, reads, direct = _delta(before)
    assert direct > 0 and direct == reads
    for name in tensors:
        assert_bitwise_equal(ours[name], tensors[name])



@pytest.mark.parametrize("io", ["direct", "auto"])
def test_a_file_system_that_refuses_direct_reads_is_read_through_the_cache(
        ckpt: tuple[Path, dict[str, torch.Tensor]], io: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Some file systems (FUSE, network ones) open with O_DIRECT and refuse every read of it
    (EINVAL). The load came out as a bare OSError; it falls back as where the open is refused."""
    import errno
    import fcntl

    from fastsafetensors.loader import posix

    path, tensors = ckpt
    if not _direct_ok(path):
        pytest.skip("this filesystem refuses O_DIRECT at the open, the case tested elsewhere")
    _evict(path)   # so that auto, too, reads directly
    preadv = os.preadv

    def refusing(fd: int, buffers: list, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", refusing)
    monkeypatch.setattr(posix, "_DIRECT_READS", {})   # asked once per file system: ask again
    before = STATS.snapshot()
    with caplog.at_level("WARNING", logger="fastsafetensors"):
        ours = fastsafetensors.load_file(path, io=io)
    _, reads, direct = _delta(before)
    assert reads > 0 and direct == 0
    assert ("O_DIRECT is not supported here" in caplog.text) == (io == "direct")
    assert posix._DIRECT_READS == {os.stat(path).st_dev: False}   # the file system's answer
    for name in tensors:
        assert_bitwise_equal(ours[name], tensors[name])
    with fastsafetensors.configure(io=io), fastsafetensors.FastSafetensorsFile(path) as f:
        for name in tensors:
            assert_bitwise_equal(f[name], tensors[name])

def test_auto_reads_a_cached_file_through_the_cache(
        ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = ckpt
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, os.path.getsize(path), 0)  # make sure every page is cached
        cached = resident_fraction(fd)
    finally:
        os.close(fd)
    assert cached is None or cached == 1.0
    before = STATS.snapshot()
    ours = fastsafetensors.load_file(path, io="auto")
    _, reads, direct = _delta(before)
    assert reads > 0 and direct == 0
    for name in tensors:
        assert_bitwise_equal(ours[name], tensors[name])


def test_auto_reads_an_evicted_file_directly(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = ckpt
    if not _direct_ok(path):
        pytest.skip("this filesystem refuses O_DIRECT, so auto can only read buffered")
    left = _evict(path)
    if left is None or left > 0.1:
        pytest.skip(f"page-cache eviction is not observable here (resident share after "
                    f"POSIX_FADV_DONTNEED: {left})")
    before = STATS.snapshot()
    ours = fastsafetensors.load_file(path, io="auto")
    _, reads, direct = _delta(before)
    assert direct > 0
    for name in tensors:
        assert_bitwise_equal(ours[name], tensors[name])


def test_resident_map_and_fraction(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = ckpt
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, os.path.getsize(path), 0)
        pages = resident_map(fd, 0, os.path.getsize(path))
        if pages is None:
            pytest.skip("mincore is not available on this platform")
        assert len(pages) == -(-os.path.getsize(path) // os.sysconf("SC_PAGE_SIZE"))
        assert resident_fraction(fd) == 1.0
        assert resident_map(fd, 0, 0) is None
        assert resident_fraction(fd, 100, 10) == 1.0
    finally:
        os.close(fd)


@pytest.mark.parametrize("io", ["buffered", "direct"])
def test_many_threads_and_small_chunks(ckpt: tuple[Path, dict[str, torch.Tensor]],
                                       io: str) -> None:
    path, tensors = ckpt
    header = fastsafetensors.format.read_header(path)
    reference = {}
    for threads in (1, 3, 8):
        before = STATS.snapshot()
        jobs = [open_job(path)]
        try:
            (out,) = load_host(jobs, get_framework("pt"), threads=threads, io=io, chunk=MiB)
        finally:
            close_job(jobs[0])
        _, reads, _ = _delta(before)
        assert reads >= header.data_size // MiB
        for name in tensors:
            assert_bitwise_equal(out[name], tensors[name])
        reference[threads] = out
    assert all(torch.equal(reference[1]["a"], r["a"]) for r in reference.values())


def test_aligned_tensors_are_views_of_one_buffer(
        ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """No copy: each tensor lies at its offset in the one buffer the file was read into. Yet
    each storage is its own bytes only, as safetensors' are: torch.save of one tensor writes
    that tensor, not the file."""
    path, _ = ckpt
    ours = fastsafetensors.load_file(path)
    offsets = {name: info.data_offsets[0] for name, info in read_header(path).tensors.items()}
    bases = {t.data_ptr() - offsets[name] for name, t in ours.items() if t.numel()}
    assert len(bases) == 1
    for name, tensor in ours.items():
        assert tensor.untyped_storage().nbytes() == tensor.nbytes, name
        if tensor.numel():
            assert tensor.untyped_storage().data_ptr() == tensor.data_ptr(), name


def test_misaligned_tensors_are_copied_to_aligned_memory(tmp_path: Path) -> None:
    entries, data, expected = misaligned_entries()
    path = write_raw(tmp_path / "mis.safetensors", entries, data)
    for io in ("buffered", "direct", "auto"):
        ours = fastsafetensors.load_file(path, io=io)
        base = ours["a.u8"].data_ptr() - entries["a.u8"]["data_offsets"][0]
        for name, tensor in expected.items():
            assert_bitwise_equal(ours[name], tensor)
            assert_aligned(ours[name])
        # a misaligned F32 cannot be a view of the file buffer; a U8 can
        assert ours["b.f32"].data_ptr() != base + entries["b.f32"]["data_offsets"][0]
        assert ours["d.u8"].data_ptr() == base + entries["d.u8"]["data_offsets"][0]


def test_subset_of_tensors_reads_only_their_range(
        ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = ckpt
    job = open_job(path, ["c", "f"])
    try:
        before = STATS.snapshot()
        (out,) = load_host([job], get_framework("pt"), io="buffered")
        nbytes, _, _ = _delta(before)
    finally:
        close_job(job)
    assert set(out) == {"c", "f"}
    assert_bitwise_equal(out["c"], tensors["c"])
    assert_bitwise_equal(out["f"], tensors["f"])
    assert nbytes < 2 * MiB  # not the 6 MB of the whole file
    with pytest.raises(TensorNotFoundError, match="'cc'"):
        open_job(path, ["c", "cc"])


def test_several_files_in_one_load(tmp_path: Path) -> None:
    paths = [write_file(tmp_path / f"{i}.safetensors", {f"t{i}": torch.full((100,), i)})
             for i in range(3)]
    jobs = [open_job(p) for p in paths]
    try:
        results = load_host(jobs, get_framework("pt"), threads=4)
    finally:
        for job in jobs:
            close_job(job)
    assert [list(r) for r in results] == [["t0"], ["t1"], ["t2"]]
    assert [int(r[f"t{i}"][0]) for i, r in enumerate(results)] == [0, 1, 2]


@pytest.mark.parametrize("io", ["buffered", "direct", "auto"])
@pytest.mark.parametrize("keep", ["mid_data", "header_only"])
def test_file_truncated_after_header_raises_read_error(
        ckpt: tuple[Path, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch,
        io: str, keep: str) -> None:
    path, _ = ckpt
    real_open_job = fastsafetensors.api.open_job
    header = fastsafetensors.format.read_header(path)
    size = header.data_start + (header.data_size // 2 if keep == "mid_data" else 0)

    def open_then_truncate(*args: Any, **kwargs: Any) -> Any:
        job = real_open_job(*args, **kwargs)
        os.truncate(path, size)
        return job

    monkeypatch.setattr(fastsafetensors.api, "open_job", open_then_truncate)
    before = open_fds()
    with pytest.raises(ReadError) as excinfo:
        fastsafetensors.load_file(path, io=io)
    assert open_fds() == before
    error = excinfo.value
    assert isinstance(error, OSError) and error.path == str(path)
    assert path.name in str(error) and "truncated" in str(error)


def test_pread_into_short_file(tmp_path: Path) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(8)
        assert pread_into(fd, memoryview(buf), 2, path=str(path)) == 8
        assert bytes(buf) == b"23456789"
        with pytest.raises(ReadError) as excinfo:
            pread_into(fd, memoryview(bytearray(8)), 5, path=str(path))
        assert (excinfo.value.offset, excinfo.value.expected, excinfo.value.got) == (5, 8, 5)
        assert pread_into(fd, memoryview(bytearray(8)), 5, path=str(path), allow_eof=True) == 5
    finally:
        os.close(fd)


def test_a_direct_read_stops_at_a_part_block(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # An O_DIRECT read widened past the end of the file comes back less than whole blocks:
    # no read follows from that unaligned offset, which some file systems refuse (EINVAL)
    # instead of answering 0. Emulated: the first read returns a part block, a second raises.
    import fastsafetensors.loader.posix as posix

    calls: list[int] = []

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(22, "Invalid argument")
        buffers[0][:5000] = b"x" * 5000
        return 5000   # one block and 904 bytes: the file's end

    monkeypatch.setattr(posix.os, "preadv", preadv)
    dest = memoryview(bytearray(8192))
    assert pread_into(0, dest, 0, path="f", direct=True, allow_eof=True) == 5000
    assert calls == [0]


def test_huge_page_advice_is_opt_in(monkeypatch):
    from fastsafetensors.frameworks import get_framework, memory

    calls = []
    monkeypatch.setattr(memory, "_madvise", lambda addr, n, advice: calls.append(n) or 0)
    fw = get_framework("pt")
    fw.alloc(8 << 20)
    assert calls == []  # not by default ("auto": huge pages only for GPU staging)
    with fastsafetensors.configure(huge_pages="auto"):
        fw.alloc(8 << 20)
    assert calls == []
    with fastsafetensors.configure(huge_pages="on"):
        fw.alloc(8 << 20)
        fw.alloc(1 << 20)  # below HUGE_MIN: no advice
    assert len(calls) == 1 and calls[0] >= 4 << 20


def test_direct_plans_use_direct_threads(tmp_path, caplog):
    import logging

    from safetensors.torch import save_file

    path = tmp_path / "d.safetensors"
    save_file({f"w{i}": torch.full((256, 1024), float(i)) for i in range(8)}, str(path))
    if not opens_direct(path):
        pytest.skip("this filesystem refuses O_DIRECT, so no plan is direct")
    with caplog.at_level(logging.INFO, logger="fastsafetensors.loader.cpu"):
        with fastsafetensors.configure(chunk_bytes=1 << 20, direct_threads=5):
            fastsafetensors.load_file(path, io="direct")
            fastsafetensors.load_file(path, io="buffered")
            fastsafetensors.load_file(path, io="direct", threads=3)
    lines = [r.getMessage() for r in caplog.records if "loaded" in r.getMessage()]
    assert "5 threads, io=direct" in lines[0]
    assert "5 threads" not in lines[1]
    assert "3 threads, io=direct" in lines[2]  # an explicit threads= wins


@pytest.mark.parametrize("io", ["buffered", "direct"])
def test_a_subset_far_apart_takes_buffers_of_its_own(tmp_path: Path, io: str) -> None:
    # load(tensors=[first, last]) allocated one buffer spanning everything between: two small
    # tensors of a 32 GB single-file model asked for 32 GB (and kept it alive as views).
    path = write_file(tmp_path / "m.safetensors", {   # file order: by name
        "a.embed": torch.full((1024,), 1.0), "b.hole": torch.zeros(4 << 20),
        "c.head": torch.full((1024,), 2.0)})
    STATS.reset()
    got = fastsafetensors.load(path, tensors=["a.embed", "c.head"], io=io)
    assert torch.equal(got["a.embed"], torch.full((1024,), 1.0))
    assert torch.equal(got["c.head"], torch.full((1024,), 2.0))
    for tensor in got.values():
        assert tensor.untyped_storage().nbytes() < 1 << 20   # not the 16 MiB between
    assert STATS.bytes_read <= 2 * 2 * 4096   # the hole is not read either


def test_a_file_replaced_between_header_and_data_is_refused(tmp_path: Path) -> None:
    # load([a, b]) reads every header first, then each file's data through a new open: b
    # replaced in between (same size, tensors swapped) gave neither file's tensors.
    a = write_file(tmp_path / "a.safetensors", {"x": torch.full((256,), 1.0)})
    b = write_file(tmp_path / "b.safetensors", {"p": torch.full((256,), 2.0),
                                                "q": torch.full((256,), 3.0)})
    header = read_header(b)
    swapped = write_file(tmp_path / "c.safetensors", {"p": torch.ones(128, 2),
                                                      "q": torch.full((256,), 5.0)})
    os.replace(swapped, b)
    with pytest.raises(HeaderError, match="changed after its header was read"):
        open_job(b, None, header)
    assert fastsafetensors.load([a, b])["q"][0] == 5.0   # read afresh: the new file, whole


def test_a_file_touched_or_saved_again_alike_still_loads(tmp_path: Path) -> None:
    # A Checkpoint keeps its headers: a file merely touched, or saved again with the same
    # layout, must not make every later load of it fail.
    path = write_file(tmp_path / "b.safetensors", {"p": torch.full((256,), 2.0)})
    ckpt = fastsafetensors.resolve(path)
    os.utime(path)
    assert fastsafetensors.load(ckpt)["p"][0] == 2.0
    write_file(tmp_path / "b.safetensors", {"p": torch.full((256,), 7.0)})
    assert fastsafetensors.load(ckpt)["p"][0] == 7.0


def test_an_interrupted_load_stops_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    # Ctrl-C in the wait skipped the cancelling of queued reads, and leaving the thread pool
    # then ran all of them: the whole file was read before the KeyboardInterrupt came out.
    import queue
    import time
    import types

    import fastsafetensors.loader.cpu as cpu
    from fastsafetensors.loader import threads

    path = write_file(tmp_path / "m.safetensors", {f"w{i}": torch.zeros(1 << 16)
                                                   for i in range(64)})   # 16 MiB
    reads = []
    real_read = cpu._read_one

    def slow_read(*args: Any) -> int:
        reads.append(1)
        time.sleep(0.01)
        return real_read(*args)

    class Interrupted(queue.SimpleQueue):
        def get(self, *args: Any, **kwargs: Any) -> Any:
            # The caller's wait for results (readers take reads with get_nowait, in C).
            raise KeyboardInterrupt

    monkeypatch.setattr(cpu, "_read_one", slow_read)
    monkeypatch.setattr(threads, "queue", types.SimpleNamespace(SimpleQueue=Interrupted,
                                                                Empty=queue.Empty))
    with pytest.raises(KeyboardInterrupt), fastsafetensors.configure(chunk_bytes=1 << 16):
        fastsafetensors.load_file(path, threads=2, io="buffered")
    assert len(reads) < 64 // 2


@pytest.mark.parametrize("opener", ["open_readonly", "open_direct"])
def test_ctrl_c_while_a_file_opens_leaks_no_descriptor(tmp_path: Path, opener: str) -> None:
    # CPython runs a Ctrl-C handler as a call returns: one right after the fstat that checks
    # the new descriptor left it open, its number known to nobody. (Right after os.open itself
    # returns, Python code cannot close that window: those points are not tried.)
    import sys

    from fastsafetensors import format as fmt
    from fastsafetensors.loader import posix

    path = write_file(tmp_path / "m.safetensors", {"w": torch.ones(4)})
    plain = fmt.open_readonly(path)
    calls = {"open_readonly": lambda: fmt.open_readonly(path),
             "open_direct": lambda: posix.open_direct(plain, str(path))}
    code = getattr(fmt if opener == "open_readonly" else posix, opener).__code__

    def interrupt_at(point: int) -> tuple[Any, list[int]]:
        passed = [0]

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "c_return" and frame.f_code is code and arg is not os.open:
                passed[0] += 1
                if passed[0] == point:
                    sys.setprofile(None)
                    raise KeyboardInterrupt

        return profile, passed

    try:
        profile, passed = interrupt_at(0)
        sys.setprofile(profile)
        try:
            opened = calls[opener]()
        finally:
            sys.setprofile(None)
        if opened is None:
            pytest.skip("O_DIRECT is not supported on this filesystem")
        os.close(opened)
        assert passed[0] >= 2
        before = open_fds()
        for point in range(1, passed[0] + 1):
            profile, _ = interrupt_at(point)
            sys.setprofile(profile)
            try:
                os.close(calls[opener]())
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
            assert open_fds() == before, point
    finally:
        os.close(plain)
