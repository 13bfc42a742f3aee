"""Options, resolved as: explicit argument > ``configure(...)`` block > environment > default.

This is the one module that reads ``FASTSAFETENSORS_*`` variables, and it reads them at call time
(not import time), so a test or a launcher can set them late.

>>> import fastsafetensors
>>> with fastsafetensors.configure(threads=4, io="buffered"):
...     fastsafetensors.config.get("threads")
4
"""

from __future__ import annotations

import contextlib
import contextvars
import operator
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["configure", "Configured", "get", "is_set", "overrides", "OPTIONS"]

MiB = 1 << 20
_F = TypeVar("_F", bound=Callable[..., Any])


def _default_threads() -> int:
    # Reads release the GIL, so more threads than cores keep more requests in flight; past 16
    # the anchors show no gain and each thread costs staging memory on the GPU path.
    return max(2, min(16, 2 * (os.cpu_count() or 1)))


@dataclass(frozen=True)
class Option:
    name: str
    default: Callable[[], Any]
    choices: tuple[str, ...] = ()
    help: str = ""
    minimum: int = 1              # of a number option

    @property
    def env(self) -> str:
        return f"FASTSAFETENSORS_{self.name.upper()}"

    def check(self, value: Any) -> Any:
        if self.choices:
            if value not in self.choices:
                raise ConfigError(self.name, value, self.choices)
            return value
        try:   # an int, its digits (from the environment) or 4.0; not 2.5, not True
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            number = int(value) if isinstance(value, (str, float)) else operator.index(value)
        except (TypeError, ValueError):
            raise ConfigError(self.name, value, [self._expected]) from None
        if number < self.minimum:
            raise ConfigError(self.name, value, [self._expected])
        return number

    @property
    def _expected(self) -> str:
        return "a positive integer" if self.minimum == 1 else f"an integer >= {self.minimum}"


OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("threads", _default_threads,
           help="reader threads per load (to a GPU, unless set, at most 8, or 12 through the "
                "ring: device_threads)"),
    Option("io", lambda: "auto", ("auto", "buffered", "direct"),
           "page-cache policy: auto picks per file from page-cache residency"),
    Option("backend", lambda: "auto", ("auto", "gds", "posix"),
           "GPU I/O backend: gds (kvikio/cuFile) or posix reads plus copies"),
    Option("chunk_bytes", lambda: 16 * MiB, help="largest single read"),
    Option("staging_bytes", lambda: 256 * MiB,
           help="pinned host staging in total, for device loads: at most this, but at least "
                "64 KiB per reader thread (through the ring, unless set, 128 MiB: "
                "device_staging)"),
    Option("direct_threads", lambda: 8,
           help="reader threads when most reads bypass the page cache (a disk serves more "
                "requests in flight; cached data does not need them)"),
    Option("event_wait", lambda: "spin", ("spin", "block"),
           help="how a reader thread waits for the GPU to finish copying out of its staging "
                "buffer: spin (CUDA's default, the fastest wake-up, keeps a core busy) or block "
                "(frees the core for other readers, costs a wake-up)"),
    Option("cuda_calls", lambda: "ring", ("torch", "driver", "native", "ring"),
           help="how a GPU load reads and queues its copies: ring (the default: no Python "
                "reader threads; C threads, 12 (at most 2 per core) unless threads is set, read "
                "the chunks in order "
                "into a ring of pinned windows within staging_bytes, and one C thread queues "
                "their copies on one stream, the shape InstantTensor has with io_uring; built "
                "on first use with the system's C compiler, loader/ring.py; not with "
                "mapped_readers). Where the ring cannot run (no C compiler, no CUDA driver "
                "library, not Linux), the default goes on with torch, said once in the log. "
                "The others have Python reader threads queue the copies, events and stream "
                "waits: torch (each call "
                "releases Python's GIL and takes it back, which waits for the other threads' "
                "Python work), driver (CUDA driver calls through ctypes that keep the GIL for "
                "their few microseconds; host waits still release it) or native (a staged "
                "chunk's wait, read, copies and event in one C call without the GIL). On the "
                "H200 machine the ring loaded 8 GB at 36.9 GB/s, torch at 25.7, InstantTensor "
                "at 37.2 (medians of 4 in one run; docs/benchmarks.md section 2)"),
    Option("small_tensor_groups", lambda: "on", ("off", "on"),
           help="loads to a GPU without a memory budget: on (the default) puts runs of small "
                "tensors (under 1 MiB, adjacent in the file, 16-byte aligned) in one device "
                "allocation of up to 8 MiB, filled by one copy per chunk, and hands each over "
                "as one view of it, instead of an allocation, a share of a batched copy and "
                "two views each: 20,000 small tensors loaded 2.3-3.0x faster than with "
                "safetensors and 2.2-3.0x faster than with off on the H200 machine "
                "(docs/benchmarks.md). Their "
                "memory is freed once all tensors of the group are. off: each tensor its own "
                "memory, as safetensors gives it"),
    Option("switch_interval_us", lambda: 500, minimum=0,
           help="loads to a GPU: Python's thread switch interval while the load's reader "
                "threads run, in microseconds, where the interpreter's is longer (5,000 by "
                "default): a reader needs the GIL back after each read, and a thread running "
                "Python meanwhile (transformers building the model, a consumer's code) keeps "
                "it for up to that long. Process-wide, set back when the last load ends "
                "(fastsafetensors/loader/switching.py); 0 leaves it alone"),
    Option("mapped_readers", lambda: 0, minimum=0,
           help="of a GPU load's reader threads, how many copy ranges already in the page "
                "cache straight to the GPU (the file mapped, the range registered with CUDA: "
                "no host copy) under io=auto; the others read them into pinned staging. "
                "Off by default: on the H100 machine CUDA registered pages no faster from 8 "
                "threads than from 1 and stalled the other readers' copies meanwhile, so "
                "loads ran slower (docs/benchmarks.md)"),
    Option("read_ahead", lambda: "on", ("off", "on", "quiet"),
           help="transformers loads whose device_map is one batched device (CUDA): on (the "
                "default) starts reading every tensor of the checkpoint as soon as its files "
                "are known, while transformers builds the model, when all floating-point "
                "tensors have the model's dtype, nothing is quantized or split, and the device "
                "has room for them all plus 1 GiB (8 GB to an H200: 0.79 s against 0.98 s in "
                "one run, 0.89 s against 0.87 s in another, docs/transformers.md); off reads "
                "them once transformers asks; quiet (to a GPU through the ring; no faster in "
                "one H200 run, 0.59 s against 0.56) reads ahead too, but transformers' thread "
                "first waits until every chunk is submitted, and the load's Python then waits "
                "for transformers' first request, so that none of it competes for the GIL "
                "meanwhile"),
    Option("pause_gc", lambda: "on", ("off", "on"),
           help="on (the default): Python's garbage collector is off while a call builds a "
                "whole result from local files (load, load_file, upstream's "
                "copy_files_to_device, and from_pretrained with loader='fastsafetensors' once "
                "transformers has the files), back on when the last such call ends: full "
                "passes over the whole process, with the GIL held, cost a third of a "
                "20,000-tensor load on the CPU VM, and 8 GB from_pretrained to an H200 took "
                "0.41 s with the collector on, 0.25 s off (fastsafetensors/gcpause.py). The "
                "passes are put off, not saved. off: the collector left alone"),
    Option("reserve_memory", lambda: "on", ("off", "on"),
           help="on: a load to a GPU that keeps every tensor (load and load_file without a "
                "dtype cast, from_pretrained reading ahead) has torch's caching allocator take "
                "each file's tensor bytes at once before cutting the tensors from them, one "
                "driver allocation a file instead of one a tensor (8 GiB in 512 tensors: "
                "0.039-0.042 s fresh, 0.003-0.004 s so, on the H200 machine); skipped where "
                "the allocator is configured (PYTORCH_CUDA_ALLOC_CONF). off: a tensor at a time"),
    Option("huge_pages", lambda: "auto", ("auto", "off", "on"),
           help="on: advise transparent huge pages for fresh host buffers (fewer page faults, "
                "but on VMs that hand free memory back to the host a first load can get "
                "slower). on or auto: for loads to a GPU, pinned staging on huge pages "
                "registered with CUDA and kept for the process (a first load pinned it in "
                "half the time of torch's pinned memory on the H100 machine). off: neither"),
)}

# Read-only, since the default is one object shared by every context; configure() sets a new one.
_overrides: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "fastsafetensors_config", default=MappingProxyType({}))
# The tokens of the blocks open in this context, innermost last: kept per context, not per
# Configured, since one Configured (a decorator, a block object kept at module level) may be
# open in several threads at once, each of which must reset its own token.
_open: contextvars.ContextVar[tuple[contextvars.Token[Mapping[str, Any]], ...]] = \
    contextvars.ContextVar("fastsafetensors_config_open", default=())


def _option(name: str) -> Option:
    try:
        return OPTIONS[name]
    except KeyError:
        raise ConfigError("option", name, OPTIONS) from None


def get(name: str, explicit: Any = None) -> Any:
    """The value of option ``name``: ``explicit`` if not None, else the innermost configure
    block, else ``FASTSAFETENSORS_<NAME>``, else the default."""
    option = _option(name)
    if explicit is not None:
        return option.check(explicit)
    overrides = _overrides.get()
    if name in overrides:
        return overrides[name]
    env = os.environ.get(option.env)
    if env:
        try:
            return option.check(env)
        except ConfigError as exc:   # the caller never passed it: say where it comes from
            raise ConfigError(f"environment variable {option.env}", env, exc.valid) from None
    return option.default()


#: Python reader threads of a load to a GPU (any cuda_calls but the ring) while the threads
#: option is left to its default. On the H200 machine (16 cores), 8 threads loaded 8 GB 11% and
#: 36% faster than 16 (two runs, the first load of a fresh process each; docs/benchmarks.md
#: section 2).
DEVICE_THREADS = 8


#: The same through the ring (cuda_calls="ring"), whose C readers never wait for Python's GIL:
#: on the H200 machine 12 of them loaded 8 GB at 36.9 GB/s, 8 at 30.2 (32 windows of 8 MiB
#: each; medians of 4 in one run, docs/benchmarks.md section 2).
RING_THREADS = 12


#: staging_bytes through the ring while the option is left to its default: 32 windows of 4 MiB
#: for 12 readers. On the H200 machine its readers read the same bytes in 0.6-0.8x the
#: thread-seconds they took with 256 MiB (32 windows of 8 MiB), and 8 GB loaded 1.07x and 1.23x
#: faster (runs 8 and 10, medians of 4 and 3; docs/benchmarks.md section 2); likely because
#: more of less staging stays in the CPU's cache between a read and its copy (not measured).
RING_STAGING = 128 * MiB


def device_staging(explicit: int | None = None, *, ring: bool = False) -> int:
    """The ``staging_bytes`` option for a load to a GPU: as given or set, else the default,
    or ``RING_STAGING`` for the ring."""
    if explicit is not None or is_set("staging_bytes") or not ring:
        return int(get("staging_bytes", explicit))
    return RING_STAGING


def device_threads(explicit: int | None = None, *, ring: bool = False) -> int:
    """The ``threads`` option for a load to a GPU: as given or set, else the default (two per
    core, at most 16) capped at ``DEVICE_THREADS``, or ``RING_THREADS`` for the ring."""
    if explicit is not None or is_set("threads"):
        return int(get("threads", explicit))
    return min(RING_THREADS if ring else DEVICE_THREADS, int(get("threads")))


def overrides() -> dict[str, Any]:
    """The options set by the configure blocks open in this thread and context (the innermost
    wins), for work handed to threads of their own, where those blocks are not open."""
    return dict(_overrides.get())


def is_set(name: str) -> bool:
    """Whether option ``name`` was chosen by a configure block or the environment (not left to
    its default)."""
    return name in _overrides.get() or bool(os.environ.get(_option(name).env))


class Configured(contextlib.ContextDecorator):
    """What :func:`configure` returns: its options, checked, set while it is entered."""

    def __init__(self, checked: dict[str, Any]):
        self._checked = checked
        self._entered = False

    def __enter__(self) -> None:
        self._entered = True
        token = _overrides.set({**_overrides.get(), **self._checked})
        _open.set((*_open.get(), token))

    def __call__(self, func: _F) -> _F:
        self._entered = True   # a decorator: entered on each call, maybe never (not a mistake)
        return super().__call__(func)

    def __exit__(self, *exc: object) -> None:
        *outer, token = _open.get()
        _open.set(tuple(outer))
        _overrides.reset(token)

    def __del__(self) -> None:
        if not self._entered:
            # ``fastsafetensors.configure(threads=8)`` as a statement: nothing is set, which
            # nothing else would tell (the options were checked, and were valid).
            warnings.warn("fastsafetensors.configure(...) sets options only inside a `with` "
                          "block (with fastsafetensors.configure(...): ...); for the whole "
                          "process set FASTSAFETENSORS_* environment variables instead",
                          RuntimeWarning, stacklevel=2)


def configure(**options: Any) -> Configured:
    """Set options for the code inside the ``with`` block (this thread and context only); also
    a decorator. The names and values are checked here, on the call: ConfigError for an
    unknown name or a bad value. A call alone, outside ``with``, sets nothing (a warning says
    so); for the whole process, set the ``FASTSAFETENSORS_*`` environment variables.
    Work this package hands to threads of its own carries the caller's blocks there: an
    ``iter_tensors`` stream keeps those of its call wherever it is consumed, and a
    ``from_pretrained`` with ``loader="fastsafetensors"`` or upstream's ``ParallelLoader`` apply
    them on their reading threads."""
    return Configured({name: _option(name).check(value) for name, value in options.items()})
