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

import itertools
import math
import numbers
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .errors import CheckpointIndexError, ConfigError, TensorNotFoundError
from .format import DTYPES, TensorInfo

if TYPE_CHECKING:
    from .file import FastSafetensorsFile

__all__ = ["LazyTensor", "LazyTensorFactory", "Creator"]

#: A custom creation hook: gets the tensor's raw little-endian bytes and its TensorInfo, returns
#: whatever object the caller wants (a quantized tensor, a jax array, a custom class, ...).
Creator = Callable[[memoryview, TensorInfo], Any]


class LazyTensor:
    """A tensor of a file that is read only when indexed or materialized.

    Integers, slices and ``...`` read only the bytes they select; other indices (``None``,
    bools, lists, tensors) read the whole tensor and index it in the framework. ``get_shape()``
    is the file's shape; for F4, whose values the frameworks pack two to a byte, an index
    applies to the packed shape (the last dimension halved), as on the loaded tensor."""

    __slots__ = ("_file", "info")
    _file: FastSafetensorsFile   # set by the file as it counts the slice (_slice_born)

    def __init__(self, file: FastSafetensorsFile, info: TensorInfo):
        self.info = info
        file._slice_born(self)   # counts it and sets _file: close() leaves the descriptor to it

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
        return self._file._get(self.info, device, dtype)

    def __getitem__(self, index: Any) -> Any:
        return self._file._read_index(self.info, index)

    def __del__(self) -> None:
        try:
            file = self._file
        except AttributeError:   # unset when __init__ failed: never counted
            return
        file._slice_gone()

    def __reduce_ex__(self, protocol: Any) -> Any:
        # A copy would skip __init__ and not be counted (as safetensors' slices, these do not
        # copy or pickle).
        raise TypeError(f"a slice of an open file cannot be copied or pickled: take another "
                        f"with get_slice({self.info.name!r})")

    def __repr__(self) -> str:
        return (f"LazyTensor({self.info.name!r}, dtype={self.info.dtype}, shape={self.info.shape}, "
                f"file={os.path.basename(self._file.path)!r})")


def is_basic_index(index: Any) -> bool:
    """Whether ``index`` goes to the byte-run planner: integers, slices and one ``...`` (and
    floats or strings, which the planner refuses with IndexError). ``None``, bools, lists,
    nested tuples, ranges, tensors and arrays do not: the framework applies them to the whole
    tensor, with its own semantics, as safetensors' slices do.

    A bool or a one-element tensor has ``__index__`` too, but means something else as an index
    (a new axis, or a kept dimension), so it must not be read as an integer.
    """
    entries = index if isinstance(index, tuple) else (index,)
    if sum(e is Ellipsis for e in entries) > 1:   # torch takes several; numpy refuses them
        return False
    return not any(e is None or isinstance(e, (bool, list, tuple, range))
                   or (hasattr(e, "shape") and not isinstance(e, numbers.Integral))
                   for e in entries)


def _expand_ellipsis(shape: tuple[int, ...], index: Any) -> tuple[Any, ...]:
    """``index`` as a tuple with its ``...`` replaced by full slices; IndexError when it has
    more than one ``...`` or more entries than ``shape`` has dims."""
    if not isinstance(index, tuple):
        index = (index,)
    if sum(i is Ellipsis for i in index) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        fill = len(shape) - (len(index) - 1)
        index = index[:at] + (slice(None),) * fill + index[at + 1:]
    if len(index) > len(shape):
        raise IndexError(f"too many indices ({len(index)}) for a tensor of {len(shape)} dims")
    return index


def rows_for_index(shape: tuple[int, ...], index: Any) -> tuple[int, int, tuple[Any, ...]]:
    """Which rows (first-dim entries) ``index`` touches, and the index rewritten relative to
    the first row read. Raises IndexError like the frameworks do (ValueError for a slice step
    below 1, as torch)."""
    index = _expand_ellipsis(shape, index)
    if not shape:
        return 0, 1, ()
    first, rest = (index[0], index[1:]) if index else (slice(None), ())
    rows = shape[0]
    if isinstance(first, slice):
        start, stop, step = first.indices(rows)
        if step <= 0:
            raise ValueError("step must be greater than zero (as in torch)")
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


#: Runs of a strided read closer than this many bytes are read as one span: copying a gap this
#: small costs less than the extra system call that skipping it needs.
MERGE_GAP = 512


def plan_index(shape: tuple[int, ...], itemsize: int,
               index: Any) -> tuple[list[tuple[int, int]], tuple[int, ...], tuple[Any, ...]]:
    """The byte runs ``(offset in the tensor, length)`` that ``index`` touches, the shape of the
    block they form when read back to back, and the index that turns that block into the result.

    Pure: no file, no framework. ``index`` is what ``LazyTensor[...]`` received (integers,
    positive-step slices, ``...``). A column slice of a row-major matrix is one run per row, so a
    tensor-parallel rank reads only its columns; runs closer than :data:`MERGE_GAP` are merged by
    reading the whole of the innermost partly-selected dimension instead.

    >>> plan_index((4, 256), 4, (slice(None), slice(128, 256)))[0]   # half of each F32 row
    [(512, 512), (1536, 512), (2560, 512), (3584, 512)]
    >>> plan_index((4, 8), 4, (slice(None), slice(4, 8)))[0]   # 16-byte gaps: read whole
    [(0, 128)]
    """
    sel = _normalize_index(shape, index)
    ndim = len(shape)
    stride = [math.prod(shape[d + 1:]) * itemsize for d in range(ndim)]

    def full(d: int) -> bool:
        start, count, step, is_int = sel[d]
        return not is_int and start == 0 and step == 1 and count == shape[d]

    def span(d: int) -> int:
        start, count, step, _ = sel[d]
        return 0 if count == 0 else (count - 1) * step + 1

    k = ndim - 1   # the innermost dimension that is not read whole
    while k >= 0 and full(k):
        k -= 1
    while k > 0:
        outer_runs = math.prod(sel[d][1] for d in range(k))
        if outer_runs <= 1 or stride[k - 1] - span(k) * stride[k] >= MERGE_GAP:
            break
        k -= 1

    post: list[Any] = []
    block: list[int] = []
    for d in range(ndim):
        start, count, step, is_int = sel[d]
        if d < k:        # outer: exactly the selected entries are read
            block.append(count)
            post.append(0 if is_int else slice(None))
        elif d == k:     # the run: a contiguous span, stepped through afterwards
            block.append(span(d))
            post.append(0 if is_int else slice(None, None, step))
        else:            # read whole, indexed afterwards (the merged dimensions)
            block.append(shape[d])
            post.append(start if is_int else slice(start, start + span(d), step))
    if math.prod(block) == 0:
        return [], tuple(block), tuple(post)
    if k < 0:
        return [(0, math.prod(shape) * itemsize)], tuple(block), tuple(post)
    run = span(k) * stride[k]
    base = sel[k][0] * stride[k]
    outer = [range(s, s + c * st, st) for s, c, st, _ in sel[:k]]
    runs: list[tuple[int, int]] = []
    for entry in itertools.product(*outer):
        offset = base + sum(i * stride[d] for d, i in enumerate(entry))
        if runs and runs[-1][0] + runs[-1][1] == offset:
            runs[-1] = (runs[-1][0], runs[-1][1] + run)
        else:
            runs.append((offset, run))
    return runs, tuple(block), tuple(post)


def _normalize_index(shape: tuple[int, ...],
                     index: Any) -> list[tuple[int, int, int, bool]]:
    """Per dimension ``(start, count, step, is_int)``; raises IndexError like the frameworks
    (ValueError for a slice step below 1, as torch)."""
    index = _expand_ellipsis(shape, index)
    index = index + (slice(None),) * (len(shape) - len(index))
    out = []
    for d, (entry, size) in enumerate(zip(index, shape)):
        if isinstance(entry, slice):
            start, stop, step = entry.indices(size)
            if step <= 0:
                raise ValueError("step must be greater than zero (as in torch)")
            out.append((start, len(range(start, stop, step)), step, False))
            continue
        if isinstance(entry, bool) or not hasattr(entry, "__index__"):
            raise IndexError(f"only integers, slices and ... are supported, got {entry!r}")
        i = entry.__index__()
        if not -size <= i < size:
            raise IndexError(f"index {i} is out of bounds for dimension {d} with size {size}")
        out.append((i % size, 1, 1, True))
    return out


class LazyTensorFactory:
    """Lazy handles over the tensors of one or several files, and custom creation.

    ``sources`` is a path or a list of paths (or open FastSafetensorsFile objects). A name found
    in two files is an error. ``creator`` builds each tensor from its bytes and TensorInfo when
    :meth:`create` is called.
    """

    def __init__(self, sources: str | os.PathLike[str] | Iterable[Any], *, framework: str = "pt",
                 device: str = "cpu", creator: Creator | None = None):
        from .file import FastSafetensorsFile

        if isinstance(sources, (str, os.PathLike, FastSafetensorsFile)):
            # one source, not an iterable of them (iterating a file would yield tensor names)
            sources = [sources]
        elif not isinstance(sources, Iterable):   # LazyTensorFactory(3): "not iterable" only
            raise TypeError(f"LazyTensorFactory takes a file path or a list of them, got "
                            f"{type(sources).__name__} {sources!r:.80}")
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
                for name in f.header.tensors:
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
        return self._file(name).header.tensors[name]

    def lazy(self, name: str) -> LazyTensor:
        """A handle that reads nothing until indexed or materialized."""
        return self._file(name).get_slice(name)

    def create(self, name: str, *, device: str | None = None, dtype: Any = None) -> Any:
        """The tensor ``name``: built by ``creator`` from its bytes when one was given, else a
        framework tensor on ``device`` cast to ``dtype``."""
        f = self._file(name)
        if self.creator is None:
            return f.get_tensor(name, device=device, dtype=dtype)
        # The creator gets the bytes as stored and decides what it builds: a device or dtype
        # asked for here would be ignored without a word.
        for option, value in (("device", device), ("dtype", dtype)):
            if value is not None:
                raise ConfigError(option, value, ["None with a creator (it gets the stored "
                                                  "bytes: move or cast in it), or a factory "
                                                  "without one"])
        info = f.header.tensors[name]
        return self.creator(f.read_bytes(info), info)

    def close(self) -> None:
        for f in self._owned:
            f.close()

    def __enter__(self) -> LazyTensorFactory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
