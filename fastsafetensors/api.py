"""safetensors' verbs over the fastsafetensors loaders.

``load_file`` returns fully read tensors (not a lazy mmap), ``loads`` parses bytes held in
memory, ``safe_open`` opens one file lazily with the methods of ``safetensors.safe_open``.
"""

from __future__ import annotations

import os
from typing import Any

from .file import FastSafetensorsFile
from .format import TensorInfo, header_from_bytes
from .frameworks import get_framework, resolve_device
from .gcpause import paused
from .loader.cpu import FileJob, close_job, load_host, open_job, tensors_from_buffer
from .loader.plan import Extent

__all__ = ["load_file", "loads", "safe_open"]


def load_file(path: str | os.PathLike[str], *, device: str = "cpu", framework: str = "pt",
              threads: int | None = None, io: str | None = None) -> dict[str, Any]:
    """Read every tensor of one file: ``{name: tensor}`` in file order.

    >>> import fastsafetensors
    >>> tensors = fastsafetensors.load_file("model.safetensors")   # doctest: +SKIP
    """
    fw = get_framework(framework)
    target = resolve_device(device, framework)
    if target != "cpu":
        from .loading import load

        return load([path], device=target, framework=framework, threads=threads, io=io)
    with paused():   # gcpause.py: a whole result, many objects that live on
        job = open_job(path)
        try:
            (tensors,) = load_host([job], fw, threads=threads, io=io)
        finally:
            close_job(job)
    return tensors


def loads(data: bytes | bytearray | memoryview, *, framework: str = "pt",
          device: str = "cpu") -> dict[str, Any]:
    """Tensors of a whole safetensors file held in memory (e.g. from a network stream). The
    tensors own a copy of the data: ``data`` may be freed or reused afterwards."""
    fw = get_framework(framework)
    target = resolve_device(device, framework)
    header = header_from_bytes(data)
    buffer, view = fw.alloc(header.data_size)
    view[:] = memoryview(data).cast("B")[header.data_start:]
    job = FileJob("<bytes>", header, None, extent=Extent(header.data_start, header.data_size))
    tensors = tensors_from_buffer(fw, buffer, job)
    if target != "cpu":
        tensors = {k: fw.convert(v, device=target, dtype=None) for k, v in tensors.items()}
    return tensors


class SafeOpenFile(FastSafetensorsFile):
    """What :func:`safe_open` returns: a :class:`FastSafetensorsFile` whose ``get_tensors()``
    reads every tensor, as safetensors' handle does (``FastSafetensorsFile.get_tensors()`` is
    the user's metadata-only call; ``get_tensor_infos()`` gives that here)."""

    def get_tensors(self) -> dict[str, Any]:
        return {name: self.get_tensor(name) for name in self.offset_keys()}

    def get_tensor_infos(self) -> dict[str, TensorInfo]:
        return super().get_tensors()


def safe_open(path: str | os.PathLike[str], framework: str = "pt", device: str = "cpu",
              backend: str | None = None) -> SafeOpenFile:
    """Open one file lazily, like ``safetensors.safe_open`` (use it in a ``with`` block).

    ``backend`` is accepted for signature compatibility with safetensors 0.8 (which picks mmap
    or pread with it); this package always uses positioned reads, so it is ignored."""
    return SafeOpenFile(path, device=device, framework=framework)
