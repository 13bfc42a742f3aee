"""A GPU load's reads and copies in C threads (cuda_calls="ring"): loader/ring.py and
loader/ring.c, built here with the system's C compiler, against tests/fake_libcuda.c (whose
"device" memory is host memory and whose copies run when queued, or with its defer_copies knob
only once an event after them is waited for). tests/gpu runs the real driver."""

from __future__ import annotations

import gc
import os
import threading
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import require_o_direct
from safetensors.torch import save_file

# With test_driver's fixtures, found by pytest under these names (F811 where they are used).
from test_driver import DriverHostSink, _Stream, fake, fake_so, two_files  # noqa: F401
from test_native import assert_same, bound, cache, sink_of_device_1  # noqa: F401

from fastsafetensors import CudaError, ReadError, configure
from fastsafetensors.loader import driver, ring, stream
from fastsafetensors.loader.posix import STATS
from fastsafetensors.loader.stream import PHASES, StreamOptions, stream_tensors


@pytest.fixture
def calls(fake: Any, cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:  # noqa: F811
    yield from bound(ring, fake, cache, monkeypatch)


class RingHostSink(DriverHostSink):
    """DriverHostSink with a ring, as TorchCudaSink has it with cuda_calls="ring"."""

    def __init__(self) -> None:
        super().__init__()
        self.rings: list[ring.Ring] = []
        self.staged: list[Any] = []

    def ring(self, **shape: int) -> ring.Ring:
        made = ring.Ring(0, **shape)
        self.rings.append(made)
        return made

    def staging(self, nbytes: int) -> tuple[Any, memoryview]:
        self.staged.append(nbytes)
        return super().staging(nbytes)


def load(paths: list[Path], sink: Any, **options: Any) -> dict[str, torch.Tensor]:
    shape = {"threads": 3, "staging_bytes": 6 * 16384, "io": "buffered", **options}
    return dict(stream_tensors([(str(p), None, None) for p in paths], sink,
                               StreamOptions(**shape)))


def reported_chunks(report: ring.Report | None) -> list[tuple[int, int]]:
    """(number, bytes read) of each chunk of one Ring.next() report."""
    if report is None:
        return []
    return [(report.first + i, n) for i, n in enumerate(report.got)]


def submit(made: ring.Ring, fd: int, spans: list[tuple[int, int]], dst: torch.Tensor, *,
           limit: int = 100, first: int = 0) -> int | None:
    """Ring.submit_file of bytes ``spans`` ((begin, end) each, in file order) of ``fd``, read
    buffered, each into ``dst`` at its own offset: chunks of at most ``limit`` bytes, none
    across a gap. Tensor i of them is number ``first + i``."""
    return made.submit_file((0, fd, None, None, "buffered"), array("q", [b for b, _ in spans]),
                            array("q", [e for _, e in spans]),
                            array("Q", [dst.data_ptr() + b for b, _ in spans]), None, limit, 0,
                            first, align=512, cached=0.5)


def ring_on_a_file(tmp_path: Path, **shape: int) -> tuple[ring.Ring, int, Path, torch.Tensor]:
    """A ring of 2 windows of 4096 bytes (``shape``: Ring's other keywords), opened, and a
    descriptor of a 16 KiB file of the bytes 0-255 over and over: ``(ring, descriptor, path,
    the windows' memory, to keep until the ring is closed)``."""
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 64)
    windows = torch.zeros(2 * 4096, dtype=torch.uint8)
    made = ring.Ring(0, windows=2, stride=4096, **shape)
    made.open(7, windows.data_ptr())
    return made, os.open(path, os.O_RDONLY), path, windows


def count_submits(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int | None]]:
    """(tensors, chunks) of each Ring.submit_file call from now on."""
    calls: list[tuple[int, int | None]] = []
    real = ring.Ring.submit_file

    def counted(self: ring.Ring, file: Any, begin: Any, *args: Any, **kw: Any) -> int | None:
        chunks = real(self, file, begin, *args, **kw)
        calls.append((len(begin), chunks))
        return chunks

    monkeypatch.setattr(ring.Ring, "submit_file", counted)
    return calls


def wait_until_copied(destinations: list[tuple[str, torch.Tensor]],
                      tensors: dict[str, torch.Tensor]) -> None:
    """Until every destination holds its tensor: the ring's C threads copy without a report
    taken (10 s at most)."""
    deadline = time.monotonic() + 10
    while not all(torch.equal(d, tensors[n]) for n, d in destinations):
        assert time.monotonic() < deadline, "the ring's threads stopped without reports"
        time.sleep(0.01)


@pytest.mark.parametrize("io", ["buffered", "direct"])
def test_the_engine_through_the_ring_equals_safetensors(calls, tmp_path, io):
    # Real files through the engine: O_DIRECT's widening and skew, misaligned tensors and
    # chunks across window edges become the ring's reads and copies; every byte counted once.
    first, second = two_files(tmp_path, seed=5)
    if io == "direct":
        require_o_direct(first)
    sink = RingHostSink()
    STATS.reset()
    PHASES.reset()
    events = calls.events_live
    got = load([first, second], sink, io=io)
    assert_same(got, [first, second])
    (made,) = sink.rings
    # 6 x 16 KiB of staging: 64 KiB (the power of two within it) of windows of a chunk each.
    assert made.windows == (65536 - 4096) // made.stride and made.stride % 4096 == 0
    assert sink.staged == [made.nbytes] and made.readers == 3
    phases = PHASES.snapshot()
    assert phases["ring: readers reading"] > 0 and "ring: copier queuing copies" in phases
    assert "reader: read" not in phases   # no Python reader ran
    wanted = sum(t.numel() * t.element_size() for t in got.values())
    if io == "buffered":
        assert STATS.bytes_read == wanted and STATS.direct_reads == 0
    else:
        assert STATS.bytes_read >= wanted and STATS.direct_reads == made.submitted
    # One copy per piece, every chunk waited for its allocation, and one event per chunk
    # handed to Python; the windows' own events are gone with the ring.
    assert calls.copies >= len(got) - 1 and calls.waits >= made.submitted > 3
    assert calls.pushes == calls.pops
    del got
    gc.collect()
    assert calls.events_live == events


@pytest.mark.parametrize("count", ["cachestat", "mincore"])
@pytest.mark.parametrize("evicted", ["nothing", "the second half", "everything"])
def test_auto_reads_each_chunk_by_the_share_of_its_pages_cached(calls, tmp_path, monkeypatch,
                                                                 evicted, count):
    # io="auto" through the ring: each reader counts its chunk's pages in the page cache as it
    # starts (cachestat, or mincore on the file's mapping where the kernel has no cachestat)
    # and reads with O_DIRECT when fewer than half are: a file half evicted is read half each
    # way.
    from fastsafetensors.format import read_header
    from fastsafetensors.loader.pagecache import resident_map

    count_with_mincore = ring._load()["lib"].fst_ring_count_with_mincore

    tensors = {f"w{i}": torch.full((65536,), float(i)) for i in range(8)}   # 256 KiB each
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    require_o_direct(path)
    header = read_header(path)
    middle = header.data_start + header.tensors["w4"].data_offsets[0]
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.pread(fd, size, 0)
        if evicted != "nothing":
            start = 0 if evicted == "everything" else middle - middle % 4096
            os.posix_fadvise(fd, start, 0, os.POSIX_FADV_DONTNEED)
        pages = resident_map(fd, 0, size)
    finally:
        os.close(fd)
    if pages is None:
        pytest.skip("mincore cannot be used here")
    page = os.sysconf("SC_PAGE_SIZE")
    cached = [bool(b & 1) for b in pages]
    want = {"nothing": [True] * len(cached), "everything": [False] * len(cached),
            "the second half": [i * page < middle - middle % 4096 for i in range(len(cached))]}
    if cached != want[evicted]:
        pytest.skip("the page cache does not keep or drop pages as asked here")
    reports: list[ring.Report] = []
    real_next = ring.Ring.next

    def keep(self: ring.Ring) -> ring.Report | None:
        report = real_next(self)
        if report is not None:
            reports.append(report)
        return report

    monkeypatch.setattr(ring.Ring, "next", keep)
    sink = RingHostSink()
    # Staging of 3 x 2 x 256 KiB: chunks of 256 KiB less the O_DIRECT slack; 7 for the
    # first 6 tensors (a group reaches the staging's 1.5 MiB there), 3 for the last 2.
    count_with_mincore(count == "mincore")
    try:
        got = load([path], sink, io="auto", staging_bytes=6 * 262144)
    finally:
        count_with_mincore(0)
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    direct = [d for r in reports for d in r.direct]
    assert len(direct) == sink.rings[0].submitted == 10
    if evicted == "nothing":
        assert not any(direct)
    elif evicted == "everything":
        assert all(direct)
    else:   # those before the middle buffered; after it, direct (a read ahead aside)
        assert direct[:4] == [0] * 4 and direct[-1] == 1


def test_chunk_bytes_makes_more_and_smaller_windows(calls, tmp_path):
    # The same staging (12 x 16 KiB: 128 KiB of windows) for 3 readers, in windows of 32 KiB
    # (a buffer's share) less the slack, or with chunk_bytes of 16 KiB in windows of 16 KiB.
    first, second = two_files(tmp_path, seed=6)
    shapes = []
    for chunk in (0, 16384):
        sink = RingHostSink()
        STATS.reset()
        got = load([first, second], sink, staging_bytes=12 * 16384, chunk_bytes=chunk)
        assert_same(got, [first, second])
        (made,) = sink.rings
        assert sink.staged == [made.nbytes] and made.windows == (131072 - 4096) // made.stride
        shapes.append((made.stride, made.windows, made.submitted))
    assert [shape[:2] for shape in shapes] == [(32768 - 4096, 4), (16384, 7)]
    assert shapes[1][2] > shapes[0][2]   # more, smaller reads


@pytest.mark.parametrize(("threads", "staging"), [(4, 2 * 16384 + 4096), (3, 6 * 16384)])
def test_windows_are_read_into_again_only_after_their_copies(calls, tmp_path, threads,
                                                             staging):
    # Copies run only once an event after them is waited for, as on a GPU that has not run
    # them yet: a reader that took a window before the copies out of it ran would overwrite
    # bytes still to be copied, and some tensor would differ (a ring that frees a window once
    # its copies are queued fails here).
    g = torch.Generator().manual_seed(2)
    path = tmp_path / "a.safetensors"
    save_file({f"w{i}": torch.randn(3000 + 7 * i, generator=g) for i in range(24)}, str(path))
    calls.set("defer_copies", 1)
    sink = RingHostSink()
    assert_same(load([path], sink, threads=threads, staging_bytes=staging), [path])
    (made,) = sink.rings
    assert made.submitted > 2 * made.windows   # every window reused


def test_the_planner_and_the_reporter_wake_for_a_batch_of_chunks(calls, tmp_path,
                                                                   monkeypatch):
    # 31 windows: the planner waits for 7 free slots at a time, the reporter for 7 chunks
    # ready, so that each wake (each needs the GIL back) moves 7 chunks. With copies run late
    # and far more chunks than the ring holds, every tensor still arrives whole.
    # Not keeps_all: the slots the windows need, no more.
    real_next = ring.Ring.next

    def slow_next(self: ring.Ring) -> Any:
        time.sleep(0.02)   # a reporter slower than the planner: the slots fill up
        return real_next(self)

    monkeypatch.setattr(ring.Ring, "next", slow_next)
    g = torch.Generator().manual_seed(4)
    path = tmp_path / "a.safetensors"
    save_file({f"w{i}": torch.randn(12000 + 5 * i, generator=g) for i in range(40)}, str(path))
    calls.set("defer_copies", 1)
    sink = RingHostSink()
    assert_same(load([path], sink, staging_bytes=48 * 16384, chunk_bytes=16384), [path])
    (made,) = sink.rings
    assert (made.windows, made.batch, made.capacity) == (31, 7, 65)
    assert made.submitted > 3 * made.capacity
    assert made.room_waits > 0   # the planner waited for room


def test_the_planner_submits_every_chunk_without_waiting_for_reports(calls, tmp_path,
                                                                      monkeypatch):
    # A caller that keeps every tensor (load(), a transformers batch reading ahead) gets a
    # ring with a slot for every chunk of the load (RING_SLOTS): while the reporter cannot
    # take a report (here it waits until the planner has submitted the last chunk, as when
    # another thread keeps the GIL), the C threads still read and copy every chunk, in
    # windows reused many times.
    g = torch.Generator().manual_seed(5)
    path = tmp_path / "a.safetensors"
    tensors = {f"w{i}": torch.randn(12000 + 5 * i, generator=g) for i in range(40)}
    save_file(tensors, str(path))
    destinations: list[tuple[str, torch.Tensor]] = []
    planned = threading.Event()
    real_end, real_next = ring.Ring.end, ring.Ring.next

    def end(self: ring.Ring) -> None:
        planned.set()
        real_end(self)

    def late_next(self: ring.Ring) -> Any:
        assert planned.wait(10)
        # Every chunk was read and copied before the first report is taken.
        wait_until_copied(destinations, tensors)
        return real_next(self)

    monkeypatch.setattr(ring.Ring, "end", end)
    monkeypatch.setattr(ring.Ring, "next", late_next)
    sink = RingHostSink()
    real_alloc = sink.alloc

    def alloc(info: Any) -> Any:
        flat = real_alloc(info)
        destinations.append((info.name, flat.view(torch.float32)))
        return flat

    sink.alloc = alloc   # type: ignore[method-assign]
    assert_same(load([path], sink, staging_bytes=48 * 16384, chunk_bytes=16384,
                     keeps_all=True), [path])
    (made,) = sink.rings
    assert made.submitted > 3 * made.windows and made.capacity >= made.submitted
    assert made.room_waits == 0


@pytest.mark.parametrize("keeps_all", [True, False])
def test_the_planner_hands_the_ring_a_group_of_tensors_a_call(calls, tmp_path, monkeypatch,
                                                             keeps_all):
    # Python's work is per tensor, none per chunk: the planner hands ring.c a file's tensors
    # in one call (at most a staging's worth), which cuts them into chunks, with one
    # allocation event for the group; the consumer waits on one event per tensor, the one
    # after the report that completed it (one stream, chunk order).
    g = torch.Generator().manual_seed(8)
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for k, path in enumerate(paths):
        save_file({f"w{k}.{i}": torch.randn(20000 + 7 * i, generator=g) for i in range(6)},
                  str(path))
    submits = count_submits(monkeypatch)
    sink = RingHostSink()
    events, waited = [], []
    real_event, real_wait = sink.alloc_event, sink.consumer_wait
    sink.alloc_event = lambda: events.append(real_event()) or events[-1]  # type: ignore
    sink.consumer_wait = lambda e: waited.append(len(e)) or real_wait(e)  # type: ignore
    assert_same(load(paths, sink, staging_bytes=48 * 16384, chunk_bytes=16384,
                     keeps_all=keeps_all), paths)
    (made,) = sink.rings
    # 6 tensors of 80 KB a file, within the 768 KiB of staging: one call a file, and each
    # 80 KB tensor in 5 or 6 chunks of at most 16 KiB less the O_DIRECT slack.
    assert [tensors for tensors, _ in submits] == [6, 6]
    assert sum(chunks or 0 for _, chunks in submits) == made.submitted > 5 * 12
    assert len(events) == 2
    assert len(waited) == 12 and set(waited) == {1}


@pytest.mark.parametrize("keeps_all", [True, False])
def test_a_group_goes_to_the_ring_once_its_tensors_reach_the_staging(calls, tmp_path,
                                                                    monkeypatch, keeps_all):
    # The readers start on the first tensors of a large file while the planner allocates
    # the rest: a group is handed over once it holds staging_bytes.
    g = torch.Generator().manual_seed(10)
    path = tmp_path / "a.safetensors"
    save_file({f"w{i}": torch.randn(12000, generator=g) for i in range(40)}, str(path))
    submits = count_submits(monkeypatch)
    sink = RingHostSink()
    assert_same(load([path], sink, staging_bytes=4 * 16384, chunk_bytes=8192,
                     keeps_all=keeps_all), [path])
    # 48 KB tensors, 64 KiB of staging: a group every second tensor, the last one alone.
    assert [tensors for tensors, _ in submits] == [2] * 20


def test_a_gate_holds_the_reports_until_released_and_says_when_all_is_planned(calls, tmp_path,
                                                                              monkeypatch):
    # read_ahead="quiet": the caller learns when every chunk is submitted, and until it lets
    # the reports go no Python takes one, while the C threads read and copy every chunk.
    g = torch.Generator().manual_seed(9)
    path = tmp_path / "a.safetensors"
    tensors = {f"w{i}": torch.randn(12000 + 5 * i, generator=g) for i in range(30)}
    save_file(tensors, str(path))
    reports: list[int] = []
    real_next = ring.Ring.next

    def next_(self: ring.Ring) -> Any:
        reports.append(1)
        return real_next(self)

    monkeypatch.setattr(ring.Ring, "next", next_)
    sink = RingHostSink()
    destinations: list[tuple[str, torch.Tensor]] = []
    real_alloc = sink.alloc
    sink.alloc = lambda info: destinations.append(   # type: ignore[method-assign]
        (info.name, real_alloc(info).view(torch.float32))) or destinations[-1][1]
    gate = stream.AheadGate()
    got: dict[str, torch.Tensor] = {}
    options = StreamOptions(threads=3, staging_bytes=48 * 16384, io="buffered",
                            chunk_bytes=16384, keeps_all=True)
    loader = threading.Thread(target=lambda: got.update(
        stream_tensors([(str(path), None, None)], sink, options, gate)))
    loader.start()
    try:
        assert gate.wait_planned(10)
        (made,) = sink.rings
        assert made.submitted > 3 * made.windows   # every chunk, in windows reused
        wait_until_copied(destinations, tensors)
        loader.join(0.1)
        assert loader.is_alive() and not reports and not got
    finally:
        gate.release()
        loader.join(10)
    assert not loader.is_alive() and reports
    assert_same(got, [path])


@pytest.mark.parametrize("why", ["ring full", "files open"])
def test_a_gate_lets_the_reports_go_before_the_planner_would_wait_for_one(calls, tmp_path,
                                                                          monkeypatch, why):
    # A planner that would wait for a report (no slot left, or too many files open, each
    # closed once its reports are taken) lets the reports go first: never a deadlock with a
    # caller that waits for the planning to end.
    g = torch.Generator().manual_seed(10)
    paths = [tmp_path / f"{k}.safetensors" for k in range(3)]
    for k, path in enumerate(paths):
        save_file({f"w{k}.{i}": torch.randn(12000, generator=g) for i in range(12)}, str(path))
    if why == "ring full":
        monkeypatch.setattr(stream, "RING_SLOTS", 0)   # twice the windows and one a reader
    else:
        monkeypatch.setattr(stream, "OPEN_FILES", 1)
    gate = stream.AheadGate()
    got: dict[str, torch.Tensor] = {}
    options = StreamOptions(threads=3, staging_bytes=8 * 16384, io="buffered",
                            chunk_bytes=16384, keeps_all=True)
    loader = threading.Thread(target=lambda: got.update(stream_tensors(
        [(str(p), None, None) for p in paths], RingHostSink(), options, gate)))
    loader.start()
    gate.wait_planned(20)   # returns once the reports go, before the planning ends
    loader.join(20)
    assert not loader.is_alive() and gate.released and gate.planned
    assert_same(got, paths)


@pytest.mark.parametrize("copy_ms", [0, 20])
def test_a_ring_that_fails_while_its_reports_are_held_fails_the_load_at_once(calls, tmp_path,
                                                                            copy_ms):
    # A copy fails while the gate holds the reports: the load must not wait for the caller's
    # release to say so (found by a review: the planner went on into a dead ring, and the
    # caller, told "planned", went on building a model for a failed load). With slow copies
    # the failure comes after the planner submitted everything: then only the reporter can
    # notice it (found by another review; the load waited for ever).
    paths = [tmp_path / f"{k}.safetensors" for k in range(3)]
    for k, path in enumerate(paths):
        save_file({f"w{k}.{i}": torch.full((12000,), float(i)) for i in range(20)}, str(path))
    calls.set("fail_copy", 3)
    calls.set("copy_ms", copy_ms)
    gate = stream.AheadGate()
    out: list[Any] = []
    options = StreamOptions(threads=3, staging_bytes=48 * 16384, io="buffered",
                            chunk_bytes=16384, keeps_all=True)

    def run() -> None:
        try:
            out.append(dict(stream_tensors([(str(p), None, None) for p in paths],
                                           RingHostSink(), options, gate)))
        except BaseException as exc:  # noqa: BLE001 - what the test looks at
            out.append(exc)

    loader = threading.Thread(target=run, daemon=True)
    loader.start()
    loader.join(20)   # no release from here
    alive = loader.is_alive()
    gate.release()   # a load left waiting ends, and so does the test process
    loader.join(20)
    assert not alive and gate.released
    assert len(out) == 1 and isinstance(out[0], CudaError), out


def test_a_planner_waiting_for_budget_lets_the_reports_go(calls, tmp_path):
    # Under a memory budget the planner waits for the consumer, which waits for reports.
    path = tmp_path / "a.safetensors"
    save_file({f"w{i}": torch.full((12000,), float(i)) for i in range(20)}, str(path))
    gate = stream.AheadGate()
    got: dict[str, torch.Tensor] = {}
    options = StreamOptions(threads=3, staging_bytes=48 * 16384, io="buffered",
                            chunk_bytes=16384, keeps_all=True, max_device_bytes=100_000)
    loader = threading.Thread(target=lambda: got.update(stream_tensors(
        [(str(path), None, None)], RingHostSink(), options, gate)))
    loader.start()
    loader.join(20)
    assert not loader.is_alive() and gate.released and gate.planned
    assert_same(got, [path])


def test_a_gate_without_a_ring_has_nothing_to_hold(calls, tmp_path):
    g = torch.Generator().manual_seed(11)
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.randn(1000, generator=g)}, str(path))
    gate = stream.AheadGate()
    got = dict(stream_tensors([(str(path), None, None)], DriverHostSink(),
                              StreamOptions(threads=2, staging_bytes=4 * 16384, io="buffered",
                                            keeps_all=True), gate))
    assert gate.planned and gate.released
    assert_same(got, [path])


def test_a_planner_with_a_slot_for_every_chunk_plans_on_while_the_ring_opens(calls, tmp_path,
                                                                            monkeypatch):
    # The ring opens once its staging is pinned (0.04-0.06 s in a process's first load on the
    # H200 machine): until then the planner goes on planning and holds its groups, and
    # submits them once it must (here: the file is planned, and the ring opens only when the
    # planner waits for it).
    g = torch.Generator().manual_seed(12)
    path = tmp_path / "a.safetensors"
    save_file({f"w{i}": torch.randn(12000, generator=g) for i in range(30)}, str(path))
    allocated: list[int] = []
    at_submit: list[int] = []
    waiting = threading.Event()
    real_submit, real_open = ring.Ring.submit_file, ring.Ring.open

    def submit_file(self: ring.Ring, *args: Any, **kw: Any) -> int | None:
        at_submit.append(len(allocated))
        waiting.set()
        return real_submit(self, *args, **kw)

    def open_late(self: ring.Ring, stream: int, address: int) -> None:
        assert waiting.wait(10)   # the planner waits for the ring now
        real_open(self, stream, address)

    monkeypatch.setattr(ring.Ring, "submit_file", submit_file)
    monkeypatch.setattr(ring.Ring, "open", open_late)
    sink = RingHostSink()
    real_alloc = sink.alloc
    sink.alloc = lambda info: allocated.append(1) or real_alloc(info)  # type: ignore
    assert_same(load([path], sink, staging_bytes=8 * 16384, chunk_bytes=16384,
                     keeps_all=True), [path])
    # 48 KB tensors, 128 KiB of staging: a group every third tensor, all planned first.
    assert at_submit == [30] * 10


def test_submit_file_cuts_chunks_and_places_them_as_room_frees(calls, tmp_path):
    dst = torch.zeros(500, dtype=torch.uint8)
    made, fd, path, _windows = ring_on_a_file(tmp_path, readers=2, capacity=3)
    try:
        # Chunks that would not fit, or tensors out of file order: an error, none taken.
        with pytest.raises(ValueError, match="do not fit in the ring's windows"):
            submit(made, fd, [(0, 100)], dst, limit=4096 - 1023)
        with pytest.raises(ValueError, match="out of file order"):
            submit(made, fd, [(100, 200), (0, 100)], dst)
        assert made.submitted == 0
        result: list[Any] = []
        # Five tensors of 100 bytes; chunks of at most 160: the second tensor spans two
        # chunks, and so on (0-160, 160-320, 320-480, 480-500).
        submitter = threading.Thread(target=lambda: result.append(
            submit(made, fd, [(100 * k, 100 * k + 100) for k in range(5)], dst, limit=160,
                   first=7)))
        submitter.start()
        data = torch.frombuffer(bytearray(path.read_bytes()[:500]), dtype=torch.uint8)
        wait_until_copied([("first 3 chunks", dst[:480])], {"first 3 chunks": data[:480]})
        submitter.join(0.3)
        assert submitter.is_alive()   # 3 slots: 3 placed, the fourth waits for room
        assert not bool(dst[480:].any())
        reports = [made.next()]
        while sum(len(r.got) for r in reports if r is not None) < 4:
            reports.append(made.next())
        submitter.join(5)
        assert result == [4] and made.submitted == 4
        chunks = [c for r in reports for c in reported_chunks(r)]
        assert chunks == [(0, 160), (1, 160), (2, 160), (3, 20)]
        # Tensors 7.. are complete: after chunk 0 one, after 1 three, after 2 four, then all.
        dones = [r.done for r in reports if r is not None]
        assert dones == sorted(dones) and dones[-1] == 12 and set(dones) <= {8, 10, 11, 12}
        assert all(r is not None and r.files == [0] * len(r.got) and not any(r.direct)
                   for r in reports)
        assert torch.equal(dst, data)
        assert submit(made, fd, [], dst) == 0 and submit(made, fd, [(5, 5)], dst) == 0
        made.end()
        assert submit(made, fd, [(0, 100)], dst) is None   # after end(): refused
    finally:
        made.close()
        os.close(fd)
    assert submit(made, fd, [(0, 100)], dst) is None
    assert calls.pushes == calls.pops


def test_tensors_join_a_chunk_across_small_gaps(calls, tmp_path):
    # ring.c's cut: a tensor joins the chunk before it when at most `gap` bytes lie between
    # them (read and dropped: one read instead of two) and the chunk has room.
    dst = torch.zeros(4096, dtype=torch.uint8)
    made, fd, path, _windows = ring_on_a_file(tmp_path, readers=1, capacity=16)
    spans = [(0, 100), (110, 200), (300, 400), (400, 2000), (2000, 2100)]
    try:
        assert made.submit_file((3, fd, None, None, "buffered"),
                                array("q", [b for b, _ in spans]),
                                array("q", [e for _, e in spans]),
                                array("Q", [dst.data_ptr() + b for b, _ in spans]), None,
                                1024, 50, 0, align=512, cached=0.5) == 3
        made.end()
        reports = [r for r in iter(made.next, None)]
        # 0-200 (the gap of 10 read too), 300-1324 (a gap of 100 starts a chunk, which tensor
        # 3 fills), then 1324-2100: the rest of tensor 3 and tensor 4.
        assert [c for r in reports for c in reported_chunks(r)] == [
            (0, 200), (1, 1024), (2, 776)]
        assert reports[-1].done == 5 and {n for r in reports for n in r.files} == {3}
        data = torch.frombuffer(bytearray(path.read_bytes()[:4096]), dtype=torch.uint8)
        for b, e in spans:
            assert torch.equal(dst[b:e], data[b:e])
        assert not bool(dst[100:110].any()) and not bool(dst[200:300].any())
    finally:
        made.close()
        os.close(fd)


def test_a_planner_ahead_of_the_reports_keeps_few_files_open(calls, tmp_path, monkeypatch):
    # A file is closed once its last chunk is reported: with the reports held back, a planner
    # with slots for the whole load would open every file of it, and hundreds of shards would
    # run out of descriptors. It opens OPEN_FILES at most, then waits for one to close.
    from fastsafetensors.loader import stream

    monkeypatch.setattr(stream, "OPEN_FILES", 4)
    paths = []
    for i in range(30):
        path = tmp_path / f"s{i:02d}.safetensors"
        save_file({f"t{i}": torch.full((1024,), float(i))}, str(path))
        paths.append(path)
    opened: list[Any] = []
    most = [0]
    real_open, real_next = stream._open, ring.Ring.next

    def counting_open(*args: Any, **kwargs: Any) -> Any:
        f = real_open(*args, **kwargs)
        opened.append(f)
        most[0] = max(most[0], sum(g.fd >= 0 for g in opened))
        return f

    def late_next(self: ring.Ring) -> Any:
        if self.submitted < 8:
            time.sleep(0.3)   # reports held back: the planner runs ahead meanwhile
        return real_next(self)

    monkeypatch.setattr(stream, "_open", counting_open)
    monkeypatch.setattr(ring.Ring, "next", late_next)
    sink = RingHostSink()
    got: list[dict[str, torch.Tensor]] = []
    # In a thread: a file's place that is never given back would hang the load.
    loading = threading.Thread(target=lambda: got.append(load(paths, sink, keeps_all=True)),
                               daemon=True)
    loading.start()
    loading.join(30)
    assert got, "the load did not end: a closed file did not give its place back"
    assert_same(got[0], paths)
    assert len(opened) == 30 and 1 < most[0] <= 4
    assert all(f.fd == -1 and f.gate is None for f in opened)


def test_a_report_waits_for_a_batch_or_every_chunk_submitted(calls, tmp_path):
    dst = torch.zeros(500, dtype=torch.uint8)
    made, fd, path, _windows = ring_on_a_file(tmp_path, readers=1, capacity=4, batch=3)

    def chunks(*ks: int) -> int | None:
        return submit(made, fd, [(100 * k, 100 * k + 100) for k in ks], dst, first=ks[0])

    try:
        assert chunks(0) == 1
        assert reported_chunks(made.next()) == [(0, 100)]   # one submitted: one is enough
        assert chunks(1, 2) == 2
        assert reported_chunks(made.next()) == [(1, 100), (2, 100)]   # both, in one report
        assert chunks(3, 4) == 2
        made.end()
        assert [r for report in iter(made.next, None) for r in reported_chunks(report)] == [
            (3, 100), (4, 100)]
        assert torch.equal(dst, torch.frombuffer(bytearray(path.read_bytes()[:500]),
                                                 dtype=torch.uint8))
    finally:
        made.close()
        os.close(fd)
    assert made.batch == 3 and ring.Ring(0, readers=1, windows=2, stride=4096, capacity=2,
                                         batch=9).batch == 2


def test_a_report_hands_over_one_event_and_its_chunks_events_are_recorded_again(calls,
                                                                               tmp_path):
    # One stream, chunk order: the event after a report's last chunk marks the end of all of
    # its chunks. The others' events go back to the ring for later chunks instead of to Python,
    # which would wrap and destroy each one.
    dst = torch.zeros(500, dtype=torch.uint8)
    live = calls.events_live
    made, fd, path, _windows = ring_on_a_file(tmp_path, readers=1, capacity=8, batch=3)
    created = calls.events_created   # the windows' own
    try:
        assert submit(made, fd, [(100 * k, 100 * k + 100) for k in range(3)], dst) == 3
        first = made.next()
        assert reported_chunks(first) == [(0, 100), (1, 100), (2, 100)]
        assert calls.events_created - created == 3
        assert submit(made, fd, [(100 * k, 100 * k + 100) for k in (3, 4)], dst, first=3) == 2
        made.end()
        second = made.next()
        assert reported_chunks(second) == [(3, 100), (4, 100)]
        assert calls.events_created - created == 3   # 3 and 4 took the spares of 0 and 1
        assert first is not None and second is not None
        assert first.event.handle.value != second.event.handle.value
        assert (first.done, second.done) == (3, 5)
        assert torch.equal(dst, torch.frombuffer(bytearray(path.read_bytes()[:500]),
                                                 dtype=torch.uint8))
    finally:
        made.close()
        os.close(fd)
    del first, second
    gc.collect()
    assert calls.events_live == live   # the spare one too, with the ring


def test_the_engine_wraps_one_event_per_report(calls, tmp_path, monkeypatch):
    first, second = two_files(tmp_path, seed=9)
    reports, adopted = [], []
    real_next, real_adopt = ring.Ring.next, driver.Event.adopt

    def next_report(self: ring.Ring) -> Any:
        time.sleep(0.05)   # a reporter kept from the GIL: chunks queue up meanwhile
        report = real_next(self)
        if report is not None:
            reports.append(len(report[1]))
        return report

    monkeypatch.setattr(ring.Ring, "next", next_report)
    monkeypatch.setattr(driver.Event, "adopt",
                        lambda *a: adopted.append(1) or real_adopt(*a))   # type: ignore
    sink = RingHostSink()
    got = load([first, second], sink, keeps_all=True)
    assert_same(got, [first, second])
    (made,) = sink.rings
    assert sum(reports) == made.submitted and len(adopted) == len(reports)
    assert len(reports) < made.submitted > 3   # some report held several chunks


def test_a_file_cut_short_while_loading_fails_the_load_with_a_read_error(calls, tmp_path,
                                                                          monkeypatch):
    from fastsafetensors.loader import stream

    path = tmp_path / "a.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(path))
    real_open = stream._open

    def open_then_cut(*args: Any, **kwargs: Any) -> Any:
        f = real_open(*args, **kwargs)
        os.truncate(path, 1000)   # after the header was read and checked
        return f

    monkeypatch.setattr(stream, "_open", open_then_cut)
    with pytest.raises(ReadError, match="a.safetensors"):
        load([path], RingHostSink(), threads=2, staging_bytes=4 * 16384)
    assert calls.copies == 0 and calls.pushes == calls.pops   # nothing of a short read copied


def test_a_read_error_is_an_os_error_naming_the_file(calls, tmp_path, monkeypatch):
    from fastsafetensors.loader import stream

    path = tmp_path / "a.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(path))
    real_open = stream._open
    folder = os.open(tmp_path, os.O_RDONLY)   # pread() there fails with EISDIR

    def open_a_folder(*args: Any, **kwargs: Any) -> Any:
        f = real_open(*args, **kwargs)
        os.close(f.fd)
        f.fd = os.dup(folder)   # closed with the file
        return f

    monkeypatch.setattr(stream, "_open", open_a_folder)
    try:
        with pytest.raises(IsADirectoryError, match=str(tmp_path)):
            load([path], RingHostSink(), threads=2, staging_bytes=4 * 16384)
    finally:
        os.close(folder)
    assert calls.copies == 0 and calls.pushes == calls.pops


@pytest.mark.parametrize("fail_at", [3, 20])
def test_a_cuda_error_in_the_middle_of_a_load_fails_it(calls, tmp_path, monkeypatch, fail_at):
    # A copy fails: the error reaches the caller, the ring's threads end (no hang), every
    # context pushed was popped and every event destroyed. The 20th fails after reports of
    # several chunks gave events back to the ring to record again (a slow reporter).
    path = tmp_path / "a.safetensors"
    save_file({f"w{i}": torch.full((8192,), float(i)) for i in range(16)}, str(path))
    real_next = ring.Ring.next
    reports: list[int] = []

    def slow_next(self: ring.Ring) -> Any:
        time.sleep(0.02)
        report = real_next(self)
        if report is not None:
            reports.append(len(report[1]))
        return report

    monkeypatch.setattr(ring.Ring, "next", slow_next)
    events = calls.events_live
    calls.set("fail_copy", fail_at)
    with pytest.raises(CudaError, match="cuMemcpyHtoDAsync") as info:
        load([path], RingHostSink(), threads=2, staging_bytes=4 * 16384)
    assert "CUDA_ERROR_ILLEGAL_ADDRESS" in str(info.value)
    assert calls.pushes == calls.pops
    if fail_at > 3:
        assert calls.copies == fail_at - 1   # the copies before the failing one ran
        assert max(reports) > 1   # a report gave events back before the failure
    del info   # its traceback holds the load's frames, and their events
    gc.collect()
    assert calls.events_live == events


def test_a_ring_whose_last_wait_fails_fails_the_load_every_time(calls, tmp_path, monkeypatch):
    # The ring's close waits for its copies, where an asynchronous copy error shows; it often
    # runs after the caller has every tensor. Such a load passed for done in 13 of 20 tries.
    path = tmp_path / "a.safetensors"
    save_file({f"w{i}": torch.full((8192,), float(i)) for i in range(8)}, str(path))
    real_close = ring.Ring.close

    def failing_close(self: ring.Ring) -> Any:
        real_close(self)
        raise CudaError("cuEventSynchronize", 700, "CUDA_ERROR_ILLEGAL_ADDRESS")

    monkeypatch.setattr(stream, "ABANDONED", [])
    monkeypatch.setattr(ring.Ring, "close", failing_close)
    for _ in range(10):
        with pytest.raises(CudaError, match="cuEventSynchronize"):
            load([path], RingHostSink(), threads=2, staging_bytes=4 * 16384)


def test_a_consumer_that_stops_early_ends_the_ring(calls, tmp_path):
    # Many more chunks than the ring holds, the consumer gone after the first tensor: the
    # planner waiting for room and the ring's threads end, the files close.
    path = tmp_path / "a.safetensors"
    save_file({f"w{i}": torch.full((4096,), float(i)) for i in range(64)}, str(path))
    calls.set("copy_ms", 2)
    sink = RingHostSink()
    before = set(os.listdir("/proc/self/fd"))
    it = stream_tensors([(str(path), None, None)], sink,
                        StreamOptions(threads=2, staging_bytes=4 * 16384, io="buffered"))
    name, tensor = next(it)
    assert name == "w0" and bool((tensor == 0).all())
    started = time.monotonic()
    it.close()
    assert time.monotonic() - started < 5
    (made,) = sink.rings
    assert made.submitted < 64   # it stopped, rather than loading the rest
    assert set(os.listdir("/proc/self/fd")) <= before
    assert calls.pushes == calls.pops


def test_submit_waits_for_room_and_a_cancel_frees_it(calls, tmp_path):
    # The ring itself: with `capacity` chunks submitted and none reported, a submit waits
    # (without the GIL) until cancel() comes from another thread, then says the ring stopped.
    dst = torch.zeros(4 * 100, dtype=torch.uint8)
    made, fd, path, _windows = ring_on_a_file(tmp_path, readers=2, capacity=2)
    try:
        assert submit(made, fd, [(0, 100), (100, 200)], dst) == 2
        result: list[Any] = []
        waiter = threading.Thread(target=lambda: result.append(
            submit(made, fd, [(200, 300)], dst, first=2)))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive()   # no room until a report is taken
        # Both loaded by now: one call reports them all, in order.
        assert reported_chunks(made.next()) == [(0, 100), (1, 100)]
        waiter.join(5)
        assert result == [1]
        made.end()
        assert [r for report in iter(made.next, None) for r in reported_chunks(report)] == [
            (2, 100)]
        assert submit(made, fd, [(0, 1)], dst) is None   # after end(): refused
        assert torch.equal(dst[:300], torch.frombuffer(bytearray(path.read_bytes()[:300]),
                                                       dtype=torch.uint8))
    finally:
        made.close()
        os.close(fd)
    assert made.next() is None and submit(made, fd, [(0, 1)], dst) is None
    assert calls.pushes == calls.pops


def test_a_cancel_wakes_a_submit_waiting_for_room(calls, tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(8192))
    windows = torch.zeros(2 * 4096, dtype=torch.uint8)
    dst = torch.zeros(64, dtype=torch.uint8)
    made = ring.Ring(0, readers=1, windows=2, stride=4096, capacity=2)
    made.open(7, windows.data_ptr())
    fd = os.open(path, os.O_RDONLY)
    try:
        assert submit(made, fd, [(0, 10), (20, 30)], dst) == 2
        result: list[Any] = []
        waiter = threading.Thread(target=lambda: result.append(
            submit(made, fd, [(40, 50)], dst)))
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive()
        made.cancel()
        waiter.join(5)
        assert result == [None] and made.next() is None
    finally:
        made.close()
        os.close(fd)


def test_a_submit_before_the_ring_opens_waits_for_it(calls, tmp_path):
    # The planner may plan its first chunk while the reporter still pins the windows.
    path = tmp_path / "data.bin"
    path.write_bytes(b"abcdefgh" * 512)
    windows = torch.zeros(2 * 4096, dtype=torch.uint8)
    dst = torch.zeros(8, dtype=torch.uint8)
    made = ring.Ring(0, readers=1, windows=2, stride=4096, capacity=4)
    fd = os.open(path, os.O_RDONLY)
    result: list[Any] = []
    try:
        waiter = threading.Thread(target=lambda: result.append(
            submit(made, fd, [(0, 8)], dst)))
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive() and made.next() is None   # nothing to report: not open
        made.end()   # said before it opens: kept until then
        made.open(7, windows.data_ptr())
        waiter.join(5)
        assert result == [None]   # ended first: nothing more is taken
        assert made.next() is None
    finally:
        made.close()
        os.close(fd)


def test_a_copier_that_cannot_push_the_context_fails_the_first_chunk(calls, tmp_path):
    # The ring opens (its own push works), its copier's push fails: the first chunk is
    # reported failed, also when its read ends after the copier failed it (a read of 4 MiB
    # takes longer than the copier takes to fail), never as loaded.
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(4 << 20))
    windows = torch.zeros(2 * (4 << 20), dtype=torch.uint8)
    dst = torch.zeros(4 << 20, dtype=torch.uint8)
    for _ in range(10):
        calls.set("push_calls", 0)
        calls.set("fail_push", 2)   # open()'s is the first, the copier's the second
        made = ring.Ring(0, readers=2, windows=2, stride=(4 << 20) + 1024, capacity=4)
        made.open(7, windows.data_ptr())
        fd = os.open(path, os.O_RDONLY)
        try:
            assert submit(made, fd, [(0, 4 << 20)], dst, limit=4 << 20) == 1
            time.sleep(0.02)   # the read is over by now
            with pytest.raises(ring.RingFailure) as info:
                made.next()
            assert (info.value.index, ring.STEPS[info.value.step]) == (0, "cuCtxPushCurrent")
            assert (info.value.file_no, info.value.begin, info.value.end) == (0, 0, 4 << 20)
        finally:
            made.close()
            os.close(fd)
    calls.set("fail_push", 0)


@pytest.mark.parametrize("blocking", [False, True])
def test_the_copier_sleeps_on_its_window_marks(calls, tmp_path, blocking):
    # The copier alone waits for the marks, with copies still queued behind them: a spinning
    # wait would take a core from the readers (event_wait="spin", the default, is for events
    # the caller's threads wait for).
    made, fd, _, windows = ring_on_a_file(tmp_path, readers=1, capacity=2, blocking=blocking)
    try:
        # The windows' marks are the last events open() makes.
        assert calls.last_flags == driver.DISABLE_TIMING | driver.BLOCKING_SYNC
    finally:
        made.close()
        os.close(fd)
    del windows


def test_close_twice_and_a_read_larger_than_a_window(calls, tmp_path):
    windows = torch.zeros(2 * 4096, dtype=torch.uint8)
    made = ring.Ring(0, readers=1, windows=2, stride=4096, capacity=2)
    made.open(7, windows.data_ptr())
    with pytest.raises(ValueError, match="do not fit in the ring's windows of 4096 bytes"):
        submit(made, 0, [(0, 100)], windows, limit=3073)   # with 512 more at each end
    with pytest.raises(ValueError, match="out of file order"):
        submit(made, 0, [(0, 100), (50, 150)], windows)   # overlapping
    assert made.close() is not None and made.close() == {}   # the second finds nothing
    assert calls.pushes == calls.pops


def test_the_cuda_sink_makes_a_ring_of_its_device(calls, monkeypatch):
    sink = sink_of_device_1(monkeypatch, True, rings=ring)
    made = sink._ring(readers=5, windows=4, stride=8192, capacity=12)
    assert (made.device, made.readers, made.windows, made.stride, made.capacity) == (
        1, 5, 4, 8192, 12)
    assert made.flags == driver.DISABLE_TIMING | driver.BLOCKING_SYNC and made.nbytes == 32768
    made.close()   # never opened: nothing to stop


def test_the_option_takes_ring():
    from fastsafetensors import config

    with configure(cuda_calls="ring"):
        assert config.get("cuda_calls") == "ring"
