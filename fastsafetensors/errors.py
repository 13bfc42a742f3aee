"""Every exception fastsafetensors raises.

Each one subclasses the builtin that users already catch, so ``except KeyError`` or
``except FileNotFoundError`` keeps working, and :class:`FastSafetensorsError` catches them all.
It is itself a ``safetensors.SafetensorError``, so code written for safetensors' ``safe_open``
(``except SafetensorError``) catches ours too::

    FastSafetensorsError(safetensors.SafetensorError)
    ├── HeaderError(ValueError)                 the file breaks the safetensors format, or
    │                                           changed after its header was read
    │   ├── NotAFileError(IsADirectoryError)    a folder where a file was expected (an
    │   │                                       OSError too, as safetensors raises there)
    │   └── CheckpointIndexError                a sharded index or weight map is unsafe or wrong
    │                                           (.path: the index, .shard: the shard)
    ├── TensorNotFoundError(KeyError)           no tensor of that name (close matches listed)
    ├── CheckpointNotFoundError(FileNotFoundError)
    ├── FrameworkNotInstalledError(ModuleNotFoundError)   says the pip command
    ├── UnsupportedDTypeError(TypeError)        the framework has no such dtype (numpy and BF16)
    ├── ClosedFileError(ValueError)             use after close()
    ├── ConfigError(ValueError)                 unknown option name or value; lists the valid ones
    ├── ReadError(OSError)                      a read came back short (file changed under us)
    ├── HostMemoryError(MemoryError)            host memory for the bytes read ran out
    ├── NoGPUError(RuntimeError)                "No CUDA GPUs are available", with what to do
    ├── BackendUnavailableError(RuntimeError)   e.g. backend="gds" where GDS cannot run
    ├── CudaError(RuntimeError)                 a CUDA driver call failed (cuda_calls="driver",
    │                                           "native" or "ring")
    ├── BudgetInfeasibleError(ValueError)       a load cannot fit ParallelLoader's
    │                                           device_memory_budget (upstream's name)
    ├── PeerLoadError(RuntimeError)             another rank failed to read its files, so this
    │                                           one stops instead of waiting in a collective
    ├── RankMismatchError(RuntimeError)         the ranks called a compat buffer with different
    │                                           arguments (another tensor, dim or rank)
    ├── ForkedLoadError(RuntimeError)           a load went on in a forked child, where its
    │                                           threads are not
    └── IncompatibleVersionError(ImportError)   an integration's library is outside its range

All of them pickle (multi-GPU loads carry errors across processes): ``__reduce__`` rebuilds an
error from the keyword arguments it was made with.
"""

from __future__ import annotations

import difflib
import errno
import os
import pickle
from collections.abc import Iterable
from typing import Any

from safetensors import SafetensorError

__all__ = [
    "FastSafetensorsError",
    "HeaderError",
    "NotAFileError",
    "CheckpointIndexError",
    "TensorNotFoundError",
    "CheckpointNotFoundError",
    "FrameworkNotInstalledError",
    "UnsupportedDTypeError",
    "ClosedFileError",
    "ConfigError",
    "ReadError",
    "HostMemoryError",
    "NoGPUError",
    "BackendUnavailableError",
    "CudaError",
    "BudgetInfeasibleError",
    "PeerLoadError",
    "RankMismatchError",
    "ForkedLoadError",
    "IncompatibleVersionError",
]


class FastSafetensorsError(SafetensorError):
    """Root of every error this package raises."""

    _fields: tuple[str, ...] = ()
    message: str   # set by the subclasses that build their message from fields

    def __reduce__(self) -> tuple[Any, ...]:
        if not self._fields:  # raised with a plain message, like any Exception
            return (type(self), self.args)
        kwargs = {field: _picklable(getattr(self, field)) for field in self._fields}
        # The message travels as it was: some are worded from the state of the disk when raised
        # (CheckpointNotFoundError), or from a value that arrives as its repr.
        return (_rebuild, (type(self), kwargs, str(self)))

    def __str__(self) -> str:
        message = getattr(self, "message", None)
        return super().__str__() if message is None else str(message)


def _picklable(value: Any) -> Any:
    """``value``, or its repr where it does not pickle (a lambda given as an option or name)."""
    try:
        pickle.dumps(value)
    except Exception:
        return repr(value)
    return value


def _rebuild(cls: type[FastSafetensorsError], kwargs: dict[str, Any],
             message: str | None = None) -> FastSafetensorsError:
    error = cls(**kwargs)
    if message is not None:
        error.message = message
    return error


class HeaderError(FastSafetensorsError, ValueError):
    """The file is not a valid safetensors file.

    ``path`` is the file, ``reason`` the rule it broke, ``tensor`` the tensor concerned (or None).
    """

    # Widened so that CheckpointIndexError can add a field.
    _fields: tuple[str, ...] = ("path", "reason", "tensor")

    def __init__(self, path: str | os.PathLike[str] | None, reason: str, tensor: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.reason = reason
        self.tensor = tensor
        where = os.path.basename(self.path) if self.path else "<bytes>"
        subject = f"tensor {tensor!r}: " if tensor is not None else ""
        self.message = f"{where}: {subject}{reason}"
        super().__init__(self.message)


class NotAFileError(HeaderError, IsADirectoryError):
    """A folder where a .safetensors file was expected (a HeaderError, and an OSError as
    safetensors raises there)."""

    _fields = ("path",)

    def __init__(self, path: str | os.PathLike[str]):
        super().__init__(path, "is a folder, not a .safetensors file: pass one of its files, "
                               "or the folder itself (not in a list) to fastsafetensors.load, "
                               "which reads every shard")
        self.errno, self.strerror, self.filename = errno.EISDIR, self.message, self.path

    def __str__(self) -> str:
        return self.message   # not OSError's "[Errno 21] ..." form


class CheckpointIndexError(HeaderError):
    """A sharded checkpoint's index is inconsistent with its shards, or points outside them.

    ``path`` is the index file, ``shard`` the shard concerned (or None); ``reason`` and ``tensor``
    as for :class:`HeaderError`. The message names both files.
    """

    _fields = ("path", "reason", "tensor", "shard")

    def __init__(self, path: str | os.PathLike[str] | None, reason: str, tensor: str | None = None,
                 shard: str | None = None):
        self.shard = shard
        super().__init__(path, reason, tensor)


class TensorNotFoundError(FastSafetensorsError, KeyError):
    """No tensor of that name; the message lists up to five close matches."""

    _fields = ("name", "path", "available")

    def __init__(self, name: str, path: str | os.PathLike[str] | None = None,
                 available: Iterable[str] = ()):
        self.name = name
        self.path = None if path is None else os.fspath(path)
        self.available = tuple(available)
        where = os.path.basename(self.path) if self.path else "the checkpoint"
        close = (difflib.get_close_matches(name, self.available, n=5, cutoff=0.6)
                 if isinstance(name, str) else [])   # names are strings: tensors=[1] is a typo
        hint = (f"; close matches: {', '.join(repr(c) for c in close)}" if close
                else "; list the names with keys()")
        self.message = f"{name!r} is not in {where} ({len(self.available)} tensors){hint}"
        super().__init__(self.message)


class CheckpointNotFoundError(FastSafetensorsError, FileNotFoundError):
    """The file or checkpoint does not exist. ``str()`` starts like the builtin's."""

    _fields = ("path", "hint")

    def __init__(self, path: str | os.PathLike[str], hint: str = "check the path"):
        self.path = os.fspath(path)
        self.hint = hint
        super().__init__(errno.ENOENT, os.strerror(errno.ENOENT), self.path)
        if os.path.exists(self.path):   # a folder that holds no usable weights
            self.message = f"{self.path!r} holds no checkpoint to load ({hint})"
        else:
            self.message = (f"[Errno {errno.ENOENT}] {os.strerror(errno.ENOENT)}: {self.path!r} "
                            f"({hint})")


class FrameworkNotInstalledError(FastSafetensorsError, ModuleNotFoundError):
    """A framework asked for (torch, numpy) is not installed; says how to install it."""

    _fields = ("module", "framework", "install")

    def __init__(self, module: str, framework: str, install: str):
        self.module = module
        self.framework = framework
        self.install = install
        # framework is a framework= value, or the name of the integration that needs module
        user = (f"fastsafetensors.integrations.{framework}"
                if framework in ("transformers", "accelerate") else f"framework={framework!r}")
        self.message = f"No module named {module!r}: {user} needs it. Install it with: {install}"
        super().__init__(self.message, name=module)


class UnsupportedDTypeError(FastSafetensorsError, TypeError):
    """The chosen framework cannot represent a dtype stored in the file."""

    _fields = ("dtype", "framework", "tensor", "path")

    def __init__(self, dtype: str, framework: str, tensor: str | None = None,
                 path: str | os.PathLike[str] | None = None):
        self.dtype = dtype
        self.framework = framework
        self.tensor = tensor
        self.path = None if path is None else os.fspath(path)
        where = f"{os.path.basename(self.path)}: " if self.path else ""
        subject = f"{where}tensor {tensor!r} has dtype" if tensor else f"{where}dtype"
        # Imported here: format.py imports this module.
        from .format import DTYPES

        known = DTYPES.get(dtype)
        remedy = ("read its raw bytes instead (FastSafetensorsFile.read_bytes, or a "
                  "LazyTensorFactory creator)"
                  if framework.startswith("pt") or (known is not None and known.torch is None)
                  else "load it with framework='pt' (PyTorch) instead")
        self.message = (f"{subject} {dtype} which framework={framework!r} cannot represent; "
                        f"{remedy}")
        super().__init__(self.message)

    def in_file(self, path: str | os.PathLike[str] | None) -> UnsupportedDTypeError:
        """This error naming the file the tensor is in (the frameworks, which raise it, do not
        know it); itself when it names one already or ``path`` is None."""
        if self.path is not None or path is None:
            return self
        return UnsupportedDTypeError(self.dtype, self.framework, self.tensor, path)


class ClosedFileError(FastSafetensorsError, ValueError):
    """The file handle was used after close()."""

    _fields = ("path",)

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self.message = (f"{os.path.basename(self.path)}: the file is closed; open it again "
                        f"(or keep using it inside its 'with' block)")
        super().__init__(self.message)


class ConfigError(FastSafetensorsError, ValueError):
    """An unknown option name or value; lists the valid ones."""

    _fields = ("option", "value", "valid")

    def __init__(self, option: str, value: Any, valid: Iterable[str]):
        self.option = option
        self.value = value
        self.valid = tuple(valid)
        self.message = (f"{option}={value!r} is not valid; expected one of: "
                        f"{', '.join(self.valid)}")
        super().__init__(self.message)


class ReadError(FastSafetensorsError, OSError):
    """A read returned fewer bytes than the header promised (the file shrank while loading)."""

    _fields = ("path", "offset", "expected", "got")

    def __init__(self, path: str | os.PathLike[str], offset: int, expected: int, got: int):
        self.path = os.fspath(path)
        self.offset = offset
        self.expected = expected
        self.got = got
        self.message = (f"{os.path.basename(self.path)}: read of {expected} bytes at offset "
                        f"{offset} returned {got}; the file was truncated or changed while it "
                        f"was being loaded (re-download or re-save it)")
        super().__init__(errno.EIO, self.message)


class HostMemoryError(FastSafetensorsError, MemoryError):
    """Host memory for ``nbytes`` could not be allocated (a header may claim tensors larger
    than the machine's memory; the frameworks say so in their own words)."""

    _fields = ("nbytes",)

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.message = (f"{nbytes} bytes ({nbytes / 2**30:.2f} GiB) of host memory could not "
                        f"be allocated; free memory, or read less at once: some tensors "
                        f"(tensors=[...]), one tensor (FastSafetensorsFile(path)[name]) or part "
                        f"of one (get_slice(name)[rows])")
        super().__init__(self.message)


class NoGPUError(FastSafetensorsError, RuntimeError):
    """A CUDA device was asked for where none can be used."""

    _fields = ("device", "detail")

    def __init__(self, device: str, detail: str = ""):
        self.device = device
        self.detail = detail
        extra = f" ({detail})" if detail else ""
        self.message = (f"No CUDA GPUs are available: device={device!r} was requested{extra}. "
                        f"Load to device='cpu', or install a CUDA build of PyTorch and check "
                        f"that nvidia-smi lists a GPU and CUDA_VISIBLE_DEVICES is not empty")
        super().__init__(self.message)


class BackendUnavailableError(FastSafetensorsError, RuntimeError):
    """An I/O backend asked for by name cannot be used here; says why."""

    _fields = ("backend", "reason")

    def __init__(self, backend: str, reason: str):
        self.backend = backend
        self.reason = reason
        self.message = (f"backend={backend!r} cannot be used: {reason}. "
                        f"Use backend='auto' to fall back to plain reads")
        super().__init__(self.message)


class CudaError(FastSafetensorsError, RuntimeError):
    """A CUDA driver call of the engine failed (``cuda_calls`` ``"driver"``, ``"native"`` or
    ``"ring"``): which
    call, its error code and name."""

    _fields = ("call", "code", "name")

    def __init__(self, call: str, code: int, name: str):
        self.call = call
        self.code = code
        self.name = name
        self.message = (f"the CUDA driver call {call} failed with {name} (error {code}); it "
                        f"should return CUDA_SUCCESS. Check the GPU with nvidia-smi, or load "
                        f"with cuda_calls='torch' (FASTSAFETENSORS_CUDA_CALLS=torch), which "
                        f"makes the same calls through PyTorch")
        super().__init__(self.message)


class BudgetInfeasibleError(FastSafetensorsError, ValueError):
    """``ParallelLoader(device_memory_budget=...)`` cannot keep the load within the budget;
    raised when the loader is built, before any byte is read. Upstream's name, which vLLM
    imports and raises itself with a message alone; ``budget`` and ``needed`` are in bytes when
    this package raises it."""

    _fields = ("message", "budget", "needed")

    def __init__(self, message: str, budget: int | None = None, needed: int | None = None):
        self.message = message
        self.budget = budget
        self.needed = needed
        super().__init__(message)


class PeerLoadError(FastSafetensorsError, RuntimeError):
    """Raised on every rank of a process group whose other ranks failed to read their files
    (their own errors say why); without it this rank would wait in its next collective for
    tensors that never come, until the group's timeout."""

    _fields = ("ranks", "files")

    def __init__(self, ranks: Iterable[int], files: Iterable[str]):
        self.ranks = tuple(ranks)
        self.files = tuple(files)
        names = ", ".join(os.path.basename(f) for f in self.files) or "no file"
        self.message = (f"rank(s) {', '.join(map(str, self.ranks))} of the process group failed "
                        f"to read their files ({names}); this rank stops instead of waiting for "
                        f"their tensors. The cause is in the error and log of those ranks; fix "
                        f"it there and load again")
        super().__init__(self.message)


class RankMismatchError(FastSafetensorsError, RuntimeError):
    """Raised on every rank of a process group whose ranks called a compat buffer's method
    (``get_tensor``, ``get_sharded``, ``push_tensor``, ``get_multi_cols``) with different
    arguments, or where another rank could not make the call (its own error says why). The
    collectives that would follow do not pair up: a rank would receive another tensor's bytes,
    wait until the group's timeout, or be aborted by gloo."""

    _fields = ("rank", "call", "differ", "failed")

    def __init__(self, rank: int, call: str, differ: Iterable[int] = (),
                 failed: Iterable[int] = ()):
        self.rank = rank
        self.call = call
        self.differ = tuple(differ)
        self.failed = tuple(failed)

        def ranks(numbers: tuple[int, ...]) -> str:
            return f"rank{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}"

        others = []
        if self.differ:
            others.append(f"{ranks(self.differ)} made another call")
        if self.failed:
            others.append(f"{ranks(self.failed)} could not make the call (the error there says "
                          f"why)")
        differs = " and ".join(others) or "not every rank did"
        self.message = (f"rank {rank} called {call}, but {differs}; every rank must call the "
                        f"buffer's methods with the same arguments in the same order (they run "
                        f"collectives), so every rank stops here")
        super().__init__(self.message)


class ForkedLoadError(FastSafetensorsError, RuntimeError):
    """A load begun in one process was asked for its next tensor in a forked child, which has
    none of its reader threads: the child would wait for ever."""

    _fields = ("parent", "child")

    def __init__(self, parent: int, child: int):
        self.parent = parent
        self.child = child
        self.message = (f"this load was begun in process {parent} and cannot go on in its "
                        f"forked child {child}: its reader threads stay in the parent. Start a "
                        f"new load in the child (or fork before loading, or use the 'spawn' "
                        f"start method)")
        super().__init__(self.message)


class IncompatibleVersionError(FastSafetensorsError, ImportError):
    """The installed library is outside the range an integration supports, or a private function
    it relies on changed. Raised by ``install()`` (so also by importing the integration)."""

    _fields = ("library", "version", "supported", "detail")

    def __init__(self, library: str, version: str, supported: str, detail: str):
        self.library = library
        self.version = version
        self.supported = supported
        self.detail = detail
        self.message = (f"{library} {version} is not supported by "
                        f"fastsafetensors.integrations.{library}: {detail}. It supports "
                        f"{supported}; install one (pip install '{supported}') or load without "
                        f"fastsafetensors.integrations.{library}")
        super().__init__(self.message, name=f"fastsafetensors.integrations.{library}")
