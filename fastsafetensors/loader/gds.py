"""GPUDirect Storage through kvikio (extra ``[gds]``): probing, selection and the fallback rule.

``backend="auto"`` probes once per process and falls back to posix reads with one warning that
says why; ``backend="gds"`` raises BackendUnavailableError instead of falling back.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .. import config
from ..errors import BackendUnavailableError
from ..format import TensorInfo

if TYPE_CHECKING:
    from .stream import Sink, Source

__all__ = ["gds_available", "gds_status", "select_backend", "stream_gds"]

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def gds_status() -> tuple[bool, str]:
    """(usable, reason). Probed once: kvikio importable, not in compatibility mode (which is
    plain POSIX reads in disguise), and the cuFile driver reports GDS support."""
    try:
        kvikio = importlib.import_module("kvikio")
    except ImportError as exc:
        return False, (f"kvikio is not installed ({exc}); pip install 'fastsafetensors[gds]' "
                       f"(CUDA 12) or 'fastsafetensors[gds-cu13]' (CUDA 13)")
    try:
        if _compat_mode(kvikio):
            return False, "kvikio runs in compatibility mode (no cuFile/nvidia-fs on this machine)"
        if not _driver_properties(kvikio).is_gds_available:
            return False, "the cuFile driver reports GDS unavailable (nvidia-fs not loaded?)"
    except Exception as exc:  # noqa: BLE001 - any probe failure means "not usable", with why
        return False, f"probing kvikio failed: {type(exc).__name__}: {exc}"
    return True, "GDS available through kvikio"


def _compat_mode(kvikio: Any) -> bool:
    """Whether kvikio would read with POSIX calls instead of cuFile. Three generations of its
    API: ``is_compat_mode_preferred()`` (25.04 on; ``compat_mode()`` is gone in 26.02), a
    ``CompatMode`` enum whose default AUTO is truthy (24.12, 25.02), and a bool (24.10 and
    earlier)."""
    defaults = kvikio.defaults
    if hasattr(defaults, "is_compat_mode_preferred"):
        return bool(defaults.is_compat_mode_preferred())
    mode = defaults.compat_mode()
    if hasattr(kvikio, "CompatMode"):
        # AUTO falls back only where cuFile is missing, which the driver check below catches.
        return bool(mode == kvikio.CompatMode.ON)
    return bool(mode)


def _driver_properties(kvikio: Any) -> Any:
    """The cuFile driver's properties: ``kvikio.cufile_driver.properties`` (25.04 on),
    ``kvikio.cufile_driver.DriverProperties()`` (24.12, 25.02), ``kvikio.DriverProperties()``."""
    try:
        driver = importlib.import_module("kvikio.cufile_driver")
    except ImportError:
        return kvikio.DriverProperties()
    if hasattr(driver, "properties"):
        return driver.properties
    return driver.DriverProperties()


def gds_available() -> bool:
    """Whether GPUDirect Storage can be used in this process (probed once)."""
    return gds_status()[0]


_warned = False


def select_backend(backend: str | None = None, *, device: str = "cuda") -> str:
    """Resolve ``backend`` ("auto", "gds", "posix") to the one used: "gds" or "posix"."""
    global _warned
    choice = config.get("backend", backend)
    if choice == "posix" or device == "cpu":
        return "posix"
    usable, reason = gds_status()
    if choice == "gds":
        if not usable:
            raise BackendUnavailableError("gds", reason)
        return "gds"
    if not usable:
        if not _warned:
            _warned = True
            warnings.warn(f"fastsafetensors: GPUDirect Storage not used, reading with posix "
                          f"reads and pinned copies instead: {reason}", RuntimeWarning,
                          stacklevel=3)
        logger.debug("backend auto -> posix: %s", reason)
        return "posix"
    return "gds"


def stream_gds(sources: Iterable[Source], sink: Sink, *, kvikio: Any = None,
               max_device_bytes: int | None = None) -> Iterator[tuple[str, Any]]:
    """File -> device with cuFile reads (no staging), one read per tensor, yielded in file order.

    kvikio's ``CuFile.pread`` returns a future; once ``get()`` returned, the bytes are in device
    memory, so the consumer may use the tensor on any stream. cuFile's DMA is not ordered on any
    stream, so before a read the host waits until work queued on the allocation stream (which may
    still read the memory's previous tensor) has finished.
    """
    from ..format import header_of, open_readonly
    from .stream import device_bytes

    if kvikio is None:
        kvikio = importlib.import_module("kvikio")
    for path, header, names in sources:
        # A header read earlier (load([a, b]), a resolved Checkpoint) is checked against the
        # file open now, and cuFile opens that same file through /proc: a file replaced since
        # would otherwise be read at the old offsets, neither file's tensors and no error.
        fd = open_readonly(path)
        try:
            header = header_of(fd, path, header)
            infos = header.select(names)
            proc = f"/proc/self/fd/{fd}"
            handle = kvikio.CuFile(proc if os.path.exists(proc) else path, "r")
        finally:
            os.close(fd)
        batch: deque[tuple[TensorInfo, Any, Any]] = deque()
        try:
            held = 0
            for info in infos:
                footprint = device_bytes(info.nbytes)
                if (max_device_bytes is not None and batch
                        and held + footprint > max_device_bytes):
                    # Hand over what is in flight before allocating past the budget.
                    yield from _complete(batch, sink, path)
                    held = 0
                flat = future = None
                if info.nbytes:
                    flat = sink.alloc(info)
                    sink.host_wait(sink.alloc_event())
                    future = handle.pread(flat, info.nbytes,
                                          header.data_start + info.data_offsets[0])
                batch.append((info, flat, future))
                held += footprint
            yield from _complete(batch, sink, path)
        finally:
            # Stopped early or failed: reads still in flight write into memory freed next and
            # use the handle closed next, so they must finish first.
            for _, _, future in batch:
                if future is not None:
                    try:
                        future.get()
                    except Exception:  # noqa: BLE001 - the error that stopped us matters more
                        pass
            handle.close()


def _complete(batch: deque[tuple[TensorInfo, Any, Any]], sink: Sink, path: str
              ) -> Iterator[tuple[str, Any]]:
    """Wait for and yield the batch's tensors, taking each off ``batch`` before its wait."""
    while batch:
        info, flat, future = batch.popleft()
        if future is not None:
            got = future.get()
            if got != info.nbytes:
                from ..errors import ReadError

                raise ReadError(path, info.data_offsets[0], info.nbytes, got)
        yield info.name, sink.finish(flat, info)
