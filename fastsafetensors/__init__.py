"""fastsafetensors: load safetensors checkpoints into CPU and GPU memory as fast as the hardware
allows. Loading only; save with ``safetensors``.

>>> from fastsafetensors import FastSafetensorsFile
>>> fsf = FastSafetensorsFile("model.safetensors")    # doctest: +SKIP
>>> fsf.get_tensors()        # metadata only           # doctest: +SKIP
>>> fsf["lm_head.weight"]    # reads this tensor       # doctest: +SKIP
"""

from __future__ import annotations

from . import config, errors
from .api import load_file, loads, safe_open
from .compat import SafeTensorsFileLoader, SingleGroup
from .config import configure
from .errors import (
    BackendUnavailableError,
    BudgetInfeasibleError,
    CheckpointIndexError,
    CheckpointNotFoundError,
    ClosedFileError,
    ConfigError,
    CudaError,
    FastSafetensorsError,
    ForkedLoadError,
    FrameworkNotInstalledError,
    HeaderError,
    HostMemoryError,
    IncompatibleVersionError,
    NoGPUError,
    NotAFileError,
    PeerLoadError,
    RankMismatchError,
    ReadError,
    TensorNotFoundError,
    UnsupportedDTypeError,
)
from .file import FastSafetensorsFile
from .format import TensorInfo
from .hub import Checkpoint, inspect, resolve
from .lazy_tensor_factory import LazyTensor, LazyTensorFactory
from .loader.gds import gds_available
from .loading import iter_tensors, load
from .parallel_loader import ParallelLoader

__version__ = "0.6.0"

__all__ = [
    "__version__",
    "FastSafetensorsFile",
    "LazyTensor",
    "LazyTensorFactory",
    "TensorInfo",
    "load_file",
    "loads",
    "safe_open",
    "resolve",
    "inspect",
    "Checkpoint",
    "load",
    "iter_tensors",
    "gds_available",
    "configure",
    "config",
    "errors",
    "FastSafetensorsError",
    "ForkedLoadError",
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
    "IncompatibleVersionError",
    "SafeTensorsFileLoader",
    "SingleGroup",
    "ParallelLoader",
]

import logging as _logging

_logging.getLogger(__name__).addHandler(_logging.NullHandler())
