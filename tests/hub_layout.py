"""Tiny checkpoints laid out the way published ones are, written with safetensors directly.

A hub checkpoint differs from what our tests usually build with `save_pretrained`: its weights
are in the source dtype (bf16 for every current MoE release), sharded as
`model-0000N-of-0000M.safetensors` with a `model.safetensors.index.json` mapping each tensor to
its shard, under the legacy per-expert names each family's hub repositories use (Mixtral's
`block_sparse_moe.experts.N.w1`, Qwen's `mlp.experts.N.gate_proj`, Switch's `expert_N.wi`), and
with the structure of the real configs: tied or untied embeddings, Qwen2-MoE's shared expert and
its sigmoid gate, Switch's sparse layers every other block.

The tensors are a seeded random model's, renamed to the legacy keys by transformers' own
conversion (the names transformers 5 writes are the hub's); everything on disk is written here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conftest import byte_tokenizer, tiny_config

# per family, what differs from the plain tiny config, as in the family's published configs
HUB_CONFIG = {
    "mixtral": dict(tie_word_embeddings=False),
    "qwen2_moe": dict(tie_word_embeddings=False),
    "qwen3_moe": dict(tie_word_embeddings=False),
    "olmoe": dict(tie_word_embeddings=True),
    # sparse layers alternate with dense ones (switch-base-8: every other block)
    "switch_transformers": dict(num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=2,
                                num_sparse_decoder_layers=2, tie_word_embeddings=True),
}
LEGACY_EXPERT_KEY = {  # a key every family's hub checkpoint has, in its legacy per-expert naming
    "mixtral": "model.layers.0.block_sparse_moe.experts.0.w1.weight",
    "qwen2_moe": "model.layers.0.mlp.experts.0.gate_proj.weight",
    "qwen3_moe": "model.layers.0.mlp.experts.0.gate_proj.weight",
    "olmoe": "model.layers.0.mlp.experts.0.gate_proj.weight",
    "switch_transformers": "encoder.block.1.layer.1.mlp.experts.expert_0.wi.weight",
}


def hub_model(family: str, seed: int = 0):
    """The seeded fp32 transformers model a hub fixture of `family` stores."""
    base = tiny_config(family)
    values = {k: v for k, v in base.to_dict().items() if not k.endswith("_sparse_step")}  # derived, recomputed
    config = type(base)(**{**values, **HUB_CONFIG[family]})
    torch.manual_seed(seed)
    import transformers as tf

    if family == "switch_transformers":
        return tf.SwitchTransformersForConditionalGeneration(config).float().eval()
    return tf.AutoModelForCausalLM.from_config(config).float().eval()


def save_hub_layout(family: str, path: Path, dtype: torch.dtype = torch.bfloat16, shards: int = 3,
                    seed: int = 0) -> Path:
    """Write a hub-layout checkpoint of `family` in `dtype` to `path`: sharded safetensors plus index,
    config.json, generation_config.json and tokenizer files. Returns `path`."""
    model = hub_model(family, seed)
    staging = path.with_name(path.name + ".names")
    model.save_pretrained(staging)  # only to learn the hub's key names; its files are not kept
    tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in
               load_file(str(next(staging.glob("*.safetensors")))).items()}
    config = json.loads((staging / "config.json").read_text())
    for item in staging.iterdir():
        item.unlink()
    staging.rmdir()

    path.mkdir(parents=True)
    names = sorted(tensors)
    per_shard = math.ceil(len(names) / shards)
    write_shards(path, ({name: tensors[name] for name in names[index * per_shard:(index + 1) * per_shard]}
                        for index in range(shards)), shards)
    write_side_files(path, config, dtype, byte_tokenizer())
    return path


def write_shards(path: Path, shard_tensors: Iterable[dict[str, torch.Tensor]], shards: int) -> int:
    """Write each dict of `shard_tensors` (any iterable, so a generator can make them one at a time) as
    `model-0000N-of-0000M.safetensors` in `path`, then `model.safetensors.index.json`. Returns the tensor bytes."""
    weight_map, total = {}, 0
    for index, part in enumerate(shard_tensors):
        shard = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensor.contiguous() for name, tensor in part.items()}
        save_file(part, str(path / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
        total += sum(t.numel() * t.element_size() for t in part.values())
        del part
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def write_side_files(path: Path, config: dict, dtype: torch.dtype, tokenizer) -> None:
    """config.json (with `dtype` and the tokenizer's end of text as bos/eos/pad), generation_config.json and
    `tokenizer`'s files, in `path`."""
    tokenizer.save_pretrained(path)
    eos = tokenizer.eos_token_id
    config = {**config, "dtype": str(dtype).removeprefix("torch."), "bos_token_id": eos, "eos_token_id": eos,
              "pad_token_id": eos}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": eos, "eos_token_id": eos,
                                                             "pad_token_id": eos}))


def stored_bytes(path: Path) -> int:
    """Bytes of the safetensors files in `path`."""
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


__all__ = ["HUB_CONFIG", "LEGACY_EXPERT_KEY", "hub_model", "save_hub_layout", "stored_bytes", "write_shards",
           "write_side_files"]
