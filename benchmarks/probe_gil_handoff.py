"""What small torch calls cost when two threads make them at once.

Each torch call gives Python's GIL away for its C++ work and must take it back; when another
thread wants the GIL meanwhile, the two hand it back and forth, and on a machine with several
cores each hand-over costs a wake-up. The streaming engine makes such calls on several threads
at once (the planner allocates, the readers copy, the caller views), so this is the cost per
tensor that grouping small tensors (``small_tensor_groups``) avoids: one allocation per group
and one view per tensor. Two workloads of 20,000 calls each (allocations; two views each), run
one after the other on one thread, then on two threads at once; rounds interleaved, medians.

    python benchmarks/probe_gil_handoff.py --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable

import torch

CALLS = 20_000


def allocate() -> None:
    for _ in range(CALLS):
        torch.empty(2816, dtype=torch.uint8)


def view() -> None:
    flat = torch.empty(2816, dtype=torch.uint8)
    for _ in range(CALLS):
        flat.view(torch.bfloat16).view(32, 44)


def one_thread(work: list[Callable[[], None]]) -> float:
    started = time.perf_counter()
    for fn in work:
        fn()
    return time.perf_counter() - started


def threads(work: list[Callable[[], None]]) -> float:
    running = [threading.Thread(target=fn) for fn in work]
    started = time.perf_counter()
    for t in running:
        t.start()
    for t in running:
        t.join()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    work = [allocate, view]
    serial: list[float] = []
    parallel: list[float] = []
    for _ in range(args.rounds):
        serial.append(one_thread(work))
        parallel.append(threads(work))
    s, p = statistics.median(serial), statistics.median(parallel)
    print(f"{CALLS} allocations and {CALLS} double views, median of {args.rounds} rounds")
    print(f"  one thread:          {s * 1e3:6.0f} ms")
    print(f"  two threads at once: {p * 1e3:6.0f} ms ({p / s:.2f}x)")


if __name__ == "__main__":
    main()
