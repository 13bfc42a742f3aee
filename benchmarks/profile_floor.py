#!/usr/bin/env python
"""Where ``from_pretrained`` spends its own time: a timeline of transformers' steps, per loader.

The floor twin of bench_transformers.py (a Llama-shaped checkpoint with the layers, names and
tensor count of the ``--size-gb`` one, 128 wide: a few MB) moves almost no bytes, so loading it
times transformers' own work and each loader's per-tensor costs: the part of a load that no
reading speed shortens. Each load runs in a fresh process, as a user's first load does (some
costs are once per process: imports of the model's module, transformers' conversion table).
The child times ``from_pretrained`` and records when each of these steps began and ended, where
the installed transformers has it:

* ``modeling_utils``: ``_get_resolved_checkpoint_files``, ``_get_dtype``,
  ``get_model_conversion_mapping`` (building the model on the meta device comes between these
  two), ``_get_device_map``, ``caching_allocator_warmup``, ``convert_and_load_state_dict_in_model``,
  ``accelerate_dispatch``;
* ``PreTrainedModel``: ``_load_pretrained_model``, ``_finalize_model_loading``.

Printed per loader: the median total and, for the round with the median total, each step's start
and duration (nested steps indented) and the time outside every step. ``--profile N`` adds one
more load per loader under cProfile and prints its N functions with the most time of their own,
then the N with the most time including their callees (the profiler slows the load; read it for
proportions).

    python benchmarks/profile_floor.py --repeat 3                       # CPU, 8 GB's twin
    python benchmarks/profile_floor.py --device cuda --profile 25       # GPU machine

Nothing here asserts.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_transformers import LOADER_KWARGS, MODES  # noqa: E402

#: (module, class or None, names): the steps timed, where they exist.
STEPS = (
    ("transformers.modeling_utils", None,
     ("_get_resolved_checkpoint_files", "_get_dtype", "get_model_conversion_mapping",
      "_get_device_map", "caching_allocator_warmup", "convert_and_load_state_dict_in_model",
      "accelerate_dispatch")),
    ("transformers.modeling_utils", "PreTrainedModel",
     ("_load_pretrained_model", "_finalize_model_loading")),
)


def _timed(owner: Any, name: str, calls: list[tuple[str, float, float]]) -> bool:
    """Replace ``owner.name`` by a function that records each call's start and end."""
    raw = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
    if raw is None:
        return False
    kind = type(raw) if isinstance(raw, (classmethod, staticmethod)) else None
    function = raw.__func__ if kind is not None else raw

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            calls.append((name, started, time.perf_counter()))

    setattr(owner, name, kind(timed) if kind is not None else timed)
    return True


def child(args: argparse.Namespace) -> None:
    """One load of the twin; prints one JSON line."""
    import importlib

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import fastsafetensors.integrations.transformers  # noqa: F401  (installs the hook)

    hf_logging.disable_progress_bar()
    calls: list[tuple[str, float, float]] = []
    missing = []
    for module_name, cls, names in STEPS:
        owner: Any = importlib.import_module(module_name)
        if cls is not None:
            owner = getattr(owner, cls)
        missing += [n for n in names if not _timed(owner, n, calls)]
    if args.device.startswith("cuda"):
        torch.empty(1, device=args.device)
        torch.cuda.synchronize()
    profiler = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16,
                                         device_map=args.device, **LOADER_KWARGS[args.mode])
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    total = time.perf_counter() - started
    result: dict[str, Any] = {"mode": args.mode, "total": total, "missing_steps": missing,
                              "steps": [(n, s - started, e - started) for n, s, e in calls]}
    if profiler is not None:
        profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(args.profile)
        stats.sort_stats("cumulative").print_stats(args.profile)
        result["profile"] = text.getvalue()
    print(json.dumps(result), flush=True)


def timeline(row: dict[str, Any]) -> list[str]:
    """One line per step, nested ones indented, and the time outside every step."""
    steps = sorted(row["steps"], key=lambda s: (s[1], -s[2]))
    lines, open_ends, covered, reach = [], [], 0.0, 0.0
    for name, start, end in steps:
        while open_ends and open_ends[-1] <= start:
            open_ends.pop()
        lines.append(f"  {start:6.3f} s  {'  ' * len(open_ends)}{name:<40} {end - start:6.3f} s")
        open_ends.append(end)
        # Time inside some top-level step (steps do not straddle each other's ends).
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    lines.append(f"  outside every step above (config, building the model, ...): "
                 f"{row['total'] - covered:.3f} s")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=8.0,
                    help="the checkpoint whose twin is loaded (layers and names)")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers instead of those of --size-gb (9 tensors each)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--dir", default=None, help="the twin's folder (default: a temporary one)")
    ap.add_argument("--device", default="cpu", help="device_map: cpu, cuda, ...")
    ap.add_argument("--modes", default="stock,fastsafetensors")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="one more load per loader under cProfile: its top N functions")
    ap.add_argument("--deadline", type=float, default=None,
                    help="start no load after this many seconds")
    ap.add_argument("--run-timeout", type=float, default=60.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    modes = args.modes.split(",")
    if not modes or set(modes) - set(MODES):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    started = time.monotonic()
    cfg = C.floor_config(C.llama_shapes(int(args.size_gb * 1e9))[1])
    if args.layers is not None:
        cfg["layers"] = args.layers
    folder = Path(args.dir or Path(tempfile.gettempdir()) / f"fst-floor-{cfg['layers']}layers")
    info = C.build_checkpoint(folder, 0, shards=args.shards, cfg=cfg)
    print(f"floor twin of {args.size_gb:g} GB, {cfg['layers']} layers: {info['tensors']} tensors, "
          f"{info['tensor_bytes'] / 1e6:.1f} MB in {folder}; device_map={args.device}",
          flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(C.REPO), os.environ.get("PYTHONPATH")) if p))
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    profiles: dict[str, str] = {}
    # The first round, then the profiled loads, then the other rounds: what a deadline leaves
    # out is the least wanted.
    runs = [(0, m, False) for m in modes] + ([(0, m, True) for m in modes] if args.profile
                                             else [])
    runs += [(r, m, False) for r in range(1, args.repeat) for m in modes]
    for round_, mode, profiled in runs:
        if args.deadline and time.monotonic() - started > args.deadline:
            print(f"deadline: round {round_} {mode} skipped", flush=True)
            continue
        cmd = [sys.executable, __file__, "--child", "--mode", mode, "--folder", str(folder),
               "--device", args.device, "--profile", str(args.profile if profiled else 0)]
        # A load started before the deadline ends at most 5 s after it: the summary and the
        # profiles taken are printed even when a caller's time limit is just past it.
        timeout = args.run_timeout
        if args.deadline:
            timeout = min(timeout, max(1.0, args.deadline + 5 - (time.monotonic() - started)))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"round {round_} {mode}: stopped after {timeout:.0f} s", flush=True)
            continue
        if done.returncode:
            print(f"round {round_} {mode}: exit status {done.returncode}: "
                  f"{done.stderr[-3000:]}", flush=True)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        if profiled:
            profiles[mode] = row["profile"]
            continue
        rows[mode].append(row)
        print(f"round {round_} {mode:26} {row['total']:6.3f} s", flush=True)

    summary: dict[str, Any] = {}
    for mode, done_rows in rows.items():
        if not done_rows:
            continue
        ordered = sorted(done_rows, key=lambda r: r["total"])
        middle = ordered[(len(ordered) - 1) // 2]
        summary[mode] = {"median_total": C.median([r["total"] for r in done_rows]),
                         "totals": [r["total"] for r in done_rows], "median_round": middle}
        print(f"\n{mode}: median {summary[mode]['median_total']:.3f} s of "
              f"{len(done_rows)} loads; the median load's steps:")
        print("\n".join(timeline(middle)))
        if middle["missing_steps"]:
            print(f"  (not in this transformers: {', '.join(middle['missing_steps'])})")
    for mode, text in profiles.items():
        print(f"\n{mode} under cProfile, top {args.profile} by own time, then by time with "
              f"callees:\n{text}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": C.machine(), "args": vars(args),
                                               "twin": info, "summary": summary,
                                               "profiles": profiles}, indent=1))


if __name__ == "__main__":
    main()
