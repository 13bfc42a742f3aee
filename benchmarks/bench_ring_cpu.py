"""The engine's ways of driving a GPU load (``cuda_calls``), beside a thread running Python,
without a GPU: through tests/fake_libcuda.c, the tests' stand-in for the CUDA driver, with its
copies counted and not done (there is no device to copy to).

What is left is each mode's own work: the reads into staging, and the calls and Python per
chunk around them. With ``driver`` and ``native`` Python reader threads run each chunk (five or
more driver calls from Python, or one C call with Python around it) and need the GIL back after
every read; with ``ring`` C threads read and queue, and Python only submits each chunk and hands
its event over. transformers builds the model on its own thread while a load reads ahead, so
each round times, interleaved, every mode alone and beside a thread doing a fixed amount of
pure-Python work (the engine's switch interval, 500 us, in both).

    python benchmarks/bench_ring_cpu.py --size-mb 800 --rounds 7

``--work sorts`` makes the other thread sort a list of floats (``--steps`` / 10 of them) over
and over until the load ends instead: each sort is one C call that keeps the GIL throughout
(75-115 ms for 300,000 on the 2-core VM), as a long torch call or a C extension would; the
Python around the ring waits for each. ``ring_few_slots`` (as ``iter_tensors`` runs the ring)
against ``ring`` (as ``load()`` does) shows what the ring's slots for a whole load
(``stream.RING_SLOTS``) change then. ``ring_quiet`` runs beside the work as a transformers batch
with ``read_ahead="quiet"`` does: the work waits until every chunk is planned, and the load's
reports wait until the work is done; its row gives the seconds until the load ended.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_beside_python import (  # noqa: E402
    arguments,
    beside_work,
    print_rows,
    python_work,
    zeros_file,
)
from bench_engine_overhead import HostSink  # noqa: E402

from fastsafetensors.format import TensorInfo  # noqa: E402
from fastsafetensors.loader import cuda, driver, native, ring  # noqa: E402
from fastsafetensors.loader.stream import (  # noqa: E402
    AheadGate,
    StreamOptions,
    stream_tensors,
)

STAND_IN = Path(__file__).resolve().parent.parent / "tests" / "fake_libcuda.c"


class DriverSink(HostSink):
    """The CUDA sink's driver path (``addresses``, ``split_pieces``, driver copies, events and
    stream waits) with host memory as the device, on stream handle 7, the consumer's being 0
    (tests/test_driver.py counts its calls)."""

    def alloc_event(self) -> Any:
        return driver.Event(0, 0)

    def new_stream(self) -> int:
        return 7

    def stream_wait(self, stream: int, event: Any) -> None:
        driver.stream_wait(0, stream, event)

    def copy(self, stream: int, src: Any, pieces: list[Any]) -> None:
        singles, runs = cuda.split_pieces(pieces)
        driver.copy_to_device(0, stream, cuda.addresses(src, singles))
        cuda.copy_runs(src, runs, torch.device("cpu"))

    def record(self, stream: int) -> Any:
        return driver.Event(0, stream)

    def host_wait(self, event: Any) -> None:
        event.synchronize()

    def consumer_wait(self, events: list[Any]) -> None:
        for event in events:
            driver.stream_wait(0, 0, event)


class StandInSink(DriverSink):
    """DriverSink with staging kept across loads (as torch's pinned cache keeps it), tensors
    never touched (the stand-in does not copy), and with ``mode`` native a chunk's wait, read
    and copies in one C call, with ring the ring."""

    kept: dict[int, list[tuple[Any, memoryview]]] = {}

    def __init__(self, mode: str) -> None:
        self.read_copy = self._read_copy if mode == "native" else None
        self.ring = self._ring if mode == "ring" else None
        self.lent: dict[int, tuple[Any, memoryview]] = {}

    def staging(self, nbytes: int) -> tuple[Any, memoryview]:
        free = self.kept.setdefault(nbytes, [])
        buffer = free.pop() if free else super().staging(nbytes)
        self.lent[id(buffer[0])] = buffer
        return buffer

    def release_staging(self, buffer: Any) -> None:
        lent = self.lent.pop(id(buffer))
        self.kept[len(lent[1])].append(lent)

    def finish(self, flat: Any, info: TensorInfo) -> Any:
        return flat

    def _read_copy(self, stream: int, staged: Any, fd: int, offset: int, length: int,
                   needed: int, buffer: Any, allocated: Any, pieces: list[Any],
                   path: str) -> tuple[int, Any, Any]:
        return native.read_copy(0, staged, fd, offset, length, needed, buffer.data_ptr(),
                                stream, allocated,
                                [(dst.data_ptr() + at, src, n) for dst, at, src, n in pieces],
                                blocking=False, path=path)

    def _ring(self, **shape: int) -> ring.Ring:
        return ring.Ring(0, **shape)


def stand_in(folder: Path) -> Any:
    """tests/fake_libcuda.c built and bound as the CUDA driver, copies not done."""
    import ctypes

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        sys.exit("needs a C compiler (cc or gcc) to build the stand-in driver")
    built = folder / "libcuda.so.1"
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(built), str(STAND_IN)],
                   check=True)
    if driver._load(str(built)) is None:
        sys.exit(f"the stand-in driver does not load: {driver.available()}")
    lib = ctypes.CDLL(str(built))
    ctypes.c_int.in_dll(lib, "fake_skip_copies").value = 1
    for module in (native, ring):
        if module.available() is not None:
            sys.exit(f"{module.__name__}: {module.available()}")
    return lib


def load(path: str, mode: str, threads: int, staging: int, chunk: int = 0) -> float:
    # "ring" as load() and transformers' batches run it (keeps_all: a slot per chunk of the
    # load, stream.RING_SLOTS); "ring_few_slots" as iter_tensors does, with the slots its
    # windows need (2 * windows + readers): the planner waits for reports once they are taken.
    options = StreamOptions(threads=threads, staging_bytes=staging, io="buffered",
                            switch_interval=500e-6, chunk_bytes=chunk,
                            keeps_all=mode == "ring")
    if mode == "ring_few_slots":
        mode = "ring"
    t0 = time.perf_counter()
    for _ in stream_tensors([(path, None, None)], StandInSink(mode), options):
        pass
    return time.perf_counter() - t0


def quiet_beside(path: str, threads: int, staging: int, chunk: int, steps: int
                 ) -> tuple[float, float]:
    """``ring`` as a transformers batch with ``read_ahead="quiet"`` runs it beside the model's
    build: the load on a thread with a stream.AheadGate, this thread waiting until every chunk
    is planned, then doing the work, then letting the reports go. (Seconds from the start
    until the load ended, the work's own seconds.)"""
    options = StreamOptions(threads=threads, staging_bytes=staging, io="buffered",
                            switch_interval=500e-6, chunk_bytes=chunk, keeps_all=True)
    gate = AheadGate()
    ended: list[float] = []
    t0 = time.perf_counter()

    def run() -> None:
        for _ in stream_tensors([(path, None, None)], StandInSink("ring"), options, gate):
            pass
        ended.append(time.perf_counter() - t0)

    thread = threading.Thread(target=run)
    thread.start()
    gate.wait_planned(60)
    t1 = time.perf_counter()
    python_work(steps)
    work = time.perf_counter() - t1
    gate.release()
    thread.join()
    return ended[0], work


def beside_sorts(run: Callable[[], float], steps: int) -> tuple[float, float]:
    """(``run()``'s seconds, 0) with another thread sorting ``steps // 10`` floats over and
    over meanwhile: each sort keeps the GIL for all of its C call."""
    import random

    data = [random.random() for _ in range(steps // 10)]
    stop = threading.Event()

    def sorts() -> None:
        while not stop.is_set():
            sorted(data)

    thread = threading.Thread(target=sorts)
    thread.start()
    try:
        return run(), 0.0
    finally:
        stop.set()
        thread.join()


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--modes", default="driver,native,ring",
                    help="of driver, native, ring, ring_few_slots, ring_quiet (with --work "
                         "python)")
    ap.add_argument("--chunk-mib", type=int, default=0,
                    help="chunk_bytes: the largest chunk, so the ring's windows (0: the share of "
                         "staging a buffer gets)")
    ap.add_argument("--work", choices=("python", "sorts"), default="python",
                    help="the other thread's work: pure Python, or sorts (long C calls)")
    args = ap.parse_args()

    folder = Path(args.dir or tempfile.gettempdir()) / "fastsafetensors-bench-ring"
    folder.mkdir(parents=True, exist_ok=True)
    stand_in(folder)
    path = str(zeros_file(folder, args.size_mb))
    nbytes = Path(path).stat().st_size
    staging = args.staging_mib << 20
    chunk = args.chunk_mib << 20
    modes = args.modes.split(",")
    for mode in modes:
        if mode != "ring_quiet":
            load(path, mode, args.threads, staging, chunk)   # staging made, C built, warm
    t0 = time.perf_counter()
    python_work(args.steps)
    alone_work = time.perf_counter() - t0
    rows: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for mode in modes:
            if mode == "ring_quiet":   # only beside the work: alone it is ring
                rows.setdefault(f"{mode}, beside {args.work} (load ends)", []).append(
                    quiet_beside(path, args.threads, staging, chunk, args.steps))
                continue
            rows.setdefault(f"{mode}, alone", []).append(
                (load(path, mode, args.threads, staging, chunk), 0.0))
            run = lambda: load(path, mode, args.threads, staging, chunk)  # noqa: B023, E731
            rows.setdefault(f"{mode}, beside {args.work}", []).append(
                beside_sorts(run, args.steps) if args.work == "sorts"
                else beside_work(run, args.steps))
    m = C.machine()
    print(f"{m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {torch.__version__}")
    print(f"{nbytes / 1e9:.2f} GB warm, {args.threads} readers, {args.staging_mib} MiB of "
          f"staging, chunks of {args.chunk_mib or 'a buffer share of'} MiB, copies counted "
          f"and not done, {args.rounds} interleaved rounds, medians; "
          f"the Python work alone: {alone_work * 1e3:.0f} ms")
    print_rows(rows, nbytes)


if __name__ == "__main__":
    main()
