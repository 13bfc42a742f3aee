"""A corpus of broken files: each raises its exact error type with a message naming the rule,
through every entry point, and leaves no file descriptor open.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from builders import layout, open_fds, raw_bytes, write_file

import fastsafetensors
from fastsafetensors import (
    CheckpointNotFoundError,
    FastSafetensorsFile,
    HeaderError,
    HostMemoryError,
    LazyTensorFactory,
    NotAFileError,
    UnsupportedDTypeError,
)
from fastsafetensors.format import read_header

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _one(entry: Any, data: bytes = b"\0" * 8) -> bytes:
    return raw_bytes({"t": entry}, data)


def _entry(**changes: Any) -> dict[str, Any]:
    entry = dict(F32x2)
    for key, value in changes.items():
        if value is _DROP:
            del entry[key]
        else:
            entry[key] = value
    return entry


_DROP = object()


def _text(text: str, data: bytes = b"") -> bytes:
    return raw_bytes(text.encode(), data)


#: name -> (file bytes, exact error type, fragment of the message)
CASES: dict[str, tuple[bytes, type[Exception], str]] = {
    "empty_file": (b"", HeaderError, "8-byte header length"),
    "four_bytes": (b"\x10\0\0\0", HeaderError, "8-byte header length"),
    "seven_bytes": (b"\x02\0\0\0\0\0\0", HeaderError, "8-byte header length"),
    "length_past_eof": (struct.pack("<Q", 100) + b"{}      ", HeaderError, "runs past the end"),
    "huge_length": (struct.pack("<Q", 1 << 40) + b"{}      ", HeaderError,
                    "exceeds the 100000000-byte limit"),
    "length_just_over_limit": (struct.pack("<Q", 100_000_001) + b"{}", HeaderError,
                               "exceeds the 100000000-byte limit"),
    "length_all_ones": (b"\xff" * 8 + b"{}", HeaderError, "exceeds"),
    "zero_length_header": (struct.pack("<Q", 0), HeaderError, "not valid JSON"),
    "non_utf8": (raw_bytes(b'{"t\xff":{}}'), HeaderError, "not valid UTF-8"),
    "utf8_bom": (raw_bytes(b'\xef\xbb\xbf{}'), HeaderError, "not valid JSON"),
    "invalid_json": (_text('{"t": {"dtype": "F32",'), HeaderError, "not valid JSON"),
    "nan_in_json": (_text('{"t": NaN}'), HeaderError, "NaN is not a JSON value"),
    "deeply_nested_json": (_text("[" * 100_000 + "]" * 100_000), HeaderError,
                           "nests JSON deeper than Python's stack allows"),
    # Valid JSON; Python's limit, whose advice to raise it is left out.
    "int_too_long_for_python": (_text('{"t":{"dtype":"U8","shape":[' + "9" * 5000
                                      + '],"data_offsets":[0,0]}}'), HeaderError,
                                "a number Python refuses to read (Exceeds the limit (4300 "
                                "digits) for integer string conversion: value has 5000 digits)"
                                "; the file is damaged"),
    "top_level_array": (_text("[]"), HeaderError, "must be a JSON object, got list"),
    "top_level_number": (_text("42"), HeaderError, "must be a JSON object, got int"),
    "top_level_string": (_text('"model"'), HeaderError, "must be a JSON object, got str"),
    "top_level_null": (_text("null"), HeaderError, "must be a JSON object, got NoneType"),
    "unknown_dtype": (_one(_entry(dtype="F17")), HeaderError, "unknown dtype 'F17'"),
    "lowercase_dtype": (_one(_entry(dtype="f32")), HeaderError, "unknown dtype 'f32'"),
    "dtype_not_string": (_one(_entry(dtype=32)), HeaderError, "unknown dtype 32"),
    "shape_not_list": (_one(_entry(shape="2")), HeaderError, "shape must be a list"),
    "shape_float_dim": (_one(_entry(shape=[2.0])), HeaderError, "shape must be a list"),
    "shape_bool_dim": (_one(_entry(shape=[True, 2])), HeaderError, "shape must be a list"),
    "shape_negative_dim": (_one(_entry(shape=[-2])), HeaderError, "non-negative integers"),
    "shape_string_dim": (_one(_entry(shape=["2"])), HeaderError, "shape must be a list"),
    "shape_null_dim": (_one(_entry(shape=[None])), HeaderError, "shape must be a list"),
    "offsets_one_item": (_one(_entry(data_offsets=[0])), HeaderError,
                         "data_offsets must be two integers"),
    "offsets_three_items": (_one(_entry(data_offsets=[0, 4, 8])), HeaderError,
                            "data_offsets must be two integers"),
    "offsets_not_list": (_one(_entry(data_offsets="0-8")), HeaderError,
                         "data_offsets must be two integers"),
    "offsets_negative": (_one(_entry(data_offsets=[-8, 0])), HeaderError,
                         "must satisfy 0 <= begin <= end"),
    "offsets_reversed": (_one(_entry(data_offsets=[8, 0])), HeaderError,
                         "must satisfy 0 <= begin <= end"),
    "offsets_float": (_one(_entry(data_offsets=[0.0, 8.0])), HeaderError,
                      "data_offsets must be two integers"),
    "shape_offset_mismatch": (_one(_entry(shape=[3])), HeaderError,
                              "needs 12 bytes but data_offsets [0, 8] hold 8"),
    "overlapping_offsets": (raw_bytes({"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}},
                                      b"\0" * 12), HeaderError, "overlaps the previous tensor"),
    "gap_between_tensors": (raw_bytes({"a": F32x2, "b": {**F32x2, "data_offsets": [12, 20]}},
                                      b"\0" * 20), HeaderError, "leaves a gap"),
    "first_tensor_not_at_zero": (raw_bytes({"a": {**F32x2, "data_offsets": [4, 12]}},
                                           b"\0" * 12), HeaderError, "leaves a gap"),
    "offsets_past_eof": (_one(F32x2, b"\0" * 5), HeaderError,
                         "ends at byte 8 but the file has 5 data bytes"),
    "no_data_at_all": (_one(F32x2, b""), HeaderError, "truncated download"),
    "trailing_bytes": (_one(F32x2, b"\0" * 9), HeaderError, "trailing bytes after the last"),
    "trailing_bytes_no_tensors": (raw_bytes({}, b"\0"), HeaderError, "trailing bytes"),
    "duplicate_tensor_key": (_text('{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                                   '"t":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
                                   b"\0\0"), HeaderError, "'t' appears twice"),
    "duplicate_metadata_key": (_text('{"__metadata__":{"format":"pt","format":"np"}}'),
                               HeaderError, "'format' appears twice"),
    "two_metadata_blocks": (_text('{"__metadata__":{},"__metadata__":{}}'), HeaderError,
                            "'__metadata__' appears twice"),
    "duplicate_field": (_text('{"t":{"dtype":"U8","dtype":"I8","shape":[1],'
                              '"data_offsets":[0,1]}}', b"\0"), HeaderError,
                        "'dtype' appears twice"),
    "metadata_not_dict": (raw_bytes({"__metadata__": ["format", "pt"]}), HeaderError,
                          "__metadata__ must map strings to strings"),
    "metadata_int_value": (raw_bytes({"__metadata__": {"step": 3}}), HeaderError,
                           "__metadata__ must map strings to strings"),
    "metadata_nested_value": (raw_bytes({"__metadata__": {"a": {"b": "c"}}}), HeaderError,
                              "__metadata__ must map strings to strings"),
    # Three fields in an array load, as safetensors' reader takes them (test below).
    "entry_short_array": (raw_bytes({"t": ["F32", [2]]}, b"\0" * 8), HeaderError,
                          "entry must be an object"),
    "entry_is_string": (raw_bytes({"t": "F32"}), HeaderError, "entry must be an object"),
    "unpaired_surrogate_name": (_text('{"\\ud800":{"dtype":"U8","shape":[1],'
                                      '"data_offsets":[0,1]}}', b"\x07"), HeaderError,
                                "unpaired UTF-16 surrogate"),
    "unpaired_surrogate_metadata": (_text('{"__metadata__":{"a":"\\uDC00"}}'), HeaderError,
                                    "unpaired UTF-16 surrogate"),
    "missing_dtype": (_one(_entry(dtype=_DROP)), HeaderError, "entry lacks dtype"),
    "missing_shape": (_one(_entry(shape=_DROP)), HeaderError, "entry lacks shape"),
    "missing_data_offsets": (_one(_entry(data_offsets=_DROP)), HeaderError,
                             "entry lacks data_offsets"),
    "f4_odd_bit_count": (_one({"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}, b"\0"),
                         HeaderError, "not a whole number of bytes"),
    "f4_scalar": (_one({"dtype": "F4", "shape": [], "data_offsets": [0, 1]}, b"\0"),
                  HeaderError, "not a whole number of bytes"),
    "shape_product_overflows_u64": (
        _one({"dtype": "U8", "shape": [2 ** 62, 4], "data_offsets": [0, 0]}, b""),
        HeaderError, "needs 18446744073709551616 bytes"),
    "huge_shape": (_one({"dtype": "F32", "shape": [2 ** 32] * 3, "data_offsets": [0, 8]}),
                   HeaderError, "needs 316912650057057350374175801344 bytes"),
    # Zero bytes, so the size check passes; no framework makes such a tensor.
    "huge_dim_of_empty_tensor": (_one({"dtype": "F32", "shape": [2 ** 64, 0],
                                       "data_offsets": [0, 0]}, b""),
                                 HeaderError, "multiply to 2**63 or more"),
    "dim_2_63_of_empty_tensor": (_one({"dtype": "U8", "shape": [0, 2 ** 63],
                                       "data_offsets": [0, 0]}, b""),
                                 HeaderError, "multiply to 2**63 or more"),
    "dims_of_empty_tensor_multiply_past_int64": (
        _one({"dtype": "F32", "shape": [2 ** 62, 2 ** 62, 0], "data_offsets": [0, 0]}, b""),
        HeaderError, "multiply to 2**63 or more"),
}


def test_corpus_is_large_enough() -> None:
    assert len(CASES) + len(SPECIAL) >= 30


def _entry_points(path: Path) -> dict[str, Callable[[], Any]]:
    return {
        "FastSafetensorsFile": lambda: FastSafetensorsFile(path),
        "load_file": lambda: fastsafetensors.load_file(path),
        "load_file_np": lambda: fastsafetensors.load_file(path, framework="np"),
        "safe_open": lambda: fastsafetensors.safe_open(path, "pt"),
        "LazyTensorFactory": lambda: LazyTensorFactory([path]),
        "read_header": lambda: read_header(path),
    }


#: How a malformed file's message says to fix it (format.REMEDY, or its own advice).
FIXES = ("download it again", "re-download", "upgrade fastsafetensors")


@pytest.mark.parametrize("case", CASES)
def test_malformed_file(case: str, tmp_path: Path) -> None:
    content, error, fragment = CASES[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(content)
    before = open_fds()
    for entry, call in _entry_points(path).items():
        with pytest.raises(error) as excinfo:
            call()
        assert excinfo.type is error, entry
        message = str(excinfo.value)
        assert fragment in message, (entry, message)
        assert any(fix in message for fix in FIXES), (entry, message)   # and what to do
        # the message names the file, and the error carries it
        assert message.startswith(path.name), (entry, message)
        assert excinfo.value.path == str(path)
        assert isinstance(excinfo.value, ValueError)
    assert open_fds() == before


@pytest.mark.parametrize("case", CASES)
def test_malformed_bytes(case: str) -> None:
    content, error, fragment = CASES[case]
    with pytest.raises(error) as excinfo:
        fastsafetensors.loads(content)
    assert excinfo.type is error and fragment in str(excinfo.value)
    assert str(excinfo.value).startswith("<bytes>: ")


def test_valid_twin_loads(tmp_path: Path) -> None:
    """The corpus entries break exactly one rule: the file they are mutated from is valid."""
    path = tmp_path / "ok.safetensors"
    path.write_bytes(_one(F32x2))
    assert fastsafetensors.load_file(path)["t"].tolist() == [0.0, 0.0]
    entries = layout([("a", "U8", (1,))])
    assert fastsafetensors.loads(raw_bytes(entries, b"\x05"))["a"].tolist() == [5]


# -- paths that are not regular files --------------------------------------------------------

def _folder(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    return tmp_path / "model"


def _fifo(tmp_path: Path) -> Path:
    os.mkfifo(tmp_path / "pipe.safetensors")
    return tmp_path / "pipe.safetensors"


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "nope" / "model.safetensors"


def _dangling_link(tmp_path: Path) -> Path:
    os.symlink(tmp_path / "gone.safetensors", tmp_path / "link.safetensors")
    return tmp_path / "link.safetensors"


def _socket(tmp_path: Path) -> Path:
    # The socket file stays once its socket is closed; opening it fails with ENXIO.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock.safetensors"))
    return tmp_path / "sock.safetensors"


SPECIAL: dict[str, tuple[Callable[[Path], Path], type[Exception], str]] = {
    "folder": (_folder, NotAFileError, "is a folder"),
    "fifo": (_fifo, HeaderError, "not a regular file"),
    "socket": (_socket, HeaderError, "not a regular file"),
    "missing": (_missing, CheckpointNotFoundError, "No such file or directory"),
    "dangling_symlink": (_dangling_link, CheckpointNotFoundError, "No such file or directory"),
}


@pytest.mark.parametrize("case", SPECIAL)
def test_not_a_regular_file(case: str, tmp_path: Path) -> None:
    make, error, fragment = SPECIAL[case]
    path = make(tmp_path)
    before = open_fds()
    results: dict[str, BaseException | None] = {}

    def attempt() -> None:
        for entry, call in _entry_points(path).items():
            try:
                call()
            except BaseException as exc:  # noqa: BLE001 - recorded and checked below
                results[entry] = exc
            else:
                results[entry] = None

    # A FIFO opened for reading blocks until a writer appears: run in a thread so a hang is
    # a failure (the guard below unblocks it), not a stuck test run.
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
        pytest.fail(f"opening a {case} hung")
    assert set(results) == set(_entry_points(path))
    for entry, exc in results.items():
        assert type(exc) is error, (entry, exc)
        assert fragment in str(exc), (entry, str(exc))
        assert str(path) in str(exc) or path.name in str(exc)
    if error is CheckpointNotFoundError:
        assert all(isinstance(e, FileNotFoundError) for e in results.values())
    assert open_fds() == before


@pytest.mark.parametrize("entry", ["load", "iter_tensors", "resolve", "inspect"])
def test_a_fifo_named_json_is_refused_not_waited_on(entry: str, tmp_path: Path) -> None:
    # A .json path may be weights or an index: its first 8 bytes say which. That look opened
    # the path for reading without O_NONBLOCK, which on a FIFO waits for a writer for ever.
    path = tmp_path / "weights.json"
    os.mkfifo(path)
    calls: dict[str, Callable[[], Any]] = {
        "load": lambda: fastsafetensors.load(path),
        "iter_tensors": lambda: list(fastsafetensors.iter_tensors(path)),
        "resolve": lambda: fastsafetensors.resolve(path),
        "inspect": lambda: fastsafetensors.inspect(path),
    }
    before = open_fds()
    result: list[BaseException | None] = []

    def attempt() -> None:
        try:
            calls[entry]()
        except BaseException as exc:  # noqa: BLE001 - checked below
            result.append(exc)
        else:
            result.append(None)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))   # a writer, to unblock it
        worker.join(10)
        pytest.fail(f"{entry} of a FIFO named .json hung")
    (exc,) = result
    assert isinstance(exc, HeaderError) and "not a regular file" in str(exc), repr(exc)
    assert path.name in str(exc)
    assert str(pickle.loads(pickle.dumps(exc))) == str(exc)
    assert open_fds() == before

# -- what safetensors reads, and what the frameworks cannot hold -----------------------------

def test_entry_as_an_array_of_its_fields_loads_as_safetensors_loads_it(tmp_path: Path) -> None:
    path = tmp_path / "array.safetensors"
    path.write_bytes(raw_bytes({"t": ["F32", [2], [0, 8]]}, struct.pack("<2f", 1.5, 2.5)))
    expected = safetensors.torch.load_file(path)
    assert torch.equal(fastsafetensors.load_file(path)["t"], expected["t"])
    with FastSafetensorsFile(path) as fsf:
        assert fsf.get_tensors()["t"].shape == (2,)


def test_escaped_surrogate_pair_is_one_character(tmp_path: Path) -> None:
    path = tmp_path / "pair.safetensors"
    path.write_bytes(_text('{"w\\ud83d\\ude00":{"dtype":"U8","shape":[1],'
                           '"data_offsets":[0,1]}}', b"\x07"))
    assert list(fastsafetensors.load_file(path)) == list(safetensors.torch.load_file(path))
    assert list(fastsafetensors.load_file(path)) == ["w\N{GRINNING FACE}"]


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]},        # numpy: 64 at most
    {"dtype": "F64", "shape": [2 ** 60, 0], "data_offsets": [0, 0]},    # 2**63 bytes, empty
])
def test_shapes_numpy_cannot_hold(entry: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "shape.safetensors"
    path.write_bytes(_one(entry, b"\0" * entry["data_offsets"][1]))
    assert tuple(fastsafetensors.load_file(path)["t"].shape) == tuple(entry["shape"])   # torch
    attempts = {"load_file": lambda: fastsafetensors.load_file(path, framework="np"),
                "FastSafetensorsFile": lambda: FastSafetensorsFile(path, framework="np")["t"],
                "load": lambda: fastsafetensors.load(path, framework="np")}
    for entry_point, attempt in attempts.items():
        with pytest.raises(UnsupportedDTypeError, match="framework='pt'") as excinfo:
            attempt()
        assert str(excinfo.value).startswith("shape.safetensors: tensor 't'"), entry_point
        assert excinfo.value.path == str(path)
        assert str(pickle.loads(pickle.dumps(excinfo.value))) == str(excinfo.value)
    with pytest.raises(UnsupportedDTypeError, match="^<bytes>: tensor 't'"):
        fastsafetensors.loads(path.read_bytes(), framework="np")


def test_symlink_loop_in_a_folder(tmp_path: Path) -> None:
    os.symlink("model.safetensors", tmp_path / "model.safetensors")   # links to itself
    attempts = {"load": lambda: fastsafetensors.load(tmp_path),
                "iter_tensors": lambda: list(fastsafetensors.iter_tensors(tmp_path)),
                "inspect": lambda: fastsafetensors.inspect(tmp_path),
                "resolve": lambda: fastsafetensors.resolve(tmp_path),
                "load_file": lambda: fastsafetensors.load_file(tmp_path / "model.safetensors")}
    for entry_point, attempt in attempts.items():
        with pytest.raises(CheckpointNotFoundError, match="symbolic links form a loop") as raised:
            attempt()
        assert isinstance(raised.value, FileNotFoundError), entry_point


@pytest.mark.parametrize("name, fragment", [
    ("x\0y.safetensors", "NUL character"),
    ("a" * 300 + ".safetensors", "longer than the file system allows"),
])
def test_paths_no_file_can_have(name: str, fragment: str, tmp_path: Path) -> None:
    path = os.path.join(tmp_path, name)
    for attempt in (lambda: FastSafetensorsFile(path), lambda: fastsafetensors.load_file(path),
                    lambda: fastsafetensors.load(path)):
        with pytest.raises(CheckpointNotFoundError) as excinfo:
            attempt()
        assert isinstance(excinfo.value, FileNotFoundError)
        assert fragment in str(excinfo.value) or "check the path" in str(excinfo.value)


def test_empty_path_is_not_the_current_folder(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    write_file(tmp_path / "model.safetensors", {"w": torch.ones(1)})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="the path is empty"):
        fastsafetensors.load("")
    with pytest.raises(CheckpointNotFoundError):
        FastSafetensorsFile("")


def test_a_json_file_is_read_as_what_it_holds(tmp_path: Path) -> None:
    """An index under any .json name is an index, and weights under one are weights, for
    load, resolve and inspect alike (test_errors.py has the weights)."""
    write_file(tmp_path / "a.safetensors", {"x": torch.arange(3.0)})
    (tmp_path / "weights.json").write_text(json.dumps({"weight_map": {"x": "a.safetensors"}}))
    assert torch.equal(fastsafetensors.load(tmp_path / "weights.json")["x"], torch.arange(3.0))
    assert list(fastsafetensors.inspect(tmp_path / "weights.json").tensors) == ["x"]
    write_file(tmp_path / "odd.json", {"y": torch.ones(2)})
    assert list(fastsafetensors.load(tmp_path / "odd.json")) == ["y"]
    assert list(fastsafetensors.inspect(tmp_path / "odd.json").tensors) == ["y"]
    assert fastsafetensors.resolve(tmp_path / "odd.json").files == [str(tmp_path / "odd.json")]


@pytest.mark.parametrize("framework", ["pt", "np"])
def test_host_memory_running_out_is_a_typed_error(framework: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A header may claim more bytes than the machine has: torch says so with a RuntimeError,
    numpy with its own MemoryError; both become HostMemoryError."""
    path = write_file(tmp_path / "m.safetensors", {"w": torch.ones(4)})

    def refuse(*args: Any, **kwargs: Any) -> Any:
        if framework == "pt":
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: "
                               "can't allocate memory: you tried to allocate 80 bytes.")
        raise MemoryError("Unable to allocate 80 B for an array")

    monkeypatch.setattr(torch if framework == "pt" else np, "empty", refuse)
    for attempt in (lambda: fastsafetensors.load_file(path, framework=framework),
                    lambda: FastSafetensorsFile(path, framework=framework)["w"]):
        with pytest.raises(HostMemoryError, match="of host memory could not be allocated"
                           ) as excinfo:
            attempt()
        assert isinstance(excinfo.value, MemoryError)
        again = pickle.loads(pickle.dumps(excinfo.value))
        assert type(again) is HostMemoryError and str(again) == str(excinfo.value)
