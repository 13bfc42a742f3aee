#!/usr/bin/env python
"""Loading overlapped with download: ``fastsafetensors.hub.stream`` against download-then-load.

A loopback Hub (tests/hub_server.py: the Hub and its CDN on 127.0.0.1, files served from disk)
with a bandwidth cap serves a synthetic bf16 checkpoint in shards. Each round measures, every
time into a fresh, empty Hugging Face cache in a temporary folder:

* download: ``fastsafetensors.resolve(repo)``, every shard fetched through huggingface_hub;
* load: every shard of that cache loaded into host memory (warm page cache, as right after a
  download) with the threaded CPU loader;
* download then load: the sum of the two;
* overlapped: ``stream(repo)`` consumed, each shard loaded as soon as it is on disk while later
  ones still download (``max_downloads`` at a time).

The figure of merit is overlapped / max(download, load): 1.0 is perfect overlap, 1.15 the target.

    python benchmarks/bench_hub_overlap.py --size-mb 600 --shards 6 --bandwidth-mb 200

MB = 1e6 bytes. Nothing here asserts; medians of ``--repeat`` rounds are printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from hub_server import HubServer, hf_pointed_at  # noqa: E402

import fastsafetensors  # noqa: E402
from fastsafetensors import hub  # noqa: E402
from fastsafetensors.frameworks import get_framework  # noqa: E402
from fastsafetensors.loader.cpu import close_job, load_host, open_job  # noqa: E402


def make_checkpoint(folder: Path, size: int, shards: int) -> None:
    """``shards`` files of bf16 matrices adding up to about ``size`` bytes, and their index."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    per_shard = size // shards
    rows, cols = 1024, 2048                      # 4 MiB of bf16 per matrix
    per_matrix = rows * cols * 2
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    layer = 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for _ in range(max(1, per_shard // per_matrix)):
            tensors[f"model.layers.{layer}.mlp.weight"] = torch.randn(
                rows, cols, generator=gen).to(torch.bfloat16)
            tensors[f"model.layers.{layer}.norm.weight"] = torch.ones(cols)
            layer += 1
        save_file(tensors, str(folder / name))
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


def load_shard(path: str, names: list[str] | None) -> int:
    job = open_job(path, names)
    try:
        (tensors,) = load_host([job], get_framework("pt"))
    finally:
        close_job(job)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def one_round(server: HubServer, repo: str, scratch: Path, round_no: int,
              max_downloads: int) -> dict[str, float]:
    with hf_pointed_at(server.url, scratch / f"a{round_no}"):
        download, ckpt = timed(lambda: hub.resolve(repo, max_downloads=max_downloads))
        load, nbytes = timed(lambda: sum(load_shard(p, n) for p, n in ckpt.wanted().items()))
    assert nbytes == ckpt.total_bytes

    def overlapped() -> int:
        return sum(load_shard(path, names)
                   for path, _, names in hub.stream(repo, max_downloads=max_downloads))

    with hf_pointed_at(server.url, scratch / f"b{round_no}"):
        both, loaded = timed(overlapped)
    assert loaded == nbytes
    shutil.rmtree(scratch)  # each round starts from empty caches
    return {"download": download, "load": load, "download_then_load": download + load,
            "overlapped": both, "ratio": both / max(download, load), "bytes": float(nbytes)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=600)
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--bandwidth-mb", type=float, default=200.0,
                        help="link cap, MB/s (0: none)")
    parser.add_argument("--max-downloads", type=int, nargs="+", default=[4, 2, 1])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="write the rounds here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp:
        scratch = Path(tmp)
        make_checkpoint(scratch / "src", args.size_mb * 1_000_000, args.shards)
        size = sum(p.stat().st_size for p in (scratch / "src").glob("*.safetensors"))
        print(f"fastsafetensors {fastsafetensors.__version__}, {platform.platform()}, "
              f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
        cap = (f"link cap {args.bandwidth_mb:.0f} MB/s (download floor "
               f"{size / 1e6 / args.bandwidth_mb:.2f} s)" if args.bandwidth_mb else "no link cap")
        print(f"checkpoint: {size / 1e6:.0f} MB in {args.shards} shards; {cap}; medians of "
              f"{args.repeat} rounds")
        print(f"{'max_downloads':>13} {'download s':>10} {'load s':>7} {'dl+load s':>9} "
              f"{'overlap s':>9} {'overlap/max':>11} {'(dl+load)/max':>13}")
        results: dict[int, list[dict[str, float]]] = {}
        with HubServer(bandwidth=args.bandwidth_mb * 1e6 or None) as server:
            server.add_folder("bench/model", scratch / "src")
            one_round(server, "bench/model", scratch / "warmup", 0, 4)  # imports, first calls
            for workers in args.max_downloads:
                rounds = [one_round(server, "bench/model", scratch / f"w{workers}", r, workers)
                          for r in range(args.repeat)]
                results[workers] = rounds
                med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
                print(f"{workers:>13} {med['download']:>10.2f} {med['load']:>7.2f} "
                      f"{med['download_then_load']:>9.2f} {med['overlapped']:>9.2f} "
                      f"{med['ratio']:>11.3f} "
                      f"{med['download_then_load'] / max(med['download'], med['load']):>13.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps({str(k): v for k, v in results.items()},
                                                  indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
