"""Reader processes in place of reader threads: a reference row for ``bench_load.py``.

The engine and ``sketch_pipeline.py`` read in threads of one Python process. A thread releases
the GIL inside ``preadv``, but between two reads it needs it to queue its copies and take its
next chunk, so the more threads, the longer each waits for the others' Python work: on the H100
machine 16 reader threads loaded slower than 8, and 8 read the cached files at half the pinned
copy's speed. Here each reader is a process of its own (plain Python, no torch), reading chunks
into staging it shares with the loading process (a ``memfd`` mapped in both, registered with
CUDA there); the loading process only sends each reader its next chunk and queues the copies
out of the reader's staging, on one CUDA stream per reader. Timed beside the raw reads with 8
and 16 threads, it says whether reads without a GIL between them scale past 8 readers, the
route to the warm targets if they do.

The readers start (and the staging is pinned) before the clock, as a loader would keep such a
pool for its process. It uses nothing of the package. On the CPU (``device="cpu"``: copies
from the shared staging, no streams) it runs too, so that its result can be checked without a
GPU.

    python benchmarks/sketch_procs.py --reader MEMFD SIZE FILE...   # a reader (internal)
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import struct
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sketch_pipeline import plan, read_layout, tensors  # noqa: E402

#: A job for a reader: file index (-1: stop), file offset, length, offset in the staging.
JOB = struct.Struct("<qqqq")
#: A reader's answer: the staging offset it filled, or -1 after a failed read.
DONE = struct.Struct("<q")


def _read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = os.read(fd, n - len(data))
        if not part:
            return data
        data += part
    return data


def reader(memfd: int, size: int, files: list[str]) -> None:
    """A reader process: read each job's bytes into the shared staging, answer when done."""
    view = memoryview(mmap.mmap(memfd, size))
    fds = [os.open(path, os.O_RDONLY) for path in files]
    os.write(1, DONE.pack(0))   # ready: the loading process waits for this before any load
    while True:
        message = _read_exact(0, JOB.size)
        if len(message) < JOB.size:
            return
        index, offset, length, at = JOB.unpack(message)
        if index < 0:
            return
        got = 0
        while got < length:
            n = os.preadv(fds[index], [view[at + got:at + length]], offset + got)
            if n <= 0:
                os.write(1, DONE.pack(-1))
                return
            got += n
        os.write(1, DONE.pack(at))


class ProcSketch:
    """Load every tensor of ``files`` onto ``device`` with ``procs`` reader processes, each
    with two staging buffers of ``buffer`` bytes."""

    def __init__(self, files: list[str], *, device: str = "cuda:0", procs: int = 16,
                 buffer: int = 16 << 20):
        import torch

        self.torch, self.files, self.device = torch, files, torch.device(device)
        self.procs, self.buffer = procs, buffer
        self.cuda = self.device.type == "cuda"
        self.layouts = [read_layout(f) for f in files]
        self.size = procs * 2 * buffer
        self.memfd = os.memfd_create("fastsafetensors-sketch-staging")
        os.ftruncate(self.memfd, self.size)
        self.mapping = mmap.mmap(self.memfd, self.size)
        self.staging = torch.frombuffer(self.mapping, dtype=torch.uint8)
        self.registered = False
        if self.cuda:
            error = torch.cuda.cudart().cudaHostRegister(self.staging.data_ptr(), self.size, 0)
            if int(error) != 0:
                raise RuntimeError(f"cudaHostRegister of the shared staging failed: {error}")
            self.registered = True
        self.broken: BaseException | None = None
        self.children = [subprocess.Popen(
            [sys.executable, __file__, "--reader", str(self.memfd), str(self.size), *files],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(self.memfd,))
            for _ in range(procs)]
        for child in self.children:   # every reader started, before any clock
            assert child.stdout is not None
            if _read_exact(child.stdout.fileno(), DONE.size) != DONE.pack(0):
                raise RuntimeError("a reader process did not start")

    def reader_cpu_seconds(self) -> float:
        """User and system CPU time the reader processes have used so far."""
        ticks = 0
        for child in self.children:
            with contextlib.suppress(OSError):   # a reader that died (the load says so)
                with open(f"/proc/{child.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])   # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        for child in self.children:
            with contextlib.suppress(OSError):
                assert child.stdin is not None
                child.stdin.write(JOB.pack(-1, 0, 0, 0))
                child.stdin.close()
        for child in self.children:
            child.wait(timeout=30)
        if self.registered:
            self.torch.cuda.cudart().cudaHostUnregister(self.staging.data_ptr())
            self.registered = False
        del self.staging
        self.mapping.close()
        os.close(self.memfd)

    def load(self) -> dict[str, Any]:
        if self.broken is not None:   # a reader may still owe answers to the failed load
            raise RuntimeError(f"an earlier load failed: {self.broken!r}")
        flats, jobs = plan(self.torch, self.layouts, self.device, self.buffer)
        order = itertools.count()        # next() is atomic under the GIL
        errors: list[BaseException] = []
        threads = [threading.Thread(target=self._drive, args=(k, jobs, order, errors))
                   for k in range(self.procs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.broken = errors[0]
            for child in self.children:
                child.kill()
            raise errors[0]
        return tensors(self.torch, self.layouts, flats)

    def _drive(self, k: int, jobs: list[Any], order: Any, errors: list[BaseException]) -> None:
        """Keep reader ``k`` busy (a job in each of its two buffers) and queue the copies out
        of each buffer it fills."""
        torch = self.torch
        child = self.children[k]
        assert child.stdin is not None and child.stdout is not None
        send, answers = child.stdin.fileno(), child.stdout.fileno()
        base = k * 2 * self.buffer
        stream = torch.cuda.Stream(self.device) if self.cuda else None
        copied: list[Any] = [None, None]   # per buffer: the event after its last copies
        pending: deque[tuple[int, Any]] = deque()

        def submit(slot: int) -> None:
            i = next(order)
            if i >= len(jobs) or errors:
                return
            if copied[slot] is not None:
                copied[slot].synchronize()   # the copies out of this buffer ran
            index, offset, length, pieces = jobs[i]
            os.write(send, JOB.pack(index, offset, length, base + slot * self.buffer))
            pending.append((slot, pieces))

        try:
            with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
                submit(0)
                submit(1)
                while pending:
                    slot, pieces = pending.popleft()
                    (at,) = DONE.unpack(_read_exact(answers, DONE.size))
                    if at != base + slot * self.buffer:
                        raise OSError(f"reader {k} failed a read (answered {at})")
                    src = self.staging[at:at + self.buffer]
                    for dst, dst_off, src_off, n in pieces:
                        dst[dst_off:dst_off + n].copy_(src[src_off:src_off + n],
                                                       non_blocking=True)
                    # A blocking event: up to 16 threads wait on these, beside 16 readers;
                    # spinning (CUDA's default) would take the readers' cores.
                    copied[slot] = (stream.record_event(torch.cuda.Event(blocking=True))
                                    if stream else None)
                    submit(slot)
                if stream:
                    stream.synchronize()
        except BaseException as exc:  # noqa: BLE001 - re-raised by load()
            errors.append(exc)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--reader"]:
        reader(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
    else:
        sys.exit(__doc__)
