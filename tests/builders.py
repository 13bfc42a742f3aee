"""Tiny checkpoints for tests, built in a caller's ``tmp_path``.

Two kinds of builders:

* with ``safetensors`` itself (``write_file``, ``sharded_checkpoint``): the reference writer, so a
  golden test compares against files exactly as users get them;
* by hand (``header_bytes``, ``layout``, ``write_raw``, ``raw_bytes``): headers the reference
  writer never produces: misaligned offsets, malformed JSON, sparse multi-GB shape sets.

Shapes here are *file* shapes: for F4 the last dimension counts 4-bit values (torch's
``float4_e2m1fn_x2`` holds a pair, so its last dimension is half as long).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fastsafetensors.format import DTYPES

#: Every dtype safetensors 0.8 writes, in the order the issue lists them.
ALL_DTYPES: tuple[str, ...] = (
    "BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "BF16", "F32", "F64",
    "C64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0", "F4",
)
#: Dtypes safetensors 0.8 reads in a header but no framework has (6-bit floats): such a
#: tensor is read as raw bytes.
RAW_DTYPES: tuple[str, ...] = ("F6_E2M3", "F6_E3M2")
#: Those numpy can represent (the rest raise UnsupportedDTypeError under framework="np").
NUMPY_DTYPES: tuple[str, ...] = tuple(d for d in ALL_DTYPES if DTYPES[d].numpy is not None)

#: Shapes every dtype is tested with: ordinary, 1-D, empty (a zero dim) and 0-d. F4 needs an
#: even number of 4-bit values, and an even last dim for torch, so it gets its own list.
SHAPES: tuple[tuple[int, ...], ...] = ((3, 4), (5,), (0,), (2, 0, 3), ())
F4_SHAPES: tuple[tuple[int, ...], ...] = ((3, 8), (6,), (0,), (2, 0), (4, 0, 2))


def shapes_for(dtype: str) -> tuple[tuple[int, ...], ...]:
    return F4_SHAPES if dtype == "F4" else SHAPES


def tensor_name(dtype: str, shape: Sequence[int]) -> str:
    return f"{dtype.lower()}.{'x'.join(map(str, shape)) or 'scalar'}"


def torch_dtype(dtype: str) -> Any:
    import torch

    return getattr(torch, DTYPES[dtype].torch)  # type: ignore[arg-type]


def torch_shape(dtype: str, shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    return (*shape[:-1], shape[-1] // 2) if dtype == "F4" else shape


def random_tensor(dtype: str, shape: Sequence[int], seed: int = 0) -> Any:
    """A torch tensor of file dtype ``dtype`` and file shape ``shape`` holding random bits (NaNs
    and all: equality is checked bit for bit). BOOL holds 0 or 1, the only valid bools."""
    import torch

    td = torch_dtype(dtype)
    tshape = torch_shape(dtype, shape)
    nbytes = math.prod(tshape) * td.itemsize
    gen = torch.Generator().manual_seed(seed)
    high = 2 if dtype == "BOOL" else 256
    raw = torch.randint(0, high, (nbytes,), generator=gen, dtype=torch.uint8)
    return raw.view(td).reshape(tshape)


def as_bytes(tensor: Any) -> Any:
    """A tensor's bytes as a flat uint8 tensor (works for every dtype, 0-d included)."""
    import torch

    if tensor.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    # contiguous() may keep odd strides on size-1 dims, which view(uint8) refuses; the memory
    # is dense, so a flat unit-stride view of it is exact (and works for every dtype)
    dense = tensor.contiguous()
    return dense.as_strided((dense.numel(),), (1,)).view(torch.uint8)


def assert_bitwise_equal(actual: Any, expected: Any) -> None:
    """Same dtype, same shape, same bits. ``torch.equal`` on the uint8 view: it is defined for
    every dtype (float4 and float8 have no torch.equal of their own) and treats NaNs as bits."""
    import torch

    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert tuple(actual.shape) == tuple(expected.shape), (actual.shape, expected.shape)
    assert torch.equal(as_bytes(actual), as_bytes(expected))


def opens_direct(path: str | os.PathLike[str]) -> bool:
    """Whether the filesystem of ``path`` accepts O_DIRECT (tmpfs and some FUSE refuse it)."""
    from fastsafetensors.loader.posix import close_fds, open_direct

    plain = os.open(path, os.O_RDONLY)
    try:
        direct = open_direct(plain, os.fspath(path))
    finally:
        os.close(plain)
    close_fds(direct)
    return direct is not None


def require_o_direct(path: str | os.PathLike[str]) -> None:
    """Skip the calling test where the filesystem of ``path`` refuses O_DIRECT (tmpfs, FUSE)."""
    import pytest

    if not opens_direct(path):
        pytest.skip("this filesystem refuses O_DIRECT")


def assert_aligned(tensor: Any) -> None:
    if tensor.numel():
        assert tensor.data_ptr() % tensor.element_size() == 0, (
            f"misaligned {tensor.dtype} at {tensor.data_ptr():#x}")


def all_dtype_tensors(seed: int = 0) -> dict[str, Any]:
    """One tensor per (dtype, shape) pair of the golden set."""
    out = {}
    for i, dtype in enumerate(ALL_DTYPES):
        for j, shape in enumerate(shapes_for(dtype)):
            out[tensor_name(dtype, shape)] = random_tensor(dtype, shape, seed + 31 * i + j)
    return out


# -- files written by safetensors ------------------------------------------------------------

def write_file(path: str | os.PathLike[str], tensors: Mapping[str, Any],
               metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    save_file(dict(tensors), os.fspath(path), metadata=None if metadata is None else dict(metadata))
    return Path(path)


def small_tensors(seed: int = 0) -> dict[str, Any]:
    """A few float tensors with Llama-ish names (the usual fixture)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(64, 16, generator=gen),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=gen).half(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(32, 16, generator=gen).bfloat16(),
        "model.layers.0.input_layernorm.weight": torch.ones(16),
        "model.norm.weight": torch.randn(16, generator=gen),
        "lm_head.weight": torch.randn(64, 16, generator=gen),
        "step": torch.tensor(7, dtype=torch.int64),
    }


def sharded_checkpoint(folder: str | os.PathLike[str], tensors: Mapping[str, Any], shards: int = 2,
                       metadata: Mapping[str, str] | None = None) -> tuple[Path, list[Path]]:
    """Hugging Face layout: ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json`` (``metadata.total_size`` and ``weight_map``). Returns the
    index path and the shard paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    paths = []
    total = 0
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_file(folder / fname, {n: tensors[n] for n in part}, metadata or {"format": "pt"})
        paths.append(folder / fname)
        for n in part:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                indent=2))
    return index, paths


def many_tensors(count: int = 20_000) -> dict[str, Any]:
    """``count`` tiny tensors of mixed dtypes and shapes (a tokenizer-table-like checkpoint)."""
    import torch

    out = {}
    dtypes = (torch.float32, torch.float16, torch.int64, torch.uint8, torch.bfloat16)
    for i in range(count):
        dtype = dtypes[i % len(dtypes)]
        out[f"blocks.{i}.p"] = torch.arange(i % 7 + (i % 3), dtype=torch.int64).to(dtype) + i % 5
    return out


# -- hand-written files ----------------------------------------------------------------------

def layout(specs: Iterable[tuple[str, str, Sequence[int]]], *, start: int = 0
           ) -> dict[str, dict[str, Any]]:
    """Header entries for ``(name, dtype, file_shape)`` specs packed back to back in order."""
    entries: dict[str, dict[str, Any]] = {}
    position = start
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * DTYPES[dtype].bits // 8
        entries[name] = {"dtype": dtype, "shape": list(shape),
                         "data_offsets": [position, position + nbytes]}
        position += nbytes
    return entries


def data_size(entries: Mapping[str, Mapping[str, Any]]) -> int:
    return max((e["data_offsets"][1] for e in entries.values()), default=0)


def header_bytes(header: Any, *, metadata: Mapping[str, str] | None = None,
                 pad: bool = True) -> bytes:
    """JSON as safetensors writes it: compact, ``__metadata__`` first, padded with spaces to a
    multiple of 8 (so the data region starts 8-aligned). ``header`` may be raw bytes or str
    (written as given) or any JSON value."""
    if isinstance(header, bytes):
        raw = header
    elif isinstance(header, str):
        raw = header.encode()
    else:
        if metadata is not None and isinstance(header, dict):
            header = {"__metadata__": dict(metadata), **header}
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return raw


def raw_bytes(header: Any, data: bytes = b"", *, length: int | None = None,
              metadata: Mapping[str, str] | None = None, pad: bool = True) -> bytes:
    """A whole file: 8-byte little-endian header length (``length`` overrides it), header, data."""
    hb = header_bytes(header, metadata=metadata, pad=pad)
    return struct.pack("<Q", len(hb) if length is None else length) + hb + data


def write_raw(path: str | os.PathLike[str], header: Any, data: bytes = b"", **kw: Any) -> Path:
    Path(path).write_bytes(raw_bytes(header, data, **kw))
    return Path(path)


def write_sparse(path: str | os.PathLike[str], entries: Mapping[str, Any],
                 metadata: Mapping[str, str] | None = None) -> int:
    """Header plus a data region of the right length that is a hole (ftruncate): no GBs are
    written. Returns the absolute offset of the data region (for pwrite of chosen tensors)."""
    hb = header_bytes(entries, metadata=metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        data_start = f.tell()
        os.ftruncate(f.fileno(), data_start + data_size(entries))
    return data_start


def misaligned_entries() -> tuple[dict[str, dict[str, Any]], bytes, dict[str, Any]]:
    """A header whose tensors start at offsets that are not multiples of their element size
    (an F32 at data offset 1 after a 1-byte U8, ...), the data bytes and the expected tensors."""
    specs = [("a.u8", "U8", (1,)), ("b.f32", "F32", (3,)), ("c.i16", "I16", (2, 2)),
             ("d.u8", "U8", (2,)), ("e.f64", "F64", (2,)), ("f.c64", "C64", (1,)),
             ("g.bf16", "BF16", (3,)), ("h.i64", "I64", ()), ("i.f16", "F16", (0,)),
             ("j.u8", "U8", (1,)), ("k.i32", "I32", (2, 3))]
    entries = layout(specs)
    expected = {name: random_tensor(dtype, shape, seed=i)
                for i, (name, dtype, shape) in enumerate(specs)}
    data = b"".join(bytes(as_bytes(expected[name]).numpy()) for name, _, _ in specs)
    assert len(data) == data_size(entries)
    # at least one tensor of each wide dtype really is misaligned
    assert entries["b.f32"]["data_offsets"][0] % 4 and entries["e.f64"]["data_offsets"][0] % 8
    return entries, data, expected


def llama_specs(*, layers: int = 32, hidden: int = 4096, intermediate: int = 11008,
                vocab: int = 32000, dtype: str = "BF16") -> list[tuple[str, str, tuple[int, ...]]]:
    """The tensors of a 7B Llama (Llama-2-7b-hf names and shapes; 6.74e9 parameters)."""
    specs: list[tuple[str, str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", dtype, (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + f"self_attn.{x}_proj.weight", dtype, (hidden, hidden)) for x in "qkvo"]
        specs += [(p + "mlp.gate_proj.weight", dtype, (intermediate, hidden)),
                  (p + "mlp.up_proj.weight", dtype, (intermediate, hidden)),
                  (p + "mlp.down_proj.weight", dtype, (hidden, intermediate)),
                  (p + "input_layernorm.weight", dtype, (hidden,)),
                  (p + "post_attention_layernorm.weight", dtype, (hidden,))]
    specs += [("model.norm.weight", dtype, (hidden,)), ("lm_head.weight", dtype, (vocab, hidden))]
    return specs


def open_fds() -> set[str]:
    """This process's open descriptors (Linux), to prove that nothing leaks."""
    return set(os.listdir("/proc/self/fd"))


def _resumed(frame: Any, starts: dict[Any, int] = {}) -> bool:  # noqa: B006 - a cache
    """Whether ``frame`` is a generator's (or coroutine's) going on after a yield, or thrown
    into, rather than starting. A profile function that raises at that "call" unwinds the frame
    without its ``finally`` blocks, which CPython never does: its handler runs there inside the
    frame, where they see the exception (after ``next``), or not at all (``close``, ``throw``)."""
    import dis
    import inspect

    code = frame.f_code
    if not code.co_flags & (inspect.CO_GENERATOR | inspect.CO_COROUTINE
                            | inspect.CO_ASYNC_GENERATOR):
        return False
    if code not in starts:   # the offset of its first RESUME (none before Python 3.11)
        starts[code] = next((i.offset for i in dis.get_instructions(code)
                             if i.opname == "RESUME"), -1)
    return bool(frame.f_lasti > starts[code])


def each_ctrl_c(action: Callable[[], Any], counted: Callable[[Any], bool], *, step: int = 1
                ) -> Iterator[int]:
    """Run ``action`` once for each place where CPython would run a Ctrl-C handler on this
    thread (a Python function starting, a C call returning) in a frame ``counted`` accepts,
    with KeyboardInterrupt raised there; yield the place's number after each run. The last run
    goes to its end uninterrupted. ``step``: only every step-th place (1, 1 + step, ...), for
    actions with many places. A generator resumed is not such a place (see _resumed)."""
    import sys

    point = 1 - step
    while True:
        point += step
        passed = [0]

        def profile(frame: Any, event: str, arg: Any, passed: list[int] = passed,
                    point: int = point) -> None:
            if event == "call" and _resumed(frame):
                return
            if event in ("call", "c_return") and counted(frame):
                passed[0] += 1
                if passed[0] == point:
                    sys.setprofile(None)
                    raise KeyboardInterrupt

        sys.setprofile(profile)
        try:
            action()
        except KeyboardInterrupt:
            pass
        finally:
            sys.setprofile(None)
        yield point
        if passed[0] < point:   # ran to its end
            return

