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


def compare_decoders(session: DecoderSession, reference: DecoderSession, prompt_ids: np.ndarray,
                     continuation: np.ndarray) -> Discrepancy:
    """Run both sessions on `prompt_ids` [B, L] (prefill) then `continuation` [B, N] (N decode steps)
    and compare the logits of every step ([B, L, V] for the prefill, [B, 1, V] per decode step)."""
    config = GenerationConfig(max_new_tokens=continuation.shape[1] + 1)
    runs = [generate(s, prompt_ids, config, forced_tokens=continuation, keep_logits=True).logits
            for s in (session, reference)]
    worst = Discrepancy()
    for got, want in zip(*runs, strict=True):
        worst = worst.worst(compare_arrays(got, want))
    return worst


__all__ = ["Discrepancy", "compare_arrays", "compare_decoders"]
