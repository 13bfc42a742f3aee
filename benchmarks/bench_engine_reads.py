"""The streaming engine's reads alone, against raw reads of the same files, without a GPU.

The GPU engine (fastsafetensors/loader/stream.py) reads each chunk into staging and hands it to
a device sink. Here the sink copies nothing and allocates nothing, so what is timed is the
reading pipeline itself (planner, residency lookups, buffered or O_DIRECT reads by the reader
threads, hand-over) against ``preadv`` of the same spans into one reused buffer, O_DIRECT or
buffered, with as many threads. If the engine keeps up with the raw read here, a gap on a GPU
machine lies in what a device load adds (pinning, device allocation, copies), not in the reads.
Staging is kept across loads (made before the clock), or fresh in every load (what a first
load pays for its staging memory).

    python benchmarks/bench_engine_reads.py --size-gb 2 --modes cold --threads 4 8 16

It also prints the CPU time of each case per chunk (the process's, all threads): with small
chunks (``--staging-mib 2 --threads 1 2``) the engine's own work around a chunk stands out
against the bare loop's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_engine_overhead import HostSink  # noqa: E402

from fastsafetensors.format import TensorInfo  # noqa: E402
from fastsafetensors.loader.stream import StreamOptions, stream_tensors  # noqa: E402


class NullSink(HostSink):
    """Reads land in staging and go nowhere: no device memory, no copies. With ``kept``, staging
    buffers are kept across loads, touched once (as torch's pinned cache keeps pinned blocks);
    without, each load's readers get fresh memory (the CPU's counterpart of pinning new memory
    in a process's first load to a GPU)."""

    pool: dict[int, list[tuple[Any, memoryview]]] = {}

    def __init__(self, kept: bool) -> None:
        self.kept = kept
        self.lent: list[tuple[Any, memoryview]] = []

    def staging(self, nbytes: int) -> tuple[Any, memoryview]:
        if not self.kept:
            return super().staging(nbytes)
        free = self.pool.setdefault(nbytes, [])
        buffer = free.pop() if free else None
        if buffer is None:
            buffer = super().staging(nbytes)
            buffer[0].fill_(0)
        self.lent.append(buffer)
        return buffer

    def release_staging(self, buffer: Any) -> None:
        for lent in self.lent:
            if lent[0] is buffer:
                self.pool[len(lent[1])].append(lent)

    def alloc(self, info: TensorInfo) -> Any:
        return None

    def copy(self, stream: Any, src: Any, pieces: list[tuple[Any, int, int, int]]) -> None:
        pass

    def finish(self, flat: Any, info: TensorInfo) -> Any:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--dir", default=None, help="checkpoint folder (built there if missing)")
    ap.add_argument("--modes", default="cold,warm")
    ap.add_argument("--threads", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--io", choices=("auto", "buffered", "direct"), default="auto")
    ap.add_argument("--staging-mib", type=int, default=256,
                    help="the engine's staging in all (two buffers a thread); the raw reads "
                         "read chunks of one buffer's size")
    args = ap.parse_args()
    folder = Path(args.dir or Path(tempfile.gettempdir()) / "fastsafetensors-bench"
                  / f"llama-{args.size_gb:g}gb")
    info = C.build_checkpoint(folder, args.size_gb)
    files = [str(folder / f) for f in info["files"]]
    spans = C.data_spans(files)
    total = sum(s.size for s in spans)
    reused = C.AnonBuffer(max(s.size for s in spans) + 2 * C.DIRECT_ALIGN)
    for off in range(0, reused.size, C.PAGE):   # touched once: no page faults in the rounds
        reused.view[off] = 1
    buffers = [reused.view for _ in spans]

    def options(threads: int) -> StreamOptions:
        return StreamOptions(threads=threads, staging_bytes=args.staging_mib << 20, io=args.io)

    def engine(threads: int, kept: bool) -> None:
        for _ in stream_tensors([(f, None, None) for f in files], NullSink(kept),
                                options(threads)):
            pass

    def raw(threads: int, direct: bool) -> None:
        C.raw_read(spans, threads=threads, chunk=options(threads).buffer_bytes, direct=direct,
                   buffers=buffers, fresh=None)

    cases: dict[str, Any] = {}
    chunks: dict[str, int] = {}
    for t in args.threads:
        size = options(t).buffer_bytes
        for name, run in ((f"raw O_DIRECT, {t} thr", lambda t=t: raw(t, True)),
                          (f"raw buffered, {t} thr", lambda t=t: raw(t, False)),
                          (f"engine, kept staging, {t} thr", lambda t=t: engine(t, True)),
                          (f"engine, fresh staging, {t} thr", lambda t=t: engine(t, False))):
            cases[name] = run
            # As many chunks for each (the engine's may also end at a file's end).
            chunks[name] = sum(-(-s.size // size) for s in spans)
    modes = [m for m in ("cold", "warm") if m in args.modes.split(",")]
    got: dict[tuple[str, str], list[float]] = {(m, k): [] for m in modes for k in cases}
    cpu: dict[tuple[str, str], list[float]] = {(m, k): [] for m in modes for k in cases}
    for _ in range(args.repeat):
        for mode in modes:
            for name, run in cases.items():   # interleaved: round r of every case, then r + 1
                if "kept" in name and not NullSink.pool:
                    run()   # the kept staging is made (and touched) before the clock
                C.prepare(files, mode)
                started, cpu_started = time.perf_counter(), time.process_time()
                run()
                got[(mode, name)].append(total / 1e9 / (time.perf_counter() - started))
                cpu[(mode, name)].append((time.process_time() - cpu_started) / chunks[name])
    print(f"{total / 1e9:.2f} GB in {len(files)} files, engine io={args.io}; GB/s per round, "
          f"median last")
    for (mode, name), values in got.items():
        print(f"  {mode:4} {name:31} " + " ".join(f"{v:5.2f}" for v in values)
              + f"   median {statistics.median(values):5.2f}, CPU "
              f"{statistics.median(cpu[(mode, name)]) * 1e6:.1f} us a chunk "
              f"({chunks[name]} chunks)")
    reused.close()


if __name__ == "__main__":
    main()
