"""One rank of the 2-process tensor-parallel check (gloo on the CPU), run by
tests/test_transformers.py::test_tensor_parallel with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set.

    python tests/tp_worker.py MODEL_DIR OUT_JSON [MODEL_DIR OUT_JSON ...]

For each checkpoint it loads the model with stock tensor parallelism and with
loader="fastsafetensors", and writes to OUT_JSON: whether every local shard (parameters and
buffers) and the logits are equal, the bytes this rank read through fastsafetensors, and the
bytes it should read (its shards of sharded tensors plus the replicated ones).
"""

from __future__ import annotations

import json
import sys
from typing import Any


def local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t


def main(argv: list[str]) -> None:
    import inspect

    import tf_models  # beside this file (sys.path[0])
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import fastsafetensors.integrations.transformers  # noqa: F401  (installs the hook)
    from fastsafetensors.loader.posix import STATS

    # Newer transformers take the plan in DistributedConfig; earlier 5.x releases took
    # from_pretrained(tp_plan=, tp_size=).
    if "tp_plan" in inspect.signature(DistributedConfig).parameters:
        tp: dict[str, Any] = {"distributed_config": DistributedConfig(tp_plan="auto", tp_size=2)}
    else:
        tp = {"tp_plan": "auto", "tp_size": 2}
    ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
    for folder, out in zip(argv[0::2], argv[1::2]):
        def load(folder: str = folder, **kwargs: Any) -> Any:
            return AutoModelForCausalLM.from_pretrained(folder, **tp, **kwargs)

        # Full sizes from the checkpoint: some releases hold a rank's shard as a plain local
        # tensor (no DTensor to ask for the global shape).
        sizes = tf_models.weight_bytes(folder)
        stock = load()
        STATS.reset()
        ours = load(loader="fastsafetensors")
        bytes_read = STATS.snapshot()[0]
        mismatched = []
        sharded = replicated = local_bytes = 0
        stock_state = dict(stock.named_parameters()) | dict(stock.named_buffers())
        our_state = dict(ours.named_parameters()) | dict(ours.named_buffers())
        for name, ref in stock_state.items():
            mine = our_state.get(name)
            if (mine is None or type(mine) is not type(ref)
                    or not torch.equal(local(mine), local(ref))):
                mismatched.append(name)
            if name not in dict(stock.named_parameters()):
                continue
            full = sizes.get(name, ref.numel() * ref.element_size())
            part = local(ref).numel() * ref.element_size()
            local_bytes += part
            if part < full:
                sharded += full
            else:
                replicated += full
        with torch.no_grad():
            same_logits = torch.equal(stock(input_ids=ids).logits, ours(input_ids=ids).logits)
        rank = torch.distributed.get_rank()
        with open(out, "w") as fh:
            json.dump({"rank": rank, "mismatched": mismatched, "compared": len(stock_state),
                       "logits_equal": same_logits, "bytes_read": bytes_read,
                       "local_bytes": local_bytes, "sharded_bytes": sharded,
                       "replicated_bytes": replicated}, fh)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
