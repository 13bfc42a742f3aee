"""The safetensors format: dtypes, TensorInfo and the header parser. Pure Python, no torch.

A file is ``[u64 little-endian N][N bytes of UTF-8 JSON][data]``. The JSON object maps tensor names
to ``{"dtype", "shape", "data_offsets": [begin, end]}`` with offsets relative to the data region,
plus an optional ``"__metadata__"`` of string to string. Every rule safetensors enforces is checked
here, so the loaders behind it can trust a :class:`Header` completely.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointNotFoundError, HeaderError, NotAFileError, TensorNotFoundError

__all__ = ["DType", "DTYPES", "TensorInfo", "Header", "parse_header", "read_header",
           "MAX_HEADER_SIZE"]

#: safetensors refuses headers above 100 MB; so do we (a hostile length must not allocate GBs).
MAX_HEADER_SIZE = 100_000_000
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its width in bits and the names frameworks give it (None: lacking)."""

    name: str
    bits: int
    torch: str | None
    numpy: str | None


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("BOOL", 8, "bool", "bool"),
    DType("U8", 8, "uint8", "uint8"),
    DType("I8", 8, "int8", "int8"),
    DType("U16", 16, "uint16", "uint16"),
    DType("I16", 16, "int16", "int16"),
    DType("U32", 32, "uint32", "uint32"),
    DType("I32", 32, "int32", "int32"),
    DType("U64", 64, "uint64", "uint64"),
    DType("I64", 64, "int64", "int64"),
    DType("F16", 16, "float16", "float16"),
    DType("BF16", 16, "bfloat16", None),
    DType("F32", 32, "float32", "float32"),
    DType("F64", 64, "float64", "float64"),
    DType("C64", 64, "complex64", "complex64"),
    DType("F8_E4M3", 8, "float8_e4m3fn", None),
    DType("F8_E5M2", 8, "float8_e5m2", None),
    DType("F8_E4M3FNUZ", 8, "float8_e4m3fnuz", None),
    DType("F8_E5M2FNUZ", 8, "float8_e5m2fnuz", None),
    DType("F8_E8M0", 8, "float8_e8m0fnu", None),
    # Two 4-bit values a byte; torch's float4_e2m1fn_x2 holds a pair, so its last dim is halved.
    DType("F4", 4, "float4_e2m1fn_x2", None),
    # Four 6-bit values in three bytes. safetensors reads their headers but no framework has
    # them: the file opens, and such a tensor is raw bytes (FastSafetensorsFile.read_bytes).
    DType("F6_E2M3", 6, None, None),
    DType("F6_E3M2", 6, None, None),
)}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives in a file. ``data_offsets`` are relative to the data region.

    >>> TensorInfo("w", "F32", (2, 3), (0, 24)).nbytes
    24
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        """Bytes of one addressable element (1 for the packed 4-bit type)."""
        return max(1, DTYPES[self.dtype].bits // 8)

    def __repr__(self) -> str:
        return (f"TensorInfo(dtype={self.dtype!r}, shape={self.shape}, "
                f"data_offsets={self.data_offsets}, nbytes={self.nbytes})")


@dataclass(frozen=True)
class Header:
    """A validated header. ``tensors`` is in file order (by data offset); offsets are relative to
    ``data_start``, the absolute file offset of the data region."""

    path: str | None
    header_size: int
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None = None
    data_start: int = field(init=False)
    #: (device, inode, size, mtime in ns) of the file the header was read from (None for
    #: bytes): a later open of the same path must find the same file (see check_same_file).
    stamp: tuple[int, int, int, int] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_start", 8 + self.header_size)

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_start

    def select(self, names: Sequence[str] | None) -> list[TensorInfo]:
        """The tensors ``names`` (None: all), in file order; an unknown name raises
        TensorNotFoundError listing close matches."""
        if names is None:
            return list(self.tensors.values())
        names = list(dict.fromkeys(names))   # a name asked twice is read once
        missing = [n for n in names if n not in self.tensors]
        if missing:
            raise TensorNotFoundError(missing[0], self.path, self.tensors)
        return sorted((self.tensors[n] for n in names), key=lambda t: t.data_offsets)


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # built in C; a length mismatch is the rare duplicate, found below
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return out


class DuplicateKey(Exception):
    """Raised by :func:`reject_duplicate_keys`; callers turn it into their typed error."""


class _NotJSON(Exception):
    pass


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (and safetensors' parser) does not.
    raise _NotJSON(f"{name} is not a JSON value")


def _loads(text: str) -> Any:
    """``json.loads`` that refuses duplicate keys in any object.

    Python's parser keeps the last of two equal keys; with a hook that sees every object's pairs
    to catch them, ``json.loads`` of a 20,000-tensor header took 1.5-2.7x as long (the whole
    parse a quarter longer, 66.5 against 53.7 ms). So the text is parsed plainly
    first, then its ':' are counted: outside strings each separates one key from its value, so
    when the text holds exactly as many as the header object and the objects directly in it
    have keys, no key was dropped. A ':' inside a string, or an object nested deeper, only
    makes the counts differ, and the text is parsed again with the hook."""
    obj = json.loads(text, parse_constant=_reject_constant)
    if type(obj) is dict and text.count(":") == len(obj) + sum(
            len(v) for v in obj.values() if type(v) is dict):
        return obj
    return json.loads(text, object_pairs_hook=reject_duplicate_keys,
                      parse_constant=_reject_constant)


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


_BITS = {name: d.bits for name, d in DTYPES.items()}
#: Sizes are int64 in the frameworks.
MAX_DIM = 1 << 63


def _tensor(path: str | None, name: str, entry: Any) -> TensorInfo:
    """One entry, validated. The fast path returns only when every rule holds; anything odd
    goes to the checker below, which names the rule broken (20,000-tensor headers stay fast)."""
    try:
        shape = entry["shape"]
        begin, end = offsets = entry["data_offsets"]
        bits = _BITS[entry["dtype"]]
    except (KeyError, TypeError, ValueError):
        return _checked_tensor(path, name, entry)
    if (type(shape) is list and type(offsets) is list and type(begin) is int
            and type(end) is int and 0 <= begin <= end):
        count = 1
        for dim in shape:
            if type(dim) is not int or dim < 0:
                break
            count *= dim
        else:
            # Zero elements: the byte count cannot bound the other dimensions; checked below.
            if count and count * bits == (end - begin) * 8:
                return TensorInfo(name, entry["dtype"], tuple(shape), (begin, end))
    return _checked_tensor(path, name, entry)


def _checked_tensor(path: str | None, name: str, entry: Any) -> TensorInfo:
    if type(entry) is list and len(entry) == 3:
        # safetensors' JSON reader (serde) also takes an entry as the array of its three
        # fields in order; no writer makes one, but a file safetensors loads loads here too.
        entry = dict(zip(("dtype", "shape", "data_offsets"), entry))
    if not isinstance(entry, dict):
        raise HeaderError(path, f"entry must be an object with dtype, shape and data_offsets, "
                                f"got {type(entry).__name__}", name)
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise HeaderError(path, f"entry lacks {', '.join(missing)}", name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise HeaderError(path, f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)} (a newer "
                                f"safetensors may have written it: upgrade fastsafetensors)", name)
    if not _int_list(shape) or any(d < 0 for d in shape):
        raise HeaderError(path, f"shape must be a list of non-negative integers, got {shape!r}",
                          name)
    if 0 in shape and math.prod(d for d in shape if d) >= MAX_DIM:
        # With a 0 elsewhere in the shape the byte count is 0 and would pass the size check.
        # numpy cannot make such an array, and torch only for some orders of the dimensions
        # ([2**32, 0, 2**32] but not [2**32, 2**32, 0]): one rule for every framework.
        raise HeaderError(path, f"shape {shape!r}: its non-zero dimensions multiply to 2**63 "
                                f"or more", name)
    if not _int_list(offsets) or len(offsets) != 2:
        raise HeaderError(path, f"data_offsets must be two integers [begin, end], got "
                                f"{offsets!r}", name)
    begin, end = offsets
    if begin < 0 or end < begin:
        raise HeaderError(path, f"data_offsets [{begin}, {end}] must satisfy 0 <= begin <= end",
                          name)
    # Python ints do not overflow: a hostile shape gives a huge product, caught by this comparison.
    bits = math.prod(shape) * DTYPES[dtype].bits
    if bits % 8:
        raise HeaderError(path, f"shape {shape} of {dtype} is {bits} bits, not a whole number of "
                                f"bytes", name)
    if bits // 8 != end - begin:
        raise HeaderError(path, f"shape {shape} of {dtype} needs {bits // 8} bytes but "
                                f"data_offsets [{begin}, {end}] hold {end - begin}", name)
    return TensorInfo(name, dtype, tuple(shape), (begin, end))


#: What a HeaderError of a broken rule says to do, unless its reason says something better.
REMEDY = ("; the file is damaged or is not a safetensors file: download it again, or save it "
          "again with safetensors")
#: Words of a reason that already says what to do.
_REMEDIES = ("re-download", "download it again", "upgrade", "save it again")


def _with_remedy(exc: HeaderError) -> HeaderError:
    if any(word in exc.reason for word in _REMEDIES):
        return exc
    return HeaderError(exc.path, exc.reason + REMEDY, exc.tensor)


def parse_header(raw: bytes, *, file_size: int, path: str | os.PathLike[str] | None = None
                 ) -> Header:
    """Parse and validate the JSON header bytes (without the 8-byte length) of a file whose total
    size is ``file_size``. Raises :class:`HeaderError` naming the rule broken and what to do."""
    try:
        return _parse_header(raw, file_size=file_size, path=path)
    except HeaderError as exc:
        raise _with_remedy(exc) from None


def _parse_header(raw: bytes, *, file_size: int, path: str | os.PathLike[str] | None = None
                  ) -> Header:
    spath = None if path is None else os.fspath(path)
    data_size = file_size - 8 - len(raw)
    if data_size < 0:
        raise HeaderError(spath, f"header of {len(raw)} bytes does not fit in a file of "
                                 f"{file_size} bytes (truncated file?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(spath, f"header is not valid UTF-8 ({exc.reason} at byte "
                                 f"{exc.start})") from None
    try:
        obj = _loads(text)
    except DuplicateKey as dup:
        # The hook cannot tell a tensor name from a field name, so name only the key.
        raise HeaderError(spath, f"the key {str(dup)!r} appears twice in one JSON object of the "
                                 f"header (duplicate keys are ambiguous)") from None
    except json.JSONDecodeError as exc:
        raise HeaderError(spath, f"header is not valid JSON ({exc.msg} at char {exc.pos})"
                          ) from None
    except _NotJSON as exc:   # NaN or Infinity
        raise HeaderError(spath, f"header is not valid JSON ({exc})") from None
    except RecursionError:
        raise HeaderError(spath, "header nests JSON deeper than Python's stack allows") from None
    except ValueError as exc:
        # Python's own limit on integers (4300 digits). Its advice to raise the limit is
        # not for a corrupt file: only its first clause is kept.
        raise HeaderError(spath, f"header holds a number Python refuses to read "
                                 f"({str(exc).split(';')[0][:120]})") from None
    if not isinstance(obj, dict):
        raise HeaderError(spath, f"header must be a JSON object, got {type(obj).__name__}")
    if "\\ud" in text or "\\uD" in text:
        _check_surrogates(spath, obj)
    metadata = obj.pop(METADATA_KEY, None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise HeaderError(spath, "__metadata__ must map strings to strings")
    infos = sorted((_tensor(spath, name, entry) for name, entry in obj.items()),
                   key=lambda t: t.data_offsets)
    position = 0
    for info in infos:
        begin, end = info.data_offsets
        if begin != position:
            rule = "overlaps the previous tensor" if begin < position else "leaves a gap"
            raise HeaderError(spath, f"data_offsets [{begin}, {end}] {rule} (expected it to "
                                     f"start at {position}); tensors must tile the data region",
                              info.name)
        position = end
    if position != data_size:
        if position > data_size:
            last = infos[-1]
            raise HeaderError(spath, f"ends at byte {position} but the file has {data_size} data "
                                     f"bytes (truncated download? re-download the file)",
                              last.name)
        raise HeaderError(spath, f"tensors cover {position} bytes but the file has {data_size} "
                                 f"data bytes (trailing bytes after the last tensor)")
    return Header(spath, len(raw), file_size, {t.name: t for t in infos}, metadata)


def _check_surrogates(path: str | None, obj: dict[str, Any]) -> None:
    """JSON escapes a UTF-16 surrogate alone (``"\\ud800"``), which Python reads into a
    string that is not Unicode: such a tensor name could not be written back or compared with
    safetensors', which refuses the header. Checked only when the text holds such an escape."""
    strings = [*obj]
    metadata = obj.get(METADATA_KEY)
    if isinstance(metadata, dict):
        strings += [s for pair in metadata.items() for s in pair if isinstance(s, str)]
    for value in strings:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise HeaderError(path, f"the name or metadata {value!r} holds an unpaired UTF-16 "
                                    f"surrogate escape, which is not a character") from None


def header_size_from_prefix(prefix: bytes, *, file_size: int,
                            path: str | os.PathLike[str] | None = None) -> int:
    """Decode and bound-check the 8-byte little-endian header length."""
    try:
        return _header_size(prefix, file_size=file_size, path=path)
    except HeaderError as exc:
        raise _with_remedy(exc) from None


def _header_size(prefix: bytes, *, file_size: int, path: str | os.PathLike[str] | None) -> int:
    spath = None if path is None else os.fspath(path)
    if len(prefix) < 8:
        raise HeaderError(spath, f"file has {file_size} bytes; a safetensors file starts with an "
                                 f"8-byte header length")
    size = int.from_bytes(prefix[:8], "little")
    if size > MAX_HEADER_SIZE:
        raise HeaderError(spath, f"header length {size} exceeds the {MAX_HEADER_SIZE}-byte "
                                 f"limit")
    if 8 + size > file_size:
        raise HeaderError(spath, f"header length {size} runs past the end of the file "
                                 f"({file_size} bytes; truncated file?)")
    return size


def read_header_fd(fd: int, path: str | os.PathLike[str] | None = None) -> Header:
    """Read and validate the header of an open file (positioned reads; the offset is untouched)."""
    stamp = _stamp(fd)
    file_size = stamp[2]
    prefix = os.pread(fd, 8, 0)
    size = header_size_from_prefix(prefix, file_size=file_size, path=path)
    raw = os.pread(fd, size, 8)
    if len(raw) != size:
        raise HeaderError(path, f"header of {size} bytes could only be read in part "
                                f"({len(raw)} bytes; the file changed?)")
    header = parse_header(raw, file_size=file_size, path=path)
    object.__setattr__(header, "stamp", stamp)
    return header


def _stamp(fd: int) -> tuple[int, int, int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def check_same_file(fd: int, header: Header, path: str | os.PathLike[str]) -> Header:
    """The header to read the file open as ``fd`` with: ``header``, read earlier through
    another open of ``path``, if the file is that same one, unchanged; else its header read
    again, if that is the same (a file touched, or saved again with the same layout). A header
    that differs is a HeaderError: the bytes would be read at the old offsets (neither file's
    tensors, with no error)."""
    if header.stamp is None or _stamp(fd) == header.stamp:
        return header
    try:
        fresh: Header | None = read_header_fd(fd, path)
    except HeaderError:
        fresh = None   # not even a valid file now (cut short, half written)
    if fresh is None or (fresh.header_size, fresh.file_size, fresh.tensors, fresh.metadata) != (
            header.header_size, header.file_size, header.tensors, header.metadata):
        raise HeaderError(path, "changed after its header was read (replaced or rewritten "
                                "while loading); read its header again (for a Checkpoint: "
                                "resolve() again) once the file is complete")
    return fresh


def header_of(fd: int, path: str | os.PathLike[str], known: Header | None = None) -> Header:
    """The header of the file open as ``fd``: read now, or ``known`` (read earlier through
    another open of ``path``) once check_same_file has found it still holds."""
    return read_header_fd(fd, path) if known is None else check_same_file(fd, known, path)


def open_readonly(path: str | os.PathLike[str]) -> int:
    """Open a regular file for reading. A missing path raises CheckpointNotFoundError; a folder,
    FIFO, socket or device raises HeaderError (O_NONBLOCK keeps a FIFO from hanging the
    open)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointNotFoundError(path, "check the path; a safetensors file was expected "
                                            "there") from None
    except (OSError, ValueError) as exc:
        unusable = unusable_path(path, exc)
        if unusable is not None:
            raise unusable from None
        # A socket cannot be opened at all (ENXIO, "No such device or address"): say what it is.
        if isinstance(exc, OSError) and exc.errno in (errno.ENXIO, errno.ENODEV) \
                and _is_special(path):
            raise HeaderError(path, _NOT_REGULAR) from None
        raise
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except BaseException:
        # A Ctrl-C lands right after a call returns: the caller never gets the number to close.
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        if os.path.isdir(path):
            raise NotAFileError(path)
        raise HeaderError(path, _NOT_REGULAR)
    return fd


_NOT_REGULAR = "is not a regular file (a pipe, socket or device?), so not a .safetensors file"


def _is_special(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names something other than a regular file or a folder."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def unusable_path(path: str | os.PathLike[str], exc: BaseException
                  ) -> CheckpointNotFoundError | None:
    """The error for a path that names no file it could: a loop of symbolic links, a name too
    long, a NUL character; None for any other error of opening it (a permission refused)."""
    if isinstance(exc, ValueError):   # what os.open says of a NUL in the path
        hint = "the path holds a NUL character; no file name can"
    elif isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        hint = "its symbolic links form a loop; point it at the file itself"
    elif isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        hint = "a name in the path is longer than the file system allows; check the path"
    else:
        return None
    return CheckpointNotFoundError(path, hint)


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of the file at ``path``."""
    fd = open_readonly(path)
    try:
        return read_header_fd(fd, path)
    finally:
        os.close(fd)


def header_from_bytes(data: bytes | bytearray | memoryview) -> Header:
    """Validate the header of a whole file held in memory."""
    view = memoryview(data).cast("B")  # a view of wider items counts items, not bytes
    size = header_size_from_prefix(bytes(view[:8]), file_size=len(view))
    return parse_header(bytes(view[8:8 + size]), file_size=len(view))


def metadata_view(info: TensorInfo) -> Mapping[str, Any]:
    """The dict safetensors itself would show for a tensor (for reprs and interop)."""
    return {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": list(info.data_offsets)}
