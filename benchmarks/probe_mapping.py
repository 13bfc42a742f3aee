"""Why transformers' table of key renamings takes longer on the GPU machine than on the CPU VM.

``get_model_conversion_mapping`` builds, once per process, a table of renamings and converters
for every model family transformers knows (1,173 ``WeightTransform`` objects in 5.23). With our
regular expressions compiled lazily (``integrations/_transformers_mapping.py``) the build took
0.03-0.04 s on the 2-core CPU VM (Python 3.11 and 3.12), against 0.19-0.27 s inside
``from_pretrained(device_map="cuda")`` on the H200 machine (runs 8-11); stock's, which compiles
every expression, 0.10-0.13 s against 0.35 s. py-spy (run 11) put the time in a one-line sort
key, which cannot take it: something else stalls the thread there.

Each case builds the table in a fresh process and prints the build's wall time beside the
thread's own CPU time, page faults and context switches (``RUSAGE_THREAD``) and the garbage
collector's passes and time, so that a slow CPU, a thread kept off the CPU, and the collector
can be told apart. Cases: CUDA initialised first or not, expressions compiled lazily (ours) or
not (stock), the collector off, and a load of ``--dir`` on a thread beside the build (what
``from_pretrained`` does with our loader).

    python benchmarks/probe_mapping.py [--dir CHECKPOINT] [--device cuda:0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CASES = ("plain", "lazy", "cuda", "cuda-lazy", "cuda-nogc", "cuda-lazy-nogc", "cuda-lazy-load",
         "cuda-lazy-load-nogc")


def _usage() -> dict[str, float]:
    import resource

    u = resource.getrusage(resource.RUSAGE_THREAD)
    return {"cpu": u.ru_utime + u.ru_stime, "sys": u.ru_stime, "minflt": u.ru_minflt,
            "majflt": u.ru_majflt, "vcsw": u.ru_nvcsw, "ivcsw": u.ru_nivcsw}


def child(case: str, folder: str | None, device: str) -> dict[str, object]:
    import gc
    import re
    import threading

    import torch
    from transformers import conversion_mapping, core_model_loading

    if "cuda" in case:
        torch.cuda.init()
        torch.empty(1, device=device)
    if "lazy" in case:
        from fastsafetensors.integrations import _transformers_mapping as mapping

        core_model_loading.re = mapping.lazy_re(lambda: True)  # type: ignore[attr-defined]
    passes = {0: 0, 1: 0, 2: 0}
    gc_seconds = [0.0]
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            passes[info["generation"]] += 1
            gc_seconds[0] += time.perf_counter() - started[0]

    # The CPU's own speed, the same work everywhere: expressions compiled afresh.
    t = time.perf_counter()
    re.purge()
    for n in range(300):
        re.compile(rf"model\.layers\.(\d+)\.mlp\.experts\.{n}\.(gate|up)_proj\.weight$")
    reference = time.perf_counter() - t
    re.purge()

    loaded: dict[str, float] = {}
    beside = None
    if "load" in case and folder:
        import fastsafetensors

        def load() -> None:
            t0 = time.perf_counter()
            tensors = fastsafetensors.load(folder, device=device)
            torch.cuda.synchronize()
            loaded["seconds"] = time.perf_counter() - t0
            loaded["bytes"] = sum(x.numel() * x.element_size() for x in tensors.values())

        beside = threading.Thread(target=load)
    if "nogc" in case:
        gc.disable()
    objects = len(gc.get_objects())
    gc.callbacks.append(on_gc)
    if beside is not None:
        beside.start()
    before = _usage()
    t = time.perf_counter()
    conversion_mapping._build_checkpoint_conversion_mapping()
    wall = time.perf_counter() - t
    after = _usage()
    gc.callbacks.remove(on_gc)
    t = time.perf_counter()
    conversion_mapping._build_checkpoint_conversion_mapping()
    again = time.perf_counter() - t
    if beside is not None:
        beside.join()
    return {"case": case, "python": sys.version.split()[0], "build_s": wall, "again_s": again,
            "reference_s": reference, "objects": objects, "gc_passes": passes,
            "gc_s": gc_seconds[0], **{k: after[k] - before[k] for k in before}, "load": loaded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="a checkpoint to load beside the build (the -load cases)")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dir, args.device)))
        return
    import torch

    have_cuda = torch.cuda.is_available()
    rows = []
    for case in args.cases.split(","):
        if ("cuda" in case and not have_cuda) or ("load" in case and not args.dir):
            print(f"{case:22} skipped (no CUDA or no --dir)")
            continue
        cmd = [sys.executable, __file__, "--child", case, "--device", args.device]
        if args.dir:
            cmd += ["--dir", args.dir]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                  env=os.environ)
        except subprocess.TimeoutExpired:
            print(f"{case:22} stopped after {args.timeout:.0f} s")
            continue
        if done.returncode != 0:
            print(f"{case:22} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        load = row["load"]
        beside = (f"  load beside {load['bytes'] / load['seconds'] / 1e9:.1f} GB/s"
                  if load else "")
        print(f"{case:22} build {row['build_s']:.3f} s (again {row['again_s']:.3f})  "
              f"thread cpu {row['cpu']:.3f} s (sys {row['sys']:.3f})  "
              f"faults {row['minflt']}  switches {row['vcsw']}+{row['ivcsw']} forced  "
              f"gc {row['gc_passes']} {row['gc_s']:.3f} s  objects {row['objects']}  "
              f"reference {row['reference_s']:.3f} s{beside}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"python": sys.version, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
