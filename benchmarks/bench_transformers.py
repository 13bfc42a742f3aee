#!/usr/bin/env python
"""End-to-end ``from_pretrained``: transformers' stock loader against ``loader="fastsafetensors"``.

A Llama-shaped bf16 checkpoint of ``--size-gb`` (default 8, for GPU machines; use 1-2 on a small
CPU VM) is written once (benchmarks/_common.py ``build_checkpoint``), then every round loads it
with each loader, warm (files in the page cache) and cold (fdatasync + POSIX_FADV_DONTNEED per
file, checked with mincore), interleaved so a noisy neighbour hurts both alike. Each load runs in
a fresh child process, which measures:

* seconds: ``AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
  device_map=DEVICE[, loader="fastsafetensors"])``, imports excluded; on a GPU, CUDA is
  initialized before the clock starts and that time is reported apart (``cuda_init_seconds``):
  it is the same for both loaders and belongs to neither (until the 2026-11-26 H200 runs it was
  inside ``seconds``);
* peak RSS above the child's baseline (``ru_maxrss``: anonymous memory plus the mapped file pages
  the stock loader touches), and peak anonymous RSS (``RssAnon`` of /proc/self/status sampled
  every 5 ms: the memory a loader allocates, without page-cache-backed mappings);
* first touch: one read per 4 KiB page of every parameter afterwards (the stock CPU path hands
  out tensors that still point into its memory map, so its reads happen there), timed apart;
* a checksum of a sample of every parameter's bits, so both loaders build the same model.

A floor twin (``--floor``, on by default) has the same layers, names and tensor count at 128 wide
(a few MB): its warm loads time what each way spends besides moving bytes (transformers' own
work, per-tensor costs). ``warm/speedup_beyond_floor`` divides the two warm times less their
floors: the speedup on the bytes alone, which bounds what a faster loader can change.

    python benchmarks/bench_transformers.py --size-gb 2 --repeat 3 --json bench-tf.json
    python benchmarks/bench_transformers.py --device cuda          # on a GPU machine
    python benchmarks/bench_transformers.py --device cuda \
        --modes stock,fastsafetensors,fastsafetensors-ahead        # read ahead or not

GB = 1e9 bytes. Medians of ``--repeat`` rounds are printed; nothing here asserts.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

#: ``fastsafetensors-ahead`` is ours with ``read_ahead="on"`` (the default since the fifteenth
#: session): the batch reads while transformers builds the model; ``-on-demand`` with it off,
#: reading once transformers has built the model and asks; ``-native`` with
#: ``cuda_calls="native"``; ``-ring`` with ``cuda_calls="ring"`` (C threads read and copy),
#: ``-ring8`` the same in windows of 8 MiB (``chunk_bytes``); both the default since the
#: eighteenth session, whose ``-torch`` is the default before (``cuda_calls="torch"``);
#: ``-switch-off`` with ``switch_interval_us=0``, the interpreter's switch interval left as it
#: is while the batch reads; ``-few-slots`` with the ring's slots as before the nineteenth
#: session (``stream.RING_SLOTS = 0``: the planner waits for reports); ``-s256`` with 256 MiB
#: of staging (32 windows of 8 MiB), the ring's default before the twenty-first session (128
#: MiB since: H200 runs 8 and 10 loaded faster so without transformers);
#: ``-quiet`` with ``read_ahead="quiet"`` (transformers' thread waits until every chunk is
#: submitted, and the load's Python then waits for its first request); ``-s64`` with 64 MiB of
#: staging (32 windows of 2 MiB: faster than 128 MiB without transformers in H200 run 11);
#: ``stock-nogc`` and ``-nogc`` with Python's garbage collector turned off by the benchmark
#: around the call (H200 run 12: ours 0.25 s against 0.41 with it on); ``-gc`` with
#: ``pause_gc="off"``, the collector left alone (ours turns it off once transformers has the
#: files since the twenty-fourth session) (``--modes``). Every row says the collector's passes
#: inside the call.
MODES = ("stock", "fastsafetensors", "fastsafetensors-ahead", "fastsafetensors-on-demand",
         "fastsafetensors-native", "fastsafetensors-ring", "fastsafetensors-ring8",
         "fastsafetensors-torch", "fastsafetensors-switch-off", "fastsafetensors-few-slots",
         "fastsafetensors-s256", "fastsafetensors-quiet", "fastsafetensors-s64", "stock-nogc",
         "fastsafetensors-nogc", "fastsafetensors-gc")
LOADER_KWARGS: dict[str, dict[str, Any]] = {
    "stock": {},
    "fastsafetensors": {"loader": "fastsafetensors"},
    "fastsafetensors-ahead": {"loader": "fastsafetensors",
                              "loader_options": {"read_ahead": "on"}},
    "fastsafetensors-on-demand": {"loader": "fastsafetensors",
                                  "loader_options": {"read_ahead": "off"}},
    "fastsafetensors-native": {"loader": "fastsafetensors",
                               "loader_options": {"cuda_calls": "native"}},
    "fastsafetensors-ring": {"loader": "fastsafetensors",
                             "loader_options": {"cuda_calls": "ring"}},
    "fastsafetensors-ring8": {"loader": "fastsafetensors",
                              "loader_options": {"cuda_calls": "ring", "chunk_bytes": 8 << 20}},
    "fastsafetensors-torch": {"loader": "fastsafetensors",
                              "loader_options": {"cuda_calls": "torch"}},
    "fastsafetensors-switch-off": {"loader": "fastsafetensors",
                                   "loader_options": {"switch_interval_us": 0}},
    "fastsafetensors-few-slots": {"loader": "fastsafetensors"},
    "fastsafetensors-s256": {"loader": "fastsafetensors",
                             "loader_options": {"staging_bytes": 256 << 20}},
    "fastsafetensors-quiet": {"loader": "fastsafetensors",
                              "loader_options": {"read_ahead": "quiet"}},
    "fastsafetensors-s64": {"loader": "fastsafetensors",
                            "loader_options": {"staging_bytes": 64 << 20}},
    "stock-nogc": {},
    "fastsafetensors-nogc": {"loader": "fastsafetensors"},
    "fastsafetensors-gc": {"loader": "fastsafetensors", "loader_options": {"pause_gc": "off"}},
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class AnonPeak:
    """Samples RssAnon every ``interval`` seconds on a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kib("RssAnon") * 1024)
            self._stop.wait(self.interval)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kib("RssAnon") * 1024)


def child(args: argparse.Namespace) -> None:
    """One timed load; prints one JSON line."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import fastsafetensors.integrations.transformers  # noqa: F401  (installs the hook)

    if args.mode == "fastsafetensors-few-slots":
        from fastsafetensors.loader import stream

        stream.RING_SLOTS = 0

    hf_logging.disable_progress_bar()
    # Our one INFO line per load says when its engine runs read and when transformers first
    # waited on a tensor (the overlap that read_ahead buys): kept with the row.
    said: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    ours = logging.getLogger("fastsafetensors.integrations.transformers")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    folder = Path(args.folder)
    paths = [str(p) for p in sorted(folder.glob("*.safetensors"))]
    state = C.prepare(paths, args.cache)
    kwargs = LOADER_KWARGS[args.mode]
    base_rss = _status_kib("VmRSS") * 1024
    base_anon = _status_kib("RssAnon") * 1024
    cuda_init = None
    if args.device.startswith("cuda"):
        started = time.perf_counter()
        torch.empty(1, device=args.device)
        torch.cuda.synchronize()
        cuda_init = time.perf_counter() - started
    from fastsafetensors.loader.stream import PHASES

    PHASES.reset()   # where our engine's threads spent this load (empty for stock)
    passes: dict[str, list[float]] = {}   # the collector's passes in the call, by generation
    began = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            entry = passes.setdefault(str(info["generation"]), [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - began[0]

    if args.mode.endswith("-nogc"):
        gc.disable()
    gc.callbacks.append(on_gc)
    with AnonPeak() as anon:
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                     device_map=args.device, **kwargs)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    gc.callbacks.remove(on_gc)
    gc.enable()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # First touch: one element per 4 KiB page of every parameter. The stock CPU path returns
    # tensors that still point into its memory map, so its reads happen here.
    started = time.perf_counter()
    for p in model.parameters():
        flat = p.detach().reshape(-1).view(torch.int16)
        int(flat[::2048].sum(dtype=torch.int64))
    touch = time.perf_counter() - started
    checksum = 0
    for p in model.parameters():
        flat = p.detach().reshape(-1).view(torch.int16)
        checksum += int(flat[::97].sum(dtype=torch.int64))
    result = {"mode": args.mode, "cache": args.cache, "seconds": seconds,
              "gb_per_s": args.tensor_bytes / 1e9 / seconds, "touch_seconds": touch,
              "peak_rss_above_base": peak_rss - base_rss, "peak_anon_above_base":
              anon.peak - base_anon, "peak_rss_after_touch_above_base":
              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss,
              "checksum": checksum, "loadavg_1min": os.getloadavg()[0],
              "loader_log": said, "phases": PHASES.snapshot(), "gc_passes": passes, **state}
    if args.device.startswith("cuda"):
        result["peak_cuda"] = torch.cuda.max_memory_allocated()
        result["cuda_init_seconds"] = cuda_init
    print(json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=8.0, help="checkpoint size (GB = 1e9 B)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="device_map: cpu, cuda, auto, ...")
    ap.add_argument("--cache", choices=("warm", "cold", "both"), default="both")
    ap.add_argument("--dir", default=None,
                    help="where the checkpoint is written (default: a folder under /tmp)")
    ap.add_argument("--json", default=None, help="write every measurement here")
    ap.add_argument("--run-timeout", type=float, default=None,
                    help="seconds a child may take; one that takes longer is stopped and the "
                         "run recorded as failed (the others go on)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds from the start after which no run starts; the summary and "
                         "the JSON still cover the runs done")
    ap.add_argument("--modes", default="stock,fastsafetensors",
                    help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="skip the floor twin (same tensors, 128 wide; see above)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--tensor-bytes", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    modes = [m for m in MODES if m in args.modes.split(",")]
    if not modes or set(args.modes.split(",")) - set(MODES):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    started = time.monotonic()
    folder = Path(args.dir or Path(tempfile.gettempdir()) / f"fst-bench-tf-{args.size_gb:g}gb")
    info = C.build_checkpoint(folder, args.size_gb, shards=args.shards)
    twin = folder.parent / (folder.name + "-floor")
    floor = C.build_checkpoint(twin, 0, shards=args.shards,
                               cfg=C.floor_config(info["config"])) if args.floor else None
    caches = ("warm", "cold") if args.cache == "both" else (args.cache,)
    # The floor runs warm, between the warm and the cold runs of each round.
    plan = [c for c in caches if c == "warm"] + (["floor"] if floor and "warm" in caches
                                                 else []) + [c for c in caches if c == "cold"]
    results: list[dict[str, Any]] = []
    # The children import this checkout whether or not it is installed (the GPU machine gets
    # the working tree only); a PYTHONPATH set by the caller (a carried transformers) stays.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(C.REPO), os.environ.get("PYTHONPATH")) if p))
    skipped = 0
    failures: list[str] = []   # a failed or stopped run is reported; the others still count
    for round_ in range(args.repeat):
        for cache in plan:
            for mode in modes:
                if args.deadline and time.monotonic() - started > args.deadline:
                    skipped += 1
                    continue
                which, size = (twin, floor) if cache == "floor" else (folder, info)
                assert size is not None
                cmd = [sys.executable, __file__, "--child", "--mode", mode, "--cache",
                       "warm" if cache == "floor" else cache, "--folder", str(which),
                       "--device", args.device, "--tensor-bytes", str(size["tensor_bytes"])]
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                          check=False, timeout=args.run_timeout)
                except subprocess.TimeoutExpired:
                    failures.append(f"round {round_} {cache} {mode}: stopped after "
                                    f"{args.run_timeout:g} s")
                    print(failures[-1], flush=True)
                    continue
                if done.returncode:
                    failures.append(f"round {round_} {cache} {mode}: exit status "
                                    f"{done.returncode}: {done.stderr[-4000:]}")
                    print(failures[-1], flush=True)
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1]) | {"round": round_,
                                                                          "cache": cache}
                results.append(row)
                print(f"round {round_} {cache:4} {mode:24} {row['seconds']:7.2f} s "
                      f"(+{row['touch_seconds']:.2f} s first touch) "
                      f"{row['gb_per_s']:6.2f} GB/s  "
                      f"peak RSS +{row['peak_rss_above_base'] / 1e9:.2f} GB"
                      f"  peak anon +{row['peak_anon_above_base'] / 1e9:.2f} GB"
                      + (f"  peak cuda {row['peak_cuda'] / 1e9:.2f} GB" if "peak_cuda" in row
                         else "")
                      + f"  load {row['loadavg_1min']:.1f}"
                      + "  gc " + (", ".join(f"gen{g} {n}x {t:.3f} s" for g, (n, t)
                                             in sorted(row.get("gc_passes", {}).items()))
                                   or "none"), flush=True)
                for line in row.get("loader_log", []):
                    if "one engine run per device" in line:   # when it read, when asked
                        print("      " + line.split("one engine run per device: ")[-1]
                              .rstrip(")"), flush=True)
                if row.get("phases"):   # seconds summed over threads, as bench_load prints
                    print("      threads: " + ", ".join(
                        f"{k} {v:.3f}" for k, v in sorted(row["phases"].items())), flush=True)
    if skipped:
        print(f"deadline of {args.deadline:g} s passed: {skipped} runs skipped", flush=True)
    # The same model both ways: one checksum for the checkpoint's runs, one for the floor's.
    checksums = {r["checksum"] for r in results if r["cache"] != "floor"}
    floor_checksums = {r["checksum"] for r in results if r["cache"] == "floor"}
    summary: dict[str, Any] = {}
    for cache in plan:
        for mode in modes:
            rows = [r for r in results if r["cache"] == cache and r["mode"] == mode]
            if not rows:
                continue
            summary[f"{cache}/{mode}"] = {
                "seconds": C.median([r["seconds"] for r in rows]),
                "seconds_with_first_touch": C.median([r["seconds"] + r["touch_seconds"]
                                                      for r in rows]),
                "gb_per_s": C.median([r["gb_per_s"] for r in rows]),
                "peak_rss_above_base_gb": C.median([r["peak_rss_above_base"] for r in rows]) / 1e9,
                "peak_anon_above_base_gb":
                    C.median([r["peak_anon_above_base"] for r in rows]) / 1e9,
                "peak_rss_after_touch_above_base_gb":
                    C.median([r["peak_rss_after_touch_above_base"] for r in rows]) / 1e9,
                "state_ok": all(r["state_ok"] for r in rows)}
            if all("peak_cuda" in r for r in rows):
                summary[f"{cache}/{mode}"]["peak_cuda_gb"] = max(r["peak_cuda"]
                                                                 for r in rows) / 1e9
                summary[f"{cache}/{mode}"]["cuda_init_seconds"] = C.median(
                    [r["cuda_init_seconds"] for r in rows])
        if f"{cache}/stock" not in summary or f"{cache}/fastsafetensors" not in summary:
            continue
        stock, ours = summary[f"{cache}/stock"], summary[f"{cache}/fastsafetensors"]
        summary[f"{cache}/speedup"] = stock["seconds"] / ours["seconds"]
        summary[f"{cache}/speedup_with_first_touch"] = (stock["seconds_with_first_touch"]
                                                       / ours["seconds_with_first_touch"])
        if f"{cache}/fastsafetensors-ahead" in summary:
            # What reading while transformers builds the model saves, as a ratio of times.
            summary[f"{cache}/speedup_read_ahead"] = (
                ours["seconds"] / summary[f"{cache}/fastsafetensors-ahead"]["seconds"])
        if f"{cache}/fastsafetensors-on-demand" in summary:   # the same, from the other side
            summary[f"{cache}/speedup_read_ahead"] = (
                summary[f"{cache}/fastsafetensors-on-demand"]["seconds"] / ours["seconds"])
        if f"{cache}/fastsafetensors-native" in summary:
            summary[f"{cache}/speedup_native"] = (
                ours["seconds"] / summary[f"{cache}/fastsafetensors-native"]["seconds"])
        if f"{cache}/fastsafetensors-ring" in summary:
            summary[f"{cache}/speedup_ring"] = (
                ours["seconds"] / summary[f"{cache}/fastsafetensors-ring"]["seconds"])
        if f"{cache}/fastsafetensors-ring8" in summary:
            summary[f"{cache}/speedup_ring8"] = (
                ours["seconds"] / summary[f"{cache}/fastsafetensors-ring8"]["seconds"])
        if f"{cache}/fastsafetensors-torch" in summary:   # what the ring saves
            summary[f"{cache}/speedup_over_torch_calls"] = (
                summary[f"{cache}/fastsafetensors-torch"]["seconds"] / ours["seconds"])
        if f"{cache}/fastsafetensors-switch-off" in summary:   # what the shorter interval saves
            summary[f"{cache}/speedup_switch_interval"] = (
                summary[f"{cache}/fastsafetensors-switch-off"]["seconds"] / ours["seconds"])
        if f"{cache}/fastsafetensors-few-slots" in summary:   # what the ring's slots save
            summary[f"{cache}/speedup_ring_slots"] = (
                summary[f"{cache}/fastsafetensors-few-slots"]["seconds"] / ours["seconds"])
    if all(f"{c}/speedup" in summary for c in ("warm", "floor")):
        stock_bytes = summary["warm/stock"]["seconds"] - summary["floor/stock"]["seconds"]
        ours_bytes = (summary["warm/fastsafetensors"]["seconds"]
                      - summary["floor/fastsafetensors"]["seconds"])
        summary["warm/speedup_beyond_floor"] = (stock_bytes / ours_bytes if ours_bytes > 0
                                                else None)
    same = len(checksums) == 1 if results else "n/a"
    print(f"\n{info['tensor_bytes'] / 1e9:.2f} GB, {len(info['files'])} shards, device_map="
          f"{args.device!r}; medians of {args.repeat}; same model both ways: {same}")
    if floor:
        print(f"floor twin: {floor['tensors']} tensors, {floor['tensor_bytes'] / 1e6:.1f} MB; "
              f"same model both ways: {len(floor_checksums) == 1 if floor_checksums else 'n/a'}")
    for key, value in summary.items():
        if "speedup" in key:
            print(f"  {key:36} " + ("n/a" if value is None else f"{value:.2f}x"))
        else:
            print(f"  {key:36} {value['seconds']:7.2f} s "
                  f"({value['seconds_with_first_touch']:.2f} s with first touch) "
                  f"{value['gb_per_s']:6.2f} GB/s  "
                  f"peak RSS +{value['peak_rss_above_base_gb']:.2f} GB "
                  f"(+{value['peak_rss_after_touch_above_base_gb']:.2f} GB after first touch)  "
                  f"peak anon +{value['peak_anon_above_base_gb']:.2f} GB"
                  + (f"  peak cuda {value['peak_cuda_gb']:.2f} GB (highest round)"
                     f"  CUDA init before the clock {value['cuda_init_seconds']:.2f} s"
                     if "peak_cuda_gb" in value else ""))
    if args.json:
        import transformers

        Path(args.json).write_text(json.dumps({
            "machine": C.machine(), "filesystem": C.filesystem(str(folder)),
            "transformers": transformers.__version__, "device_map": args.device,
            "checkpoint": info, "same_model_both_ways": len(checksums) == 1,
            "floor": floor, "same_floor_model_both_ways": len(floor_checksums) == 1,
            "runs_skipped_at_deadline": skipped, "failures": failures,
            "summary": summary, "runs": results}, indent=2))
    if failures:
        sys.exit(f"{len(failures)} runs failed (above); the summary covers the others")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
