"""PyTorch tensors from host bytes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# tensor.numpy() below needs numpy: imported here, a missing numpy is named with how to
# install it by get_framework (torch alone says "Numpy is not available" at the first read).
import numpy  # noqa: F401
import torch

from ..errors import ConfigError, HostMemoryError, UnsupportedDTypeError
from ..format import DTYPES, TensorInfo
from .memory import advise_huge_pages

__all__ = ["TORCH", "torch_dtype"]


def torch_dtype(dtype: str, tensor: str | None = None) -> torch.dtype:
    name = DTYPES[dtype].torch
    found = getattr(torch, name, None) if name else None
    if found is None:
        raise UnsupportedDTypeError(dtype, f"pt (torch {torch.__version__})", tensor)
    return found


def torch_shape(info: TensorInfo) -> tuple[int, ...]:
    if info.dtype != "F4":
        return info.shape
    # float4_e2m1fn_x2 packs two values per element: the file counts 4-bit values, torch pairs.
    if not info.shape or info.shape[-1] % 2:
        raise UnsupportedDTypeError("F4 with an odd last dimension", "pt", info.name)
    return (*info.shape[:-1], info.shape[-1] // 2)


class TorchFramework:
    name = "pt"

    def alloc(self, nbytes: int, *, align: int = 64) -> tuple[torch.Tensor, memoryview]:
        try:
            raw = torch.empty(nbytes + align, dtype=torch.uint8)
        except (RuntimeError, MemoryError) as exc:
            # torch says "DefaultCPUAllocator: can't allocate memory" as a RuntimeError.
            if isinstance(exc, RuntimeError) and "alloc" not in str(exc):
                raise
            raise HostMemoryError(nbytes) from None
        advise_huge_pages(raw.data_ptr(), nbytes + align)
        buffer = self.exact(raw, -raw.data_ptr() % align, nbytes)
        # .data is memoryview(array); numpy's stubs give ndarray no __buffer__ before Python 3.12
        return buffer, buffer.numpy().data.cast("B")

    @staticmethod
    def exact(raw: torch.Tensor, start: int, nbytes: int) -> torch.Tensor:
        """Bytes ``[start, start + nbytes)`` of the 1-D uint8 tensor ``raw``, as a tensor whose
        storage is exactly those bytes (the same memory, kept alive with it). A plain slice
        keeps ``raw``'s storage, larger than the tensor: safetensors' ``save_model`` then finds
        no tied weight that covers its whole storage and refuses the model, and
        ``save_pretrained`` sizes its shards by storage."""
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        if start == 0 and nbytes == raw.numel():
            return raw
        return torch.frombuffer(raw.numpy().data[start:start + nbytes], dtype=torch.uint8)

    def dtype(self, dtype: str, tensor: str | None = None) -> Any:
        return torch_dtype(dtype, tensor)

    def view(self, buffer: torch.Tensor, start: int, info: TensorInfo) -> torch.Tensor:
        dtype = torch_dtype(info.dtype, info.name)
        shape = torch_shape(info)
        if info.nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        typed = buffer[start:start + info.nbytes].view(dtype)
        return typed if len(shape) == 1 else typed.view(shape)   # 1-D: shaped already

    def viewer(self, buffer: torch.Tensor) -> Callable[[int, TensorInfo], torch.Tensor]:
        """Like :meth:`view` for many tensors of one buffer, faster per tensor (a 20,000-tensor
        file spends most of its view time in torch's calls). In host memory each tensor's
        storage is its own bytes, as safetensors' tensors' are (one ``frombuffer`` each): a
        view of the file's buffer would make ``torch.save`` of one tensor write the whole
        file, and ``save_pretrained`` size its shards by the file. On a device, where no
        storage can be made over part of another: :meth:`strided_viewer`."""
        if buffer.device.type == "cpu":
            return self._host_viewer(buffer)
        return self.strided_viewer(buffer)

    @staticmethod
    def strided_viewer(buffer: torch.Tensor) -> Callable[[int, TensorInfo], torch.Tensor]:
        """Views sharing ``buffer``'s storage (a group of small tensors in one device
        allocation): one ``as_strided`` each on a typed view of the buffer made once per
        dtype, instead of three torch calls per tensor."""
        # Per dtype name: (dtype, the buffer viewed whole with it, where that view starts in its
        # storage, in elements); per shape: its strides. Made once each: a 20,000-tensor file
        # repeats a few of each.
        typed: dict[str, tuple[torch.dtype, torch.Tensor, int]] = {}
        strides: dict[tuple[int, ...], tuple[int, ...]] = {}

        def view(start: int, info: TensorInfo) -> torch.Tensor:
            found = typed.get(info.dtype)
            if found is None:
                dtype = torch_dtype(info.dtype, info.name)
                size = dtype.itemsize
                # The buffer starts 64-byte aligned, so every dtype can view it whole.
                whole = buffer[:buffer.numel() // size * size].view(dtype)
                found = typed[info.dtype] = (dtype, whole, int(whole.storage_offset()))
            dtype, whole, base = found
            shape = torch_shape(info)
            begin, end = info.data_offsets
            if begin == end:
                return torch.empty(shape, dtype=dtype, device=buffer.device)
            step = strides.get(shape)
            if step is None:
                walked = []
                n = 1
                for dim in reversed(shape):
                    walked.append(n)
                    n *= dim
                step = strides[shape] = tuple(walked[::-1])
            return whole.as_strided(shape, step, base + start // dtype.itemsize)

        return view

    @staticmethod
    def _host_viewer(buffer: torch.Tensor) -> Callable[[int, TensorInfo], torch.Tensor]:
        data = buffer.numpy().data.cast("B")
        dtypes: dict[str, torch.dtype] = {}

        def view(start: int, info: TensorInfo) -> torch.Tensor:
            dtype = dtypes.get(info.dtype)
            if dtype is None:
                dtype = dtypes[info.dtype] = torch_dtype(info.dtype, info.name)
            shape = torch_shape(info)
            begin, end = info.data_offsets
            if begin == end:
                return torch.empty(shape, dtype=dtype)
            flat = torch.frombuffer(data[start:start + end - begin], dtype=dtype)
            return flat if len(shape) == 1 else flat.view(shape)   # 1-D: shaped already

        return view

    def convert(self, tensor: torch.Tensor, *, device: str | None, dtype: Any) -> torch.Tensor:
        if isinstance(dtype, str):
            name = dtype
            dtype = torch_dtype(name) if name in DTYPES else getattr(torch, name, None)
            if not isinstance(dtype, torch.dtype):
                raise ConfigError("dtype", name, ["a torch dtype or its name (torch.bfloat16, "
                                                  "'bfloat16', 'half')", "a safetensors dtype "
                                                  "('BF16', 'F32', ...)"])
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise ConfigError("dtype", dtype, ["a torch dtype or its name"])
        if device is None and dtype is None:
            return tensor
        return tensor.to(device=device, dtype=dtype)


TORCH = TorchFramework()
