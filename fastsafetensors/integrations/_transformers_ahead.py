"""When a transformers load reads ahead, and to which device (internal, for the seam).

A batch (``_transformers_batch.py``) can start reading the whole checkpoint as soon as
transformers has resolved its files and settled the model's dtype, while transformers builds the
model (the seam's ``_get_dtype`` hook calls :func:`start_reading_ahead`). This module decides
whether that is safe and useful for one load: one batched device in ``device_map``, nothing
split or quantized, the model's dtype in the files, room on the device, and requests that
transformers will make through futures (their first wait ends them).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .. import config
from . import human_size

if TYPE_CHECKING:
    from ._transformers_seam import Load

#: Target device types whose whole tensors are read in batches. Not the CPU: there the engine
#: reads each file into one buffer, and a parameter kept would keep its file's buffer alive.
#: (The tests add "cpu" to run the batching without a GPU.)
BATCH_DEVICE_TYPES = ("cuda",)
#: Free device memory a read-ahead leaves beyond the checkpoint's tensors.
AHEAD_HEADROOM = 1 << 30


def indexed(target: Any) -> Any:
    """``target`` with the current CUDA device's index where it names none (batches are kept
    by device)."""
    import torch

    if target.type == "cuda" and target.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return target


def ahead_device(kwargs: dict[str, Any]) -> str | None:
    """The device a ``from_pretrained`` call puts every weight on, when its ``device_map``
    names one batched device and nothing splits or quantizes the weights; else None."""
    if any(kwargs.get(k) is not None for k in ("tp_plan", "distributed_config", "device_mesh",
                                               "quantization_config")):
        return None
    device_map = kwargs.get("device_map")
    if isinstance(device_map, dict):
        if list(device_map) != [""]:
            return None
        device_map = device_map[""]
    elif device_map == "cuda":
        # transformers reads a bare "cuda" as this process's local rank (torchrun), not as the
        # current device.
        device_map = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    import torch

    if isinstance(device_map, bool) or not isinstance(device_map, (str, int, torch.device)):
        return None
    try:
        if isinstance(device_map, int):   # an accelerator's index, as transformers reads it
            if not torch.cuda.is_available():
                return None
            device_map = f"cuda:{device_map}"
        target = torch.device(device_map)   # "auto", "balanced", "disk": not a device
        if target.type not in BATCH_DEVICE_TYPES:
            return None
        return str(indexed(target))
    except (RuntimeError, TypeError, AssertionError):   # AssertionError: torch without CUDA
        return None


def start_reading_ahead(load: Load, device: str, files: Any, dtype: Any, state_dict: Any,
                        hf_quantizer: Any) -> str:
    """Start a batch of ``load`` reading every tensor of ``files`` to ``device``, or say why
    not: the outcome, for the debug log."""
    import torch

    with load.configured():
        mode = config.get("read_ahead")
    if mode == "off":
        return "read_ahead='off'"
    if state_dict is not None or hf_quantizer is not None or not isinstance(dtype, torch.dtype):
        return "a state_dict, a quantizer or no single dtype"
    if not files or not all(str(f).endswith(".safetensors") for f in files):
        return "no safetensors files"
    why = _not_asked_through_futures(files)
    if why:
        return why
    handles = [load.open(path) for path in files]
    nbytes = 0
    for handle in handles:
        for info in handle.get_tensors().values():
            # Only tensors transformers keeps as they are: a cast would hold both copies.
            kind = handle._dtype_of(info)
            if kind.is_floating_point and kind != dtype:
                return f"{info.name} is {kind}, the model {dtype}"
            nbytes += info.nbytes
    cuda = torch.device(device).type == "cuda"
    if cuda:
        free, _ = torch.cuda.mem_get_info(device)
        if free < nbytes + AHEAD_HEADROOM:
            return f"{human_size(nbytes)} of tensors and {human_size(free)} free on {device}"
    load.batch(device).read_ahead(handles, quiet=cuda and mode == "quiet")
    if cuda:
        load.devices.add(device)
    return f"reading {human_size(nbytes)} ahead to {device}"


def _not_asked_through_futures(files: Any) -> str | None:
    """Why transformers would read ``files`` without asking a batch through futures (its
    first wait ends a read-ahead's requests; without one, what was read would stay on the
    device beside what transformers reads itself), or None."""
    from transformers import modeling_utils
    from transformers.utils import import_utils

    if import_utils.is_env_variable_true("HF_DEACTIVATE_ASYNC_LOAD"):
        return "HF_DEACTIVATE_ASYNC_LOAD: transformers loads one tensor at a time"
    on_mount = getattr(modeling_utils, "_is_on_hf_mount", None)   # not in 5.0; in 5.14
    if on_mount is not None and any(on_mount(f) for f in files):
        return "files on an hf-mount, which transformers reads whole"
    try:   # a torch.distributed checkpoint, loaded through DCP (in 5.23; not in 5.17)
        from transformers.distributed.checkpoint import is_sharded_checkpoint
    except ImportError:
        return None
    if is_sharded_checkpoint(os.path.dirname(os.fspath(files[0]))):
        return "a distributed checkpoint, which transformers loads through torch.distributed"
    return None
