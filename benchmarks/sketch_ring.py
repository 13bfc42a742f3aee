"""A file-to-GPU pipeline with no Python per chunk, as a reference row for ``bench_load.py``.

``sketch_ring.c``: reader threads (pthreads) read the chunks, in file order, into a ring of
pinned windows; the calling thread queues each chunk's copies on one stream, in order, and a
window is read into again once the copy of the chunk that last used it has run. This is the
shape of InstantTensor's buffered mode (io_uring and kernel workers there, threads here: 12
reads in flight into 8 MiB windows on a 16-core machine), which loaded 8.21 GB at 34-36 GB/s on
the H200 machine where our engine reached 21-23 (docs/benchmarks.md, section 2). Timed in the
same run: if this shape reaches InstantTensor's speed with threads, the engine's per-chunk work
and its per-reader double buffers are what to change; if not, io_uring's kernel workers are.

It uses the package only to build the C file (``fastsafetensors.loader.native.build``) and for
the CUDA driver's function addresses (``loader/driver.py``); it parses the headers and plans the
chunks as ``sketch_pipeline.py`` does, and allocates each tensor on the device. The ring is
pinned in each load (InstantTensor pins its ring in each load too).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

from sketch_pipeline import plan, read_layout, tensors

SOURCE = Path(__file__).with_name("sketch_ring.c")


class _Chunk(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("fd", "offset", "length", "first", "count")]


class _Piece(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_int64), ("length", ctypes.c_int64)]


def _library() -> tuple[Any, Any]:
    from fastsafetensors.loader import native

    p, i64 = ctypes.c_void_p, ctypes.c_int64
    state = native.load_into({}, SOURCE, {"sketch_ring": (ctypes.c_int, [
        p, p, p, p, i64, p, p, i64, i64, i64])})
    if "missing" in state:
        raise RuntimeError(f"the sketch cannot be built or run: {state['missing']}")
    return state["lib"], state["calls"]


class RingSketch:
    """Load every tensor of ``files`` onto ``device`` with ``readers`` reader threads and a ring
    of ``windows`` pinned windows of ``window`` bytes."""

    def __init__(self, files: list[str], *, device: str = "cuda:0", readers: int = 12,
                 window: int = 8 << 20, windows: int = 12):
        import torch

        self.torch, self.files, self.device = torch, files, torch.device(device)
        self.readers, self.window, self.windows = readers, window, windows
        self.layouts = [read_layout(f) for f in files]
        self.lib, self.calls = _library()

    def load(self) -> dict[str, Any]:
        from fastsafetensors.loader import driver

        torch = self.torch
        cuda = self.device.type == "cuda"
        flats, jobs = plan(torch, self.layouts, self.device, self.window)
        ring = torch.empty(self.window * self.windows, dtype=torch.uint8, pin_memory=cuda)
        fds = [os.open(path, os.O_RDONLY) for path in self.files]
        try:
            chunks = (_Chunk * len(jobs))()
            pieces = (_Piece * sum(len(job[3]) for job in jobs))()
            at = 0
            for i, (index, offset, length, parts) in enumerate(jobs):
                chunks[i] = _Chunk(fds[index], offset, length, at, len(parts))
                for dst, dst_offset, src_offset, n in parts:
                    pieces[at] = _Piece(dst.data_ptr() + dst_offset, src_offset, n)
                    at += 1
            index = self.device.index if self.device.index is not None else 0
            stream = torch.cuda.current_stream(self.device).cuda_stream if cuda else 0
            code = self.lib.sketch_ring(
                ctypes.byref(self.calls), driver._context(index if cuda else 0), stream,
                chunks, len(jobs), pieces, ring.data_ptr(), self.window, self.windows,
                self.readers)
        finally:
            for fd in fds:
                os.close(fd)
        if code < 0:
            raise OSError(-code, os.strerror(-code))
        if code:
            driver._check(code, "sketch_ring")
        return tensors(torch, self.layouts, flats)
