"""Per-tensor cost of the device streaming engine itself, without a device.

The engine (fastsafetensors/loader/stream.py) runs a planner thread, reader threads and the
caller's generator; each tensor costs Python work in all three (allocation, chunk pieces,
completion, hand-over). This runs the engine over one warm file of many small tensors with a
host-memory sink whose copies are plain synchronous memcpys, so what is timed is the engine's
own overhead plus those copies: the floor under a GPU load of the same file, where each tensor
also costs a device allocation, a copy launch and event calls. Two sinks, loads interleaved:
one that takes runs of small tensors in one allocation (``finisher``, as the CUDA sink does
with ``small_tensor_groups="on"``), and one that allocates each tensor alone.

    python benchmarks/bench_engine_overhead.py --tensors 20000 --threads 1 2 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from fastsafetensors import gcpause  # noqa: E402
from fastsafetensors.format import TensorInfo  # noqa: E402
from fastsafetensors.frameworks.torch import TORCH, torch_dtype, torch_shape  # noqa: E402
from fastsafetensors.loader.cuda import copy_pieces  # noqa: E402
from fastsafetensors.loader.posix import DIRECT_ALIGN  # noqa: E402
from fastsafetensors.loader.stream import StreamOptions, stream_tensors  # noqa: E402


class HostSink:
    """The Sink protocol on host memory: no streams, no events, synchronous copies."""

    def enter_thread(self) -> None:
        pass

    def alloc(self, info: TensorInfo) -> Any:
        return torch.empty(info.nbytes, dtype=torch.uint8)

    def staging(self, nbytes: int) -> tuple[Any, memoryview]:
        raw = torch.empty(nbytes + DIRECT_ALIGN, dtype=torch.uint8)
        skip = -raw.data_ptr() % DIRECT_ALIGN
        buffer = raw[skip:skip + nbytes]
        return buffer, buffer.numpy().data.cast("B")

    def release_staging(self, buffer: Any) -> None:
        pass

    def alloc_event(self) -> None:
        return None

    def new_stream(self) -> None:
        return None

    def stream_wait(self, stream: Any, event: Any) -> None:
        pass

    def copy(self, stream: Any, src: Any, pieces: list[tuple[Any, int, int, int]]) -> None:
        copy_pieces(src, pieces, torch.device("cpu"))   # as the CUDA sink: small ones in runs

    def record(self, stream: Any) -> None:
        return None

    def host_wait(self, event: Any) -> None:
        pass

    def consumer_wait(self, events: list[Any]) -> None:
        pass

    def finish(self, flat: Any, info: TensorInfo) -> Any:
        dtype, shape = torch_dtype(info.dtype, info.name), torch_shape(info)
        if flat is None:
            return torch.empty(shape, dtype=dtype)
        typed = flat.view(dtype)
        return typed if len(shape) == 1 else typed.view(shape)   # as the CUDA sink


class GroupingHostSink(HostSink):
    """HostSink that takes runs of small tensors in one allocation, as the CUDA sink does."""

    def finisher(self, block: Any) -> Any:
        return TORCH.strided_viewer(block)   # as the CUDA sink


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=20_000)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 8])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default=None,
                    help="where the file is written (default: <temp dir>/fastsafetensors-bench)")
    args = ap.parse_args()
    folder = C.bench_dir(args.dir)
    path = folder / f"many-{args.tensors}.safetensors"
    info = C.build_many(path, args.tensors)
    C.warm([str(path)])
    print(f"{info['count']} tensors, {info['tensor_bytes'] / 1e6:.0f} MB, warm; median of "
          f"{args.repeat}")
    # Interleaved, one load of each sink in turn, with the garbage collector paused as load()
    # and load_file() pause it.
    sinks = {"grouped (small_tensor_groups=on)": GroupingHostSink, "one allocation each": HostSink}
    for threads in args.threads:
        times: dict[str, list[float]] = {name: [] for name in sinks}
        cpu: dict[str, list[float]] = {name: [] for name in sinks}
        for _ in range(args.repeat):
            for name, sink in sinks.items():
                with gcpause.paused():
                    cpu0 = os.times()
                    started = time.perf_counter()
                    count = sum(1 for _ in stream_tensors(
                        [(str(path), None, None)], sink(),
                        StreamOptions(threads=threads, staging_bytes=256 << 20,
                                      small_tensor_groups=True)))
                    times[name].append(time.perf_counter() - started)
                    cpu1 = os.times()
                cpu[name].append(cpu1.user - cpu0.user + cpu1.system - cpu0.system)
                assert count == info["count"]
        for name in sinks:
            median = statistics.median(times[name])
            # CPU time of all threads moves much less than wall time on a shared machine.
            print(f"  threads={threads:<3} {median * 1e3:7.0f} ms  "
                  f"{median / count * 1e6:5.1f} us per tensor, CPU "
                  f"{statistics.median(cpu[name]) / count * 1e6:5.1f} us per tensor  {name}")


if __name__ == "__main__":
    main()
