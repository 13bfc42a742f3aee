"""accelerate's checkpoint loading through fastsafetensors.

accelerate reads safetensors files in ``accelerate.utils.modeling.load_state_dict``, which
``load_checkpoint_in_model`` and ``load_checkpoint_and_dispatch`` call once per shard. It reads
them through two names of that module, ``safe_open`` (one handle per target device of the
``device_map``) and ``safe_load_file`` (a whole file onto one device). This module replaces both
with dispatchers; accelerate keeps its own logic (metadata checks, which tensor goes to which
device, disk offload, dispatch)::

    from accelerate import load_checkpoint_and_dispatch
    from fastsafetensors.integrations.accelerate import enabled

    with enabled(threads=8):
        model = load_checkpoint_and_dispatch(model, "checkpoint/", device_map="auto")

accelerate has no loader argument, so replacing its reads is opt-in and importing this module
changes nothing:

- ``with enabled(**options):`` loads in the block (this thread and context) go through this
  package, with options of :func:`fastsafetensors.configure`;
- ``install(**options)``: every later load in the process does, until ``uninstall()``.

Files go to CPU memory or straight to a CUDA device (``0``, ``"cuda:1"``, ...). Other devices
(``"mps"``, ``"npu:0"``, ...) and ``.bin`` files stay with accelerate's own reads. One INFO line
per file read on the ``fastsafetensors.integrations.accelerate`` logger.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .. import config
from ..api import SafeOpenFile
from ..errors import FrameworkNotInstalledError, IncompatibleVersionError
from ..forking import renew_lock
from . import human_size, major_version

__all__ = ["install", "uninstall", "enabled", "is_installed", "SUPPORTED",
           "IncompatibleVersionError"]

logger = logging.getLogger(__name__)

#: The accelerate releases this module is written and tested for.
SUPPORTED = "accelerate>=1.0,<2"
#: The module whose globals are replaced, and the function that must still call them.
SITE = "accelerate.utils.modeling"
READER = ("load_state_dict", ("checkpoint_file", "device_map"))

#: Options of the loads in an ``enabled()`` block; None outside one.
_BLOCK: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "fastsafetensors_accelerate_options", default=None)
#: Options set by ``install()`` for every load; None when only blocks route.
_GLOBAL: dict[str, Any] | None = None
_lock = threading.Lock()   # held through install()'s import of accelerate: renewed in a child
renew_lock(sys.modules[__name__])


def _options() -> dict[str, Any] | None:
    block = _BLOCK.get()
    return block if block is not None else _GLOBAL


def _target(device: Any) -> str | None:
    """The device name this package reads to, or None for one it leaves to accelerate."""
    if isinstance(device, int) and not isinstance(device, bool):
        # accelerate passes a bare index on to safetensors as it is (it names only NPU and HPU
        # devices itself), and torch reads it as one of the current accelerator's: xpu:N on an
        # Intel GPU, whose "auto" device maps hold ints too. Only CUDA's indices are ours.
        return f"cuda:{device}" if _index_type() == "cuda" else None
    name = str(device)
    if name == "cpu" or name == "cuda" or name.startswith("cuda:"):
        return name
    return None


def _index_type() -> str:
    """The device type torch gives a bare index: the current accelerator's (CUDA before torch
    2.6, which has no torch.accelerator, and where there is none: a read then says no GPU)."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    current = accelerator.current_accelerator() if accelerator is not None else None
    return "cuda" if current is None else current.type


class _File(SafeOpenFile):
    """The handle accelerate's ``safe_open`` gets: reads under the load's options, and one INFO
    line at close when it read anything (accelerate also opens files just for their keys)."""

    def __init__(self, path: Any, device: str, options: dict[str, Any]):
        super().__init__(path, device=device, framework="pt")
        self._options = options
        self._seconds = 0.0         # spent reading, for the INFO line
        self._reported = False

    def get_tensor(self, name: str, *, device: str | None = None, dtype: Any = None) -> Any:
        started = time.perf_counter()
        with config.configure(**self._options):
            tensor = super().get_tensor(name, device=device, dtype=dtype)
        with self._lock:
            self._seconds += time.perf_counter() - started
        return tensor

    def close(self) -> None:
        super().close()
        with self._lock:
            report = self.bytes_read > 0 and not self._reported
            self._reported = True
        if report:
            _report(self.path, self.bytes_read, self._seconds, self.device)


def _report(path: Any, nbytes: int, seconds: float, device: str) -> None:
    logger.info("%s: read %s to %s with fastsafetensors in %.2f s (%.2f GB/s)",
                os.path.basename(str(path)), human_size(nbytes), device, seconds,
                nbytes / 1e9 / max(seconds, 1e-9))


def _make_safe_open(original: Callable[..., Any]) -> Callable[..., Any]:
    def safe_open(filename: Any, framework: str = "pt", device: Any = "cpu",
                  **kwargs: Any) -> Any:
        options = _options()
        target = _target(device)
        if options is None or target is None or framework not in ("pt", "torch") or kwargs:
            return original(filename, framework=framework, device=device, **kwargs)
        return _File(filename, target, options)

    safe_open.__fastsafetensors_original__ = original  # type: ignore[attr-defined]
    return safe_open


def _make_load_file(original: Callable[..., Any]) -> Callable[..., Any]:
    def safe_load_file(filename: Any, device: Any = "cpu", **kwargs: Any) -> Any:
        # safetensors' own keywords (backend=, 0.8) go to it, as in safe_open above: the
        # dispatcher stays in accelerate's module after a block, for any caller to reach.
        options = _options()
        target = _target(device)
        if options is None or target is None or kwargs:
            return original(filename, device=device, **kwargs)
        if target == "cpu":
            # One read per tensor, into memory of its own, as safetensors returns them: views
            # of one file buffer would tie every parameter to the whole shard (saving one
            # parameter would write the shard; dropping one would free nothing).
            with _File(filename, target, options) as handle:
                return {name: handle.get_tensor(name) for name in handle.offset_keys()}
        from ..api import load_file

        started = time.perf_counter()
        with config.configure(**options):
            tensors = load_file(filename, device=target)   # one device allocation per tensor
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        _report(filename, nbytes, time.perf_counter() - started, target)
        return tensors

    safe_load_file.__fastsafetensors_original__ = original  # type: ignore[attr-defined]
    return safe_load_file


REPLACED = {"safe_open": _make_safe_open, "safe_load_file": _make_load_file}


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    with config.configure(**options):   # unknown names or values raise ConfigError here
        pass
    return dict(options)


def _check_accelerate() -> Any:
    """accelerate's modeling module, or IncompatibleVersionError naming what no longer fits."""
    try:
        import accelerate  # type: ignore[import-untyped]
    except ModuleNotFoundError as exc:
        if exc.name != "accelerate":
            raise
        raise FrameworkNotInstalledError("accelerate", "accelerate",
                                         f"pip install '{SUPPORTED}'") from None
    version = str(accelerate.__version__)
    if major_version(version) != 1:
        raise IncompatibleVersionError("accelerate", version, SUPPORTED,
                                       "this module is written for the accelerate 1 line")
    modeling = importlib.import_module(SITE)
    problems = [f"{SITE} no longer imports {name}" for name in REPLACED
                if not callable(getattr(modeling, name, None))]
    reader, expected = READER
    function = getattr(modeling, reader, None)
    if function is None:
        problems.append(f"{SITE}.{reader} is gone")
    else:
        params = inspect.signature(function).parameters
        if any(p not in params for p in expected):
            problems.append(f"{SITE}.{reader}{inspect.signature(function)} lacks "
                            f"{', '.join(p for p in expected if p not in params)}")
    if problems:
        raise IncompatibleVersionError("accelerate", version, SUPPORTED, "; ".join(problems))
    return modeling


def _replace(modeling: Any) -> None:
    for name, make in REPLACED.items():
        current = getattr(modeling, name)
        if not hasattr(current, "__fastsafetensors_original__"):
            setattr(modeling, name, make(current))


def install(**options: Any) -> None:
    """Route every later accelerate load in this process through fastsafetensors, with these
    options (an ``enabled()`` block's options win inside it). Calling it again replaces the
    options. Raises IncompatibleVersionError if accelerate is not 1.x or its loading code
    changed, and ConfigError for unknown options."""
    global _GLOBAL
    checked = _check_options(options)
    with _lock:
        _replace(_check_accelerate())
        _GLOBAL = checked


def uninstall() -> None:
    """Put accelerate back exactly as it was. Idempotent."""
    global _GLOBAL
    import sys

    with _lock:
        _GLOBAL = None
        modeling = sys.modules.get(SITE)
        for name in REPLACED:
            original = getattr(getattr(modeling, name, None), "__fastsafetensors_original__",
                               None)
            if original is not None:
                setattr(modeling, name, original)


def is_installed() -> bool:
    """Whether every accelerate load goes through this package (``install()`` was called)."""
    return _GLOBAL is not None


@contextlib.contextmanager
def enabled(**options: Any) -> Iterator[None]:
    """Within the block (this thread and context), accelerate's loads read with fastsafetensors
    and these options. The dispatchers stay in place after the block; outside any block and
    without ``install()`` they call accelerate's own functions."""
    checked = _check_options(options)
    with _lock:
        _replace(_check_accelerate())
    token = _BLOCK.set(checked)
    try:
        yield
    finally:
        _BLOCK.reset(token)

