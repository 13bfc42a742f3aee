"""Lazy tensor handles over one file or several, and custom tensor creation.

A :class:`LazyTensor` knows a tensor's shape and dtype from the header and reads nothing until it
is indexed or materialized; indexing reads only the rows the index touches. It follows
safetensors' slice protocol (``get_shape()``, ``get_dtype()``, ``[...]``), so code written for
``safe_open(...).get_slice(name)`` (transformers, vLLM) accepts it unchanged.

>>> from fastsafetensors.lazy_tensor_factory import LazyTensorFactory
>>> with LazyTensorFactory(["model-00001.safetensors"]) as factory:   # doctest: +SKIP
...     handle = factory.lazy("lm_head.weight")
...     handle.shape, handle[:8].shape
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from .errors import CheckpointIndexError, TensorNotFoundError
from .format import DTYPES, TensorInfo

if TYPE_CHECKING:
    from .file import FastSafetensorsFile

__all__ = ["LazyTensor", "LazyTensorFactory", "Creator"]

#: A custom creation hook: gets the tensor's raw little-endian bytes and its TensorInfo, returns
#: whatever object the caller wants (a quantized tensor, a jax array, a custom class, ...).
Creator = Callable[[memoryview, TensorInfo], Any]


class LazyTensor:
    """A tensor of a file that is read only when indexed or materialized."""

    __slots__ = ("_file", "info")

    def __init__(self, file: FastSafetensorsFile, info: TensorInfo):
        self._file = file
        self.info = info

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> Any:
        """The framework's dtype object (e.g. ``torch.bfloat16``)."""
        return self._file._dtype_of(self.info)

    def get_shape(self) -> list[int]:
        return list(self.info.shape)

    def get_dtype(self) -> str:
        """The file's dtype string, as safetensors' slices return it (``"BF16"``)."""
        return self.info.dtype

    def get_ndim(self) -> int:
        return len(self.info.shape)

    def __len__(self) -> int:
        if not self.info.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.info.shape[0]

    def materialize(self, device: str | None = None, dtype: Any = None) -> Any:
        """Read the whole tensor (on ``device``, cast to ``dtype`` when given)."""
        return self._file.get_tensor(self.info.name, device=device, dtype=dtype)

    def __getitem__(self, index: Any) -> Any:
        return self._file._read_index(self.info, index)

    def __repr__(self) -> str:
        return (f"LazyTensor({self.info.name!r}, dtype={self.info.dtype}, shape={self.info.shape}, "
                f"file={os.path.basename(self._file.path)!r})")


def rows_for_index(shape: tuple[int, ...], index: Any) -> tuple[int, int, tuple[Any, ...]]:
    """Which rows (first-dim entries) ``index`` touches, and the index rewritten relative to
    the first row read. Raises IndexError like the frameworks do."""
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        fill = len(shape) - (len(index) - 1)
        index = index[:at] + (slice(None),) * fill + index[at + 1:]
    if len(index) > len(shape):
        raise IndexError(f"too many indices ({len(index)}) for a tensor of {len(shape)} dims")
    if not shape:
        return 0, 1, ()
    first, rest = (index[0], index[1:]) if index else (slice(None), ())
    rows = shape[0]
    if isinstance(first, slice):
        start, stop, step = first.indices(rows)
        if step <= 0:
            raise IndexError("slice steps must be positive")
        picked = range(start, stop, step)
        if not picked:
            return 0, 0, (slice(0, 0),) + rest
        lo, hi = picked[0], picked[-1] + 1
        return lo, hi, (slice(0, hi - lo, step),) + rest
    if isinstance(first, bool) or not hasattr(first, "__index__"):
        raise IndexError(f"only integers, slices and ... are supported, got {first!r}")
    i = first.__index__()
    if not -rows <= i < rows:
        raise IndexError(f"index {i} is out of bounds for dimension 0 with size {rows}")
    i %= rows
    return i, i + 1, (0,) + rest


def row_bytes(info: TensorInfo) -> int | None:
    """Bytes of one first-dim entry, or None when rows do not fall on byte boundaries."""
    if not info.shape:
        return None
    bits = math.prod(info.shape[1:]) * DTYPES[info.dtype].bits
    return None if bits % 8 else bits // 8


class LazyTensorFactory:
    """Lazy handles over the tensors of one or several files, and custom creation.

    ``sources`` is a path or a list of paths (or open FastSafetensorsFile objects). A name found
    in two files is an error. ``creator`` builds each tensor from its bytes and TensorInfo when
    :meth:`create` is called.
    """

    def __init__(self, sources: str | os.PathLike[str] | Iterable[Any], *, framework: str = "pt",
                 device: str = "cpu", creator: Creator | None = None):
        from .file import FastSafetensorsFile

        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        self.creator = creator
        self._files: list[FastSafetensorsFile] = []
        self._owned: list[FastSafetensorsFile] = []
        self._where: dict[str, FastSafetensorsFile] = {}
        try:
            for source in sources:
                if isinstance(source, FastSafetensorsFile):
                    f = source
                else:
                    f = FastSafetensorsFile(source, device=device, framework=framework)
                    self._owned.append(f)
                self._files.append(f)
                for name in f.get_tensors():
                    other = self._where.setdefault(name, f)
                    if other is not f:
                        raise CheckpointIndexError(
                            f.path, f"also stored in {os.path.basename(other.path)}; a tensor "
                                    f"must live in one file only", name)
        except BaseException:
            self.close()
            raise

    def _file(self, name: str) -> FastSafetensorsFile:
        try:
            return self._where[name]
        except KeyError:
            where = self._files[0].path if len(self._files) == 1 else None
            raise TensorNotFoundError(name, where, self._where) from None

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._where)

    def info(self, name: str) -> TensorInfo:
        return self._file(name).get_tensors()[name]

    def lazy(self, name: str) -> LazyTensor:
        """A handle that reads nothing until indexed or materialized."""
        return self._file(name).get_slice(name)

    def create(self, name: str, *, device: str | None = None, dtype: Any = None) -> Any:
        """The tensor ``name``: built by ``creator`` from its bytes when one was given, else a
        framework tensor on ``device`` cast to ``dtype``."""
        f = self._file(name)
        if self.creator is None:
            return f.get_tensor(name, device=device, dtype=dtype)
        info = f.get_tensors()[name]
        return self.creator(f.read_bytes(info), info)

    def close(self) -> None:
        for f in self._owned:
            f.close()

    def __enter__(self) -> LazyTensorFactory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
