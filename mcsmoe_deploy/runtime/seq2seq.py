"""One interface over encoder-decoder backends (Switch Transformers): encode once, then decoder steps.

`encode` runs the encoder on `input_ids` / `attention_mask` [B, S] and returns what every
decoder step needs: the encoder's attention mask and the cross-attention keys and values
(fixed for the whole generation), plus its hidden states [B, S, d_model] for checks. A
decoder step takes new decoder tokens [B, N] and the self-attention cache of the P tokens
before and returns logits [B, N, V] and the cache of P + N tokens. Caches belong to the
backend, as in session.py.

`Seq2SeqSession.decoder(encoded)` binds one encoded batch into a DecoderSession, so
`generate` drives encoder-decoder models too: its prompts are the decoder's first tokens
(`decoder_start_token_id`). The decoder tokens of a batch are aligned (all start together,
as in transformers' `generate`), so the bound decoder reads no attention mask or positions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from .session import DecoderSession, StepOutput


@dataclass
class EncoderOutput:
    """One encoded batch: what the decoder steps read."""

    hidden_states: np.ndarray  # [B, S, d_model] float32, the encoder's last hidden state
    attention_mask: np.ndarray  # [B, S] int64
    cross_past: Any  # backend-owned cross-attention keys and values (or what computes them)


class Seq2SeqSession(ABC):
    """A loaded encoder-decoder (see the module docstring)."""

    backend: str = ""
    vocab_size: int = 0
    decoder_start_token_id: int = 0

    @abstractmethod
    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> EncoderOutput:
        """Run the encoder once over [B, S] tokens."""

    @abstractmethod
    def empty_past(self, batch: int) -> Any:
        """The decoder's self-attention cache before its first token."""

    @abstractmethod
    def decode_step(self, input_ids: np.ndarray, encoded: EncoderOutput, past: Any) -> StepOutput:
        """Run N new decoder tokens [B, N] after the cached ones, attending to `encoded`."""

    def decoder(self, encoded: EncoderOutput) -> DecoderSession:
        """The decoder bound to `encoded`, as a DecoderSession for `generate`."""
        return EncodedDecoder(self, encoded)

    def describe(self) -> dict:
        """Backend facts for reports."""
        return {"backend": self.backend}

    def close(self) -> None:
        """Release what the backend holds."""


class EncodedDecoder(DecoderSession):
    """A seq2seq session's decoder over one encoded batch (attention mask and positions unread)."""

    def __init__(self, seq2seq: Seq2SeqSession, encoded: EncoderOutput):
        self.seq2seq, self.encoded = seq2seq, encoded
        self.backend, self.vocab_size = seq2seq.backend, seq2seq.vocab_size

    def empty_past(self, batch: int) -> Any:
        return self.seq2seq.empty_past(batch)

    def step(self, input_ids, attention_mask, position_ids, past: Any) -> StepOutput:
        return self.seq2seq.decode_step(input_ids, self.encoded, past)

    def describe(self) -> dict:
        return self.seq2seq.describe()


__all__ = ["EncodedDecoder", "EncoderOutput", "Seq2SeqSession"]
