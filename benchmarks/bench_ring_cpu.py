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
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_beside_python import python_work  # noqa: E402
from bench_engine_reads import NullSink  # noqa: E402

from fastsafetensors.format import TensorInfo  # noqa: E402
from fastsafetensors.loader import cuda, driver, native, ring  # noqa: E402
from fastsafetensors.loader.stream import StreamOptions, stream_tensors  # noqa: E402

STAND_IN = Path(__file__).resolve().parent.parent / "tests" / "fake_libcuda.c"


class StandInSink(NullSink):
    """The CUDA sink's driver path on the stand-in driver: driver events and stream waits,
    copies queued through it (and not done), staging kept across loads; with ``mode`` native,
    a chunk's wait, read and copies in one C call; with ring, the ring."""

    def __init__(self, mode: str) -> None:
        super().__init__(kept=True)
        self.read_copy = self._read_copy if mode == "native" else None
        self.ring = self._ring if mode == "ring" else None

    def alloc(self, info: TensorInfo) -> Any:
        import torch

        return torch.empty(info.nbytes, dtype=torch.uint8)   # never touched: no page faults

    def alloc_event(self) -> Any:
        return driver.Event(0, 0)

    def new_stream(self) -> int:
        return 7

    def stream_wait(self, stream: int, event: Any) -> None:
        driver.stream_wait(0, stream, event)

    def copy(self, stream: int, src: Any, pieces: list[Any]) -> None:
        driver.copy_to_device(0, stream, cuda.addresses(src, pieces))

    def record(self, stream: int) -> Any:
        return driver.Event(0, stream)

    def host_wait(self, event: Any) -> None:
        event.synchronize()

    def consumer_wait(self, events: list[Any]) -> None:
        for event in events:
            driver.stream_wait(0, 0, event)

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


def load(path: str, mode: str, threads: int, staging: int) -> float:
    options = StreamOptions(threads=threads, staging_bytes=staging, io="buffered",
                            switch_interval=500e-6)
    t0 = time.perf_counter()
    for _ in stream_tensors([(path, None, None)], StandInSink(mode), options):
        pass
    return time.perf_counter() - t0


def beside(path: str, mode: str, threads: int, staging: int, steps: int
           ) -> tuple[float, float]:
    """(load seconds, work seconds) with the work running on another thread meanwhile."""
    spent: list[float] = []

    def work() -> None:
        t0 = time.perf_counter()
        python_work(steps)
        spent.append(time.perf_counter() - t0)

    thread = threading.Thread(target=work)
    thread.start()
    seconds = load(path, mode, threads, staging)
    thread.join()
    return seconds, spent[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=800)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--staging-mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3_000_000, help="the work's loop length")
    ap.add_argument("--modes", default="driver,native,ring")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    folder = Path(args.dir or tempfile.gettempdir()) / "fastsafetensors-bench-ring"
    folder.mkdir(parents=True, exist_ok=True)
    stand_in(folder)
    path = folder / f"big-{args.size_mb}mb.safetensors"
    if not path.exists():
        per = 64 << 20
        save_file({f"w{i}": torch.zeros(per, dtype=torch.uint8)
                   for i in range(max(1, (args.size_mb << 20) // per))}, str(path))
    C.warm([str(path)])
    nbytes = path.stat().st_size
    staging = args.staging_mib << 20
    modes = args.modes.split(",")
    for mode in modes:
        load(str(path), mode, args.threads, staging)   # staging made, C built, code warm
    t0 = time.perf_counter()
    python_work(args.steps)
    alone_work = time.perf_counter() - t0
    rows: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for mode in modes:
            rows.setdefault(f"{mode}, alone", []).append(
                (load(str(path), mode, args.threads, staging), 0.0))
            rows.setdefault(f"{mode}, beside Python", []).append(
                beside(str(path), mode, args.threads, staging, args.steps))
    m = C.machine()
    print(f"{m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {torch.__version__}")
    print(f"{nbytes / 1e9:.2f} GB warm, {args.threads} readers, {args.staging_mib} MiB of "
          f"staging, copies counted and not done, {args.rounds} interleaved rounds, medians; "
          f"the work alone: {alone_work * 1e3:.0f} ms")
    for name, values in rows.items():
        seconds = statistics.median(v[0] for v in values)
        work = statistics.median(v[1] for v in values)
        line = f"  {name:24s} load {seconds * 1e3:6.0f} ms ({nbytes / 1e9 / seconds:5.2f} GB/s)"
        if work:
            line += f"   work {work * 1e3:4.0f} ms"
        print(line)


if __name__ == "__main__":
    main()
