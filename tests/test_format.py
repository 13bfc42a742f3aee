"""The header parser (fastsafetensors.format): dtypes, TensorInfo, and property-based tests.

Random valid headers, serialised the way safetensors writes them, parse back to the same
TensorInfos (and safetensors itself accepts them); mutations of valid headers into invalid ones
always raise HeaderError, never any other exception.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pytest
import safetensors
from builders import ALL_DTYPES, RAW_DTYPES, header_bytes, layout
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fastsafetensors.errors import HeaderError
from fastsafetensors.format import (
    DTYPES,
    MAX_HEADER_SIZE,
    Header,
    TensorInfo,
    header_from_bytes,
    header_size_from_prefix,
    metadata_view,
    parse_header,
)

SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# -- dtypes and TensorInfo ------------------------------------------------------------------

def test_every_safetensors_dtype_is_known() -> None:
    assert set(DTYPES) == set(ALL_DTYPES) | set(RAW_DTYPES)
    bits = {"BOOL": 8, "U8": 8, "I8": 8, "U16": 16, "I16": 16, "U32": 32, "I32": 32, "U64": 64,
            "I64": 64, "F16": 16, "BF16": 16, "F32": 32, "F64": 64, "C64": 64, "F8_E4M3": 8,
            "F8_E5M2": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8, "F4": 4,
            "F6_E2M3": 6, "F6_E3M2": 6}
    assert {name: d.bits for name, d in DTYPES.items()} == bits


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_dtype_maps_to_torch_and_numpy(dtype: str) -> None:
    import numpy as np
    import torch

    d = DTYPES[dtype]
    assert d.torch is not None
    tdt = getattr(torch, d.torch)
    assert tdt.itemsize * 8 == (8 if dtype == "F4" else d.bits)  # F4: torch holds a pair
    if d.numpy is not None:
        assert np.dtype(d.numpy).itemsize * 8 == d.bits
    else:
        assert dtype in {"BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
                         "F8_E8M0", "F4"}


def test_tensor_info_fields_and_repr() -> None:
    info = TensorInfo("w", "BF16", (2, 3), (8, 20))
    assert info.nbytes == 12 and info.numel == 6 and info.itemsize == 2
    assert repr(info) == "TensorInfo(dtype='BF16', shape=(2, 3), data_offsets=(8, 20), nbytes=12)"
    assert TensorInfo("s", "F64", (), (0, 8)).numel == 1
    assert TensorInfo("f", "F4", (4,), (0, 2)).itemsize == 1
    assert metadata_view(info) == {"dtype": "BF16", "shape": [2, 3], "data_offsets": [8, 20]}
    with pytest.raises(AttributeError):
        info.dtype = "F32"  # type: ignore[misc]


def test_parse_simple_header() -> None:
    entries = layout([("b", "F32", (2, 2)), ("a", "I64", ()), ("e", "U8", (0, 5))])
    raw = header_bytes(entries, metadata={"format": "pt"})
    header = parse_header(raw, file_size=8 + len(raw) + 24, path="dir/m.safetensors")
    assert isinstance(header, Header)
    assert header.path == "dir/m.safetensors"
    assert header.header_size == len(raw) and header.data_start == 8 + len(raw)
    assert header.data_size == 24 and header.metadata == {"format": "pt"}
    assert header.tensors["b"] == TensorInfo("b", "F32", (2, 2), (0, 16))
    assert header.tensors["a"] == TensorInfo("a", "I64", (), (16, 24))
    assert header.tensors["e"] == TensorInfo("e", "U8", (0, 5), (24, 24))
    assert list(header.tensors) == ["b", "a", "e"]


def test_tensors_are_in_file_order_whatever_the_json_order() -> None:
    entries = layout([("z", "U8", (3,)), ("y", "U8", (1,)), ("x", "U8", (2,))])
    shuffled = {k: entries[k] for k in ("x", "z", "y")}
    raw = header_bytes(shuffled)
    header = parse_header(raw, file_size=8 + len(raw) + 6)
    assert list(header.tensors) == ["z", "y", "x"]


def _dup_text(entries: dict[str, Any], where: str) -> bytes:
    """The header of ``entries`` with a key written twice: a tensor, a field of the first entry,
    or a metadata key."""
    text = json.dumps(entries | {"__metadata__": {"note": "a: b", "format": "pt"}})
    if where == "tensor":
        first = next(iter(entries))
        text = text.replace("{", '{' + json.dumps(first) + ': ' + json.dumps(entries[first])
                            + ', ', 1)
    elif where == "field":
        text = text.replace('"dtype"', '"dtype": "U8", "dtype"', 1)
    else:
        text = text.replace('"format"', '"format": "np", "format"', 1)
    return text.encode()


@pytest.mark.parametrize("where", ["tensor", "field", "metadata"])
@pytest.mark.parametrize("colon_in_a_string", [False, True])
def test_a_key_written_twice_is_refused_with_or_without_colons_in_strings(
        where: str, colon_in_a_string: bool) -> None:
    # The parser counts ':' to know no key was dropped (format._loads); a ':' in a string
    # (a name, a metadata value) makes it parse again key by key. Both ways refuse duplicates.
    names = ["model.a:0", "b"] if colon_in_a_string else ["a", "b"]
    entries = layout([(names[0], "U8", (2,)), (names[1], "U8", (3,))])
    raw = header_bytes(entries)
    assert list(parse_header(raw, file_size=8 + len(raw) + 5).tensors) == names
    bad = _dup_text(entries, where)
    if not colon_in_a_string:
        bad = bad.replace(b'"note": "a: b", ', b"")
    with pytest.raises(HeaderError, match="appears twice"):
        parse_header(bad, file_size=8 + len(bad) + 5)


def test_empty_header_and_no_metadata() -> None:
    raw = header_bytes({})
    header = parse_header(raw, file_size=8 + len(raw))
    assert header.tensors == {} and header.metadata is None


def test_header_from_bytes_matches_parse() -> None:
    entries = layout([("a", "F16", (3,))])
    hb = header_bytes(entries)
    data = struct.pack("<Q", len(hb)) + hb + b"\x01\x02" * 3
    header = header_from_bytes(data)
    assert header.path is None and header.data_start == 8 + len(hb)
    assert header.tensors["a"].data_offsets == (0, 6)
    assert header_from_bytes(bytearray(data)) == header == header_from_bytes(memoryview(data))


def test_header_length_limit() -> None:
    assert header_size_from_prefix(struct.pack("<Q", MAX_HEADER_SIZE),
                                   file_size=8 + MAX_HEADER_SIZE) == MAX_HEADER_SIZE
    with pytest.raises(HeaderError, match="exceeds"):
        header_size_from_prefix(struct.pack("<Q", MAX_HEADER_SIZE + 1),
                                file_size=1 << 40)
    with pytest.raises(HeaderError, match="runs past the end"):
        header_size_from_prefix(struct.pack("<Q", 100), file_size=107)


def test_huge_shape_is_rejected_without_overflow() -> None:
    # 2**62 * 4 bytes wraps to 0 in 64-bit arithmetic: a u64 parser would accept [0, 0].
    raw = header_bytes({"t": {"dtype": "U8", "shape": [2 ** 62, 4], "data_offsets": [0, 0]}})
    with pytest.raises(HeaderError, match="18446744073709551616 bytes"):
        parse_header(raw, file_size=8 + len(raw))


# -- property-based: random valid headers round-trip ------------------------------------------

NAMES = st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__")
SHAPES = st.lists(st.integers(0, 6), max_size=4)


@st.composite
def valid_headers(draw: st.DrawFn, min_tensors: int = 0) -> dict[str, Any]:
    """``{"entries": {name: entry}, "metadata": ..., "order": [...], "data_size": n}`` with the
    JSON keys in a random order, independent of the order the data sits in the file."""
    specs = draw(st.dictionaries(
        NAMES,
        st.tuples(st.sampled_from(ALL_DTYPES), SHAPES).filter(
            lambda t: math.prod(t[1]) * DTYPES[t[0]].bits % 8 == 0),
        min_size=min_tensors, max_size=6))
    file_order = draw(st.permutations(list(specs)))
    entries = layout([(name, *specs[name]) for name in file_order])
    json_order = draw(st.permutations(list(specs)))
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8),
                                                max_size=3))
    return {"entries": {n: entries[n] for n in json_order}, "metadata": metadata,
            "data_size": max((e["data_offsets"][1] for e in entries.values()), default=0)}


def _expected(entries: dict[str, Any]) -> dict[str, TensorInfo]:
    return {n: TensorInfo(n, e["dtype"], tuple(e["shape"]), tuple(e["data_offsets"]))
            for n, e in entries.items()}


@SETTINGS
@given(valid_headers())
def test_valid_headers_round_trip(h: dict[str, Any]) -> None:
    raw = header_bytes(h["entries"], metadata=h["metadata"])
    header = parse_header(raw, file_size=8 + len(raw) + h["data_size"])
    assert header.tensors == _expected(h["entries"])
    assert header.metadata == h["metadata"]
    assert header.data_size == h["data_size"]
    starts = [t.data_offsets for t in header.tensors.values()]
    assert starts == sorted(starts)
    # the reference implementation agrees that the file is valid and what it holds
    blob = struct.pack("<Q", len(raw)) + raw + bytes(h["data_size"])
    reference = dict(safetensors.deserialize(blob))
    assert set(reference) == set(header.tensors)
    for name, info in header.tensors.items():
        assert reference[name]["dtype"] == info.dtype
        assert tuple(reference[name]["shape"]) == info.shape
        assert len(reference[name]["data"]) == info.nbytes


# -- property-based: mutations into invalid headers always raise HeaderError ------------------

class _Raw(str):
    """JSON text written verbatim (integers too long for ``json.dumps``)."""


def _dump(value: Any) -> str:
    """JSON text; lists of pairs (tagged with the "pairs" marker) become objects that may
    repeat a key."""
    if isinstance(value, _Raw):
        return str(value)
    if isinstance(value, tuple) and value and value[0] == "pairs":
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{_dump(v)}"
                              for k, v in value[1]) + "}"
    if isinstance(value, dict):
        return _dump(("pairs", list(value.items())))
    if isinstance(value, list):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


MUTATIONS = ["unknown_dtype", "dtype_not_str", "grow_offset", "shrink_offset", "negative_dim",
             "float_dim", "bool_dim", "string_dim", "huge_dim", "drop_key", "duplicate_tensor",
             "duplicate_field", "duplicate_metadata_key", "offsets_length", "entry_not_object",
             "metadata_not_strings", "shape_not_list", "truncate_json", "invalid_utf8",
             "top_level_not_object", "trailing_bytes", "missing_bytes", "resize_dim"]


@SETTINGS
@given(valid_headers(min_tensors=1), st.sampled_from(MUTATIONS), st.data())
def test_mutated_headers_raise_header_error(h: dict[str, Any], mutation: str,
                                            data: st.DataObject) -> None:
    entries = {n: dict(e) for n, e in h["entries"].items()}
    metadata = h["metadata"]
    name = data.draw(st.sampled_from(sorted(entries)), label="tensor")
    entry = entries[name]
    data_size = h["data_size"]

    if mutation == "unknown_dtype":
        entry["dtype"] = data.draw(st.text(max_size=8).filter(lambda s: s not in DTYPES))
    elif mutation == "dtype_not_str":
        entry["dtype"] = data.draw(st.sampled_from([None, 3, 1.5, True, [], {"F32": 1}]))
    elif mutation in ("grow_offset", "shrink_offset"):
        which = data.draw(st.sampled_from([0, 1]))
        delta = data.draw(st.integers(1, 1000))
        offsets = list(entry["data_offsets"])
        offsets[which] += delta if mutation == "grow_offset" else -delta
        entry["data_offsets"] = offsets
    elif mutation in ("negative_dim", "float_dim", "bool_dim", "string_dim", "huge_dim"):
        shape = list(entry["shape"])
        bad = {"negative_dim": data.draw(st.integers(max_value=-1)),
               "float_dim": float(data.draw(st.integers(0, 6))),
               "bool_dim": data.draw(st.booleans()),
               "string_dim": str(data.draw(st.integers(0, 6))),
               # past 4300 digits Python's json itself refuses the number
               "huge_dim": _Raw("1" + "0" * data.draw(st.integers(20, 40)
                                                      | st.integers(4301, 6000)))}[mutation]
        at = data.draw(st.integers(0, len(shape)))
        if shape and data.draw(st.booleans()):
            shape[min(at, len(shape) - 1)] = bad
        else:
            shape.insert(at, bad)
        if mutation == "huge_dim":
            assume(0 not in shape)  # a zero dim would keep a huge one valid
        entry["shape"] = shape
    elif mutation == "resize_dim":
        shape = list(entry["shape"])
        assume(shape)
        i = data.draw(st.integers(0, len(shape) - 1))
        shape[i] += data.draw(st.integers(1, 3))
        assume(math.prod(shape) != math.prod(entry["shape"]))
        entry["shape"] = shape
    elif mutation == "drop_key":
        del entry[data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif mutation == "offsets_length":
        extra = data.draw(st.sampled_from([[], [0], [0, 1, 2], [entry["data_offsets"][0]]]))
        entry["data_offsets"] = extra
    elif mutation == "entry_not_object":
        entries[name] = data.draw(st.sampled_from([None, 1, "F32", [1, 2], True]))
    elif mutation == "shape_not_list":
        entry["shape"] = data.draw(st.sampled_from([None, 3, "3", {"0": 3}]))
    elif mutation == "metadata_not_strings":
        metadata = data.draw(st.sampled_from([[], "x", 1, {"k": 1}, {"k": None}, {"k": ["v"]}]))
    elif mutation == "trailing_bytes":
        data_size += data.draw(st.integers(1, 64))
    elif mutation == "missing_bytes":
        assume(data_size > 0)
        data_size -= data.draw(st.integers(1, data_size))

    body: list[tuple[str, Any]] = []
    if metadata is not None:
        body.append(("__metadata__", metadata if not isinstance(metadata, dict)
                     else ("pairs", list(metadata.items()))))
    body += [(n, ("pairs", list(e.items())) if isinstance(e, dict) else e)
             for n, e in entries.items()]
    if mutation == "duplicate_tensor":
        body.insert(data.draw(st.integers(0, len(body))), (name, body[-1][1]))
    elif mutation == "duplicate_field":
        fields = list(entry.items())
        key, value = data.draw(st.sampled_from(fields))
        fields.insert(data.draw(st.integers(0, len(fields))), (key, value))
        body = [(n, ("pairs", fields) if n == name else v) for n, v in body]
    elif mutation == "duplicate_metadata_key":
        pairs = list((metadata or {"format": "pt"}).items()) or [("k", "v")]
        pairs.append(pairs[0])
        body = [p for p in body if p[0] != "__metadata__"]
        body.insert(0, ("__metadata__", ("pairs", pairs)))
    text = _dump(("pairs", body))
    if mutation == "top_level_not_object":
        text = data.draw(st.sampled_from([f"[{text}]", "1", '"x"', "null", "true", "[]"]))
    raw = text.encode("utf-8")
    if mutation == "truncate_json":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif mutation == "invalid_utf8":
        at = data.draw(st.integers(0, len(raw)))
        raw = raw[:at] + data.draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + raw[at:]
    raw += b" " * (-len(raw) % 8)

    with pytest.raises(HeaderError) as excinfo:
        parse_header(raw, file_size=8 + len(raw) + data_size, path="m.safetensors")
    assert isinstance(excinfo.value, ValueError)
    assert str(excinfo.value).startswith("m.safetensors: ")
    # and the same through the whole-file entry point
    blob = struct.pack("<Q", len(raw)) + raw + bytes(data_size)
    with pytest.raises(HeaderError):
        header_from_bytes(blob)


@SETTINGS
@given(st.binary(max_size=64), st.integers(0, 64))
def test_random_bytes_never_crash_the_parser(raw: bytes, data_size: int) -> None:
    try:
        parse_header(raw, file_size=8 + len(raw) + data_size)
    except HeaderError:
        pass
