"""Framework adapters: bytes in host memory -> framework tensors. Only this package imports
torch or numpy, and only when that framework is asked for."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import ConfigError, FrameworkNotInstalledError
from ..format import TensorInfo

__all__ = ["Framework", "get_framework", "FRAMEWORKS"]

#: accepted spellings -> canonical name (safetensors uses "pt"/"np"; people write "torch" too)
FRAMEWORKS = {"pt": "pt", "torch": "pt", "pytorch": "pt", "np": "np", "numpy": "np"}


class Framework(Protocol):
    """What the loaders need from a framework."""

    name: str

    def alloc(self, nbytes: int, *, align: int = 64) -> tuple[Any, memoryview]:
        """A fresh 1-D uint8 array of ``nbytes`` whose first byte is ``align``-aligned, and a
        writable memoryview of it."""

    def exact(self, raw: Any, start: int, nbytes: int) -> Any:
        """Bytes ``[start, start + nbytes)`` of the 1-D uint8 array ``raw``, sharing its memory,
        as an array whose storage holds those bytes only (where the framework has storages)."""

    def dtype(self, dtype: str, tensor: str | None = None) -> Any:
        """The framework's dtype object for a file dtype string; UnsupportedDTypeError if none."""

    def view(self, buffer: Any, start: int, info: TensorInfo) -> Any:
        """``buffer[start:start + info.nbytes]`` as a tensor of the file's dtype and shape.
        The caller guarantees ``start`` is a multiple of ``info.itemsize`` (or copies first)."""

    def viewer(self, buffer: Any) -> Callable[[int, TensorInfo], Any]:
        """A function doing :meth:`view` on ``buffer`` for many tensors, faster per tensor."""

    def convert(self, tensor: Any, *, device: str | None, dtype: Any) -> Any:
        """Cast and move, without a copy when nothing changes."""


#: canonical name -> (the library its adapter module, of the same name, needs; how to install it)
_ADAPTERS = {
    "pt": ("torch", "pip install torch  (or: pip install 'fastsafetensors[torch]')"),
    "np": ("numpy", "pip install numpy  (or reinstall: pip install fastsafetensors)"),
}


def get_framework(name: str) -> Framework:
    canonical = FRAMEWORKS.get(name)
    if canonical is None:
        raise ConfigError("framework", name, FRAMEWORKS)
    library, install = _ADAPTERS[canonical]
    try:
        module = importlib.import_module(f"{__name__}.{library}")
    except ModuleNotFoundError as exc:
        # The torch adapter needs numpy too (the loaders write into host memory through a
        # tensor's numpy view); numpy is a dependency of this package, but can be uninstalled.
        if exc.name == "numpy" and library != "numpy":
            library, install = _ADAPTERS["np"]
        elif exc.name != library:   # a broken install is a bug to see, not a missing library
            raise
        raise FrameworkNotInstalledError(library, name, install) from None
    framework: Framework = module.TORCH if canonical == "pt" else module.NUMPY
    return framework


def resolve_device(device: Any, framework: str = "pt", *, pin_index: bool = False) -> str:
    """Normalise a device name; ``cuda`` without a usable GPU raises NoGPUError here, before
    any file is opened or byte read. ``pin_index``: a bare ``cuda`` becomes ``cuda:N`` for the
    caller's current device, for loaders that read on threads of their own, where the current
    device is 0 whatever the caller chose (it initialises CUDA, so only they ask for it)."""
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}"   # a bare index means a CUDA device, as in safetensors
    name = str(device) if device is not None else "cpu"
    if name == "cpu":
        return name
    if FRAMEWORKS.get(framework) != "pt":
        raise ConfigError("device", name, ["cpu (numpy arrays live in host memory)"])
    # torch's own error says less ("cuda:x"), and takes no "cuda:01" or 20-digit index
    if not re.fullmatch(r"cuda(:(0|[1-9][0-9]{0,8}))?", name):
        raise ConfigError("device", name, ["cpu", "cuda", "cuda:N", "N (an int, meaning cuda:N)"])
    import torch

    from ..errors import NoGPUError

    if not torch.cuda.is_available():
        detail = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
                  else "the CUDA driver reports no device")
        raise NoGPUError(name, detail)
    index = torch.device(name).index
    if index is None:
        return f"cuda:{torch.cuda.current_device()}" if pin_index else name
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError("device", name, [f"cuda:{i}" for i in range(count)] + [
            "(CUDA_VISIBLE_DEVICES decides which GPUs this process sees, numbered from 0)"])
    return name
