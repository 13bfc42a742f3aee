"""A GPU load on a thread beside the main thread's work, as transformers reads ahead: what does
the work cost the load's speed, and where do the engine's threads wait?

In H200 run 8, a load read ahead under ``from_pretrained`` ran at 15-16 GB/s, against 34-37
alone. transformers' thread builds the model meanwhile: mostly pure Python (modules, regular
expressions), holding the GIL but for switch intervals. Here ``fastsafetensors.load`` runs on a
thread while the main thread does, until it ends, one of: nothing (it waits), pure Python,
regular expressions compiled afresh (``re``'s parser is Python), or sorts (one C call each,
keeping the GIL, some 5 ms each). Each round times every kind, interleaved; the first round
prints the engine's phases too (seconds summed over threads), and the end each kind's median.

    python benchmarks/probe_beside_gpu.py --dir CHECKPOINT --rounds 3
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path


def idle(done: threading.Event) -> None:
    done.wait()


def python(done: threading.Event) -> None:
    total = 0
    while not done.is_set():
        for i in range(10_000):
            total += i * i


def regexes(done: threading.Event) -> None:
    n = 0
    while not done.is_set():
        n += 1
        re.compile(rf"model\.layers\.(\d+)\.mlp\.experts\.{n}\.(gate|up)_proj\.weight$")
        if n % 400 == 0:
            re.purge()   # transformers' ~1000 patterns overflow re's cache of 512 anyway


def sorts(done: threading.Event) -> None:
    values = [random.random() for _ in range(30_000)]   # some 5 ms a sort
    while not done.is_set():
        sorted(values)


WORK: dict[str, Callable[[threading.Event], None]] = {
    "alone": idle, "python": python, "regexes": regexes, "sorts": sorts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--deadline", type=float, default=30, help="no round starts after it (s)")
    args = ap.parse_args()

    import torch

    import fastsafetensors
    from fastsafetensors.loader.stream import PHASES

    files = sorted(str(p) for p in Path(args.dir).glob("*.safetensors"))
    nbytes = sum(Path(f).stat().st_size for f in files)

    def load_beside(work: Callable[[threading.Event], None]) -> tuple[float, dict[str, float]]:
        result: dict[str, float] = {}
        failed: list[BaseException] = []
        done = threading.Event()

        def run() -> None:
            started = time.perf_counter()
            try:
                tensors = fastsafetensors.load(files, device=args.device)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                result["seconds"] = time.perf_counter() - started
                del tensors
            except BaseException as exc:  # noqa: BLE001 - raised again on the main thread
                failed.append(exc)
            finally:
                done.set()

        PHASES.reset()
        thread = threading.Thread(target=run)
        thread.start()
        work(done)
        thread.join()
        if failed:
            raise failed[0]
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return result["seconds"], PHASES.snapshot()

    load_beside(idle)   # staging pinned, code warm
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    print(f"{where}, {len(files)} files, {nbytes / 1e9:.2f} GB", flush=True)
    rows: dict[str, list[float]] = {k: [] for k in WORK}
    started = time.monotonic()
    for round_ in range(args.rounds):
        if time.monotonic() - started > args.deadline:
            print(f"deadline: rounds from {round_} on skipped", flush=True)
            break
        for name, work in WORK.items():
            seconds, phases = load_beside(work)
            rows[name].append(seconds)
            print(f"round {round_} beside {name:8s} {seconds:6.3f} s  "
                  f"{nbytes / 1e9 / seconds:6.2f} GB/s", flush=True)
            if round_ == 0:
                print("      threads: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in sorted(phases.items())), flush=True)
    for name, values in rows.items():
        if values:
            seconds = statistics.median(values)
            print(f"  beside {name:8s} median {seconds:6.3f} s  "
                  f"{nbytes / 1e9 / seconds:6.2f} GB/s")


if __name__ == "__main__":
    main()
