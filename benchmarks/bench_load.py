#!/usr/bin/env python
"""Load benchmark: this package against the limits of the machine, safetensors and its peers.

One run measures, side by side and interleaved (round r of every case before round r + 1, so a
noisy neighbour hurts all cases alike), warm (files in the page cache) and cold (evicted with
fdatasync + POSIX_FADV_DONTNEED, checked with mincore):

* limit A: raw ``preadv`` into one reused, already touched buffer (page cache or disk limit);
* limit B: raw ``preadv`` into freshly allocated memory (what a loader returning tensors it owns
  can reach: first-touch page faults are part of it);
* O_DIRECT raw reads (reused and fresh aligned buffers): the cold disk limit;
* ``safetensors.torch.load_file`` + touching every page, and + ``.clone()`` of every tensor
  (``load_file`` alone is a lazy mmap and is never reported as loaded);
* ``fastsafetensors.load_file`` with io auto / buffered / direct (and ``fastsafetensors.load``
  when it exists);
* peers, when they install: upstream fastsafetensors, InstantTensor (CUDA only), Run:ai model
  streamer, each installed with ``pip install --target`` into its own folder;
* with CUDA: the pinned host-to-device copy limit and every loader with ``device="cuda:0"``.

Every case runs in its own child process (peak RSS per loader; the upstream package has our
import name), which evicts or warms the files itself right before each timed run. A last child
measures the per-tensor overhead on a file of 20,000 small tensors.

    python benchmarks/bench_load.py --size-gb 2 --repeat 3 --json out.json

GB = 1e9 bytes. Ratios and GB/s only: nothing here asserts.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import queue
import random
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

MARK = "@@bench@@ "
# fastsafetensors' largest default staging_bytes (config.py: Python readers; the ring's is
# 128 MiB). The parent process never imports the package: upstream, a peer, has the same
# import name.
STAGING_DEFAULT = 256 * C.MiB
HERE = Path(__file__).resolve()

# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str            # key in the JSON
    label: str           # row of the table
    group: str           # limit | reference | safetensors | ours | peer
    kind: str            # which runner the child builds
    params: dict[str, Any] = field(default_factory=dict)
    peer: str | None = None           # folder under --peers-dir for PYTHONPATH
    env: dict[str, str] = field(default_factory=dict)
    modes: tuple[str, ...] = ("warm", "cold")


PEERS = {
    # name: (pip requirement, extra light dependencies, import name)
    "upstream": ("fastsafetensors", ["typer"], "fastsafetensors"),
    "instanttensor": ("instanttensor", [], "instanttensor"),
    "runai": ("runai-model-streamer", ["humanize"], "runai_model_streamer"),
}


def make_cases(args: argparse.Namespace, cuda: bool) -> list[Case]:
    threads = sorted({1, 2, args.threads})
    cases: list[Case] = []
    # On a GPU machine also 16 threads: whether reading the page cache scales past the
    # engine's 8 readers there, or the host copy itself is the limit.
    for t in sorted(set(threads) | ({16} if cuda else set())):
        cases.append(Case(f"raw_reused_t{t}", f"limit A: preadv, reused buffer, {t} thr",
                          "limit", "raw", {"threads": t, "fresh": False, "direct": False}))
    for t in threads:
        cases.append(Case(f"raw_fresh_t{t}", f"limit B: preadv, fresh memory, {t} thr",
                          "limit", "raw", {"threads": t, "fresh": True, "direct": False}))
    for t in sorted({2, args.threads}):
        cases.append(Case(f"raw_fresh_huge_t{t}",
                          f"limit B: preadv, fresh + MADV_HUGEPAGE, {t} thr",
                          "limit", "raw", {"threads": t, "fresh": True, "direct": False,
                                           "huge": True}))
    for t in sorted({2, args.threads}):
        cases.append(Case(f"direct_reused_t{t}", f"O_DIRECT, reused buffer, {t} thr",
                          "limit", "raw", {"threads": t, "fresh": False, "direct": True}))
        cases.append(Case(f"direct_fresh_t{t}", f"O_DIRECT, fresh memory, {t} thr",
                          "limit", "raw", {"threads": t, "fresh": True, "direct": True}))
    cases.append(Case("st_touch", "safetensors load_file + touch pages", "safetensors",
                      "st", {"how": "touch"}))
    cases.append(Case("st_clone", "safetensors load_file + clone", "safetensors", "st",
                      {"how": "clone"}))
    for io in ("auto", "buffered", "direct"):
        cases.append(Case(f"fst_{io}", f"fastsafetensors.load_file io={io}", "ours", "fst",
                          {"io": io}))
    cases.append(Case("fst_load", "fastsafetensors.load (checkpoint)", "ours", "fst_load", {}))
    if not args.no_peers:
        cases.append(Case("upstream_default", "upstream fastsafetensors (default: O_DIRECT)",
                          "peer", "upstream", {}, peer="upstream"))
        cases.append(Case("upstream_buffered", "upstream fastsafetensors ODIRECT=0", "peer",
                          "upstream", {}, peer="upstream", env={"FASTSAFETENSORS_ODIRECT": "0"}))
        cases.append(Case("runai", "Run:ai model streamer", "peer", "runai", {}, peer="runai"))
        cases.append(Case("instanttensor", "InstantTensor default -> cuda" if cuda else
                          "InstantTensor (CUDA only)", "peer", "instanttensor",
                          {"backend": "default", "device": "cuda:0"}, peer="instanttensor"))
    if cuda:
        dev = "cuda:0"
        cases.append(Case("h2d_pinned", "limit: pinned host-to-device copy (2 GiB buffer)", "limit",
                          "h2d", {}, modes=("warm",)))
        cases.append(Case("st_cuda", "safetensors load_file(device=cuda:0)", "safetensors",
                          "st", {"how": "device", "device": dev}))
        cases.append(Case("fst_cuda", "fastsafetensors.load_file(device=cuda:0)", "ours",
                          "fst", {"device": dev}))
        for io in ("buffered", "direct"):   # the fixed modes io="auto" must keep up with
            cases.append(Case(f"fst_cuda_{io}", f"fastsafetensors.load_file(cuda:0) io={io}",
                              "ours", "fst", {"device": dev, "io": io}))
        # Warm-only tuning rows: would another setting than the defaults (the ring's 12 C
        # readers to a GPU since the eighteenth session, 8 Python readers with torch's calls
        # before; 128 MiB of staging through the ring since the twenty-first session, 256
        # before and for Python readers; no mapped readers) be faster on this machine? Rows
        # that name their windows set the staging they were first measured with. The first
        # run of each is a fresh process's first load (pinned staging allocated); a second
        # reuses what torch's pinned-memory cache kept. Rows earlier runs settled are gone, to leave
        # the time to new ones: blocking event waits, 16 threads and 1 GiB of staging (two
        # H200 runs), 4 threads and 128 MiB of staging (slower than the default on the H100
        # machine: 12.92 and 16.34 against 19.20 GB/s), 16 threads with 8 or 16 mapped readers
        # (14.20 and 10.96 against 20.11 GB/s without mapped readers, same run).
        def env(threads: int = 0, calls: str = "", staging_mib: int = 0,
                **other: str) -> dict[str, str]:
            """The options of a tuning row, as the environment of its child (each row names
            what it changes from the defaults it was first measured with: cuda_calls="torch"
            until the eighteenth session)."""
            out = {f"FASTSAFETENSORS_{name.upper()}": value for name, value in other.items()}
            if threads:
                out["FASTSAFETENSORS_THREADS"] = str(threads)
            if calls:
                out["FASTSAFETENSORS_CUDA_CALLS"] = calls
            if staging_mib:
                out["FASTSAFETENSORS_STAGING_BYTES"] = str(staging_mib << 20)
            return out

        for key, label, options in (
                ("m4", "mapped_readers=4 (half the readers copy from the page cache)",
                 env(calls="torch", mapped_readers="4")),
                ("m8", "mapped_readers=8 (every cached chunk from the page cache)",
                 env(calls="torch", mapped_readers="8")),
                ("huge", "huge_pages=on (staging on registered huge pages)",
                 env(calls="torch", huge_pages="on")),
                ("t16huge", "threads=16, huge_pages=on", env(16, "torch", huge_pages="on")),
                # Copies, events and stream waits through the CUDA driver with the GIL held
                # (loader/driver.py): do the readers' waits for the GIL limit them?
                ("driver", "cuda_calls=driver (copies, events, waits: GIL held)",
                 env(calls="driver")),
                ("t16driver", "threads=16, cuda_calls=driver", env(16, "driver")),
                # A staged chunk's wait, read, copies and event in one C call without the GIL
                # (loader/native.py): one GIL hand-over per chunk, not five or more.
                ("native", "cuda_calls=native (a chunk's wait, read, copies: one C call)",
                 env(calls="native")),
                ("t12native", "threads=12, cuda_calls=native", env(12, "native")),
                ("t16native", "threads=16, cuda_calls=native", env(16, "native")),
                # Smaller staging buffers (2 or 4 MiB a buffer, not 16): does a chunk the copy
                # engine reads soon after the read wrote it come from the CPU's cache rather
                # than from memory, and leave the reads more memory bandwidth? Native calls
                # keep the cost of the many more chunks low.
                ("s32", "staging_bytes=32 MiB (2 MiB buffers)",
                 env(calls="torch", staging_mib=32)),
                ("native_s32", "cuda_calls=native, staging_bytes=32 MiB (2 MiB buffers)",
                 env(calls="native", staging_mib=32)),
                ("native_s64", "cuda_calls=native, staging_bytes=64 MiB (4 MiB buffers)",
                 env(calls="native", staging_mib=64)),
                ("t16native_s64", "threads=16, cuda_calls=native, staging_bytes=64 MiB "
                 "(2 MiB buffers)", env(16, "native", 64)),
                ("t16native_s128", "threads=16, cuda_calls=native, staging_bytes=128 MiB "
                 "(4 MiB buffers)", env(16, "native", 128)),
                # More readers with buffers of 16 or 32 MiB (H200 run 5's follow-ups: 12-16
                # readers with 32 MiB buffers loaded 1.1-1.5x faster once their staging was
                # pinned, but a first load, which pins it, ran slower): which of them is
                # faster in a process's first load too, the row's first round?
                ("t12_s384", "threads=12, staging_bytes=384 MiB (16 MiB buffers)",
                 env(12, "torch", 384)),
                ("t12native_s384", "threads=12, cuda_calls=native, staging_bytes=384 MiB "
                 "(16 MiB buffers)", env(12, "native", 384)),
                ("t16native_s512", "threads=16, cuda_calls=native, staging_bytes=512 MiB "
                 "(16 MiB buffers)", env(16, "native", 512)),
                ("t16native_s1g", "threads=16, cuda_calls=native, staging_bytes=1 GiB "
                 "(32 MiB buffers)", env(16, "native", 1024)),
                # No Python reader threads (loader/ring.py): C readers fill a ring of pinned
                # windows (about two per reader, in the largest power of two within
                # staging_bytes), one C thread queues their copies in order on one stream,
                # InstantTensor's shape; the sketch rows below are the same with no engine.
                ("ring", "threads=8, cuda_calls=ring (8 C readers, 16 windows of 16 MiB)",
                 env(8, "ring", 256)),
                ("ring_s128", "threads=8, cuda_calls=ring, staging_bytes=128 MiB (8 C "
                 "readers, 16 windows of 8 MiB)", env(8, "ring", 128)),
                # Windows of chunk_bytes (eighteenth session): on the H200 machine 8 MiB
                # windows (ring_s128, t12ring) ran faster than 16 MiB ones (ring).
                ("ring_c8", "threads=8, cuda_calls=ring, chunk_bytes=8 MiB (8 C readers, 32 "
                 "windows of 8 MiB)", env(8, "ring", 256, chunk_bytes=str(8 << 20))),
                ("ring_c4", "threads=8, cuda_calls=ring, chunk_bytes=4 MiB (8 C readers, 64 "
                 "windows of 4 MiB)", env(8, "ring", 256, chunk_bytes=str(4 << 20))),
                ("ring_s128_c4", "threads=8, cuda_calls=ring, staging_bytes=128 MiB, "
                 "chunk_bytes=4 MiB (8 C readers, 32 windows of 4 MiB)",
                 env(8, "ring", 128, chunk_bytes=str(4 << 20))),
                # The default before the eighteenth session: 8 Python readers, torch's calls
                # (the default row is the ring with 12 C readers since).
                ("torch", "cuda_calls=torch (8 Python readers)", env(calls="torch")),
                # The ring's default before the twenty-first session; 128 MiB (the default
                # since) beat it in H200 runs 8 and 10 (1.07x, 1.23x).
                ("s256", "staging_bytes=256 MiB (12 C readers, 32 windows of 8 MiB)",
                 env(staging_mib=256)),
                # Do windows of 2 MiB, which stay in the CPU's cache longer, do better still?
                ("s64", "staging_bytes=64 MiB (12 C readers, 32 windows of 2 MiB)",
                 env(staging_mib=64)),
                # 64 MiB beat 128 in H200 run 11 (35.3 GB/s against 27.6): is it the smaller
                # footprint (the same 64 MiB in 16 windows of 4 MiB) or the smaller windows
                # (32 MiB in windows of 1 MiB)?
                ("s64_c4", "staging_bytes=64 MiB, chunk_bytes=4 MiB (12 C readers, 16 windows "
                 "of 4 MiB)", env(staging_mib=64, chunk_bytes=str(4 << 20))),
                ("s32_ring", "staging_bytes=32 MiB (12 C readers, 32 windows of 1 MiB)",
                 env(staging_mib=32)),
                ("nohuge", "huge_pages=off (the ring's staging from torch's pinned memory)",
                 env(huge_pages="off")),
                # Each file's memory reserved at once (nineteenth session): a first load's
                # 0.08 s of allocations in H200 runs 6 and 7 against this row's first round.
                ("noreserve", "reserve_memory=off (a driver allocation per tensor in a first "
                 "load)", env(reserve_memory="off")),
                ("t12ring", "threads=12, cuda_calls=ring (12 C readers, 32 windows of 8 MiB)",
                 env(12, "ring", 256)),
                ("t16ring", "threads=16, cuda_calls=ring (16 C readers, 32 windows of 8 MiB)",
                 env(16, "ring", 256)),
                # 16 readers waited for a chunk or a free window 1.2 thread-seconds of a 0.31 s
                # load in H200 run 6, with 2 windows each: with 4 each, do they reach the
                # 16-thread raw read (44 GB/s there)?
                ("t16ring_c4", "threads=16, cuda_calls=ring, chunk_bytes=4 MiB (16 C readers, "
                 "64 windows of 4 MiB)", env(16, "ring", 256, chunk_bytes=str(4 << 20))),
                ("t16ring_s512", "threads=16, cuda_calls=ring, staging_bytes=512 MiB (16 C "
                 "readers, 64 windows of 8 MiB)", env(16, "ring", 512, chunk_bytes=str(8 << 20)))):
            cases.append(Case(f"fst_cuda_{key}", f"fastsafetensors.load_file(cuda:0) {label}",
                              "ours", "fst", {"device": dev}, env=options, modes=("warm",)))
        cases.append(Case("fst_load_cuda", "fastsafetensors.load(device=cuda:0)", "ours",
                          "fst_load", {"device": dev}))
        # One load() of every file, as InstantTensor opens them, with the ring's staging of
        # before the twenty-first session.
        cases.append(Case("fst_load_cuda_s256", "fastsafetensors.load(device=cuda:0) "
                          "staging_bytes=256 MiB", "ours", "fst_load", {"device": dev},
                          env=env(staging_mib=256), modes=("warm",)))
        # A plain-Python pipeline of the engine's shape (benchmarks/sketch_pipeline.py): what
        # Python alone reaches here, pinning its staging in the timed load or before it.
        for key, label, params in (
                ("", "8 thr, 16 MiB buffers", {"threads": 8}),
                ("_prepinned", "8 thr, 16 MiB buffers pinned before the clock",
                 {"threads": 8, "prepinned": True}),
                ("_t16", "16 thr, 8 MiB buffers", {"threads": 16, "buffer": 8 * C.MiB})):
            cases.append(Case(f"sketch_cuda{key}", f"reference: plain-Python pipeline, {label}",
                              "reference", "sketch", {"device": dev, **params},
                              modes=("warm",)))
        # No Python per chunk (benchmarks/sketch_ring.py): reader threads in C fill a ring of
        # pinned windows, one thread queues the copies in order on one stream, InstantTensor's
        # shape (12 reads in flight into 8 MiB windows on a 16-core machine).
        for key, params in (("ring12", {"readers": 12, "window": 8 * C.MiB, "windows": 12}),
                            ("ring16", {"readers": 16, "window": 8 * C.MiB, "windows": 24}),
                            ("ring8x16", {"readers": 8, "window": 16 * C.MiB, "windows": 16})):
            cases.append(Case(f"sketch_cuda_{key}",
                              f"reference: C readers, ring of {params['windows']} x "
                              f"{params['window'] // C.MiB} MiB, {params['readers']} readers, "
                              "copies in order on one stream", "reference", "sketch_ring",
                              {"device": dev, **params}, modes=("warm",)))
        # The same with reader processes (benchmarks/sketch_procs.py): no GIL between reads.
        for procs in (8, 16):
            cases.append(Case(f"sketch_cuda_procs{procs}",
                              f"reference: {procs} reader processes, 16 MiB buffers pinned "
                              "before the clock", "reference", "sketch_procs",
                              {"device": dev, "procs": procs}, modes=("warm",)))
        cases.append(Case("vllm_cuda", "vLLM's ParallelLoader sequence -> cuda", "ours", "vllm",
                          {"device": dev}))
        if not args.no_peers:
            cases.append(Case("upstream_vllm_cuda", "upstream: vLLM's ParallelLoader sequence",
                              "peer", "vllm", {"device": dev}, peer="upstream"))
            cases.append(Case("upstream_cuda", "upstream fastsafetensors -> cuda (nogds)",
                              "peer", "upstream", {"device": dev}, peer="upstream"))
            cases.append(Case("instanttensor_buffered", "InstantTensor BUFFERED -> cuda",
                              "peer", "instanttensor", {"backend": "BUFFERED", "device": dev},
                              peer="instanttensor"))
            cases.append(Case("runai_cuda", "Run:ai (host tensors, then .to(cuda))", "peer",
                              "runai", {"device": dev}, peer="runai"))
    if args.only:
        cases = [c for c in cases if re.search(args.only, c.name)]
    if args.warm_only:
        for c in cases:
            if re.search(args.warm_only, c.name):
                c.modes = tuple(m for m in c.modes if m == "warm")
    return cases


# --------------------------------------------------------------------------- child side


class Runner:
    """One loader in a child: ``load()`` returns what must stay alive until the clock stops;
    ``release()`` frees it (untimed); ``tensors()`` gives the dict to check, if any."""

    version = ""
    device = "cpu"

    def load(self) -> Any:
        raise NotImplementedError

    def tensors(self, out: Any) -> dict[str, Any] | None:
        return out if isinstance(out, dict) else None

    def release(self, out: Any) -> None:
        pass


class RawRunner(Runner):
    def __init__(self, files: list[str], p: dict[str, Any], chunk: int) -> None:
        self.spans = C.data_spans(files)
        self.threads, self.fresh, self.direct, self.chunk = (p["threads"], p["fresh"],
                                                             p["direct"], chunk)
        huge = bool(p.get("huge"))
        self.alloc = lambda n: C.AnonBuffer(n, hugepage=huge)
        self.buffers = None
        if not self.fresh:
            # ONE buffer, already touched, that every file's reads land in.
            size = max(s.size for s in self.spans) + 2 * C.DIRECT_ALIGN
            self.reused = C.AnonBuffer(size)
            block = b"\1" * C.MiB
            for off in range(0, size - C.MiB + 1, C.MiB):
                self.reused.view[off:off + C.MiB] = block
            self.buffers = [self.reused.view for _ in self.spans]

    def load(self) -> Any:
        _, owned = C.raw_read(self.spans, threads=self.threads, chunk=self.chunk,
                              direct=self.direct, buffers=self.buffers, fresh=self.alloc)
        return owned

    def release(self, out: Any) -> None:
        for buf in out or ():
            buf.close()


class SafetensorsRunner(Runner):
    def __init__(self, files: list[str], p: dict[str, Any]) -> None:
        import safetensors
        from safetensors.torch import load_file

        self.files, self.how, self.load_file = files, p["how"], load_file
        self.device = p.get("device", "cpu")
        self.version = safetensors.__version__

    def load(self) -> Any:
        out: dict[str, Any] = {}
        for f in self.files:
            if self.how == "device":
                out.update(self.load_file(f, device=self.device))
            elif self.how == "clone":
                lazy = self.load_file(f)
                out.update({k: v.clone() for k, v in lazy.items()})
                del lazy
            else:
                lazy = self.load_file(f)
                C.touch_pages(lazy)
                out.update(lazy)
        _sync(self.device)
        return out


class OursRunner(Runner):
    def __init__(self, files: list[str], p: dict[str, Any], whole: bool) -> None:
        import fastsafetensors

        self.fst, self.files, self.whole = fastsafetensors, files, whole
        self.io = p.get("io")
        self.device = p.get("device", "cpu")
        self.version = fastsafetensors.__version__
        if whole and not hasattr(fastsafetensors, "load"):
            raise Unavailable("fastsafetensors.load does not exist yet in this checkout")

    def load(self) -> Any:
        from fastsafetensors.loader.stream import PHASES

        PHASES.reset()
        if self.whole:
            out = dict(self.fst.load(self.files, device=self.device))
        else:
            out = {}
            for f in self.files:
                out.update(self.fst.load_file(f, device=self.device, io=self.io))
        _sync(self.device)
        return out

    def extra(self) -> dict[str, Any]:
        """Where the streaming engine's threads spent this load's time (loads to a GPU)."""
        from fastsafetensors.loader.stream import PHASES

        phases = PHASES.snapshot()
        return {"phases": phases} if phases else {}


class UpstreamRunner(Runner):
    def __init__(self, files: list[str], p: dict[str, Any]) -> None:
        import fastsafetensors

        # upstream's API: this child runs with upstream first on sys.path
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup  # type: ignore[attr-defined]

        if not fastsafetensors.__file__.startswith(os.environ.get("BENCH_PEER_DIR", "?")):
            raise Unavailable(f"imported the wrong fastsafetensors: {fastsafetensors.__file__}")
        self.files, self.Loader, self.Group = files, SafeTensorsFileLoader, SingleGroup
        self.device = p.get("device", "cpu")
        self.version = fastsafetensors.__version__

    def load(self) -> Any:
        loader = self.Loader(self.Group(), self.device, nogds=True)
        try:
            loader.add_filenames({0: self.files})
            fb = loader.copy_files_to_device()
            out = {k: fb.get_tensor(k) for k in loader.get_keys()}
            _sync(self.device)
            fb.close()
        finally:
            loader.close()
        return out


class VllmSequenceRunner(Runner):
    """vLLM's fastsafetensors iterator on one GPU: ParallelLoader with its keywords, every tensor
    kept (as ``load`` does). The same code runs ours or upstream, whichever the child imports."""

    def __init__(self, files: list[str], p: dict[str, Any]) -> None:
        import fastsafetensors
        from fastsafetensors.parallel_loader import ParallelLoader

        peer = os.environ.get("BENCH_PEER_DIR")
        if peer and not fastsafetensors.__file__.startswith(peer):
            raise Unavailable(f"imported the wrong fastsafetensors: {fastsafetensors.__file__}")
        self.files, self.Loader = files, ParallelLoader
        self.device = p.get("device", "cpu")
        self.version = fastsafetensors.__version__

    def load(self) -> Any:
        loader = self.Loader(pg=None, hf_weights_files=sorted(self.files), queue_size=0,
                             use_tqdm_on_load=False, device=self.device, nogds=True,
                             all_local=False, accumulate_resident=True)
        try:
            out = dict(loader.iterate_weights())
        finally:
            loader.close()
        _sync(self.device)
        return out


class RunaiRunner(Runner):
    def __init__(self, files: list[str], p: dict[str, Any]) -> None:
        import importlib.metadata

        from runai_model_streamer import SafetensorsStreamer

        self.files, self.Streamer = files, SafetensorsStreamer
        self.device = p.get("device", "cpu")
        self.version = importlib.metadata.version("runai-model-streamer")

    def load(self) -> Any:
        out = {}
        with self.Streamer() as streamer:
            streamer.stream_files(self.files, device="cpu")
            for name, t in streamer.get_tensors():
                out[name] = t if self.device == "cpu" else t.to(self.device, non_blocking=True)
        _sync(self.device)
        return out


class InstantTensorRunner(Runner):
    def __init__(self, files: list[str], p: dict[str, Any]) -> None:
        import importlib.metadata

        import torch
        from instanttensor import BackendPolicy, safe_open

        if not torch.cuda.is_available():
            raise Unavailable("InstantTensor only supports CUDA devices (no GPU here)")
        self.files, self.open, self.device = files, safe_open, p["device"]
        self.backend = BackendPolicy.BUFFERED if p["backend"] == "BUFFERED" else None
        self.version = importlib.metadata.version("instanttensor")

    def load(self) -> Any:
        out = {}
        with self.open(self.files, framework="pt", device=self.device,
                       backend=self.backend) as f:
            for name, t in f.tensors():
                out[name] = t
        _sync(self.device)
        return out


class SketchRunner(Runner):
    """The reference pipelines: reader threads (sketch_pipeline.py), with ``procs`` in the
    parameters reader processes (sketch_procs.py), with ``windows`` C readers filling a ring
    (sketch_ring.py)."""

    def __init__(self, files: list[str], p: dict[str, Any]) -> None:
        self.device = p["device"]
        buffer = p.get("buffer", 16 * C.MiB)
        self.procs: Any = None
        self.sketch: Any
        if "windows" in p:
            from sketch_ring import RingSketch

            self.sketch = RingSketch(files, device=self.device, readers=p["readers"],
                                     window=p["window"], windows=p["windows"])
        elif "procs" in p:
            from sketch_procs import ProcSketch

            self.sketch = self.procs = ProcSketch(files, device=self.device, procs=p["procs"],
                                                  buffer=buffer)
        else:
            from sketch_pipeline import Sketch

            self.sketch = Sketch(files, device=self.device, threads=p["threads"], buffer=buffer,
                                 prepinned=p.get("prepinned", False))
        self.reader_cpu = 0.0

    def load(self) -> Any:
        before = self.procs.reader_cpu_seconds() if self.procs else 0.0
        out = self.sketch.load()
        _sync(self.device)
        if self.procs:
            self.reader_cpu = self.procs.reader_cpu_seconds() - before
        return out

    def extra(self) -> dict[str, Any]:
        # Reader processes read: their CPU time counts with this one's.
        return {"reader_cpu_seconds": self.reader_cpu} if self.procs else {}


class H2DRunner(Runner):
    """The host-to-device limit: as many bytes as the checkpoint holds, copied to the GPU from a
    2 GiB pinned buffer (again and again), so the row's GB/s and its paired ratios count the
    same bytes as every loader's row."""

    def __init__(self, nbytes: int) -> None:
        import torch

        self.nbytes = nbytes
        self.torch, self.device = torch, "cuda:0"
        self.src = torch.empty(2 * C.GiB, dtype=torch.uint8, pin_memory=True)
        self.src.fill_(1)
        self.dst = torch.empty(2 * C.GiB, dtype=torch.uint8, device=self.device)
        self.dst.copy_(self.src)
        torch.cuda.synchronize()

    def load(self) -> Any:
        left = self.nbytes
        while left > 0:
            n = min(left, self.src.numel())
            self.dst[:n].copy_(self.src[:n], non_blocking=True)
            left -= n
        self.torch.cuda.synchronize()
        return None


class Unavailable(Exception):
    pass


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_reset() -> int:
    """Start measuring peak RSS from now; returns the current RSS.

    ru_maxrss survives execve, so a child forked from a big parent starts with the parent's peak;
    Linux's VmHWM belongs to the new process image, and writing 5 to clear_refs resets it to the
    current RSS (kernel >= 4.0). Elsewhere fall back to ru_maxrss."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    rss = _status("VmRSS")
    return rss if rss is not None else _maxrss()


def _maxrss() -> int:
    hwm = _status("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(case: str, spec: dict[str, Any]) -> None:
    import torch

    base = _peak_reset()
    files, kind, p = spec["files"], spec["kind"], spec["params"]
    try:
        runner: Runner
        if kind == "raw":
            runner = RawRunner(files, p, spec["chunk"])
        elif kind == "st":
            runner = SafetensorsRunner(files, p)
        elif kind in ("fst", "fst_load"):
            runner = OursRunner(files, p, whole=kind == "fst_load")
        elif kind == "upstream":
            runner = UpstreamRunner(files, p)
        elif kind == "vllm":
            runner = VllmSequenceRunner(files, p)
        elif kind == "runai":
            runner = RunaiRunner(files, p)
        elif kind == "instanttensor":
            runner = InstantTensorRunner(files, p)
        elif kind in ("sketch", "sketch_procs", "sketch_ring"):
            runner = SketchRunner(files, p)
        elif kind == "h2d":
            runner = H2DRunner(sum(s.size for s in C.data_spans(files)))
        else:
            raise Unavailable(f"unknown kind {kind}")
    except (ImportError, Unavailable, OSError, RuntimeError) as exc:
        _emit({"unavailable": f"{type(exc).__name__}: {exc}".strip()})
        return
    cuda = runner.device.startswith("cuda")
    _emit({"ready": True, "version": runner.version})
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "quit":
            return
        if cmd[0] == "peak":
            _emit({"maxrss_delta": _maxrss() - base})
            continue
        mode = cmd[1] if len(cmd) > 1 else "warm"
        if spec.get("idle_before") and cmd[0] == "run":
            # Let the VM's free page reporting hand the memory freed by the last load back to
            # the host, as on a machine that sat idle before a load (see docs/benchmarks.md).
            time.sleep(spec["idle_before"])
        state = C.prepare(files, mode) if kind != "h2d" else {"resident": None, "state_ok": True}
        gc.collect()
        if cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        vm0 = C.vmstat()
        try:
            cpu0 = os.times()
            started = time.perf_counter()
            out = runner.load()
            seconds = time.perf_counter() - started
            cpu1 = os.times()
        except Exception as exc:  # noqa: BLE001  (a peer failing is a result, not a crash)
            _emit({"error": f"{type(exc).__name__}: {exc}"})
            continue
        # CPU time of all threads of this process: on a shared machine it moves much less than
        # wall time, and a warm load is CPU work (copies and page faults).
        reply: dict[str, Any] = {"seconds": seconds, **state, "cpu_seconds":
                                 cpu1.user - cpu0.user + cpu1.system - cpu0.system,
                                 "vmstat": C.vmstat_delta(vm0)}
        reply.update(getattr(runner, "extra", dict)())
        reply["cpu_seconds"] += reply.get("reader_cpu_seconds", 0.0)
        if cuda:
            import torch

            reply["cuda_peak"] = torch.cuda.max_memory_allocated()
        if cmd[0] == "check":
            tensors = runner.tensors(out)
            if tensors is not None:
                reply["check"] = C.compare(tensors, files)
                if not cuda:
                    reply["materialized"] = C.materialization(tensors)
            if cuda and tensors is not None:
                reply["on_device"] = all(t.device.type == "cuda" for t in tensors.values())
            del tensors
        runner.release(out)
        del out
        if cuda:
            import torch

            # Give the freed device memory back: every case keeps its child alive, and 8 GB
            # cached by each of a dozen children does not fit one GPU. It also makes each
            # timed run pay for its device memory, as a load in a fresh process does.
            gc.collect()
            torch.cuda.empty_cache()
        _emit(reply)


def many_child(spec: dict[str, Any]) -> None:
    """Per-tensor overhead: one warm file of many small tensors."""
    import torch
    from safetensors.torch import load_file as st_load

    import fastsafetensors

    path, repeat = spec["path"], spec["repeat"]
    C.warm([path])
    res: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[[], Any]) -> None:
        for _ in range(repeat):
            gc.collect()
            t0 = time.perf_counter()
            out = fn()
            res.setdefault(name, []).append(time.perf_counter() - t0)
            del out

    timed("fst_load_file", lambda: fastsafetensors.load_file(path))
    timed("st_load_file_lazy", lambda: st_load(path))
    timed("st_load_file_clone", lambda: {k: v.clone() for k, v in st_load(path).items()})
    if torch.cuda.is_available():
        # Per-tensor cost on the device path: an allocation, copies and events per tensor.
        def to_cuda(load: Callable[[], Any]) -> Any:
            out = load()
            torch.cuda.synchronize()
            return out

        timed("fst_load_file_cuda", lambda: to_cuda(
            lambda: fastsafetensors.load_file(path, device="cuda:0")))

        def configured(**options: Any) -> Callable[[], Any]:
            def load() -> Any:
                with fastsafetensors.configure(**options):
                    return fastsafetensors.load_file(path, device="cuda:0")
            return load

        # Runs of small tensors in one allocation each (config.py): on by default since the
        # fifteenth session; off, each tensor its own allocation.
        grouped = configured(small_tensor_groups="on")
        timed("fst_load_file_cuda_groups", lambda: to_cuda(grouped))
        timed("fst_load_file_cuda_nogroups",
              lambda: to_cuda(configured(small_tensor_groups="off")))
        timed("fst_load_file_cuda_native", lambda: to_cuda(configured(cuda_calls="native")))
        timed("st_load_file_cuda", lambda: to_cuda(lambda: st_load(path, device="cuda:0")))
    # Where fastsafetensors' time goes, through its internals (skipped if they moved).
    try:
        from fastsafetensors.frameworks import get_framework
        from fastsafetensors.loader import cpu
        from fastsafetensors.loader.plan import plan_extent, plan_reads

        fw = get_framework("pt")
        job = cpu.open_job(path)
        try:
            timed("fst_header", lambda: cpu.close_job(cpu.open_job(path)))
            timed("fst_plan", lambda: plan_reads(0, job.header, None, chunk=16 << 20))
            job.extent = plan_extent(job.header, None, align=4096)
            buf, _ = fw.alloc(job.extent.size, align=4096)
            timed("fst_views", lambda: cpu.tensors_from_buffer(fw, buf, job))
        finally:
            cpu.close_job(job)
    except Exception as exc:  # noqa: BLE001
        res["breakdown_error"] = [str(exc)]  # type: ignore[list-item]
    ours = fastsafetensors.load_file(path)
    ref = st_load(path)
    same = all(torch.equal(ours[k].view(torch.uint8), ref[k].view(torch.uint8))
               for k in list(ref)[::997])
    phases: dict[str, dict[str, float]] = {}
    if torch.cuda.is_available():
        from fastsafetensors.loader.stream import PHASES

        grouped_out = to_cuda(grouped)
        same = same and all(torch.equal(grouped_out[k].cpu().view(torch.uint8),
                                        ref[k].view(torch.uint8)) for k in list(ref)[::97])
        del grouped_out
        # Where the engine's threads spent one more load of each CUDA row (not timed).
        for name, fn in (("fst_load_file_cuda", lambda: to_cuda(
                lambda: fastsafetensors.load_file(path, device="cuda:0"))),
                ("fst_load_file_cuda_groups", lambda: to_cuda(grouped))):
            PHASES.reset()
            fn()
            phases[name] = PHASES.snapshot()
    _emit({"times": res, "equal_sample": same and set(ours) == set(ref), "phases": phases})


# --------------------------------------------------------------------------- parent side


class Child:
    """A child process speaking the line protocol: commands on stdin, MARK lines on stdout."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str, log: Path) -> None:
        self.log = open(log, "a")  # noqa: SIM115  (closed in close())
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     bufsize=1)
        self.replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.replies.put(json.loads(line[len(MARK):]))
            else:
                self.log.write(line)
        self.replies.put(None)

    def tell(self, command: str) -> bool:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            return False
        return True

    def ask(self, command: str | None, timeout: float) -> dict[str, Any]:
        if command is not None and not self.tell(command):
            return {"error": "child exited"}
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            return {"error": f"no answer in {timeout:.0f} s (killed)"}
        if reply is None:
            return {"error": f"child exited with code {self.proc.wait()} (see {self.log.name})"}
        return reply

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.tell("quit")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        self.log.close()


def install_peer(name: str, peers_dir: Path, version: str | None) -> tuple[Path | None, str]:
    """``pip install --no-deps --target`` the peer (and its light dependencies; torch, numpy and
    safetensors come from this environment). Returns (folder or None, reason)."""
    requirement, extras, _ = PEERS[name]
    if version:
        requirement += f"=={version}"
    target = peers_dir / name
    stamp = target / ".bench-installed"
    if stamp.exists() and stamp.read_text() == requirement:
        return target, ""
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-deps", "--upgrade", "--target", str(target), requirement, *extras]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["pip failed"]
        return None, f"pip install {requirement} failed: {tail[0][:200]}"
    stamp.write_text(requirement)
    return target, ""


def start_child(case: Case, spec: dict[str, Any], args: argparse.Namespace,
                peer_dirs: dict[str, Path], logs: Path) -> Child:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(case.env)
    env["PYTHONUNBUFFERED"] = "1"
    if not args.process_per_run and not args.malloc_default:
        # A child loads many times, a user's process once. glibc raises its mmap threshold
        # (up to 32 MiB) each time a large block is freed, after which tensors below it come
        # from heap memory that earlier loads already faulted in: later rounds would skip the
        # first-touch page faults a real first load pays. Pinning the thresholds at glibc's
        # initial values keeps every load like the first one in a fresh process.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
        env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    if case.peer:
        env["PYTHONPATH"] = str(peer_dirs[case.peer])
        env["BENCH_PEER_DIR"] = str(peer_dirs[case.peer])
        cwd = str(peer_dirs[case.peer].parent)        # outside the repository
    else:
        env["PYTHONPATH"] = str(C.REPO)               # this checkout, installed or not
        cwd = str(C.REPO)
    argv = [sys.executable, str(HERE), "--child", case.name, "--spec", json.dumps(spec)]
    return Child(argv, env, cwd, logs / f"{case.name}.log")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    started = time.monotonic()

    cuda = torch.cuda.is_available()
    folder = Path(args.dir or Path(tempfile.gettempdir()) / "fastsafetensors-bench"
                  / f"llama-{args.size_gb:g}gb")
    print(f"checkpoint: {folder} ({args.size_gb:g} GB, building if missing)", flush=True)
    info = C.build_checkpoint(folder, args.size_gb)
    files = [str(folder / f) for f in info["files"]]
    nbytes = info["tensor_bytes"]
    logs = Path(args.logs or folder / "logs")
    logs.mkdir(parents=True, exist_ok=True)
    cases = make_cases(args, cuda)
    modes = [m for m in ("warm", "cold") if m in args.modes.split(",")]

    peer_dirs: dict[str, Path] = {}
    unavailable: dict[str, str] = {}
    peers_dir = Path(args.peers_dir).expanduser()
    for name in sorted({c.peer for c in cases if c.peer}):
        ver = args.upstream_version if name == "upstream" else None
        print(f"peer {name}: installing into {peers_dir / name} if needed", flush=True)
        try:
            where, why = install_peer(name, peers_dir, ver)
        except (OSError, subprocess.SubprocessError) as exc:
            where, why = None, f"{type(exc).__name__}: {exc}"
        if where is None:
            unavailable[name] = why
        else:
            peer_dirs[name] = where

    results: dict[str, dict[str, Any]] = {}
    children: dict[str, Child] = {}
    specs: dict[str, dict[str, Any]] = {}
    load_before = os.getloadavg()
    skipped = 0     # timed runs not started because the deadline passed

    def open_child(case: Case, started: Child | None = None) -> Child | None:
        """A ready child for ``case`` (``started`` already, or now), or None (the row then says
        why)."""
        row = results[case.name]
        child = started or start_child(case, specs[case.name], args, peer_dirs, logs)
        hello = child.ask(None, timeout=min(300, args.timeout))
        if not hello.get("ready"):
            row["unavailable"] = hello.get("unavailable") or hello.get("error", "?")
            child.close()
            print(f"  {case.name}: not available: {row['unavailable']}", flush=True)
            return None
        row["version"] = hello.get("version", "")
        return child

    def record_peak(case: Case, child: Child) -> None:
        # Peak RSS of the timed runs only: the check holds reference tensors too.
        peak = child.ask("peak", timeout=60).get("maxrss_delta")
        row = results[case.name]
        if peak is not None:
            row["peak_rss"] = max(row.get("peak_rss") or 0, peak)

    # Every child starts at once (importing torch takes seconds each: on a lent GPU machine,
    # started one by one they took time the timed runs need), then each is asked whether its
    # loader is available.
    starting: dict[str, Child] = {}
    try:
        for case in cases:
            row = results.setdefault(case.name, {"label": case.label, "group": case.group,
                                                 "times": {m: [] for m in modes},
                                                 "cpu": {m: [] for m in modes},
                                                 "state": {m: [] for m in modes}})
            if case.peer and case.peer in unavailable:
                row["unavailable"] = unavailable[case.peer]
                continue
            specs[case.name] = {"files": files, "kind": case.kind, "params": case.params,
                                "chunk": args.chunk_mb * C.MiB, "idle_before": args.idle_before}
            starting[case.name] = start_child(case, specs[case.name], args, peer_dirs, logs)
        for case in cases:
            if case.name not in starting:
                continue
            child = open_child(case, starting.pop(case.name))
            if child is None:
                continue
            if args.process_per_run:
                child.close()           # it only proved that the case is available
                children[case.name] = None  # type: ignore[assignment]
            else:
                children[case.name] = child
        rng = random.Random(args.seed)
        for r in range(args.repeat):
            # A new order every round: what ran just before a case (memory it freed, pages it
            # left fragmented, which decides whether huge pages come cheap) changes too.
            order = cases[:]
            rng.shuffle(order)
            for mode in modes:
                for case in order:
                    if case.name not in children or mode not in case.modes:
                        continue
                    if args.deadline and time.monotonic() - started > args.deadline:
                        skipped += 1    # leave time for the checks and the report
                        continue
                    child = children[case.name] or open_child(case)
                    if child is None:
                        continue
                    # The first warm run of a loader is also its check (the comparison runs
                    # after the clock stops), so no extra load is needed for it at the end.
                    check = (mode == "warm" and case.group != "limit"
                             and "check" not in results[case.name])
                    reply = child.ask(f"{'check' if check else 'run'} {mode}",
                                      timeout=args.timeout)
                    if check:
                        _keep_check(results[case.name], reply)
                    if args.process_per_run:
                        record_peak(case, child)
                        child.close()
                    row = results[case.name]
                    if "error" in reply:
                        row.setdefault("errors", []).append(f"{mode}: {reply['error']}")
                        row["times"][mode].append(None)   # keeps rounds aligned for pairing
                        row["cpu"][mode].append(None)
                        if row.get("group") == "ours":   # phase lines name the run they show
                            row.setdefault("phases", {}).setdefault(mode, []).append(None)
                        continue
                    row["times"][mode].append(reply["seconds"])
                    row["cpu"][mode].append(reply.get("cpu_seconds"))
                    row["state"][mode].append(reply.get("resident"))
                    row.setdefault("vmstat", {}).setdefault(mode, []).append(reply.get("vmstat"))
                    if not reply.get("state_ok", True):
                        row.setdefault("state_failures", []).append(
                            f"{mode} run {r + 1}: resident {reply.get('resident'):.2f}")
                    if "cuda_peak" in reply:
                        row["cuda_peak"] = max(row.get("cuda_peak", 0), reply["cuda_peak"])
                    if "phases" in reply:
                        row.setdefault("phases", {}).setdefault(mode, []).append(reply["phases"])
                    print(f"  round {r + 1} {mode:4} {case.name:24} "
                          f"{nbytes / 1e9 / reply['seconds']:6.2f} GB/s", flush=True)
        if skipped:
            print(f"deadline of {args.deadline:g} s passed: {skipped} timed runs skipped",
                  flush=True)
        for case in cases:
            if case.name not in children:
                continue
            child = children[case.name] or open_child(case)
            if child is None:
                continue
            children[case.name] = child
            row = results[case.name]
            if not args.process_per_run:
                record_peak(case, child)
            if case.group != "limit" and "check" not in row:
                _keep_check(row, child.ask("check warm", timeout=args.timeout))
            child.tell("quit")
    finally:
        for child in [*children.values(), *starting.values()]:
            if child is not None:
                child.close()

    many = None
    if not args.skip_many:
        path = folder.parent / f"many-{args.many_tensors}.safetensors"
        minfo = C.build_many(path, args.many_tensors)
        env = dict(os.environ, PYTHONPATH=str(C.REPO))
        child = Child([sys.executable, str(HERE), "--many", json.dumps(
            {"path": str(path), "repeat": max(3, args.repeat)})], env, str(C.REPO),
            logs / "many.log")
        try:
            many = child.ask(None, timeout=args.timeout)
        finally:
            child.close()
        many["tensors"], many["tensor_bytes"] = minfo["count"], minfo["tensor_bytes"]

    for row in results.values():
        for mode in modes:
            ts = [t for t in row["times"][mode] if t]
            row.setdefault("seconds", {})[mode] = C.median(ts) if ts else None
            row.setdefault("gbps", {})[mode] = nbytes / 1e9 / C.median(ts) if ts else None
            cs = [c for c in row.get("cpu", {}).get(mode, []) if c is not None]
            row.setdefault("cpu_s_per_gb", {})[mode] = C.median(cs) / (nbytes / 1e9) if cs \
                else None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "machine": {**C.machine(), "filesystem": C.filesystem(str(folder)),
                    "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if cuda
                    else None},
        "checkpoint": {"folder": str(folder), **info},
        "repeat": args.repeat, "threads": args.threads, "chunk_mib": args.chunk_mb,
        "process_per_run": args.process_per_run, "idle_before": args.idle_before,
        "deadline": args.deadline, "runs_skipped_at_deadline": skipped,
        "malloc_default": args.malloc_default,
        "loadavg": {"start": load_before, "end": os.getloadavg()},
        "cases": results, "many": many,
        "targets": targets(results) + gpu_targets(results, info["tensor_bytes"]),
    }


def _keep_check(row: dict[str, Any], reply: dict[str, Any]) -> None:
    row["check"] = reply.get("check") or reply.get("error")
    for key in ("materialized", "on_device"):
        if key in reply:
            row[key] = reply[key]


# --------------------------------------------------------------------------- report


def best(results: dict[str, Any], prefix: str, mode: str) -> tuple[str | None, float | None]:
    rows = [(k, r["gbps"].get(mode)) for k, r in results.items()
            if k.startswith(prefix) and r.get("gbps", {}).get(mode)]
    return max(rows, key=lambda x: x[1]) if rows else (None, None)


def paired(results: dict[str, Any], name: str, refs: list[str], mode: str) -> float | None:
    """Median over rounds of ``name``'s speed over the best of ``refs`` in the same round: a
    noisy neighbour slows a whole round, so this ratio is steadier than a ratio of medians."""
    mine = results.get(name, {}).get("times", {}).get(mode, [])
    ratios = []
    for r, t in enumerate(mine):
        others = [results[k]["times"][mode][r] for k in refs
                  if k in results and len(results[k].get("times", {}).get(mode, [])) > r
                  and results[k]["times"][mode][r]]
        if t and others:
            ratios.append(min(others) / t)
    return C.median(ratios) if ratios else None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 2 item 7, for fastsafetensors.load_file with the default io=auto. The status uses
    the per-round (paired) ratio; the ratio of medians is reported beside it."""
    ours = results.get("fst_auto", {}).get("gbps", {})
    out = []
    for mode, need_b, need_st in (("warm", 0.95, 1.25), ("cold", 0.95, 1.5)):
        got = ours.get(mode)
        ref_name, ref = best(results, "raw_fresh_", mode)
        st = results.get("st_clone", {}).get("gbps", {}).get(mode)
        for what, base, need, refs in (
                (f"fresh-memory raw read (best: {ref_name})", ref, need_b,
                 [ref_name] if ref_name else []),
                ("safetensors load_file + clone", st, need_st, ["st_clone"])):
            if not got or not base:
                out.append({"mode": mode, "against": what, "need": need, "status": "n/a"})
                continue
            ratio = got / base
            pair = paired(results, "fst_auto", refs, mode) or ratio
            row = {"mode": mode, "against": what, "need": need,
                   "ratio_of_medians": round(ratio, 3), "paired_ratio": round(pair, 3),
                   "status": "MET" if pair >= need else "MISSED",
                   "gap_percent": round(100 * (need / pair - 1), 1) if pair < need else 0.0}
            if refs == ["st_clone"]:
                row.update(ceiling(results, mode))
            out.append(row)
    return out


def gpu_targets(results: dict[str, Any], tensor_bytes: int) -> list[dict[str, Any]]:
    """Issue 3's targets for ``fastsafetensors.load_file(device="cuda:0")`` (``fst_cuda``), when
    the run has CUDA rows: warm >= 0.85x the pinned host-to-device copy and >= 1.3x
    InstantTensor's buffered mode, cold >= 1.0x the best raw read of the disk; io="auto" (the
    default) >= 0.95x the better of io="buffered" and io="direct", warm and cold; peak device
    memory <= tensor bytes + staging + 256 MiB."""
    if "fst_cuda" not in results or "unavailable" in results["fst_cuda"]:
        return []
    out = []
    disk = [k for k in results if k.startswith(("raw_reused_", "direct_reused_"))]
    fixed = ["fst_cuda_buffered", "fst_cuda_direct"]
    for mode, what, refs, need in (
            ("warm", "pinned host-to-device copy", ["h2d_pinned"], 0.85),
            ("warm", "InstantTensor BUFFERED", ["instanttensor_buffered"], 1.3),
            ("cold", "best raw read of the disk", disk, 1.0),
            ("warm", "better of io=buffered and io=direct", fixed, 0.95),
            ("cold", "better of io=buffered and io=direct", fixed, 0.95)):
        got = results["fst_cuda"].get("gbps", {}).get(mode)
        ref = [results[k]["gbps"][mode] for k in refs
               if k in results and results[k].get("gbps", {}).get(mode)]
        if not got or not ref:
            out.append({"mode": mode, "against": what, "need": need, "status": "n/a"})
            continue
        pair = paired(results, "fst_cuda", refs, mode) or got / max(ref)
        out.append({"mode": mode, "against": what, "need": need,
                    "ratio_of_medians": round(got / max(ref), 3), "paired_ratio": round(pair, 3),
                    "status": "MET" if pair >= need else "MISSED",
                    "gap_percent": round(100 * (need / pair - 1), 1) if pair < need else 0.0,
                    "subject": "fastsafetensors.load_file(device=cuda:0)"})
    peak = results["fst_cuda"].get("cuda_peak")
    bound = tensor_bytes + STAGING_DEFAULT + 256 * C.MiB
    if peak:
        out.append({"mode": "memory", "against": f"peak device memory {peak / 1e9:.3f} GB vs "
                    f"tensors + staging + 256 MiB = {bound / 1e9:.3f} GB", "need": 1.0,
                    "status": "MET" if peak <= bound else "MISSED", "paired_ratio": peak / bound,
                    "ratio_of_medians": peak / bound, "gap_percent": 0.0,
                    "subject": "fastsafetensors.load_file(device=cuda:0)"})
    return out


def ceiling(results: dict[str, Any], mode: str) -> dict[str, Any]:
    """How far the safetensors target is reachable at all in this run: the best raw read a
    loader returning memory it owns could match, over safetensors + clone, paired per round.
    Warm that is the fresh-memory read (owned memory must be faulted in); cold, generously, the
    best read of any kind (reused buffers and O_DIRECT included: the disk itself)."""
    prefixes = ("raw_fresh_",) if mode == "warm" else ("raw_", "direct_")
    rows = [(k, r["gbps"][mode]) for k, r in results.items()
            if k.startswith(prefixes) and r.get("gbps", {}).get(mode)]
    if not rows or "st_clone" not in results:
        return {}
    name = max(rows, key=lambda x: x[1])[0]
    over_st = paired(results, name, ["st_clone"], mode)
    return {"ceiling": name, "ceiling_over_st": round(over_st, 3) if over_st else None}


def table(report: dict[str, Any]) -> str:
    results = report["cases"]
    modes = [m for m in ("warm", "cold") if any(r.get("gbps", {}).get(m) for r in
                                                 results.values())]
    ref_b = {m: best(results, "raw_fresh_", m)[1] for m in modes}
    ref_st = {m: results.get("st_clone", {}).get("gbps", {}).get(m) for m in modes}
    head = ["what"]
    for m in modes:
        head += [f"{m} GB/s", "x B", "x st+clone"]
    head += ["CPU s/GB " + "/".join(modes), "peak RSS MB", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results.values():
        cells = [r["label"]]
        if "unavailable" in r:
            cells += [""] * (3 * len(modes)) + ["", "", f"not available: {r['unavailable']}"]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        for m in modes:
            g = r.get("gbps", {}).get(m)
            cells.append(f"{g:.2f}" if g else "")
            cells.append(f"{g / ref_b[m]:.2f}" if g and ref_b[m] else "")
            cells.append(f"{g / ref_st[m]:.2f}" if g and ref_st[m] else "")
        cpu = [r.get("cpu_s_per_gb", {}).get(m) for m in modes]
        cells.append(" / ".join(f"{c:.2f}" if c is not None else "-" for c in cpu))
        rss = r.get("peak_rss")
        cells.append(f"{rss / 1e6:.0f}" if rss is not None else "")
        notes = []
        if r.get("version"):
            notes.append(r["version"])
        chk = r.get("check")
        if isinstance(chk, dict):
            notes.append("equal" if chk.get("ok") else f"MISMATCH {chk.get('why')}")
        elif chk:
            notes.append(f"check failed: {chk}")
        mat = r.get("materialized")
        if mat:
            if mat["file_backed_fraction"] > 0.01:
                notes.append(f"{mat['file_backed_fraction']:.0%} file-backed mmap")
            if mat["anon_resident_fraction"] < 0.99:
                notes.append(f"only {mat['anon_resident_fraction']:.0%} resident")
        if r.get("cuda_peak"):
            notes.append(f"cuda peak {r['cuda_peak'] / 1e9:.2f} GB")
        for e in (r.get("errors") or [])[:1]:
            notes.append(f"error: {e}")
        for s in (r.get("state_failures") or [])[:1]:
            notes.append(f"EVICT/WARM FAILED: {s}")
        cells.append("; ".join(notes))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def phase_lines(report: dict[str, Any]) -> list[str]:
    """Where the streaming engine's threads spent the first warm run of each of our GPU rows:
    seconds summed over threads (readers, planner, caller), next to the load's wall time."""
    out: list[str] = []
    for name, row in report["cases"].items():
        runs = row.get("phases", {}).get("warm") or []
        if not runs:
            continue
        first = runs[0]
        if not out:
            out += ["", "where the engine's threads spent the first warm run (seconds, summed "
                        "over threads; wall = the load's own time):"]
        if first is None:
            out.append(f"  {name}: the first warm run failed")
            continue
        wall = first.get("load: wall time")
        parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(first.items())
                          if k != "load: wall time")
        out.append(f"  {name}: wall {'?' if wall is None else f'{wall:.3f}'}; {parts}")
    return out


def summary(report: dict[str, Any]) -> str:
    m = report["machine"]
    ck = report["checkpoint"]
    out = [f"{report['date']}  {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
           f"kernel {m['kernel']}, {m['filesystem']}, torch {m['torch']}"
           + (f", {m['cuda']}" if m.get("cuda") else ""),
           (f"checkpoint: {ck['tensor_bytes'] / 1e9:.2f} GB bf16, {ck['tensors']} tensors in "
           f"{len(ck['files'])} shards; median of {report['repeat']}"
           + (f" ({report['runs_skipped_at_deadline']} runs skipped at the deadline)"
              if report.get("runs_skipped_at_deadline") else "")
           + "; GB = 1e9 bytes; "
           f"B = best fresh-memory raw preadv of the same mode (4 KiB or huge pages); "
           f"load average "
           f"{report['loadavg']['start'][0]:.1f} at start, "
           f"{report['loadavg']['end'][0]:.1f} at end "
           f"on {m['cores']} cores"),
           "", table(report), ""]
    for t in report["targets"]:
        if t["status"] == "n/a":
            out.append(f"target {t['mode']}: >= {t['need']}x {t['against']}: n/a")
        else:
            gap = f" (needs {t['gap_percent']}% more speed)" if t["status"] == "MISSED" else ""
            if t.get("ceiling_over_st"):
                gap += (f"; the best raw read ({t['ceiling']}) was {t['ceiling_over_st']:.2f}x "
                        f"safetensors load_file + clone in this run")
            who = t.get("subject", "fastsafetensors.load_file")
            if t["mode"] == "memory":
                out.append(f"target memory: {who}: {t['against']}: {t['status']}")
                continue
            out.append(f"target {t['mode']}: {who} >= {t['need']}x "
                       f"{t['against']}: paired {t['paired_ratio']:.2f}x (medians "
                       f"{t['ratio_of_medians']:.2f}x) {t['status']}{gap}")
    out.extend(phase_lines(report))
    many = report.get("many")
    if many and "times" in many:
        out.append("")
        out.append(f"per-tensor overhead: {many['tensors']} tensors, "
                   f"{many['tensor_bytes'] / 1e6:.0f} MB, warm, median ms "
                   f"(equal: {many.get('equal_sample')})")
        for k, v in many["times"].items():
            if v and isinstance(v[0], float):
                out.append(f"  {k:22} {1e3 * C.median(v):8.1f} ms")
            else:
                out.append(f"  {k:22} {v}")
        for name, spent in (many.get("phases") or {}).items():
            wall = spent.get("load: wall time")
            parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(spent.items())
                              if k != "load: wall time")
            out.append(f"  where {name}'s threads spent one more load (s): wall "
                       f"{'?' if wall is None else f'{wall:.3f}'}; {parts}")
    elif many:
        out.append(f"per-tensor overhead: {many}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = _cuda_available()
    ap.add_argument("--size-gb", type=float, default=8.0 if gpu else 2.0)
    ap.add_argument("--dir", help="checkpoint folder (built once, reused); default "
                                  "<temp dir>/fastsafetensors-bench/llama-<size>gb")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case and mode (median)")
    ap.add_argument("--threads", type=int, default=4 if not gpu else 8,
                    help="thread count of the raw-read limits besides 1 and 2")
    ap.add_argument("--chunk-mb", type=int, default=16, help="raw reads: bytes per preadv")
    ap.add_argument("--modes", default="warm,cold")
    ap.add_argument("--only", help="regex: run only the cases whose key matches")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--peers-dir", default="~/.cache/fastsafetensors-bench/peers")
    ap.add_argument("--upstream-version", default=None, help="default: the newest pip finds")
    ap.add_argument("--idle-before", type=float, default=0.0,
                    help="seconds each child sleeps before a timed run (a first load on a VM "
                         "that sat idle: freed memory went back to the host)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-round case order")
    ap.add_argument("--process-per-run", action="store_true",
                    help="a fresh child process for every timed run (slower; default: one "
                         "child per case with glibc's malloc thresholds pinned)")
    ap.add_argument("--malloc-default", action="store_true",
                    help="do not pin MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ in children")
    ap.add_argument("--many-tensors", type=int, default=20_000)
    ap.add_argument("--skip-many", action="store_true")
    ap.add_argument("--warm-only", help="regex: cases whose key matches run warm only")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds from the start after which no timed run starts (the checks "
                         "and the report still run): a run cut short by a time limit keeps "
                         "its report")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per child command")
    ap.add_argument("--logs", help="children's stderr (default <dir>/logs)")
    ap.add_argument("--json", help="write the full report here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--many", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, json.loads(args.spec))
        return 0
    if args.many:
        many_child(json.loads(args.many))
        return 0
    report = run(args)
    print()
    print(summary(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    return 0


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
