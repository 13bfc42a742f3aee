"""FastSafetensorsFile: one safetensors file, opened lazily.

Opening reads only the header. ``get_tensors()`` is metadata; ``fsf[name]`` reads exactly that
tensor's bytes with positioned reads (no mmap, no whole-file buffer); ``get_slice(name)[a:b]``
reads only rows ``a`` to ``b``. The handle is safe to share between threads: reads are
positioned (no shared file offset), and ``close()`` waits for reads in flight; the descriptors
close then, or, while slices taken earlier are alive (they keep working, as safetensors' do),
when the last of them is collected.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from . import config
from .errors import (
    ClosedFileError,
    ConfigError,
    HeaderError,
    ReadError,
    TensorNotFoundError,
    UnsupportedDTypeError,
)
from .forking import in_child
from .format import DTYPES, Header, TensorInfo, open_readonly, read_header_fd
from .frameworks import get_framework, resolve_device
from .lazy_tensor_factory import LazyTensor, is_basic_index, plan_index, row_bytes, rows_for_index
from .loader.cpu import IOPolicy
from .loader.pagecache import resident_map
from .loader.plan import split_range
from .loader.posix import DIRECT_ALIGN, open_direct, pread_into, pread_runs

__all__ = ["FastSafetensorsFile"]

#: Tensors from this size up go to a device through the streaming engine (threads, pinned
#: staging, async copies); smaller ones through one pinned bounce buffer.
DEVICE_STREAM_BYTES = 32 << 20
#: Host reads of at least this many bytes follow the io option (buffered, direct, or auto by
#: page-cache residency); smaller ones go through the page cache, where a page-cache check and
#: block-aligned widening would cost more than they save.
DIRECT_MIN_BYTES = 1 << 20


class _DeviceReads:
    """Per-tensor reads to a device running at once (transformers runs 4 from its thread pool)
    share the configured reader threads, and each of their workers gets the staging buffer
    that a whole load gives each of its workers. The share is taken when a read starts: reads
    that start while others run get less, and those keep theirs, so the readers of all reads
    together can reach about twice the threads option (8, 4, 2, 2 for four at once).

    Sized per tensor instead, every read took 16 threads and a staging size of its own: on the
    H200 machine, from_pretrained with device_map="cuda" ran at 0.84x stock, pinning new host
    memory (about 1.5 GB/s there) for each of those sizes. One buffer size is one size class of
    torch's pinned-memory cache, so reads after the first reuse it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0

    @contextlib.contextmanager
    def share(self, nbytes: int) -> Iterator[tuple[int, int]]:
        """``(threads, staging_bytes)`` for one read of ``nbytes``, while it runs."""
        threads = config.device_threads()
        # At least a byte: the engine gives each buffer its floor (two O_DIRECT blocks).
        per_worker = max(config.get("staging_bytes") // (2 * threads), 1)
        with self._lock:
            self._active += 1
            active = self._active
        try:
            # No more workers than the tensor has buffers' worth of bytes, nor than this
            # read's share of the threads (reads that start later get smaller shares).
            mine = max(1, min(threads // active, -(-nbytes // per_worker)))
            yield mine, 2 * mine * per_worker
        finally:
            with self._lock:
                self._active -= 1


_DEVICE_READS = _DeviceReads()

_Read = TypeVar("_Read", bound=Callable[..., Any])


def _restores_readers(read: _Read) -> _Read:
    """A read method that leaves no read of its own counted in flight, however it ends. A read
    counts itself in ``_InUse.__enter__`` and counts itself done in ``__exit__``, but a Ctrl-C
    as ``__exit__`` starts (CPython runs its handler as a function starts) skipped that:
    close() then waited for ever for a read that was over, and the descriptors stayed open."""

    @functools.wraps(read)
    def restoring(self: FastSafetensorsFile, *args: Any, **kwargs: Any) -> Any:
        ident = threading.get_ident()
        # Reads in flight on this thread already are not this call's (a finalizer can read
        # inside a read).
        before = set(self._readers)
        try:
            return read(self, *args, **kwargs)
        except BaseException:
            with self._lock:
                for use, thread in list(self._readers.items()):
                    if thread == ident and use not in before:
                        del self._readers[use]
                self._read_done()
            raise

    return restoring  # type: ignore[return-value]


#: Every handle open in the process, for :func:`_after_fork`.
_OPEN: weakref.WeakSet[FastSafetensorsFile] = weakref.WeakSet()


def _after_fork() -> None:
    # Reads in flight on the parent's other threads never end in the child: each handle, and
    # the device reads' share, start there with no reader and a lock nobody holds (close()
    # waited for ever for such a reader; one of them may have held the lock).
    _DEVICE_READS._lock = threading.Lock()
    _DEVICE_READS._active = 0
    for handle in list(_OPEN):
        handle._lock = threading.RLock()
        handle._idle = threading.Condition(handle._lock)
        handle._readers = {}


in_child(_after_fork)


class FastSafetensorsFile:
    """One safetensors file: a mapping of names to tensors, read on access.

    >>> fsf = FastSafetensorsFile("model.safetensors")          # doctest: +SKIP
    >>> fsf.get_tensors()["lm_head.weight"]   # metadata only  # doctest: +SKIP
    TensorInfo(dtype='BF16', shape=(32000, 4096), data_offsets=(0, 262144000), nbytes=262144000)
    >>> fsf["lm_head.weight"].shape   # reads this tensor only  # doctest: +SKIP
    torch.Size([32000, 4096])
    """

    def __init__(self, path: str | os.PathLike[str], *, device: str = "cpu",
                 framework: str = "pt"):
        self._path = os.fspath(path)
        self._framework = get_framework(framework)
        self._device = resolve_device(device, framework)
        # `with` on a C lock runs no Python between taking it and the block, nor between the
        # block and releasing it; a Condition's __enter__ and __exit__ are Python functions, and
        # a Ctrl-C at the start of one of them (or as the lock call inside returns) left the lock
        # held for good, or a count changed inside undone.
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)   # notified as reads end, for close()
        self._readers: dict[_InUse, int] = {}   # reads in flight, with their threads' idents
        self._slices = 0                     # LazyTensors alive: they keep the descriptors open
        self._closed = True
        self._fds_closed = True              # nothing open yet: nothing for __del__ to close
        self._direct_fd: int | None = None   # O_DIRECT, opened on first use (-1: refused)
        self._fd = open_readonly(self._path)
        self._fds_closed = False
        try:
            self._header = read_header_fd(self._fd, self._path)
        except BaseException:
            self._close_fds()
            raise
        self._closed = False
        self.bytes_read = 0
        _OPEN.add(self)

    # -- metadata -------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._path

    @property
    def header(self) -> Header:
        return self._header

    @property
    def device(self) -> str:
        return self._device

    def get_tensors(self) -> dict[str, TensorInfo]:
        """``{name: TensorInfo}`` in file order. Reads nothing: the header is already parsed."""
        return dict(self._header.tensors)

    def keys(self) -> list[str]:
        """Tensor names, sorted (as ``safetensors.safe_open.keys()`` returns them)."""
        return sorted(self._header.tensors)

    def offset_keys(self) -> list[str]:
        """Tensor names in the order their bytes appear in the file."""
        return list(self._header.tensors)

    def metadata(self) -> dict[str, str] | None:
        return None if self._header.metadata is None else dict(self._header.metadata)

    def __len__(self) -> int:
        return len(self._header.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._header.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def _info(self, name: str) -> TensorInfo:
        try:
            return self._header.tensors[name]
        except (KeyError, TypeError):
            raise TensorNotFoundError(name, self._path, self._header.tensors) from None

    def _dtype_of(self, info: TensorInfo) -> Any:
        try:
            return self._framework.dtype(info.dtype, info.name)
        except UnsupportedDTypeError as exc:
            raise exc.in_file(self._path) from None

    # -- data -----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        return self.get_tensor(name)

    def get_tensor(self, name: str, *, device: str | None = None, dtype: Any = None) -> Any:
        """Read tensor ``name`` (only its bytes) onto ``device`` (default: the file's device),
        cast to ``dtype`` when given."""
        info = self._info(name)
        if self._closed:
            raise ClosedFileError(self._path)
        try:
            return self._get(info, device, dtype)
        except UnsupportedDTypeError as exc:
            raise exc.in_file(self._path) from None

    @_restores_readers
    def _get(self, info: TensorInfo, device: str | None, dtype: Any) -> Any:
        name = info.name
        target = self._device if device is None else resolve_device(device, self._framework.name)
        if target != "cpu" and info.nbytes >= DEVICE_STREAM_BYTES:
            # Large tensors stream through pinned staging straight into device memory.
            from .loading import device_stream

            with self._engine_source() as source, \
                    _DEVICE_READS.share(info.nbytes) as (threads, staging):
                # The header is the one this file holds (not read and parsed again).
                ((_, tensor),) = device_stream([(source, self._header, [name])], target,
                                               threads=threads, staging_bytes=staging)
            with self._lock:
                self.bytes_read += info.nbytes
            return self._framework.convert(tensor, device=None, dtype=dtype)
        buffer = self._read_range(info.data_offsets[0], info.nbytes, pinned=target != "cpu")
        tensor = self._framework.view(buffer, 0, info)
        if target != "cpu":
            # From pinned memory the copy is a DMA queued on the caller's current stream, so
            # the tensor is ready for that stream without a host sync.
            tensor = tensor.to(target, non_blocking=True)
        return self._framework.convert(tensor, device=None, dtype=dtype)

    @contextlib.contextmanager
    def _engine_source(self) -> Iterator[str]:
        """The path the streaming engine should open to read this handle's file, kept open
        meanwhile: ``/proc/self/fd/N``, this handle's file even if the path names another one
        by now (the engine opens what it reads). A read or header error raised inside names the
        file, not the link it was read through."""
        with self._in_use() as fd:
            proc = f"/proc/self/fd/{fd}"
            source = proc if os.path.exists(proc) else self._path
            try:
                yield source
            except (ReadError, HeaderError) as exc:
                if getattr(exc, "path", None) != source or source == self._path:
                    raise
                fields = {f: getattr(exc, f) for f in type(exc)._fields}
                raise type(exc)(**{**fields, "path": self._path}) from None

    def get_slice(self, name: str) -> LazyTensor:
        """A lazy handle: ``fsf.get_slice(name)[a:b]`` reads rows ``a`` to ``b`` only. As with
        safetensors, it keeps working after the file is closed (it keeps the descriptor open
        until it is collected)."""
        return LazyTensor(self, self._info(name))

    def _slice_born(self, piece: LazyTensor) -> None:
        """A LazyTensor of this file is made (in its __init__, however it is made)."""
        with self._lock:
            if self._closed:
                raise ClosedFileError(self._path)
            self._slices += 1
            # Counted and known to the slice together: a Ctrl-C as this returned (before the
            # slice kept the file) left a count that no collected slice took back.
            piece._file = self

    def _slice_gone(self) -> None:
        with self._lock:
            self._slices -= 1
            if self._closed and not self._slices and not self._readers:
                self._close_fds()

    @_restores_readers
    def read_bytes(self, info: TensorInfo | str) -> memoryview:
        """The raw little-endian bytes of one tensor (its name, or its :class:`TensorInfo`), in
        fresh host memory: for a dtype the framework cannot represent."""
        if self._closed:
            raise ClosedFileError(self._path)
        if not isinstance(info, TensorInfo):
            info = self._info(info)   # read_bytes(3): TensorNotFoundError, not AttributeError
        elif self._header.tensors.get(info.name) != info:
            # Another file's TensorInfo read at its offsets here: wrong bytes, or a ReadError
            # that blamed this file for being truncated.
            raise ConfigError("info", info, [f"a tensor name, or a TensorInfo from the "
                                             f"get_tensors() of {self._path}"])
        buffer = self._read_range(info.data_offsets[0], info.nbytes)
        array = buffer.numpy() if self._framework.name == "pt" else buffer
        return memoryview(array).cast("B")

    @_restores_readers
    def _read_index(self, info: TensorInfo, index: Any) -> Any:
        try:
            return self._index(info, index)
        except UnsupportedDTypeError as exc:
            raise exc.in_file(self._path) from None

    def _index(self, info: TensorInfo, index: Any) -> Any:
        if index is Ellipsis or (type(index) is tuple and not index):
            # The whole tensor (``slice[...]``, how transformers reads): no plan to make.
            return self._finish(self._framework.view(
                self._read_range(info.data_offsets[0], info.nbytes), 0, info))
        per_row = row_bytes(info)
        if per_row is None or not is_basic_index(index):
            # 0-d and packed 4-bit tensors, and indices beyond integers and slices (None,
            # bools, lists, tensors): read all, index in the framework's own shape.
            whole = self._framework.view(self._read_range(info.data_offsets[0], info.nbytes), 0,
                                         info)
            return self._finish(whole[index])
        bits = DTYPES[info.dtype].bits
        if bits < 8:
            # Packed sub-byte dtypes: plan whole rows only; the rest is indexed in memory.
            lo, hi, local = rows_for_index(info.shape, index)
            part = TensorInfo(info.name, info.dtype, (hi - lo, *info.shape[1:]),
                              (info.data_offsets[0] + lo * per_row,
                               info.data_offsets[0] + hi * per_row))
            tensor = self._framework.view(self._read_range(part.data_offsets[0], part.nbytes), 0,
                                          part)
            return self._finish(tensor[local])
        # Only the bytes the index touches: one run per selected row when columns are sliced
        # (what a tensor-parallel rank asks for), read back to back into one block.
        runs, block, local = plan_index(info.shape, bits // 8, index)
        total = sum(length for _, length in runs)
        part = TensorInfo(info.name, info.dtype, block, (0, total))
        if len(runs) == 1:
            buffer = self._read_range(info.data_offsets[0] + runs[0][0], total)
        else:
            buffer = self._read_runs(info.data_offsets[0], runs, total)
        return self._finish(self._framework.view(buffer, 0, part)[local])

    def _read_runs(self, begin: int, runs: list[tuple[int, int]], total: int) -> Any:
        """Several ranges of the data region (offsets relative to ``begin``), back to back in
        fresh host memory."""
        buffer, view = self._framework.alloc(total)
        base = self._header.data_start + begin
        with self._in_use() as fd:
            pread_runs(fd, view, runs, base, path=self._path)
        with self._lock:
            self.bytes_read += total
        return buffer

    def _finish(self, tensor: Any) -> Any:
        if self._framework.name == "pt":
            tensor = tensor.contiguous()
        else:
            import numpy as np

            # not ascontiguousarray: it turns 0-d results (arr[i] of a 1-D array) into shape (1,)
            tensor = np.asarray(tensor, order="C")
        if self._device != "cpu":
            tensor = self._framework.convert(tensor, device=self._device, dtype=None)
        return tensor

    def _read_range(self, begin: int, length: int, *, pinned: bool = False) -> Any:
        """Bytes ``[begin, begin + length)`` of the data region, read into fresh host memory;
        large ranges are split across reader threads."""
        if pinned:
            from .loader.cuda import TorchCudaSink

            buffer, view = TorchCudaSink.pinned(length)
        else:
            buffer, view = self._framework.alloc(length)
        if length == 0:
            with self._in_use():  # nothing to read, but a closed file still refuses
                return buffer
        offset = self._header.data_start + begin
        chunk = config.get("chunk_bytes")
        if not pinned:
            direct = self._read_direct(offset, length, chunk)
            if direct is not None:
                return direct
        pieces = split_range(offset, offset + length, chunk, align=4096)
        with self._in_use() as fd:
            _each(pieces, lambda p: pread_into(fd, view[p[0] - offset:p[1] - offset], p[0],
                                               path=self._path))
        with self._lock:
            self.bytes_read += length
        return buffer

    def _read_direct(self, offset: int, length: int, chunk: int) -> Any:
        """Bytes ``[offset, offset + length)`` of the file read with O_DIRECT into fresh memory,
        when the io option asks for it (``direct``, or ``auto`` and mostly not cached); None
        when they should go through the page cache instead. The block-aligned reads land in a
        buffer whose start sits at the same offset within a block as the file's bytes, so the
        returned view is the tensor's bytes with no second copy, and its data is aligned to 8
        bytes (not 64), which every dtype's elements need."""
        # An element must not straddle its natural alignment (8 covers every dtype).
        if length < DIRECT_MIN_BYTES or offset % 8:
            return None
        mode = config.get("io")
        if mode == "buffered":
            return None
        with self._in_use() as fd:
            first = offset - offset % DIRECT_ALIGN
            end = -(-(offset + length) // DIRECT_ALIGN) * DIRECT_ALIGN
            if mode == "auto":
                resident = resident_map(fd, first, end - first)
                if not IOPolicy(mode).direct_range(resident, first, offset, offset + length):
                    return None
            with self._lock:
                if self._direct_fd is None:
                    opened = open_direct(fd, self._path)
                    self._direct_fd = -1 if opened is None else opened
                direct_fd = self._direct_fd
            if direct_fd < 0:
                return None   # the filesystem refuses O_DIRECT (tmpfs, some FUSE)
            raw, view = self._framework.alloc(end - first, align=DIRECT_ALIGN)
            size = self._header.file_size

            def read(piece: tuple[int, int]) -> None:
                lo, hi = piece
                got = pread_into(direct_fd, view[lo - first:hi - first], lo, path=self._path,
                                 direct=True, allow_eof=hi > size)
                if lo + got < min(hi, offset + length):
                    raise ReadError(self._path, lo, min(hi, offset + length) - lo, got)

            _each(split_range(first, end, chunk, align=DIRECT_ALIGN), read)
        with self._lock:
            self.bytes_read += length
        # The tensor's bytes alone, as its storage (frameworks' exact()).
        return self._framework.exact(raw, offset - first, length)

    # -- lifetime -------------------------------------------------------------------------
    @_restores_readers
    def _fstat(self) -> os.stat_result:
        """The open file's status (whose ``st_dev`` and ``st_ino`` tell which file it is)."""
        with self._in_use() as fd:
            return os.fstat(fd)

    def _in_use(self) -> _InUse:
        return _InUse(self)

    def close(self) -> None:
        """Close the file. Idempotent; waits for reads in flight on other threads. Slices taken
        before keep the descriptors open until the last of them is collected."""
        with self._lock:
            # No early return once closed: a close() that a Ctrl-C stopped half-way (closed,
            # descriptors still open) is finished by the next one.
            self._closed = True
            while self._readers:
                self._idle.wait()
            if not self._slices:
                self._close_fds()

    def _read_done(self) -> None:
        """Under the lock, as a read ends: wake close(), and be the one that closes the
        descriptors if close() came meanwhile."""
        self._idle.notify_all()
        if self._closed and not self._slices and not self._readers:
            self._close_fds()

    def _close_fds(self) -> None:
        """Under the lock. Once only, even when a slice collected during close() gets here
        first (the lock is reentrant, and collection can run on any thread at any time)."""
        if self._fds_closed:
            return
        self._fds_closed = True
        try:
            os.close(self._fd)
        finally:   # also after a Ctrl-C as the first close returns
            if self._direct_fd is not None and self._direct_fd >= 0:
                os.close(self._direct_fd)

    def __enter__(self) -> FastSafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Collected: no read or slice of it is left, whatever a count that a Ctrl-C stopped
        # says, so nothing to wait for.
        if getattr(self, "_fds_closed", True) is False:
            self._closed = True
            self._close_fds()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self)} tensors"
        return f"FastSafetensorsFile({self._path!r}, device={self._device!r}, {state})"


def _each(pieces: list[tuple[int, int]], read: Any) -> None:
    """``read(piece)`` for every piece: on this thread for one, else on reader threads."""
    if len(pieces) == 1:
        read(pieces[0])
        return
    from .loader import threads

    # Not ThreadPoolExecutor: a Ctrl-C in its locking could leave a lock held that its threads
    # need, and the caller waited for them for good (threads.run_all).
    threads.run_all([functools.partial(read, piece) for piece in pieces],
                    config.get("threads"), "fastsafetensors-read")


class _InUse:
    """Holds the descriptor open for one read; close() waits until every holder has left."""

    def __init__(self, owner: FastSafetensorsFile):
        self.owner = owner

    def __enter__(self) -> int:
        # The handle's own methods refuse a closed file before they get here; a slice taken
        # before close() reads until the descriptors are gone.
        owner = self.owner
        ident = threading.get_ident()
        with owner._lock:
            if owner._fds_closed:
                raise ClosedFileError(owner._path)
            owner._readers[self] = ident
        return owner._fd

    def __exit__(self, *exc: object) -> None:
        owner = self.owner
        with owner._lock:
            # Gone already when _restores_readers took it out after a Ctrl-C, and this runs
            # late (a generator's, as it is collected).
            owner._readers.pop(self, None)
            owner._read_done()
