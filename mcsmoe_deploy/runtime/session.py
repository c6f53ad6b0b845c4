"""One interface over the backends that serve a decoder: a step from tokens and a KV cache to logits.

A step takes new tokens `input_ids` [B, S], `attention_mask` [B, P + S] (1 = real token,
0 = padding; covers the past too) and `position_ids` [B, S], plus the cache of the P tokens
before, and returns the logits [B, S, V] (float32, on the host) and the cache of P + S
tokens. What a cache is belongs to the backend (numpy arrays or device buffers for
onnxruntime, a transformers DynamicCache for torch); callers pass it back unopened.

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

from ..contract import KVGeometry
from ..errors import UserError

BACKEND_CLASSES = {
    "ort": "mcsmoe_deploy.runtime.ort_session:OrtDecoderSession",
    "trt": "mcsmoe_deploy.runtime.trt_session:TrtDecoderSession",
    "torch": "mcsmoe_deploy.runtime.torch_session:TorchDecoderSession",
}
BACKENDS = tuple(BACKEND_CLASSES)


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


def backend_class(backend: str) -> type[DecoderSession]:
    """The session class registered for `backend` in BACKEND_CLASSES, imported now."""
    if backend not in BACKEND_CLASSES:
        raise UserError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
    module, _, name = BACKEND_CLASSES[backend].partition(":")
    return getattr(importlib.import_module(module), name)


def open_session(model: str | Path, backend: str = "ort", **options) -> DecoderSession:
    """Open `model` with `backend`.

    ort / trt: an ONNX file from `mcsmoe export` (the KV-cache graph); torch: a checkpoint
    directory, dense (transformers) or compressed (`load_compressed`). `options` go to the
    backend's session class (see OrtDecoderSession, TrtDecoderSession, TorchDecoderSession).
    """
    path = Path(model)
    if backend not in BACKEND_CLASSES:
        raise UserError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
    if not path.exists():
        raise UserError(f"model not found: {path}")
    session_class = backend_class(backend)
    if session_class.opens_directory and not path.is_dir():
        raise UserError(f"the {backend} backend loads a checkpoint directory, not {path.name}")
    if not session_class.opens_directory and path.is_dir():
        raise UserError(f"the {backend} backend runs an ONNX file from `mcsmoe export`; {path} is a directory")
    return session_class(path, **options)


__all__ = ["BACKENDS", "BACKEND_CLASSES", "DecoderSession", "KVGeometry", "StepOutput", "backend_class",
           "open_session"]
