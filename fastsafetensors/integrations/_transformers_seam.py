"""The seam between transformers' ``from_pretrained`` and this package (internal).

transformers 5 reads every safetensors shard through a module-level ``safe_open`` name and
materializes each tensor with ``slice[...]`` (or ``slice[rows, cols]`` under tensor parallelism)
in a small thread pool. These replacements, made once at install time, route those reads here:

1. ``PreTrainedModel.from_pretrained`` is wrapped: the wrapper pops the keyword-only ``loader`` and
   ``loader_options`` arguments and records the load in a ContextVar for the duration of the call.
2. Each module-level ``safe_open`` is replaced by a dispatcher that returns a
   :class:`TransformersFile` while a load is recorded in the calling context, and calls the
   original ``safe_open`` otherwise. Swapping the globals per call would race between threads;
   a ContextVar does not.
3. ``core_model_loading._materialize_copy`` reads one of our slices whose target is a CUDA device
   straight onto it (this package's pinned staging), instead of into host memory first; any other
   tensor or device goes to the original.
4. ``core_model_loading.spawn_materialize``, which hands each tensor to transformers' pool of four
   threads, instead collects every whole tensor bound for a CUDA device into one batch per
   device (:class:`Batch`) and returns a Future; when transformers first waits on one of them
   (after it spawned them all), the batch reads every tensor it holds in one run of the streaming
   engine, in file order. One tensor per engine run, four at a time, moved the bytes at about
   10.8 GB/s beyond transformers' own time on the H100 machine; one run over the whole files,
   about 18 (docs/transformers.md).
5. ``modeling_utils._get_dtype`` and ``caching_allocator_warmup``, when a load's ``device_map``
   names one batched device: as soon as transformers has resolved the checkpoint's files and
   settled the dtype, the device's batch starts reading every tensor of those files, while
   transformers builds the model and its conversion mapping (most of its own work, which took
   0.39-0.41 s a load on the H100 machine, comes before it asks for any tensor), and the
   allocator warm-up, which would allocate the model's size beside the tensors already read,
   is skipped (``_transformers_ahead.start_reading_ahead`` says when this is done; option
   ``read_ahead``, on by default since the fifteenth session's H200 runs: 0.79 s against 0.98 s
   for 8 GB in one, 0.89 s against 0.87 s in the other).
6. The ``re`` global of ``core_model_loading``: during our loads, the regular expressions it
   compiles (transformers' table of key renamings and converters for every model family, 1,044
   in 5.23, built once per process; a renaming per checkpoint key) are compiled when used, and
   most never are (``_transformers_mapping.py``; the table took 0.08 s of a 0.2 s load on the
   CPU VM).

The hook of 5. also turns Python's garbage collector off from there to the end of the call
(``gcpause.py``, option ``pause_gc``): a full pass of it, which transformers' new objects start
on Python 3.12, holds the GIL; 8 GB to the H200 machine took 0.41 s with it and 0.25 s
without.

transformers keeps its renaming, weight converters, sharding, quantization and dispatch: it only
gets our lazy handles in place of safetensors' slices. Each ``[...]`` reads exactly the bytes of
that tensor (or of this rank's rows or columns) into memory the result owns, so there is no file
buffer to release and no view can outlive its handle. A batch reads ahead of transformers'
conversion as transformers' own pool does (its futures too complete as fast as the reads go),
and keeps no tensor once it has handed it over: what transformers frees after converting it
(fused experts, quantized weights) is freed.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import importlib
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import config, fdlimit, gcpause, hub
from ..errors import (
    ConfigError,
    FrameworkNotInstalledError,
    HeaderError,
    IncompatibleVersionError,
)
from ..file import FastSafetensorsFile
from ..forking import renew_lock
from ..lazy_tensor_factory import LazyTensor
from . import _transformers_ahead as ahead
from . import _transformers_mapping as mapping
from . import human_size, major_version
from ._transformers_batch import Batch, _Pending, complete  # noqa: F401  (_Pending: tests)

logger = logging.getLogger("fastsafetensors.integrations.transformers")

#: Names accepted by ``from_pretrained(loader=...)``; None and "safetensors" mean the stock path.
LOADERS = ("fastsafetensors", "safetensors", None)
#: The transformers releases this seam is written and tested for.
SUPPORTED = "transformers>=5.0,<6"

#: Modules whose ``safe_open`` global transformers calls while loading. The first is the main
#: path and must exist; the others (disk offload, multi-token-prediction heads, torchao
#: pre-quantized checkpoints) are replaced where present.
SAFE_OPEN_SITES = (
    "transformers.modeling_utils",
    "transformers.integrations.accelerate",
    "transformers.modeling_layers",
    "transformers.quantizers.quantizer_torchao",
)

#: Private functions whose parameters the seam relies on: (module, qualified name, parameters),
#: or a tuple of the homes one had over releases (where transformers moved it), newest first.
#: Materialization must still call ``tensor[...]`` on what ``safe_open(...).get_slice()`` returns,
#: so a change here is the first sign that the seam no longer fits.
PRIVATE_SIGNATURES: tuple[Any, ...] = (
    ("transformers.modeling_utils", "PreTrainedModel._load_pretrained_model",
     ("model", "state_dict", "checkpoint_files", "load_config")),
    ("transformers.modeling_utils", "load_state_dict", ("checkpoint_file", "map_location")),
    ("transformers.core_model_loading", "spawn_materialize",
     ("thread_pool", "tensor", "device", "dtype")),
    ("transformers.core_model_loading", "_materialize_copy", ("tensor", "device", "dtype")),
    # Tensor-parallel shards: transformers.distributed since 5.14, the tensor_parallel
    # integration's layers in 5.0 to 5.13; both index the slice they are given.
    (("transformers.distributed.sharding_utils", "DtensorShardOperation.shard_tensor",
      ("source", "tensor_idx", "device", "dtype")),
     ("transformers.integrations.tensor_parallel", "TensorParallelLayer.shard_tensor",
      ("param", "tensor_idx", "device", "dtype"))),
)


# -- the handles transformers gets --------------------------------------------------------------

class TransformersSlice(LazyTensor):
    """A :class:`LazyTensor` that reads under its load's options on whichever thread indexes it
    (transformers materializes in a thread pool, where ContextVars set by the caller are unset)."""

    __slots__ = ("_load",)

    def __init__(self, file: FastSafetensorsFile, info: Any, load: Load):
        super().__init__(file, info)
        self._load = load

    def __getitem__(self, index: Any) -> Any:
        with self._load.configured():
            tensor = super().__getitem__(index)
        self._load.count_read()
        return tensor


class TransformersFile(FastSafetensorsFile):
    """What ``safe_open`` returns to transformers during a fastsafetensors load."""

    def __init__(self, path: str | os.PathLike[str], load: Load):
        try:
            super().__init__(path, device="cpu", framework="pt")
        except HeaderError as exc:
            # A repo id's shards come from the Hugging Face cache, where a damaged copy stays.
            if type(exc) is not HeaderError or not hub.in_hub_cache(path):
                raise
            raise hub.damaged_in_cache(path, exc) from exc
        self._load = load

    def get_slice(self, name: str) -> TransformersSlice:
        return TransformersSlice(self, self._info(name), self._load)

    def get_tensor(self, name: str, *, device: str | None = None, dtype: Any = None) -> Any:
        with self._load.configured():
            tensor = super().get_tensor(name, device=device, dtype=dtype)
        self._load.count_read()
        return tensor


class Load:
    """One ``from_pretrained`` call routed through this package: its options, the files it
    opened and what was read, for the one INFO line at the end."""

    def __init__(self, options: dict[str, Any]):
        self.options = options
        self.files: list[TransformersFile] = []
        self.reads = 0
        self.devices: set[str] = set()   # devices read to directly (CUDA targets)
        self.batches: dict[str, Batch] = {}   # by device
        self.ahead_device: str | None = None   # the one device of device_map, when batched
        self.started = time.perf_counter()
        self._lock = threading.Lock()
        self._pause: contextlib.ExitStack | None = None   # the collector's, once files are known
        self._widened = 0   # fdlimit.widen() calls of this load, each undone by close()

    def configured(self) -> Any:
        # Entered for every tensor read: no options, nothing to set.
        return config.configure(**self.options) if self.options else contextlib.nullcontext()

    def open(self, path: str | os.PathLike[str]) -> TransformersFile:
        # Each handle holds a descriptor until the load ends, where safetensors' hold none (it
        # maps the file and closes it): a checkpoint of hundreds of shards would run out of
        # the soft limit of open files where the stock loader did not (fdlimit.py).
        while True:
            try:
                handle = TransformersFile(path, self)
                break
            except OSError as exc:
                if exc.errno != errno.EMFILE or not self._widen():
                    raise
        if fdlimit.near(handle._fd):
            self._widen()
        with self._lock:
            self.files.append(handle)
        return handle

    def _widen(self) -> bool:
        if not fdlimit.widen():
            return False
        with self._lock:
            self._widened += 1
        return True

    def count_read(self) -> None:
        with self._lock:
            self.reads += 1

    def batch(self, device: str) -> Batch:
        with self._lock:
            batch = self.batches.get(device)
            if batch is None:
                batch = self.batches[device] = Batch(self, device)
            return batch

    def reading_ahead(self) -> bool:
        return any(batch.ahead for batch in list(self.batches.values()))

    def pause_collector(self) -> None:
        """Python's garbage collector off from now until :meth:`close` (gcpause.py), unless
        ``pause_gc`` is "off". On the caller's thread, once: a nested call shares the pause."""
        if self._pause is None:
            self._pause = contextlib.ExitStack()
            with self.configured():
                self._pause.enter_context(gcpause.paused())

    def close(self) -> None:
        """Stop the batches (a load that failed leaves their reads unused), then close every
        handle (transformers closes the main ones; a few are only dropped), then end the
        collector's pause and put back the limit of open files."""
        try:
            for batch in list(self.batches.values()):
                batch.stop()
            for handle in self.files:
                handle.close()
        finally:
            try:
                if self._pause is not None:
                    self._pause.close()
            finally:
                with self._lock:
                    widened, self._widened = self._widened, 0
                for _ in range(widened):
                    fdlimit.restore()

    def release(self) -> None:
        """Drop the handles and batches once the call is over and summed up. Each points back
        at this load: left in place, the cycle (headers, locks) would wait for the collector's
        next pass."""
        with self._lock:
            self.files.clear()
            self.batches.clear()

    def summary(self) -> str:
        seconds = time.perf_counter() - self.started
        nbytes = sum(f.bytes_read for f in self.files)
        paths = {f.path for f in self.files}
        direct = f", straight to {', '.join(sorted(self.devices))}" if self.devices else ""
        if self.reading_ahead():
            direct += ", read ahead while transformers built the model"
        batches = "; ".join(b.timeline(self.started) for b in list(self.batches.values()))
        return (f"read {human_size(nbytes)} ({self.reads} tensor reads, {len(paths)} files) with "
                f"fastsafetensors (posix reads{direct}); from_pretrained took {seconds:.2f} s, "
                f"{nbytes / 1e9 / max(seconds, 1e-9):.2f} GB/s"
                + (f" (one engine run per device: {batches})" if batches else ""))


_ACTIVE: contextvars.ContextVar[Load | None] = contextvars.ContextVar(
    "fastsafetensors_transformers_load", default=None)
_DEFAULT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "fastsafetensors_transformers_default", default=None)


# -- the dispatcher that replaces safe_open ----------------------------------------------------

def make_dispatcher(original: Callable[..., Any]) -> Callable[..., Any]:
    """A ``safe_open`` replacement: our handle during a fastsafetensors load, else ``original``."""

    def safe_open(filename: Any, framework: str = "pt", device: Any = "cpu", **kwargs: Any) -> Any:
        load = _ACTIVE.get()
        if load is None or framework not in ("pt", "torch") or str(device) != "cpu":
            return original(filename, framework=framework, device=device, **kwargs)
        return load.open(filename)

    safe_open.__fastsafetensors_original__ = original  # type: ignore[attr-defined]
    safe_open.__doc__ = "fastsafetensors dispatcher in place of safetensors.safe_open"
    return safe_open


# -- straight to the device: the replacement of _materialize_copy -------------------------------

#: Where transformers turns a slice into a tensor on its device; looked up as a global at call
#: time, so replacing it once reaches every load.
MATERIALIZE_SITE = ("transformers.core_model_loading", "_materialize_copy")


def make_materializer(original: Callable[..., Any]) -> Callable[..., Any]:
    """``_materialize_copy`` that reads one of our slices straight onto a CUDA device (pinned
    staging and asynchronous copies), where the stock code would read it into host memory and
    then copy it; everything else goes to ``original``."""

    def _materialize_copy(tensor: Any, device: Any = None, dtype: Any = None) -> Any:
        if isinstance(tensor, TransformersSlice) and device is not None:
            import torch

            target = torch.device(device)
            if target.type == "cuda":
                tensor._load.devices.add(str(target))
                result = tensor.materialize(device=str(target), dtype=dtype)
                # The copies are ordered on this pool thread's current stream only, and the
                # caller's thread may use the tensor on another stream: wait for them here
                # (the tail of this tensor's copies; the reads are done by now).
                complete(target)
                return result
        return original(tensor, device, dtype)

    _materialize_copy.__fastsafetensors_original__ = original  # type: ignore[attr-defined]
    return _materialize_copy


# -- many tensors, one engine run: the replacement of spawn_materialize ----------------------------

SPAWN_SITE = ("transformers.core_model_loading", "spawn_materialize")


def make_spawner(original: Callable[..., Any]) -> Callable[..., Any]:
    """``spawn_materialize`` that batches our whole slices bound for a CUDA device (see
    :class:`Batch`); everything else (no pool, sharding, other tensors or devices) goes to
    ``original``."""

    def spawn_materialize(thread_pool: Any, tensor: Any, device: Any = None, dtype: Any = None,
                          *args: Any, **kwargs: Any) -> Any:
        # A sharded tensor (recent releases pass sharding_op) reads only its part: left to the
        # pool, as is a load without a pool (transformers loads one tensor at a time then, to
        # bound memory: disk offload, quantization on the fly).
        if (thread_pool is not None and isinstance(tensor, TransformersSlice)
                and device is not None and not args and kwargs.get("sharding_op") is None):
            import torch

            try:
                target = torch.device(device)
            except (RuntimeError, TypeError):   # not a torch device ("disk")
                return original(thread_pool, tensor, device, dtype, *args, **kwargs)
            if target.type in ahead.BATCH_DEVICE_TYPES:
                target = ahead.indexed(target)
                future = tensor._load.batch(str(target)).add(tensor, dtype)
                if future is not None:
                    if target.type == "cuda":
                        tensor._load.devices.add(str(target))
                    return future
        return original(thread_pool, tensor, device, dtype, *args, **kwargs)

    spawn_materialize.__fastsafetensors_original__ = original  # type: ignore[attr-defined]
    return spawn_materialize


# -- reading ahead: the replacements of _get_dtype and caching_allocator_warmup ------------------

#: Where from_pretrained settles the model's dtype: just after it resolved the checkpoint's
#: files, before it builds the model and its conversion mapping (most of transformers' own
#: 0.39-0.41 s a load on the H100 machine: docs/transformers.md). The earliest point at which
#: the files, the dtype and any quantizer are known, so a batch can start reading there.
DTYPE_SITE = ("transformers.modeling_utils", "_get_dtype")
#: transformers' warm-up of the CUDA caching allocator: one allocation of the model's size, freed
#: at once, before the weights load. Skipped while a batch reads ahead: its tensors are already
#: allocated, and a warm-up beside them would double the device's peak.
WARMUP_SITE = ("transformers.modeling_utils", "caching_allocator_warmup")
#: Reading ahead needs both sites as written here; without them loads batch on demand.
AHEAD_SIGNATURES = (
    ("transformers.modeling_utils", "_get_dtype",
     ("dtype", "checkpoint_files", "state_dict", "hf_quantizer")),
    ("transformers.modeling_utils", "caching_allocator_warmup",
     ("model", "expanded_device_map", "hf_quantizer")),
)


def make_dtype_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """``_get_dtype`` that also starts reading ahead (see :func:`start_reading_ahead`)."""
    signature = inspect.signature(original)

    def _get_dtype(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        load = _ACTIVE.get()
        if load is not None:
            # The files are local by now (downloads done): the rest of the call makes the
            # objects whose full collections held the GIL (gcpause.py).
            load.pause_collector()
        device = load.ahead_device if load is not None else None
        if load is not None and device is not None and not load.batches:
            # Only the load's first dtype (its own files): a from_pretrained nested in building
            # the model has files and a device_map of its own.
            load.ahead_device = None
            try:
                given = signature.bind(*args, **kwargs).arguments
                outcome = ahead.start_reading_ahead(
                    load, device, given.get("checkpoint_files"), result[1],
                    given.get("state_dict"), given.get("hf_quantizer"))
            except Exception as exc:   # noqa: BLE001 - an optimization: the load goes on
                outcome = f"not reading ahead: {exc!r}"
            logger.debug("fastsafetensors: %s", outcome)
        return result

    _get_dtype.__fastsafetensors_original__ = original  # type: ignore[attr-defined]
    return _get_dtype


def make_warmup_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    """``caching_allocator_warmup`` that does nothing while a batch reads ahead."""

    def caching_allocator_warmup(*args: Any, **kwargs: Any) -> Any:
        load = _ACTIVE.get()
        if load is not None and load.reading_ahead():
            return None
        return original(*args, **kwargs)

    caching_allocator_warmup.__fastsafetensors_original__ = original  # type: ignore[attr-defined]
    return caching_allocator_warmup


# -- the wrapper around from_pretrained ----------------------------------------------------------

_UNSET: Any = object()


def stock_reason(kwargs: dict[str, Any]) -> str | None:
    """Why a load must stay on transformers' own path, or None."""
    if kwargs.get("gguf_file"):
        return f"gguf_file={kwargs['gguf_file']!r} is a GGUF checkpoint"
    if kwargs.get("state_dict") is not None:
        return "the caller passed state_dict="
    if kwargs.get("use_safetensors") is False:
        return "use_safetensors=False asks for .bin weights"
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return None
    if is_deepspeed_zero3_enabled():
        return "DeepSpeed ZeRO-3 partitions the weights while they load"
    return None


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Unknown option names or values raise ConfigError listing the valid ones."""
    if not isinstance(options, dict):
        raise ConfigError("loader_options", options, ["a dict of fastsafetensors options: "
                                                      + ", ".join(config.OPTIONS)])
    with config.configure(**options):
        pass
    return dict(options)


def wrap_from_pretrained(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original`` is the function under ``PreTrainedModel.from_pretrained``'s classmethod."""

    @functools.wraps(original)
    def from_pretrained(cls: Any, *args: Any, loader: Any = _UNSET,
                        loader_options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        if loader is _UNSET:
            if loader_options is not None:
                raise ConfigError("loader_options", loader_options,
                                  ["None unless loader='fastsafetensors' is given too"])
            default = _DEFAULT.get()
            if _ACTIVE.get() is not None or default is None:
                # Stock call, or a nested call (a composite model loading a part): as the caller.
                return original(cls, *args, **kwargs)
            options = default
        elif loader is None or loader == "safetensors":
            if loader_options is not None:
                raise ConfigError("loader_options", loader_options,
                                  ["None unless loader='fastsafetensors' is given too"])
            if _ACTIVE.get() is None:
                return original(cls, *args, **kwargs)
            token = _ACTIVE.set(None)
            try:
                return original(cls, *args, **kwargs)
            finally:
                _ACTIVE.reset(token)
        elif loader == "fastsafetensors":
            options = check_options(loader_options or {})
        else:
            raise ConfigError("loader", loader, [repr(name) for name in LOADERS])

        what = f"{getattr(cls, '__name__', cls)}.from_pretrained"
        reason = stock_reason(kwargs)
        if reason is not None:
            logger.info("%s: %s; transformers loads it with its own loader", what, reason)
            token = _ACTIVE.set(None)
            try:
                return original(cls, *args, **kwargs)
            finally:
                _ACTIVE.reset(token)
        if kwargs.get("disable_mmap"):
            # transformers would read whole files into memory instead of mapping them; this
            # package never maps files, so the request is already met by positioned reads.
            kwargs["disable_mmap"] = False
        # transformers reads on threads of its own, where the caller's configure() blocks are
        # not open: they go with the load, below its own options.
        load = Load({**config.overrides(), **options})
        load.ahead_device = ahead.ahead_device(kwargs)
        token = _ACTIVE.set(load)
        try:
            model = original(cls, *args, **kwargs)
        finally:
            _ACTIVE.reset(token)
            load.close()
            summary = load.summary() if load.reads else None
            load.release()
        if summary is None:
            logger.info("%s: no safetensors weights were read through fastsafetensors (.bin "
                        "weights, an MPS device_map, or files transformers reads whole, e.g. on "
                        "hf-mount); transformers loaded them with its own loader", what)
        else:
            logger.info("%s: %s", what, summary)
        return model

    from_pretrained.__fastsafetensors_original__ = original  # type: ignore[attr-defined]
    return from_pretrained


# -- version and signature checks ----------------------------------------------------------------

def _resolve(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return getattr(obj, "__fastsafetensors_original__", obj)


def _signature_problem(module: str, qualname: str, expected: tuple[str, ...]) -> str | None:
    """What is wrong with one private function the seam relies on, or None when it fits."""
    try:
        function = _resolve(module, qualname)
    except (ImportError, AttributeError):
        return f"{module}.{qualname} is gone"
    missing = [p for p in expected if p not in inspect.signature(function).parameters]
    if missing:
        return (f"{module}.{qualname}{inspect.signature(function)} lacks "
                f"parameter(s) {', '.join(missing)}")
    return None


def check_transformers() -> None:
    """Raise IncompatibleVersionError unless transformers is 5.x and the private functions the
    seam relies on still take the parameters it expects."""
    try:
        import transformers
    except ModuleNotFoundError as exc:
        if exc.name != "transformers":
            raise
        raise FrameworkNotInstalledError(
            "transformers", "transformers",
            "pip install 'fastsafetensors[transformers]'  (transformers>=5,<6)") from None

    version = str(transformers.__version__)
    if major_version(version) != 5:
        raise IncompatibleVersionError("transformers", version, SUPPORTED,
                                       "the seam is written for the transformers 5 line")
    from transformers import modeling_utils

    problems = []
    if not isinstance(modeling_utils.PreTrainedModel.__dict__.get("from_pretrained"),
                      classmethod):
        problems.append("PreTrainedModel.from_pretrained is no longer a classmethod")
    if not callable(getattr(modeling_utils, "safe_open", None)):
        problems.append("transformers.modeling_utils no longer imports safe_open")
    for entry in PRIVATE_SIGNATURES:
        alternatives = entry if isinstance(entry[0], tuple) else (entry,)
        gone = []
        # Newest home first. Only a home that is gone lets the next one answer: a newer home
        # with a changed signature is a change, even where the older one is still defined.
        for alternative in alternatives:
            problem = _signature_problem(*alternative)
            if problem is None:
                break
            if not problem.endswith(" is gone"):
                problems.append(problem)
                break
            gone.append(problem)
        else:
            problems.append("; ".join(gone))
    if problems:
        raise IncompatibleVersionError("transformers", version, SUPPORTED, "; ".join(problems))


# -- install / uninstall -------------------------------------------------------------------------

_install_lock = threading.Lock()   # held through install()'s imports: renewed in a child
renew_lock(sys.modules[__name__], "_install_lock")


def _lazy_re(original: Any) -> Any:
    return mapping.lazy_re(lambda: _ACTIVE.get() is not None)


def install() -> None:
    with _install_lock:
        check_transformers()
        from transformers import modeling_utils

        for name in SAFE_OPEN_SITES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            current = getattr(module, "safe_open", None)
            if current is None or hasattr(current, "__fastsafetensors_original__"):
                continue
            module.safe_open = make_dispatcher(current)  # type: ignore[attr-defined]
        sites: list[tuple[tuple[str, str], Callable[[Any], Any]]] = [
            (MATERIALIZE_SITE, make_materializer), (SPAWN_SITE, make_spawner)]
        if all(_signature_problem(*entry) is None for entry in AHEAD_SIGNATURES):
            sites += [(DTYPE_SITE, make_dtype_hook), (WARMUP_SITE, make_warmup_hook)]
        if mapping.fits():
            sites.append((mapping.COMPILE_SITE, _lazy_re))
        for (module_name, attr), make in sites:
            module = importlib.import_module(module_name)
            current = getattr(module, attr)
            if not hasattr(current, "__fastsafetensors_original__"):
                setattr(module, attr, make(current))
        cls = modeling_utils.PreTrainedModel
        method = cls.__dict__["from_pretrained"]
        if not hasattr(method.__func__, "__fastsafetensors_original__"):
            # setattr because mypy rejects assigning a classmethod object over a method.
            setattr(cls, "from_pretrained",  # noqa: B010
                    classmethod(wrap_from_pretrained(method.__func__)))


def uninstall() -> None:
    with _install_lock:
        import sys

        for name in SAFE_OPEN_SITES:
            module = sys.modules.get(name)
            current = getattr(module, "safe_open", None)
            original = getattr(current, "__fastsafetensors_original__", None)
            if original is not None:
                module.safe_open = original  # type: ignore[union-attr]
        for module_name, attr in (MATERIALIZE_SITE, SPAWN_SITE, DTYPE_SITE, WARMUP_SITE,
                                  mapping.COMPILE_SITE):
            module = sys.modules.get(module_name)
            original = getattr(getattr(module, attr, None), "__fastsafetensors_original__", None)
            if original is not None:
                setattr(module, attr, original)
        modeling_utils = sys.modules.get("transformers.modeling_utils")
        if modeling_utils is None:
            return
        cls = modeling_utils.PreTrainedModel
        method = cls.__dict__.get("from_pretrained")
        original = getattr(getattr(method, "__func__", None), "__fastsafetensors_original__", None)
        if original is not None:
            cls.from_pretrained = classmethod(original)


def is_installed() -> bool:
    """Whether ``from_pretrained`` currently accepts ``loader=``."""
    import sys

    modeling_utils = sys.modules.get("transformers.modeling_utils")
    if modeling_utils is None:
        return False
    method = modeling_utils.PreTrainedModel.__dict__.get("from_pretrained")
    return hasattr(getattr(method, "__func__", None), "__fastsafetensors_original__")


def set_default(options: dict[str, Any] | None) -> contextvars.Token[dict[str, Any] | None]:
    return _DEFAULT.set(options)


def reset_default(token: contextvars.Token[dict[str, Any] | None]) -> None:
    _DEFAULT.reset(token)
