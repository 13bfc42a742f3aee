#!/usr/bin/env python
"""Who holds the GIL during ``from_pretrained``: each thread's share, and what it runs then.

On the H200 machine ``from_pretrained(..., loader="fastsafetensors")`` with
``device_map="cuda"`` read 8.21 GB at 15-20 GB/s, against 34-44 GB/s for the same load without
transformers beside it; and on the floor twin (no bytes to move) transformers' own
``get_model_conversion_mapping`` took 0.19 s there against 0.02 s on the 2-core CPU VM
(docs/benchmarks.md, section 4). Both point at threads taking turns with the GIL, which
cProfile cannot show: since Python 3.12 it mixes the threads' stacks. This script asks py-spy,
which samples the process from outside: ``py-spy record --gil`` keeps, at each tick, the stack
of the thread holding the GIL, if any.

Each ``--modes`` entry (bench_transformers.py's loaders) is one fresh child process under
py-spy: imports and CUDA's start first, then one timed ``from_pretrained`` inside
``timed_load()``, so that the main thread's samples of the load are those under that frame.
Printed per mode: the load's time; for each thread, the milliseconds it held the GIL during
the load (the samples over the rate); the time nobody held it; and each thread's functions
with the most samples, both innermost frames and frames anywhere on the stack.

    python benchmarks/gil_profile.py --dir CKPT --device cuda --modes stock,fastsafetensors

Needs ``py-spy`` (``pip install py-spy``; ``--py-spy PATH`` otherwise) and ptrace rights over
its own child, which an unprivileged container may lack: the error is then printed. Sampling
at 1,000 Hz without pausing the process (``--nonblocking``) slows the load a little; read
the proportions. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transformers import LOADER_KWARGS, MODES  # noqa: E402

#: The main thread's frame around the timed load.
MARK = "timed_load"
#: "thread (1234): MainThread;frame (file:line);... 17", or with no name for a thread py-spy
#: has not named yet.
LINE = re.compile(r"^thread \((\d+)\)(?::\s*([^;]*))?;?(.*?)\s+(\d+)$")


def child(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import fastsafetensors.integrations.transformers  # noqa: F401  (installs the hook)

    hf_logging.disable_progress_bar()
    if args.device.startswith("cuda"):
        torch.empty(1, device=args.device)
        torch.cuda.synchronize()

    def timed_load() -> float:
        started = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16,
                                             device_map=args.device, **LOADER_KWARGS[args.mode])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    time.sleep(0.2)   # the import threads of transformers, if any, settle
    print(json.dumps({"mode": args.mode, "seconds": timed_load()}), flush=True)


def parse(text: str) -> tuple[dict[str, str], list[tuple[str, list[str], int]]]:
    """py-spy's raw output: thread names by id, and (thread id, frames root first, samples)."""
    names: dict[str, str] = {}
    rows = []
    for line in text.splitlines():
        found = LINE.match(line.strip())
        if not found:
            continue
        tid, name, stack, count = found.groups()
        if name:
            names[tid] = name.strip()
        frames = [f for f in stack.split(";") if f]
        rows.append((tid, frames, int(count)))
    return names, rows


def _short(frame: str) -> str:
    """'function (path/to/file.py:12)' -> 'file.py:function' (lines merged; the import
    machinery's frames as one)."""
    found = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not found:
        return frame
    function, path = found.groups()
    if path.startswith("<frozen importlib"):
        return "(imports)"
    return f"{Path(path).name}:{function}"


def summarize(text: str, seconds: float, rate: int, top: int) -> list[str]:
    names, rows = parse(text)
    held: collections.Counter[str] = collections.Counter()
    leaves: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    anywhere: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    main = next((t for t, n in names.items() if n == "MainThread"), None)
    for tid, frames, count in rows:
        if tid == main:
            if not any(MARK in f for f in frames):
                continue   # imports, CUDA's start: before the load
            frames = frames[next(i for i, f in enumerate(frames) if MARK in f) + 1:]
        label = f"{names.get(tid, '?')} ({tid})"
        held[label] += count
        if frames:
            leaves[label][_short(frames[-1])] += count
        for short in {_short(f) for f in frames}:
            anywhere[label][short] += count
    ms = 1000.0 / rate
    total = sum(held.values())
    lines = [f"  load {seconds:.3f} s; GIL held {total * ms:.0f} ms by these threads, by none "
             f"{max(0.0, seconds * 1000 - total * ms):.0f} ms"]
    for label, count in held.most_common():
        lines.append(f"  {label}: {count * ms:.0f} ms")
        # Frames under every sample of the thread (its entry point) say nothing: left out.
        common = {name for name, n in anywhere[label].items() if n == count}
        for title, table in (("innermost", leaves[label]), ("on the stack", anywhere[label])):
            best = [f"{name} {n * ms:.0f}" for name, n in table.most_common()
                    if name not in common or title == "innermost"]
            lines.append(f"      {title}: {', '.join(best[:top])}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="the checkpoint folder (bench_transformers)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--modes", default="stock,fastsafetensors")
    ap.add_argument("--rate", type=int, default=1000, help="samples per second")
    ap.add_argument("--top", type=int, default=8, help="functions printed per thread")
    ap.add_argument("--py-spy", default=None, help="the py-spy program (default: on PATH)")
    ap.add_argument("--out", default=None, help="keep py-spy's raw output here (a folder)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per child")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if not args.dir:
        ap.error("--dir: the checkpoint folder is needed")
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    spy = args.py_spy or shutil.which("py-spy")
    if spy is None:
        print("py-spy not found: pip install py-spy, or --py-spy PATH")
        return
    out = Path(args.out) if args.out else Path(args.dir).parent / "gil-profiles"
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": args.device, "rate": args.rate, "modes": {}}
    for mode in modes:
        raw = out / f"gil-{mode}.txt"
        command = [spy, "record", "--gil", "--threads", "--nonblocking", "--rate",
                   str(args.rate), "--format", "raw", "-o", str(raw), "--",
                   sys.executable, __file__, "--child", "--mode", mode, "--folder", args.dir,
                   "--device", args.device]
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{mode}: timed out after {args.timeout:.0f} s")
            continue
        result = next((json.loads(line) for line in done.stdout.splitlines()
                       if line.startswith("{")), None)
        if result is None or not raw.exists():
            print(f"{mode}: no profile (rc {done.returncode}): {done.stderr.strip()[-600:]}")
            continue
        text = raw.read_text()
        lines = summarize(text, result["seconds"], args.rate, args.top)
        print(f"{mode}:")
        print("\n".join(lines))
        report["modes"][mode] = {"seconds": result["seconds"], "summary": lines}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
