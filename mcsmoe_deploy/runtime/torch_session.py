"""torch backend: the transformers model (dense) or `load_compressed` (compressed), the baseline users know."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import is_compressed_checkpoint, load_compressed
from ..errors import UserError
from ..models import adapter_for_config, load_model
from .session import DecoderSession, StepOutput


class TorchDecoderSession(DecoderSession):
    """A checkpoint directory run in eager PyTorch with transformers' DynamicCache.

    device: "cpu", "cuda", ... (default cpu); threads: torch intra-op threads (None: unchanged).
    """

    backend = "torch"

    def __init__(self, model_dir: str | Path, device: str = "cpu", threads: int | None = None):
        self.path = Path(model_dir)
        if threads:
            torch.set_num_threads(threads)
        self.compressed = is_compressed_checkpoint(self.path)
        if self.compressed:
            self.model = load_compressed(self.path, device=device)
        else:
            self.model, adapter = load_model(self.path, device=device)
            if adapter.encoder_decoder:
                raise UserError(f"{adapter.family} is an encoder-decoder model; the torch session runs decoder-only models")
        self.device = torch.device(device)
        self.geometry = adapter_for_config(self.model.config).kv_geometry(self.model.config)
        self.vocab_size = self.model.config.vocab_size
        self.threads = torch.get_num_threads()

    def empty_past(self, batch: int) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def step(self, input_ids, attention_mask, position_ids, past: Any) -> StepOutput:
        def tensor(array):
            return torch.tensor(np.asarray(array, dtype=np.int64), device=self.device)  # a copy: inputs may be read-only views

        out = self.model(
            input_ids=tensor(input_ids),
            attention_mask=tensor(attention_mask),
            position_ids=tensor(position_ids),
            past_key_values=past,
            use_cache=True,
        )
        return StepOutput(out.logits.float().cpu().numpy(), out.past_key_values)

    def describe(self) -> dict:
        return {"backend": self.backend, "device": str(self.device), "threads": self.threads,
                "compressed": self.compressed, "path": str(self.path)}

    def close(self) -> None:
        del self.model


__all__ = ["TorchDecoderSession"]
