"""A plain-Python file-to-GPU pipeline, as a reference row for ``bench_load.py``.

``../shared/ANCHORS.md`` reports that a sketch of this shape reached 35-39 GB/s warm on the
H200 machine: threads, each ``preadv``-ing chunks into its own two pinned staging buffers and
copying them asynchronously on its own CUDA stream into the final tensors. Our engine has that
shape too, plus a planner, a memory budget, page-cache residency, events per tensor and a
generator; on the same machine it reached 9-17 GB/s. Timed in the same run, this pipeline says
which side of that gap is the machine and which is the engine: if it runs at the engine's speed,
the machine (or pinning) is the limit; if it runs at InstantTensor's, the engine's extra work is.

It uses nothing of the package (it is the reference, not a loader): it parses the header
itself, loads every tensor of every file, and holds no memory budget. ``prepinned`` allocates
the staging outside the timed load, which separates pinning from the rest. On the CPU
(``device="cpu"``: plain buffers, no streams) it runs too, so that its result can be checked
without a GPU.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import struct
import threading
from typing import Any

#: safetensors dtype names of the benchmark's checkpoints (bf16, with f32 and f16 for tests).
DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "U8": "uint8",
          "I64": "int64"}


def read_layout(path: str) -> tuple[int, list[tuple[str, str, list[int], int, int]]]:
    """(absolute offset of the data region, [(name, dtype, shape, begin, end)] in file order)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    entries = [(name, e["dtype"], e["shape"], *e["data_offsets"]) for name, e in header.items()]
    return 8 + size, sorted(entries, key=lambda e: e[3])


#: One chunk of one file: (file index, file offset, length, [(dst, dst offset, src offset, n)]).
Job = tuple[int, int, int, list[tuple[Any, int, int, int]]]


def plan(torch: Any, layouts: list[tuple[int, list[Any]]], device: Any,
         buffer: int) -> tuple[dict[str, Any], list[Job]]:
    """Every tensor allocated flat on ``device``, and the chunks of at most ``buffer`` bytes
    that cover them, file by file in file order."""
    flats: dict[str, Any] = {}
    jobs: list[Job] = []
    for index, (start, entries) in enumerate(layouts):
        pieces: list[tuple[Any, int, int, int]] = []
        chunk_begin = start + (entries[0][3] if entries else 0)
        for name, _, _, begin, end in entries:
            flat = torch.empty(end - begin, dtype=torch.uint8, device=device)
            flats[name] = flat
            pos = start + begin
            while pos < start + end:
                if pos - chunk_begin >= buffer:
                    jobs.append((index, chunk_begin, buffer, pieces))
                    pieces, chunk_begin = [], pos
                n = min(start + end - pos, chunk_begin + buffer - pos)
                pieces.append((flat, pos - start - begin, pos - chunk_begin, n))
                pos += n
        if pieces:
            last = pieces[-1]
            jobs.append((index, chunk_begin, last[2] + last[3], pieces))
    return flats, jobs


def tensors(torch: Any, layouts: list[tuple[int, list[Any]]],
            flats: dict[str, Any]) -> dict[str, Any]:
    """The flat tensors viewed with their dtypes and shapes."""
    out = {}
    for _, entries in layouts:
        for name, dtype, shape, _, _ in entries:
            out[name] = flats[name].view(getattr(torch, DTYPES[dtype])).view(shape)
    return out


class Sketch:
    """Load every tensor of ``files`` onto ``device`` with ``threads`` reader threads and
    ``buffer`` bytes per staging buffer (two per thread)."""

    def __init__(self, files: list[str], *, device: str = "cuda:0", threads: int = 8,
                 buffer: int = 16 << 20, prepinned: bool = False):
        import torch

        self.torch, self.files, self.device = torch, files, torch.device(device)
        self.threads, self.buffer = threads, buffer
        self.cuda = self.device.type == "cuda"
        self.layouts = [read_layout(f) for f in files]
        self.staging = [self._pin() for _ in range(threads)] if prepinned else None

    def _pin(self) -> list[Any]:
        return [self.torch.empty(self.buffer, dtype=self.torch.uint8, pin_memory=self.cuda)
                for _ in range(2)]

    def load(self) -> dict[str, Any]:
        flats, jobs = plan(self.torch, self.layouts, self.device, self.buffer)
        fds = []
        try:
            for path in self.files:
                fds.append(os.open(path, os.O_RDONLY))
            self._run([(fds[i], offset, length, pieces) for i, offset, length, pieces in jobs])
        finally:
            for fd in fds:
                os.close(fd)
        return tensors(self.torch, self.layouts, flats)

    def _run(self, jobs: list[tuple[int, int, int, list[tuple[Any, int, int, int]]]]) -> None:
        torch = self.torch
        order = itertools.count()        # next() is atomic under the GIL
        errors: list[BaseException] = []

        def reader(k: int) -> None:
            try:
                stream = torch.cuda.Stream(self.device) if self.cuda else None
                buffers = self.staging[k] if self.staging else self._pin()
                views = [memoryview(b.numpy()) for b in buffers]
                done: list[Any] = [None, None]
                turn = 0
                with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
                    while not errors:
                        i = next(order)
                        if i >= len(jobs):
                            break
                        fd, offset, length, pieces = jobs[i]
                        if done[turn] is not None:
                            done[turn].synchronize()      # the copies out of this buffer ran
                        got = 0
                        while got < length:
                            n = os.preadv(fd, [views[turn][got:length]], offset + got)
                            if n <= 0:
                                raise OSError(f"short read at {offset + got}")
                            got += n
                        src = buffers[turn]
                        for dst, dst_off, src_off, n in pieces:
                            dst[dst_off:dst_off + n].copy_(src[src_off:src_off + n],
                                                           non_blocking=True)
                        done[turn] = stream.record_event() if stream else None
                        turn ^= 1
                if stream:
                    stream.synchronize()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(self.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
