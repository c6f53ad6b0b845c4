"""Seeded random Mixtral checkpoints for benchmarks (no hub here), with the package's embedded tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path


def save_random_mixtral(path: Path, seed: int = 0, **config) -> int:
    """Save a random `MixtralConfig(**config)` model (seed `seed`) and the embedded tokenizer to `path`.

    Written to `path.tmp` first and renamed, so a cache entry is never half-written.
    Returns the parameter count. The tokenizer (2,048 tokens) is for calibration only.
    """
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from mcsmoe_deploy.demo import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    if config.get("vocab_size", len(tokenizer)) < len(tokenizer):
        raise ValueError(f"vocabulary {config['vocab_size']} is smaller than the tokenizer's {len(tokenizer)}")
    config.setdefault("vocab_size", len(tokenizer))
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**config)).eval()
    staging = path.with_name(path.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(path)
    return sum(p.numel() for p in model.parameters())
