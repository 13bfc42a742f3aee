"""The streaming engine beside a thread that runs Python, with and without a shorter switch
interval (``switch_interval_us``, fastsafetensors/loader/switching.py), without a GPU.

transformers reads ahead while it builds the model on its own thread, and a consumer may run
Python between two tensors: the engine's readers need the GIL back after every read, and CPython
hands it over from a thread running Python only every switch interval (5 ms by default). Here
the engine reads a warm file with a sink that copies nothing (``bench_engine_reads.NullSink``,
staging kept across loads) while another thread does a fixed amount of pure-Python work; each
round times, interleaved: the load alone (with either interval), and the load beside the work
with the interpreter's interval and with the engine's shorter one; and how long the work itself
took each time.

    python benchmarks/bench_beside_python.py --size-mb 800 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_engine_reads import NullSink  # noqa: E402

from fastsafetensors.loader.stream import StreamOptions, stream_tensors  # noqa: E402


def python_work(steps: int) -> int:
    """Pure-Python work that never releases the GIL by itself (a model build's stand-in)."""
    total = 0
    for i in range(steps):
        total += i * i
    return total


def load(path: str, threads: int, staging: int, interval: float) -> float:
    sink = NullSink(kept=True)
    options = StreamOptions(threads=threads, staging_bytes=staging, io="buffered",
                            switch_interval=interval)
    t0 = time.perf_counter()
    for _ in stream_tensors([(path, None, None)], sink, options):
        pass
    return time.perf_counter() - t0


def beside_work(run: Callable[[], float], steps: int) -> tuple[float, float]:
    """(``run()``'s seconds, the work's seconds) with the work running on another thread
    meanwhile."""
    spent: list[float] = []

    def work() -> None:
        t0 = time.perf_counter()
        python_work(steps)
        spent.append(time.perf_counter() - t0)

    thread = threading.Thread(target=work)
    thread.start()
    seconds = run()
    thread.join()
    return seconds, spent[0]


def beside(path: str, threads: int, staging: int, interval: float, steps: int
           ) -> tuple[float, float]:
    """(load seconds, work seconds) with the work running on another thread meanwhile."""
    return beside_work(lambda: load(path, threads, staging, interval), steps)


def zeros_file(folder: Path, size_mb: int) -> Path:
    """A file of ``size_mb`` MiB of 64 MiB tensors (written once), warm."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"big-{size_mb}mb.safetensors"
    if not path.exists():
        per = 64 << 20
        save_file({f"w{i}": torch.zeros(per, dtype=torch.uint8)
                   for i in range(max(1, (size_mb << 20) // per))}, str(path))
    C.warm([str(path)])
    return path


def print_rows(rows: dict[str, list[tuple[float, float]]], nbytes: int) -> None:
    """Each row's median load time (and GB/s) and, beside work, the work's median time."""
    for name, values in rows.items():
        seconds = statistics.median(v[0] for v in values)
        work = statistics.median(v[1] for v in values)
        line = f"  {name:40s} load {seconds * 1e3:6.0f} ms ({nbytes / 1e9 / seconds:5.2f} GB/s)"
        if work:
            line += f"   work {work * 1e3:4.0f} ms"
        print(line)


def arguments(doc: str) -> argparse.ArgumentParser:
    """The options this benchmark and bench_ring_cpu.py share."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=800)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--staging-mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3_000_000, help="the work's loop length")
    ap.add_argument("--dir", default=None)
    return ap


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--interval-us", type=int, default=500, help="the engine's interval")
    args = ap.parse_args()

    import torch

    path = zeros_file(Path(args.dir or tempfile.gettempdir()) / "fastsafetensors-bench-beside",
                      args.size_mb)
    nbytes = path.stat().st_size
    staging = args.staging_mib << 20
    shorter = args.interval_us / 1e6
    load(str(path), args.threads, staging, 0.0)   # staging made, code warm
    t0 = time.perf_counter()
    python_work(args.steps)
    alone_work = time.perf_counter() - t0
    rows: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        rows.setdefault("load alone", []).append((load(str(path), args.threads, staging, 0.0),
                                                  0.0))
        rows.setdefault(f"load alone, {args.interval_us} us", []).append(
            (load(str(path), args.threads, staging, shorter), 0.0))
        rows.setdefault(f"beside, interpreter's interval ({sys.getswitchinterval() * 1e3:g} ms)",
                        []).append(beside(str(path), args.threads, staging, 0.0, args.steps))
        rows.setdefault(f"beside, {args.interval_us} us while loading", []).append(
            beside(str(path), args.threads, staging, shorter, args.steps))
    m = C.machine()
    print(f"{m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {torch.__version__}")
    print(f"{nbytes / 1e9:.2f} GB warm, {args.threads} readers, {args.staging_mib} MiB of "
          f"staging, {args.rounds} interleaved rounds, medians; the work alone: "
          f"{alone_work * 1e3:.0f} ms")
    print_rows(rows, nbytes)


if __name__ == "__main__":
    main()
