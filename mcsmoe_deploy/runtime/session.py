"""The session interfaces over the backends, and the table that opens them.

DecoderSession, for decoder-only graphs and checkpoints: a step takes new tokens
`input_ids` [B, S], `attention_mask` [B, P + S] (1 = real token, 0 = padding; covers the
past too) and `position_ids` [B, S], plus the cache of the P tokens before, and returns the
logits [B, S, V] (float32, on the host) and the cache of P + S tokens. What a cache is belongs
to the backend (numpy arrays or device buffers for onnxruntime, a transformers DynamicCache for
torch); callers pass it back unopened. `padding_side` says where a batch's padding goes: "left"
(transformers': the mask marks the real cache positions, each step's tokens go at the end) or
"right" (graphs with GroupQueryAttention: a row's real tokens come first, in the batch and in the
cache; its mask is ones for its length, then zeros, and its new tokens go at its own length).

Seq2SeqSession, for encoder-decoders (Switch Transformers): `encode` runs the encoder on
`input_ids` / `attention_mask` [B, S] once and returns what every decoder step needs (the
encoder's mask and the fixed cross-attention keys and values, plus its hidden states
[B, S, d_model] for checks); a decoder step takes new decoder tokens [B, N] and the
self-attention cache of the P tokens before, and returns logits [B, N, V] and the cache of
P + N tokens. `decoder(encoded)` binds one encoded batch into a DecoderSession, so
`generate` drives encoder-decoders too; its prompts are the decoder's first tokens. The
decoder tokens of a batch are aligned (all start together, as in transformers' `generate`),
so the bound decoder reads no attention mask or positions.

Backends are a table of names to "module:Class", imported on first use: this module imports
no backend, and the backends import only this interface, so none imports another.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import DECODER_FILE, ENCODER_FILE, KVGeometry
from ..errors import UserError

BACKEND_CLASSES = {
    "ort": "mcsmoe_deploy.runtime.ort_session:OrtDecoderSession",
    "trt": "mcsmoe_deploy.runtime.trt_session:TrtDecoderSession",
    "torch": "mcsmoe_deploy.runtime.torch_session:TorchDecoderSession",
}
BACKENDS = tuple(BACKEND_CLASSES)
SEQ2SEQ_CLASSES = {"ort": "mcsmoe_deploy.runtime.ort_session:OrtSeq2SeqSession"}  # for an export folder


@dataclass
class StepOutput:
    logits: np.ndarray  # [B, S, V] float32
    past: Any  # backend-owned cache of all tokens so far


class DecoderSession(ABC):
    """A loaded decoder that runs prefill and decode steps (see the module docstring)."""

    backend: str = ""
    vocab_size: int = 0
    geometry: KVGeometry
    opens_directory: bool = False  # what `open_session` hands it: a checkpoint directory, else an ONNX file
    # how `generate` pads a batch of prompts of different lengths for this session: "left" (transformers')
    # or "right" (a graph with GroupQueryAttention, contract.PADDING_SIDE)
    padding_side: str = "left"

    @abstractmethod
    def empty_past(self, batch: int) -> Any:
        """The cache before the first token (past length 0)."""

    @abstractmethod
    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Any) -> StepOutput:
        """Run S new tokens after the cached ones."""

    def describe(self) -> dict:
        """Backend facts for reports: provider, threads, precision, ..."""
        return {"backend": self.backend}

    def close(self) -> None:
        """Release what the backend holds; the session is unusable afterwards."""


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


def _load(target: str) -> type:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def backend_class(backend: str) -> type[DecoderSession]:
    """The session class registered for `backend` in BACKEND_CLASSES, imported now."""
    if backend not in BACKEND_CLASSES:
        raise UserError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
    return _load(BACKEND_CLASSES[backend])


def is_seq2seq_export(path: str | Path) -> bool:
    """Whether `path` is an encoder-decoder export folder (ENCODER_FILE and DECODER_FILE in it)."""
    path = Path(path)
    return (path / ENCODER_FILE).is_file() and (path / DECODER_FILE).is_file()


def open_session(model: str | Path, backend: str = "ort", **options) -> DecoderSession | Seq2SeqSession:
    """Open `model` with `backend`.

    ort / trt: an ONNX file from `mcsmoe export` (the KV-cache graph); torch: a checkpoint
    directory, dense (transformers) or compressed (`load_compressed`). `options` go to the
    backend's session class (see OrtDecoderSession, TrtDecoderSession, TorchDecoderSession).
    ort also opens an encoder-decoder export folder (Switch's encoder.onnx + decoder.onnx)
    as a Seq2SeqSession (OrtSeq2SeqSession).
    """
    path = check_model_path(model, backend)
    if backend in SEQ2SEQ_CLASSES and path.is_dir() and is_seq2seq_export(path):
        return _load(SEQ2SEQ_CLASSES[backend]).from_folder(path, **options)
    return backend_class(backend)(path, **options)


def check_model_path(model: str | Path, backend: str) -> Path:
    """UserError unless `model` is what `backend` opens (a graph file, an export folder, a checkpoint
    directory); cheap, so callers check it before other work."""
    path = Path(model)
    if backend not in BACKEND_CLASSES:
        raise UserError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
    session_class = backend_class(backend)
    if not path.exists():
        raise UserError(f"model not found: {path}" if session_class.opens_directory else f"ONNX file not found: {path}")
    if backend in SEQ2SEQ_CLASSES and path.is_dir() and is_seq2seq_export(path):
        return path
    if session_class.opens_directory and not path.is_dir():
        raise UserError(f"the {backend} backend loads a checkpoint directory, not {path.name}")
    if not session_class.opens_directory and path.is_dir():
        raise UserError(f"the {backend} backend runs an ONNX file from `mcsmoe export` (or a Switch export folder); "
                        f"{path} is a directory")
    return path


__all__ = ["BACKENDS", "BACKEND_CLASSES", "DecoderSession", "EncodedDecoder", "EncoderOutput", "KVGeometry",
           "SEQ2SEQ_CLASSES", "Seq2SeqSession", "StepOutput", "backend_class", "check_model_path", "is_seq2seq_export", "open_session"]
