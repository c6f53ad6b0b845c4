"""Two sessions on the same inputs, compared (Polygraphy's runners and comparator).

A check feeds the session under test and a reference session the same steps through
`generate` (a prefill of the prompt from an empty past, then the given continuation one token
per decode step) and compares every step's logits with one comparator: the max absolute
error max|got - reference| and the relative error max|got - reference| / max|reference|.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .generation import GenerationConfig, generate
from .session import DecoderSession


@dataclass(frozen=True)
class Discrepancy:
    """How far outputs are from the reference: max |got - ref|, and that over max |ref| of the same output."""

    max_abs_error: float = 0.0
    max_rel_error: float = 0.0

    def worst(self, other: Discrepancy) -> Discrepancy:
        """The larger of each error over two comparisons."""
        return Discrepancy(max(self.max_abs_error, other.max_abs_error), max(self.max_rel_error, other.max_rel_error))


def compare_arrays(got: np.ndarray, reference: np.ndarray) -> Discrepancy:
    """The comparator: errors of `got` against `reference` (same shape)."""
    got, reference = np.asarray(got), np.asarray(reference)
    if got.shape != reference.shape:
        raise ValueError(f"shapes differ: {got.shape} vs reference {reference.shape}")
    error = float(np.abs(got - reference).max())
    return Discrepancy(error, error / max(float(np.abs(reference).max()), 1e-30))


def decoder_logits(session: DecoderSession, prompt_ids: np.ndarray, continuation: np.ndarray) -> list[np.ndarray]:
    """The logits of every step of `session` on `prompt_ids` [B, L] (prefill) then `continuation` [B, N] (N decode
    steps): [B, L, V] for the prefill, [B, 1, V] per decode step. Kept apart from the comparison so that a
    reference can be run, recorded and freed before the session under test is opened."""
    config = GenerationConfig(max_new_tokens=continuation.shape[1] + 1)
    return generate(session, prompt_ids, config, forced_tokens=continuation, keep_logits=True).logits


def compare_runs(got: list[np.ndarray], reference: list[np.ndarray]) -> Discrepancy:
    """The worst discrepancy over the steps of two `decoder_logits` runs."""
    worst = Discrepancy()
    for step, want in zip(got, reference, strict=True):
        worst = worst.worst(compare_arrays(step, want))
    return worst


def compare_decoders(session: DecoderSession, reference: DecoderSession, prompt_ids: np.ndarray,
                     continuation: np.ndarray) -> Discrepancy:
    """Run both sessions on `prompt_ids` [B, L] (prefill) then `continuation` [B, N] (N decode steps)
    and compare the logits of every step ([B, L, V] for the prefill, [B, 1, V] per decode step)."""
    return compare_runs(*(decoder_logits(s, prompt_ids, continuation) for s in (session, reference)))


__all__ = ["Discrepancy", "compare_arrays", "compare_decoders", "compare_runs", "decoder_logits"]
