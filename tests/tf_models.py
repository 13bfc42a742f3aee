"""Tiny transformers checkpoints for the integration tests (tests/test_transformers.py and the
tensor-parallel worker tests/tp_worker.py). Seeded, so two builds are bit-identical."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: Small enough that a load takes milliseconds, big enough that a 2-way column split of a row is
#: at least fastsafetensors' MERGE_GAP (512 bytes), so each rank really skips the other half.
HIDDEN = 256


def llama_config(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    args: dict[str, Any] = dict(vocab_size=128, hidden_size=HIDDEN, intermediate_size=512,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=64,
                                tie_word_embeddings=False)
    args.update(overrides)
    return LlamaConfig(**args)


def mixtral_config(**overrides: Any) -> Any:
    from transformers import MixtralConfig

    args: dict[str, Any] = dict(vocab_size=128, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=64,
                                num_local_experts=4, num_experts_per_tok=2,
                                tie_word_embeddings=False)
    args.update(overrides)
    return MixtralConfig(**args)


def bert_config() -> Any:
    from transformers import BertConfig

    return BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=64)


def build(kind: str, folder: str | os.PathLike[str], *, shard: str = "200KB",
          safe: bool = True, seed: int = 0, config_dtype: str | None = "keep") -> Path:
    """Save a randomly initialised tiny ``kind`` ("llama", "mixtral", "bert") in ``folder``."""
    import torch
    from transformers import BertForMaskedLM, LlamaForCausalLM, MixtralForCausalLM

    classes = {"llama": (LlamaForCausalLM, llama_config), "mixtral": (MixtralForCausalLM,
               mixtral_config), "bert": (BertForMaskedLM, bert_config)}
    cls, make_config = classes[kind]
    torch.manual_seed(seed)
    model = cls(make_config()).eval()
    folder = Path(folder)
    model.save_pretrained(folder, max_shard_size=shard)
    if not safe:
        # transformers 5 saves safetensors only; write the legacy pickle format by hand.
        import safetensors.torch

        state: dict[str, Any] = {}
        for path in sorted(folder.glob("*.safetensors")):
            state.update(safetensors.torch.load_file(path))
            path.unlink()
        (folder / "model.safetensors.index.json").unlink(missing_ok=True)
        torch.save(state, folder / "pytorch_model.bin")
    if config_dtype != "keep":
        path = folder / "config.json"
        cfg = json.loads(path.read_text())
        cfg.pop("dtype", None)
        cfg.pop("torch_dtype", None)
        if config_dtype is not None:
            cfg["dtype"] = config_dtype
        path.write_text(json.dumps(cfg))
    return folder


def weight_bytes(folder: str | os.PathLike[str]) -> dict[str, int]:
    """``{tensor name: data bytes}`` over every safetensors shard of ``folder``."""
    from fastsafetensors import FastSafetensorsFile

    sizes: dict[str, int] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with FastSafetensorsFile(path) as f:
            sizes.update({name: info.nbytes for name, info in f.get_tensors().items()})
    return sizes
