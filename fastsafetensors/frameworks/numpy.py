"""NumPy arrays from host bytes. NumPy lacks BF16, the F8 and F4 types: those raise
UnsupportedDTypeError, which points to framework='pt'."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ConfigError, HostMemoryError, UnsupportedDTypeError
from ..format import DTYPES, TensorInfo
from .memory import advise_huge_pages

__all__ = ["NUMPY"]


def numpy_dtype(dtype: str, tensor: str | None = None) -> np.dtype[Any]:
    name = DTYPES[dtype].numpy
    if name is None:
        raise UnsupportedDTypeError(dtype, "np", tensor)
    return np.dtype(name).newbyteorder("<")


class NumpyFramework:
    name = "np"

    def alloc(self, nbytes: int, *, align: int = 64) -> tuple[np.ndarray, memoryview]:
        try:
            raw = np.empty(nbytes + align, dtype=np.uint8)
        except MemoryError:
            raise HostMemoryError(nbytes) from None
        advise_huge_pages(raw.ctypes.data, nbytes + align)
        skip = -raw.ctypes.data % align
        buffer = raw[skip:skip + nbytes]
        # .data is memoryview(array); numpy's stubs give ndarray no __buffer__ before Python 3.12
        return buffer, buffer.data.cast("B")

    @staticmethod
    def exact(raw: np.ndarray, start: int, nbytes: int) -> np.ndarray:
        """Bytes ``[start, start + nbytes)`` of ``raw`` (numpy has no storage to trim)."""
        return raw[start:start + nbytes]

    def dtype(self, dtype: str, tensor: str | None = None) -> Any:
        return numpy_dtype(dtype, tensor)

    def view(self, buffer: np.ndarray, start: int, info: TensorInfo) -> np.ndarray:
        dtype = numpy_dtype(info.dtype, info.name)
        try:
            if info.nbytes == 0:
                return np.empty(info.shape, dtype=dtype)
            return buffer[start:start + info.nbytes].view(dtype).reshape(info.shape)
        except ValueError:
            # Shapes a valid header may hold and numpy refuses: more than 64 dimensions, or
            # an empty one whose other dimensions' bytes pass 2**63 (torch takes both).
            shape = (f"in {len(info.shape)} dimensions" if len(info.shape) > 64
                     else f"of shape {list(info.shape)}")
            raise UnsupportedDTypeError(f"{info.dtype} {shape}", "np", info.name) from None

    def viewer(self, buffer: np.ndarray) -> Callable[[int, TensorInfo], np.ndarray]:
        return lambda start, info: self.view(buffer, start, info)

    def convert(self, array: np.ndarray, *, device: str | None, dtype: Any) -> np.ndarray:
        if device not in (None, "cpu"):
            raise ConfigError("device", device, ["cpu (numpy arrays live in host memory)"])
        if dtype is None:
            return array
        target = numpy_dtype(dtype) if isinstance(dtype, str) and dtype in DTYPES else dtype
        try:
            target = np.dtype(target)
        except TypeError:
            raise ConfigError("dtype", dtype, ["a NumPy dtype or its name ('float32')",
                                               "a safetensors dtype ('F32', ...)"]) from None
        return array.astype(target, copy=False)


NUMPY = NumpyFramework()
