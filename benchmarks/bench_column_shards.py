"""Column shards: what a tensor-parallel rank reads of a row-major matrix split along its columns.

Such a shard is one run of bytes per row (8,192 rows of 2 KiB for a TP=8 rank of an 8192 x 8192
bf16 matrix), read with one positioned read each: the per-read cost decides the speed. This
compares, interleaved in one process on one warm file:

- ``pread_runs``: the package's loop for strided reads (what ``get_slice(name)[:, a:b]`` uses);
- ``pread_into`` per run: the general read helper called once per run (the loop the package
  used before ``pread_runs``);
- ``get_slice``: the whole public call, fresh memory and tensor creation included;
- the whole tensor with ``fsf[name]``, for scale.

    python benchmarks/bench_column_shards.py --rows 8192 --cols 8192 --shards 8 --repeat 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import fastsafetensors  # noqa: E402
from fastsafetensors.loader.posix import pread_into, pread_runs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--shards", type=int, nargs="+", default=[8, 2])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--dir", default=None,
                    help="where the file is written (default: <temp dir>/fastsafetensors-bench)")
    args = ap.parse_args()
    folder = C.bench_dir(args.dir)
    path = folder / f"matrix-{args.rows}x{args.cols}.safetensors"
    if not path.exists():
        save_file({"w": torch.randn(args.rows, args.cols).bfloat16()}, str(path))
    with fastsafetensors.FastSafetensorsFile(path) as fsf:
        fsf["w"]   # warm
        print(f"{args.rows} x {args.cols} bf16 ({args.rows * args.cols * 2 / 1e6:.0f} MB), "
              f"warm; median (min) of {args.repeat} interleaved rounds")
        for shards in args.shards:
            _time_split(fsf, str(path), args.rows, args.cols, shards, args.repeat)


def _time_split(fsf: fastsafetensors.FastSafetensorsFile, path: str, rows: int, cols: int,
                shards: int, repeat: int) -> None:
    base = fsf.header.data_start
    row = cols * 2
    width = row // shards
    runs = [(r * row, width) for r in range(rows)]
    dest = memoryview(bytearray(rows * width))
    fd = os.open(path, os.O_RDONLY)

    def per_call() -> None:
        at = 0
        for offset, length in runs:
            pread_into(fd, dest[at:at + length], base + offset, path=path)
            at += length

    cases = {
        "pread_runs": lambda: pread_runs(fd, dest, runs, base, path=path),
        "pread_into per run": per_call,
        "get_slice (public call)": lambda: fsf.get_slice("w")[:, :cols // shards],
        "whole tensor fsf[name]": lambda: fsf["w"],
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for _ in range(repeat):
            for name, case in cases.items():
                started = time.perf_counter()
                case()
                times[name].append(time.perf_counter() - started)
    finally:
        os.close(fd)
    print(f"  1/{shards} of the columns: {rows} runs of {width} bytes "
          f"({rows * width / 1e6:.1f} MB)")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        nbytes = rows * (row if name.startswith("whole") else width)
        print(f"    {name:<26} {median * 1e3:7.1f} ms ({min(seconds) * 1e3:6.1f})  "
              f"{nbytes / 1e9 / median:5.2f} GB/s")


if __name__ == "__main__":
    main()
