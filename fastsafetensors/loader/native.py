"""A chunk's read and its copies in one C call (``cuda_calls="native"``).

On the H200 machine 8 reader threads read cached files at 30.6 GB/s and 16 at 42.2 with plain
``preadv`` calls, but the engine's readers moved 21-23 GB/s to the GPU with 8 and less with 16:
each chunk takes a reader through five or more calls that give Python's GIL away and take it
back behind the other threads (a host wait, the read, a stream wait, copies, an event), and
the readers' time went to those hand-overs rather than to reading (docs/benchmarks.md,
section 2). Here a reader makes one call per chunk, readcopy.c's ``fst_read_copy``, which does
all of them with the GIL released, through the same CUDA driver functions as
``cuda_calls="driver"`` (loader/driver.py): its events are driver events.

readcopy.c is compiled on first use with the system's C compiler (``cc``) into a cache
folder (``$XDG_CACHE_HOME/fastsafetensors`` or ``~/.cache/fastsafetensors``), so the package
stays pure Python; where no compiler or driver is found, :func:`available` says why and the
engine queues its copies through the driver or torch instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from array import array
from pathlib import Path
from typing import Any

from ..forking import renew_lock
from . import driver

__all__ = ["available", "read_copy"]

SOURCE = Path(__file__).with_name("readcopy.c")
#: The header readcopy.c and ring.c include: part of what their builds are keyed on.
HEADER = Path(__file__).with_name("driver_calls.h")
#: The failed steps of the C calls, by number (driver_calls.h's enum).
STEPS = ("", "cuCtxPushCurrent", "cuEventSynchronize", "pread", "cuStreamWaitEvent",
         "cuMemcpyHtoDAsync", "cuEventCreate", "cuEventRecord", "cuCtxPopCurrent",
         "short read")
_READ = STEPS.index("pread")

_lock = threading.Lock()   # held through a first build (a C compile): renewed in a child
_state: dict[str, Any] = {}   # "lib" and "calls" once loaded, or "missing": why not
renew_lock(sys.modules[__name__])


class _Calls(ctypes.Structure):
    """driver_calls.h's calls_t."""

    _fields_ = [(name, ctypes.c_void_p) for name in
                ("push", "pop", "sync", "wait", "copy", "create", "record", "destroy")]


_DRIVER_NAMES = ("cuCtxPushCurrent_v2", "cuCtxPopCurrent_v2", "cuEventSynchronize",
                 "cuStreamWaitEvent", "cuMemcpyHtoDAsync_v2", "cuEventCreate", "cuEventRecord",
                 "cuEventDestroy_v2")


def cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastsafetensors"


def build(folder: Path | None = None, *, again: bool = False, source: Path | None = None
          ) -> Path:
    """The compiled ``source`` (readcopy.c by default; the benchmarks build a sketch of theirs
    so), built once per source text and machine (``again``: built anew even if there); raises
    RuntimeError (with the compiler's output) where it cannot be built, or where the file
    there is not this user's own."""
    source = source or SOURCE
    text = source.read_bytes()
    if HEADER.name.encode() in text:   # a change to the header builds anew too
        text += HEADER.read_bytes()
    key = hashlib.sha256(text + os.uname().machine.encode()).hexdigest()[:16]
    folder = folder or cache_folder()
    target = folder / f"{source.stem}-{key}.so"
    if target.exists() and not again:
        _check_owned(target)
        return target
    compiler = shlex.split(os.environ.get("CC", "")) or [
        found for found in (shutil.which("cc") or shutil.which("gcc"),) if found]
    if not compiler:
        raise RuntimeError(f"no C compiler (cc or gcc) on PATH to build {source.name}; install one "
                           "(apt install gcc) or set CC")
    folder.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed: another process building it at once, or one that
    # loads it meanwhile, never sees half a file.
    fd, partial = tempfile.mkstemp(prefix=f"{source.stem}-", suffix=".so.part", dir=folder)
    os.close(fd)
    try:
        try:
            done = subprocess.run([*compiler, "-O2", "-shared", "-fPIC", "-pthread",
                                   "-D_FILE_OFFSET_BITS=64", f"-I{HEADER.parent}", "-o",
                                   partial, str(source)],
                                  capture_output=True, text=True, timeout=120)
        except OSError as exc:
            raise RuntimeError(f"the C compiler {' '.join(compiler)!r} cannot be run: {exc}; "
                               f"install one (apt install gcc) or set CC") from None
        if done.returncode:
            raise RuntimeError(f"{' '.join(compiler)} could not build {source}: "
                               f"{(done.stderr or done.stdout).strip()[-2000:]}")
        os.chmod(partial, 0o755)   # whatever the umask: _check_owned refuses writable files
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _check_owned(path: Path) -> None:
    """Code to be loaded into this process: only from a file of this user's that nobody else
    may write (a shared cache folder could hold someone else's file of that name)."""
    st = path.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise RuntimeError(f"{path} is not this user's own file, or others may write it; "
                           f"remove it, or set XDG_CACHE_HOME to a folder of your own")


def load_into(state: dict[str, Any], source: Path,
              signatures: dict[str, tuple[Any, list[Any]]]) -> dict[str, Any]:
    """Fill ``state`` once: ``"lib"`` (``source`` built and loaded, its functions typed as
    ``signatures`` says: name -> (restype, argtypes)) and ``"calls"`` (the driver's functions
    for calls_t), or ``"missing"``: why they cannot be had."""
    if "lib" in state or "missing" in state:
        return state
    with _lock:
        if "lib" not in state and "missing" not in state:
            why = driver.available()
            if why is not None:
                state["missing"] = f"the CUDA driver library cannot be used ({why})"
                return state
            try:
                try:
                    # CDLL: the GIL is released around calls.
                    lib = ctypes.CDLL(str(build(source=source)))
                except OSError:
                    # A file there that does not load (built for another libc, say): anew.
                    lib = ctypes.CDLL(str(build(source=source, again=True)))
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                state["missing"] = str(exc)
                return state
            for name, (restype, argtypes) in signatures.items():
                function = getattr(lib, name)
                function.restype, function.argtypes = restype, argtypes
            released = driver._libs_or_raise()[1]
            state["calls"] = _Calls(*(ctypes.cast(getattr(released, name), ctypes.c_void_p)
                                      .value for name in _DRIVER_NAMES))
            state["lib"] = lib
    return state


_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {"fst_read_copy": (ctypes.c_int, [
    _P, _P, _P, ctypes.c_int, _I64, _I64, _I64, _P, ctypes.POINTER(_I64), _P, _P, _I64, _P, _P,
    _P, ctypes.c_uint, ctypes.POINTER(_P), ctypes.POINTER(ctypes.c_int),
    ctypes.POINTER(ctypes.c_double)])}


def _load() -> dict[str, Any]:
    return load_into(_state, SOURCE, _SIGNATURES)


def available() -> str | None:
    """None when native chunk calls can be made here, else why not."""
    return _load().get("missing")


def forget() -> None:
    """Load again on next use (tests that swap the driver library)."""
    with _lock:
        _state.clear()


def read_copy(device: int, staged: Any, fd: int, offset: int, length: int, needed: int,
              dest: int, stream: int, allocated: Any,
              copies: list[tuple[int, int, int]], *, blocking: bool, path: str
              ) -> tuple[int, driver.Event | None, tuple[float, float, float]]:
    """Wait for the driver event ``staged`` (None: nothing to wait for), read ``length`` bytes
    of ``fd`` at ``offset`` into the pinned memory at ``dest``, then, if at least ``needed``
    came, make ``stream`` wait for ``allocated`` and queue each ``(device address, offset in
    dest, bytes)`` of ``copies`` on it: returns the bytes read, the event recorded after the
    copies (None when fewer than ``needed`` came; nothing was queued then), and the seconds
    spent waiting for ``staged``, reading and queuing."""
    state = _load()
    if "missing" in state:
        from ..errors import CudaError

        raise CudaError("dlopen", -1, f"native chunk calls cannot be made ({state['missing']})")
    dst = array("Q", [c[0] for c in copies])
    src = array("Q", [c[1] for c in copies])
    lengths = array("Q", [c[2] for c in copies])
    got = ctypes.c_int64()
    event = ctypes.c_void_p()
    failed = ctypes.c_int()
    spent = (ctypes.c_double * 3)()
    flags = driver.DISABLE_TIMING | (driver.BLOCKING_SYNC if blocking else 0)
    code = state["lib"].fst_read_copy(
        ctypes.byref(state["calls"]), driver._context(device),
        None if staged is None else staged.handle, fd, offset, length, needed, dest,
        ctypes.byref(got), stream, None if allocated is None else allocated.handle,
        len(copies), dst.buffer_info()[0], src.buffer_info()[0], lengths.buffer_info()[0],
        flags, ctypes.byref(event), ctypes.byref(failed), spent)
    made = driver.Event.adopt(device, event) if event.value else None
    if code:
        if failed.value == _READ:
            raise OSError(code, os.strerror(code), path)
        driver._check(code, STEPS[failed.value] if failed.value < len(STEPS) else "native")
    return got.value, made, (spent[0], spent[1], spent[2])


if sys.platform != "linux":   # pread and the driver's calls as used here: Linux only
    _state["missing"] = f"native chunk calls are built for Linux, not {sys.platform}"
