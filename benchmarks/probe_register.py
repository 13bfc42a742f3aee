"""Would copying straight out of the page cache beat reading into pinned staging?

The streaming engine reads each chunk of a cached file into pinned staging (a host copy) and
then copies it to the GPU. Another route skips the host copy: map the file read-only, register
the mapping with CUDA (``cuMemHostRegister`` with the read-only flag), and let the copy
engine read the page cache directly. It pays off only if registering cached pages costs less
than copying them. This probe times each step for every shard of a warm checkpoint, next to the
pinned-copy limit, and prints GB/s; it changes no file (it registers through the package's
``loader/hostpool.py``, so the repository must be importable: the session script sets PYTHONPATH).

    python benchmarks/probe_register.py --dir <checkpoint folder> [--json out.json]

It also times the other half of a first load's cost, pinning its staging (run 2 on the H200
machine pinned new host memory at about 1.5 GB/s, close to this VM family's rate of faulting in
fresh 4 KiB pages): torch's pinned allocator against anonymous memory faulted in with and
without ``MADV_HUGEPAGE`` and then registered, 256 MiB each. Registration goes through the CUDA
driver, as ``huge_pages="on"`` does (fastsafetensors/loader/hostpool.py): a refused runtime call
would leave an error behind for torch's next kernel.

Without CUDA it says so and exits 0 (the GPU session script runs it on the lent machine).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from fastsafetensors.loader import hostpool  # noqa: E402

#: CU_MEMHOSTREGISTER_READ_ONLY (CUDA 11.1+): the device only reads the registered memory, which
#: lets a read-only file mapping be registered at all.
REGISTER_READ_ONLY = 0x08

#: libc with mmap/munmap typed: the package's page-cache probe already sets it up (None where
#: mincore is unavailable, which is not Linux, where this probe has nothing to measure anyway).
_libc = C.pagecache()._libc


def probe_file(torch: Any, path: str, dst: Any) -> dict[str, Any]:
    """Map, register, copy to ``dst`` and unregister one file; seconds of each step."""
    if _libc is None:
        return {"error": "no libc mmap here"}
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, C.pagecache()._MAP_FAILED):
            return {"error": f"mmap failed (errno {ctypes.get_errno()})"}
        try:
            t0 = time.perf_counter()
            err = hostpool.register(addr, size, REGISTER_READ_ONLY)
            t1 = time.perf_counter()
            if err:
                return {"error": f"cuMemHostRegister returned CUDA error {err}", "bytes": size}
            try:
                array = (ctypes.c_uint8 * size).from_address(addr)
                src = torch.frombuffer(array, dtype=torch.uint8)   # read-only: only read here
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                dst[:size].copy_(src, non_blocking=True)
                torch.cuda.synchronize()
                t3 = time.perf_counter()
                same = bool(torch.equal(dst[:4096].cpu(), src[:4096]))
            finally:
                t4 = time.perf_counter()
                hostpool.unregister(addr)
                t5 = time.perf_counter()
            return {"bytes": size, "register": t1 - t0, "copy": t3 - t2,
                    "unregister": t5 - t4, "pinned": bool(src.is_pinned()), "same": same}
        finally:
            _libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def probe_parallel(path: str, piece: int = 16 << 20) -> list[dict[str, Any]]:
    """Registering one warm file as ``piece``-sized ranges from 1, 2, 4 and 8 threads at once:
    does registration scale with threads (the engine's mapped readers register in parallel),
    or does the driver serialize it? Seconds for every range registered, then all released."""
    import threading

    size = os.path.getsize(path) // piece * piece
    fd = os.open(path, os.O_RDONLY)
    rows: list[dict[str, Any]] = []
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, C.pagecache()._MAP_FAILED):
            return [{"error": f"mmap failed (errno {ctypes.get_errno()})"}]
        try:
            for threads in (1, 2, 4, 8):
                starts = list(range(0, size, piece))
                errors: list[int] = []

                def run(mine: list[int], errors: list[int] = errors) -> None:
                    import torch

                    torch.cuda.mem_get_info()   # a context on this thread
                    for start in mine:
                        err = hostpool.register(addr + start, piece,
                                                hostpool.PORTABLE | hostpool.READ_ONLY)
                        if err:
                            errors.append(err)

                parts = [starts[k::threads] for k in range(threads)]
                workers = [threading.Thread(target=run, args=(part,)) for part in parts]
                t0 = time.perf_counter()
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                seconds = time.perf_counter() - t0
                t1 = time.perf_counter()
                for start in starts:
                    hostpool.unregister(addr + start)
                rows.append({"threads": threads, "bytes": size, "piece": piece,
                             "register": seconds, "unregister": time.perf_counter() - t1,
                             "errors": sorted(set(errors))})
        finally:
            _libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)
    return rows


#: madvise(MADV_POPULATE_WRITE) (Linux 5.14): fault the range in, writable, in one call.
MADV_POPULATE_WRITE = 23


def probe_pinning(torch: Any, nbytes: int = 256 << 20) -> list[dict[str, Any]]:
    """Seconds to get ``nbytes`` of new pinned host memory, three ways, and whether a copy
    from each lands on the GPU as from pinned memory."""
    torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)   # the allocator's own setup
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    rows.append({"how": "torch pin_memory=True", "bytes": nbytes,
                 "seconds": time.perf_counter() - t0, "pinned": bool(pinned.is_pinned())})
    del pinned
    for huge in (False, True):
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        row: dict[str, Any] = {"how": "anonymous mmap" + (" + MADV_HUGEPAGE" if huge else "")
                               + ", faulted in, registered", "bytes": nbytes}
        t0 = time.perf_counter()
        if huge:
            mm.madvise(mmap.MADV_HUGEPAGE)
        try:
            mm.madvise(MADV_POPULATE_WRITE)
        except OSError:
            torch.frombuffer(mm, dtype=torch.uint8).zero_()   # older kernels: touch it
        t1 = time.perf_counter()
        anchor = ctypes.c_char.from_buffer(mm)
        addr = ctypes.addressof(anchor)
        del anchor   # an exported buffer would keep mm.close() from unmapping
        err = hostpool.register(addr, nbytes)
        t2 = time.perf_counter()
        row.update({"fault_in": t1 - t0, "register": t2 - t1, "seconds": t2 - t0})
        if int(err) != 0:
            row["error"] = f"cuMemHostRegister returned CUDA error {err}"
        else:
            src = torch.frombuffer(mm, dtype=torch.uint8)
            row["pinned"] = bool(src.is_pinned())
            dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            torch.cuda.synchronize()
            t3 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            row["copy_gbps"] = nbytes / 1e9 / (time.perf_counter() - t3)
            del src, dst
            hostpool.unregister(addr)
        huge_kib = _anon_huge_kib()
        if huge_kib is not None:
            row["anon_huge_pages_kib_after"] = huge_kib
        rows.append(row)
        mm.close()
    return rows


def _anon_huge_kib() -> int | None:
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="a checkpoint folder (bench_load.py builds one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import warnings

    import torch

    if not torch.cuda.is_available():
        print("probe_register: no CUDA device here; nothing to measure")
        return 0
    files = sorted(str(p) for p in Path(args.dir).glob("*.safetensors"))
    if not files:
        print(f"probe_register: no .safetensors files in {args.dir}")
        return 0
    C.warm(files)
    dst = torch.empty(max(os.path.getsize(f) for f in files), dtype=torch.uint8, device="cuda")
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # frombuffer warns that the buffer is not writable
        for f in files:
            row = probe_file(torch, f, dst)
            row["file"] = os.path.basename(f)
            rows.append(row)
    total = sum(r.get("bytes", 0) for r in rows if "error" not in r)
    print(f"cuMemHostRegister(read-only) of warm file mappings, {len(rows)} files, "
          f"{total / 1e9:.2f} GB, {torch.cuda.get_device_name(0)}")
    for r in rows:
        if "error" in r:
            print(f"  {r['file']}: {r['error']}")
            continue
        gb = r["bytes"] / 1e9
        print(f"  {r['file']}: register {r['register']:.3f} s ({gb / r['register']:.1f} GB/s), "
              f"copy {r['copy']:.3f} s ({gb / r['copy']:.1f} GB/s), unregister "
              f"{r['unregister']:.3f} s; pinned: {r['pinned']}; first page equal: {r['same']}")
    good = [r for r in rows if "error" not in r]
    if good:
        seconds = sum(r["register"] + r["copy"] + r["unregister"] for r in good)
        print(f"  all steps: {total / 1e9 / seconds:.1f} GB/s (the engine's warm load, same "
              f"files: see bench_load.py)")
    parallel = probe_parallel(files[0]) if _libc is not None else []
    print(f"registering {os.path.basename(files[0])} in 16 MiB ranges, threads at once:")
    for r in parallel:
        if "error" in r:
            print(f"  {r['error']}")
            continue
        print(f"  {r['threads']} thr: {r['register']:.3f} s ({r['bytes'] / 1e9 / r['register']:.1f}"
              f" GB/s), unregister {r['unregister']:.3f} s; errors {r['errors'] or 'none'}")
    pinning = probe_pinning(torch)
    print("new pinned host memory, 256 MiB each:")
    for r in pinning:
        parts = [f"{r['seconds']:.3f} s ({r['bytes'] / 1e9 / r['seconds']:.2f} GB/s)"]
        if "fault_in" in r:
            parts.append(f"fault-in {r['fault_in']:.3f} s, register {r['register']:.3f} s")
        if "copy_gbps" in r:
            parts.append(f"copy to the GPU {r['copy_gbps']:.1f} GB/s")
        if "anon_huge_pages_kib_after" in r:
            parts.append(f"AnonHugePages {r['anon_huge_pages_kib_after']} KiB")
        parts.append(r.get("error") or f"pinned: {r.get('pinned')}")
        print(f"  {r['how']}: " + "; ".join(parts))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": C.machine(), "files": rows,
                                               "parallel": parallel, "pinning": pinning}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
