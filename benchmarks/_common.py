"""Helpers for the benchmarks: synthetic checkpoints, page-cache control, raw reads, checks.

Nothing here imports ``fastsafetensors``: the peer children run with the upstream package (which
has our import name) first on ``sys.path``. The page-cache probe is this repository's own
``fastsafetensors/loader/pagecache.py``, loaded from its file under a private name (it needs only
the standard library), so every child measures residency the same way.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import math
import mmap
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PAGE = mmap.PAGESIZE
DIRECT_ALIGN = 4096
MiB = 1 << 20
GiB = 1 << 30


def bench_dir(given: str | None) -> Path:
    """Where a benchmark writes its files: ``given`` (its ``--dir``), or
    ``<temp dir>/fastsafetensors-bench``; made if missing."""
    import tempfile

    folder = Path(given or Path(tempfile.gettempdir()) / "fastsafetensors-bench")
    folder.mkdir(parents=True, exist_ok=True)
    return folder

# --------------------------------------------------------------------------- page cache

_pagecache = None


def pagecache() -> Any:
    """``fastsafetensors.loader.pagecache`` of this repository, imported from its file."""
    global _pagecache
    if _pagecache is None:
        path = REPO / "fastsafetensors" / "loader" / "pagecache.py"
        spec = importlib.util.spec_from_file_location("_bench_pagecache", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _pagecache = module
    return _pagecache


def resident(path: str) -> float:
    """Fraction of ``path``'s pages in the page cache (1.0 where mincore is unavailable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        value = pagecache().resident_fraction(fd)
    finally:
        os.close(fd)
    return 1.0 if value is None else value


def evict(paths: Iterable[str]) -> float:
    """Drop ``paths`` from the page cache (fdatasync, then POSIX_FADV_DONTNEED per file) and
    return the largest resident fraction left afterwards (should be about 0)."""
    worst = 0.0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            value = pagecache().resident_fraction(fd)
        finally:
            os.close(fd)
        worst = max(worst, 1.0 if value is None else value)
    return worst


def warm(paths: Iterable[str], *, scratch: bytearray | None = None) -> float:
    """Read every file once through the page cache (unless it is already there) and return the
    smallest resident fraction afterwards (should be about 1)."""
    buf = scratch if scratch is not None else bytearray(8 * MiB)
    view = memoryview(buf)
    worst = 1.0
    for path in paths:
        if resident(path) < 0.99:
            fd = os.open(path, os.O_RDONLY)
            try:
                offset = 0
                while got := os.preadv(fd, [view], offset):
                    offset += got
            finally:
                os.close(fd)
        worst = min(worst, resident(path))
    return worst


def prepare(paths: Sequence[str], mode: str) -> dict[str, Any]:
    """Put ``paths`` in the state ``mode`` ("warm" or "cold") names, and say whether it worked."""
    if mode == "cold":
        left = evict(paths)
        return {"resident": left, "state_ok": left < 0.05}
    got = warm(paths)
    return {"resident": got, "state_ok": got > 0.95}


# --------------------------------------------------------------------------- raw reads


@dataclass(frozen=True)
class Span:
    """The data region of one file: bytes ``[begin, end)``."""

    path: str
    begin: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.begin


def data_spans(paths: Sequence[str]) -> list[Span]:
    """The data region (after the JSON header) of each safetensors file."""
    spans = []
    for path in paths:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
        spans.append(Span(path, 8 + n, os.path.getsize(path)))
    return spans


class AnonBuffer:
    """Page-aligned anonymous memory (fresh zero pages: the first touch of each page faults).
    ``populate``: MAP_POPULATE, the kernel faults every page in at mmap time."""

    def __init__(self, size: int, *, populate: bool = False, hugepage: bool = False) -> None:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if populate:
            flags |= getattr(mmap, "MAP_POPULATE", 0x8000)
        self.size = max(size, PAGE)
        self.mm = mmap.mmap(-1, self.size, flags=flags)
        if hugepage and hasattr(self.mm, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
            self.mm.madvise(mmap.MADV_HUGEPAGE)
        self.view = memoryview(self.mm)

    def close(self) -> None:
        self.view.release()
        self.mm.close()


def _pread_full(fd: int, dest: memoryview, offset: int) -> int:
    done = 0
    while done < len(dest):
        got = os.preadv(fd, [dest[done:]], offset + done)
        if got == 0:
            break  # end of file (an O_DIRECT read rounded up past it)
        done += got
    return done


def raw_read(spans: Sequence[Span], *, threads: int, chunk: int, direct: bool = False,
             buffers: Sequence[memoryview] | None = None, fresh: Callable[[int], Any] | None = None
             ) -> tuple[int, list[Any]]:
    """Read every span with ``threads`` threads of ``preadv`` in ``chunk``-byte pieces.

    ``buffers``: one reused destination per span (already touched). Otherwise ``fresh(size)``
    allocates a new buffer per span (an object with ``.view``), returned so the caller frees it
    after the clock stops, as a loader's caller would hold its tensors. With ``direct`` reads use
    O_DIRECT: offsets, lengths and buffer addresses are aligned to 4096.
    Returns (bytes of the data regions, fresh buffers)."""
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = [os.open(s.path, flags) for s in spans]
    owned: list[Any] = []
    try:
        work = []
        for i, span in enumerate(spans):
            begin = span.begin - span.begin % DIRECT_ALIGN if direct else span.begin
            end = -(-span.end // DIRECT_ALIGN) * DIRECT_ALIGN if direct else span.end
            if buffers is not None:
                view = buffers[i]
            else:
                assert fresh is not None
                buf = fresh(end - begin)
                owned.append(buf)
                view = buf.view
            for off in range(begin, end, chunk):
                stop = min(end, off + chunk)
                work.append((fds[i], view[off - begin:stop - begin], off))
        if threads <= 1:
            for w in work:
                _pread_full(*w)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda w: _pread_full(*w), work))
    finally:
        for fd in fds:
            os.close(fd)
    return sum(s.size for s in spans), owned


# --------------------------------------------------------------------------- checks

_VMSTAT_KEYS = ("thp_fault_alloc", "thp_fault_fallback", "compact_stall", "pgfault",
                "pgmajfault")


def vmstat() -> dict[str, int]:
    """System-wide counters that explain fresh-memory costs (huge pages got or not, direct
    compaction, page faults). Other processes move them too: a hint, not a measurement."""
    out = {}
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                key, value = line.split()
                if key in _VMSTAT_KEYS:
                    out[key] = int(value)
    except OSError:
        pass
    return out


def vmstat_delta(before: dict[str, int]) -> dict[str, int]:
    after = vmstat()
    return {k: after[k] - before.get(k, 0) for k in after}


def _anon_ranges() -> list[tuple[int, int, bool]]:
    """(start, end, file_backed) for each mapping of this process."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            name = parts[5].strip() if len(parts) > 5 else ""
            out.append((lo, hi, name.startswith("/")))
    return out


_libc = None


def _mincore_resident(addr: int, length: int) -> int:
    """Resident bytes (whole pages) of ``[addr, addr + length)`` per mincore."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6", use_errno=True)
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    start = addr - addr % PAGE
    span = addr + length - start
    pages = (span + PAGE - 1) // PAGE
    vec = ctypes.create_string_buffer(pages)
    if _libc.mincore(ctypes.c_void_p(start), span, vec) != 0:
        return length  # unknown: do not claim it is lazy
    return min(length, (pages - vec.raw.count(0)) * PAGE)


def materialization(tensors: dict[str, Any]) -> dict[str, Any]:
    """Where the bytes of host tensors live: file-backed mappings (a lazy mmap, like
    safetensors.load_file) or anonymous memory, and how much of that is resident."""
    maps = _anon_ranges()
    file_bytes = anon_bytes = resident_bytes = 0
    for t in tensors.values():
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        ptr, n = t.data_ptr(), t.numel() * t.element_size()
        hit = next((m for m in maps if m[0] <= ptr < m[1]), None)
        if hit is not None and hit[2]:
            file_bytes += n
        else:
            anon_bytes += n
            resident_bytes += _mincore_resident(ptr, n)
    total = file_bytes + anon_bytes
    return {"file_backed_fraction": file_bytes / total if total else 0.0,
            "anon_resident_fraction": resident_bytes / anon_bytes if anon_bytes else 1.0}


def compare(tensors: dict[str, Any], paths: Sequence[str], *, sample: int = 6) -> dict[str, Any]:
    """Check a loader's result against safetensors: same names, and ``sample`` tensors (first,
    last, the smallest and largest, some in between) equal bit for bit."""
    import torch
    from safetensors import safe_open

    where: dict[str, str] = {}
    for path in paths:
        with safe_open(path, framework="pt") as f:
            for k in f.keys():  # noqa: SIM118  (safe_open is not iterable)
                where[k] = path
    names = sorted(where)
    if set(tensors) != set(where):
        missing = sorted(set(where) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(where))[:3]
        return {"ok": False, "why": f"names differ: missing {missing} extra {extra}"}
    sizes = {k: tensors[k].numel() * tensors[k].element_size() for k in names}
    picks = {names[0], names[-1], min(names, key=sizes.__getitem__),
             max(names, key=sizes.__getitem__)}
    step = max(1, len(names) // max(1, sample - len(picks)))
    picks.update(names[::step][: max(0, sample - len(picks))])
    for name in sorted(picks):
        with safe_open(where[name], framework="pt") as f:
            ref = f.get_tensor(name)
        got = tensors[name].detach().to("cpu")
        if got.dtype != ref.dtype or tuple(got.shape) != tuple(ref.shape):
            return {"ok": False, "why": f"{name}: {got.dtype}{tuple(got.shape)} vs "
                                        f"{ref.dtype}{tuple(ref.shape)}"}
        if not torch.equal(got.contiguous().view(torch.uint8), ref.contiguous().view(torch.uint8)):
            return {"ok": False, "why": f"{name}: bytes differ"}
    return {"ok": True, "checked": sorted(picks)}


def touch_pages(tensors: dict[str, Any]) -> int:
    """Read one byte of every 4 KiB page of every tensor (faults in a lazy mmap)."""
    import torch

    total = 0
    for t in tensors.values():
        if t.numel():
            total += int(t.reshape(-1).view(torch.uint8)[::PAGE].sum())
    return total


# --------------------------------------------------------------------------- checkpoints


def llama_shapes(size_bytes: int) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Tensor shapes of a Llama-like model of about ``size_bytes`` of bf16: embedding and head
    (vocab x hidden), per layer q/k/v/o (GQA), gate/up/down MLP and two RMSNorm vectors."""
    if size_bytes >= 6e9:
        cfg = {"hidden": 4096, "inter": 14336, "kv": 1024, "vocab": 128256}
    elif size_bytes >= 1e9:
        cfg = {"hidden": 2048, "inter": 8192, "kv": 512, "vocab": 128256}
    else:
        cfg = {"hidden": 1024, "inter": 4096, "kv": 256, "vocab": 32000}
    h, i, kv, v = cfg["hidden"], cfg["inter"], cfg["kv"], cfg["vocab"]
    per_layer = 2 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)
    fixed = 2 * (2 * v * h + h)
    cfg["layers"] = max(1, round((size_bytes - fixed) / per_layer))
    return layer_shapes(cfg), cfg


def layer_shapes(cfg: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """The tensors of a Llama-like model of ``cfg`` (hidden, inter, kv, vocab, layers)."""
    h, i, kv, v = cfg["hidden"], cfg["inter"], cfg["kv"], cfg["vocab"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["layers"]):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (h, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, h)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def floor_config(cfg: dict[str, int]) -> dict[str, int]:
    """A model with the layers, names and tensor count of ``cfg`` and almost no bytes (128
    wide): loading it times what a loader spends besides moving bytes."""
    return {"hidden": 128, "inter": 256, "kv": 64, "vocab": 256, "layers": cfg["layers"]}


def build_checkpoint(folder: Path, size_gb: float, *, shards: int = 4,
                     cfg: dict[str, int] | None = None) -> dict[str, Any]:
    """Write (once; reused while its ``bench.json`` matches) a sharded bf16 Llama-like
    checkpoint with a ``model.safetensors.index.json``: of about ``size_gb``, or of exactly
    ``cfg`` when given. Returns the description."""
    import torch
    from safetensors.torch import save_file

    size = int(size_gb * 1e9)
    stamp = folder / "bench.json"
    if stamp.exists():
        info = json.loads(stamp.read_text())
        if (info.get("size_gb") == size_gb and (cfg is None or info.get("config") == cfg)
                and all((folder / f).exists() for f in info["files"])):
            return info
    folder.mkdir(parents=True, exist_ok=True)
    if cfg is None:
        shapes, cfg = llama_shapes(size)
    else:
        shapes = layer_shapes(cfg)
    total = sum(2 * math.prod(s) for s in shapes.values())
    per_shard = total / shards
    groups: list[list[str]] = [[]]
    acc = 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if groups[-1] and acc + nbytes / 2 > per_shard * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(name)
        acc += nbytes
    # On a GPU machine the numbers come from the GPU: one CPU thread makes about 100 M/s, which
    # for 8 GB is over two minutes of a lent machine's 10-minute call.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    files, weight_map = [], {}
    started = time.perf_counter()
    for k, names in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=gen, device=device) * 0.02
                                 ).to(torch.bfloat16).cpu()
            weight_map[name] = fname
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
        files.append(fname)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "hidden_size": cfg["hidden"], "intermediate_size": cfg["inter"],
        "num_hidden_layers": cfg["layers"], "vocab_size": cfg["vocab"],
        "num_attention_heads": cfg["hidden"] // 64, "num_key_value_heads": cfg["kv"] // 64}))
    info = {"size_gb": size_gb, "files": files, "tensor_bytes": total, "tensors": len(shapes),
            "config": cfg, "build_seconds": round(time.perf_counter() - started, 1)}
    stamp.write_text(json.dumps(info, indent=2))
    return info


#: Layout of build_many's file: 2 since the fourteenth session, whose sizes are whole multiples
#: of 16 bytes, as the small tensors of real checkpoints are (norms, biases, scales); 1 had
#: any number of elements, so most tensors started off the 16-byte grid.
MANY_LAYOUT = 2


def build_many(path: Path, count: int = 20_000) -> dict[str, Any]:
    """One file of ``count`` small tensors (128 B to 16 KiB, bf16 and f32, each a multiple of
    8 elements), written once."""
    import torch
    from safetensors.torch import save_file

    stamp = path.with_suffix(".json")
    if path.exists() and stamp.exists():
        known = json.loads(stamp.read_text())
        if known.get("count") == count and known.get("layout") == MANY_LAYOUT:
            return known
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    sizes = (torch.randint(8, 512, (count,), generator=gen) * 8).tolist()
    tensors = {}
    for n, numel in enumerate(sizes):
        dtype = torch.float32 if n % 3 == 0 else torch.bfloat16
        tensors[f"blocks.{n // 8}.part{n % 8}.weight"] = torch.randn(numel, generator=gen).to(dtype)
    save_file(tensors, str(path))
    info = {"count": count, "layout": MANY_LAYOUT,
            "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    stamp.write_text(json.dumps(info))
    return info


# --------------------------------------------------------------------------- reporting


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": sys.version.split()[0],
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
            "thp": _read("/sys/kernel/mm/transparent_hugepage/enabled")}


def filesystem(path: str) -> str:
    """The filesystem type and device holding ``path`` (longest /proc/mounts prefix)."""
    best = ("", "?", "?")
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and \
                        len(mnt) > len(best[0]):
                    best = (mnt, fstype, dev)
    except OSError:
        pass
    return f"{best[1]} on {best[2]}"


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "?"
