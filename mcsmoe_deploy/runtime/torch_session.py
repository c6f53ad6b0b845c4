"""torch backend: the transformers model (dense) or `load_compressed` (compressed), the baseline users know.

Also the reference runner of export validation: `from_model` wraps a model already in memory,
and TorchSeq2SeqSession runs an encoder-decoder (Switch Transformers) step by step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import is_compressed_checkpoint, load_compressed
from ..errors import UserError
from ..models import adapter_for_config, load_model
from ..models.kv_cache import forward_with_cache
from .session import DecoderSession, EncoderOutput, Seq2SeqSession, StepOutput


def _tensor(array, device: torch.device) -> torch.Tensor:
    return torch.tensor(np.asarray(array, dtype=np.int64), device=device)  # a copy: inputs may be read-only views


class TorchDecoderSession(DecoderSession):
    """A checkpoint directory run in eager PyTorch with transformers' DynamicCache.

    device: "cpu", "cuda", ... (default cpu); threads: torch intra-op threads (None: unchanged).
    """

    backend = "torch"
    opens_directory = True

    def __init__(self, model_dir: str | Path, device: str = "cpu", threads: int | None = None):
        path = Path(model_dir)
        if threads:
            torch.set_num_threads(threads)
        compressed = is_compressed_checkpoint(path)
        if compressed:
            model = load_compressed(path, device=device)
        else:
            model, adapter = load_model(path, device=device)
            if adapter.encoder_decoder:
                raise UserError(f"{adapter.family} is an encoder-decoder model; the torch session runs decoder-only models")
        self._attach(model, path, compressed)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> TorchDecoderSession:
        """Wrap a decoder-only model already loaded (on its own device), e.g. as a validation reference."""
        session = cls.__new__(cls)
        session._attach(model, None, None)
        return session

    def _attach(self, model: torch.nn.Module, path: Path | None, compressed: bool | None) -> None:
        self.model, self.path, self.compressed = model, path, compressed
        self.device = next(model.parameters()).device
        self.geometry = adapter_for_config(model.config).kv_geometry(model.config)
        self.vocab_size = model.config.vocab_size
        self.threads = torch.get_num_threads()

    def empty_past(self, batch: int) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def step(self, input_ids, attention_mask, position_ids, past: Any) -> StepOutput:
        out, past = forward_with_cache(self.model, past, input_ids=_tensor(input_ids, self.device),
                                       attention_mask=_tensor(attention_mask, self.device),
                                       position_ids=_tensor(position_ids, self.device))
        return StepOutput(out.logits.float().cpu().numpy(), past)

    def describe(self) -> dict:
        return {"backend": self.backend, "device": str(self.device), "threads": self.threads,
                "compressed": self.compressed, "path": str(self.path)}

    def close(self) -> None:
        del self.model


class TorchSeq2SeqSession(Seq2SeqSession):
    """A transformers encoder-decoder (Switch Transformers) already in memory, stepped with an EncoderDecoderCache.

    The cross-attention cache is filled by transformers on the first decoder step; the past
    of a step is the whole EncoderDecoderCache.
    """

    backend = "torch"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        self.decoder_start_token_id = model.config.decoder_start_token_id

    @torch.inference_mode()
    def encode(self, input_ids, attention_mask) -> EncoderOutput:
        mask = _tensor(attention_mask, self.device)
        encoded = self.model.encoder(input_ids=_tensor(input_ids, self.device), attention_mask=mask)
        # the encoder's whole output goes back in at every step: the model reads more than its hidden states
        return EncoderOutput(encoded.last_hidden_state.float().cpu().numpy(), mask.cpu().numpy(), encoded)

    def empty_past(self, batch: int) -> Any:
        from transformers import DynamicCache, EncoderDecoderCache

        return EncoderDecoderCache(DynamicCache(), DynamicCache())

    @torch.inference_mode()
    def decode_step(self, input_ids, encoded: EncoderOutput, past: Any) -> StepOutput:
        out, past = forward_with_cache(self.model, past, encoder_outputs=encoded.cross_past,
                                       attention_mask=_tensor(encoded.attention_mask, self.device),
                                       decoder_input_ids=_tensor(input_ids, self.device))
        return StepOutput(out.logits.float().cpu().numpy(), past)

    def describe(self) -> dict:
        return {"backend": self.backend, "device": str(self.device)}

    def close(self) -> None:
        del self.model


__all__ = ["TorchDecoderSession", "TorchSeq2SeqSession"]
