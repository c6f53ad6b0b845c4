"""Text generation over any DecoderSession: greedy or sampled, KV cache, stop tokens, padded batches.

Prompts of different lengths are padded into one batch on the side the session asks for
(`DecoderSession.padding_side`): left by default (transformers' `generate`: padding has attention
mask 0 and position ids count only real tokens, and every row's new token goes at the end), right
for graphs with GroupQueryAttention (each row's real tokens first, its new token at its own length,
the mask ones for the row's length). Either way a padded row produces the same tokens as that
prompt alone, and kept logits are returned in the left-padded layout.

`generate` is the one loop that steps a session from prefill to decode: text generation,
benchmarks (its per-step times) and export validation (given tokens instead of picked ones,
every step's logits kept) all run through it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .session import DecoderSession


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens.

    temperature 0 is greedy (argmax); otherwise logits / temperature, then nucleus
    (top-p) sampling with numpy's generator seeded by `seed`. Generation of a row stops
    at any of `stop_token_ids` (the stop token is kept) or after `max_new_tokens`.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


@dataclass
class GenerationResult:
    """New tokens per prompt, how long the steps took (seconds, wall clock), and the logits if kept."""

    tokens: list[list[int]]
    prefill_seconds: float
    decode_seconds: list[float] = field(default_factory=list)  # one per decode step (batch-wide)
    logits: list[np.ndarray] = field(default_factory=list)  # per step [B, S, V] float32 (`keep_logits`)

    @property
    def generated(self) -> int:
        return sum(len(t) for t in self.tokens)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, position_ids), each [B, L], for prompts left-padded to the longest, L."""
    ids, mask, _ = right_pad(prompts, pad_token_id)
    shifts = mask.shape[1] - mask.sum(axis=1)
    ids, mask = _shift_rows(ids, shifts), _shift_rows(mask, shifts)
    return ids, mask, np.maximum(mask.cumsum(axis=1) - 1, 0)


def right_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, position_ids), each [B, L], for prompts right-padded to the longest, L."""
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(prompts), length), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
        mask[row, :len(prompt)] = 1
    positions = np.maximum(mask.cumsum(axis=1) - 1, 0)
    return ids, mask, positions


def _shift_rows(array: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Each row of `array` [B, L, ...] rolled right by its shift along axis 1."""
    return np.stack([np.roll(row, int(shift), axis=0) for row, shift in zip(array, shifts, strict=True)])


def pick_tokens(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    """Next token per row from last-position logits [B, V]."""
    if config.temperature == 0:
        return logits.argmax(axis=-1)
    scaled = logits.astype(np.float64) / config.temperature
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    picks = np.empty(len(probs), dtype=np.int64)
    for row, p in enumerate(probs):
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        # the smallest prefix whose mass reaches top_p (always at least one token)
        keep = order[: int(np.searchsorted(cumulative, config.top_p)) + 1]
        picks[row] = rng.choice(keep, p=p[keep] / p[keep].sum())
    return picks


def generate(
    session: DecoderSession,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    forced_tokens: np.ndarray | None = None,
    keep_logits: bool = False,
) -> GenerationResult:
    """Generate up to `config.max_new_tokens` tokens after each prompt (token ids) with `session`.

    forced_tokens [B, N]: the first N new tokens are these instead of picked ones (teacher
    forcing, to compare backends on the same inputs); the rest are picked. keep_logits: keep
    every step's logits in the result (the prefill's [B, L, V], then [B, 1, V] per decode step).
    """
    rng = np.random.default_rng(config.seed)
    right = session.padding_side == "right"
    ids, mask, positions = (right_pad if right else left_pad)(prompts, config.pad_token_id)
    lengths = mask.sum(axis=1)  # real tokens per row
    batch = len(prompts)
    forced = np.zeros((batch, 0), dtype=np.int64) if forced_tokens is None else np.asarray(forced_tokens, np.int64)
    if forced.ndim != 2 or forced.shape[0] != batch:
        raise ValueError(f"forced_tokens must be [{batch}, N], got shape {forced.shape}")
    stop = np.array(config.stop_token_ids, dtype=np.int64)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)

    start = time.perf_counter()
    out = session.step(ids, mask, positions, session.empty_past(batch))
    result = GenerationResult(tokens, prefill_seconds=time.perf_counter() - start)
    last = out.logits[np.arange(batch), lengths - 1] if right else out.logits[:, -1]  # [B, V]
    for step in range(config.max_new_tokens):
        if keep_logits:
            result.logits.append(_shift_rows(out.logits, mask.shape[1] - lengths) if right and step == 0
                                 else out.logits)
        picked = forced[:, step] if step < forced.shape[1] else pick_tokens(last, config, rng)
        picked = np.where(done, config.pad_token_id, picked)
        for row in np.flatnonzero(~done):
            tokens[row].append(int(picked[row]))
        done |= np.isin(picked, stop)
        if done.all() or step + 1 == config.max_new_tokens:
            break
        # the new token sits at each row's length (right) or at the end (left); its position is the length
        new_column = np.zeros if right else np.ones
        mask = np.concatenate([mask, new_column((batch, 1), dtype=np.int64)], axis=1)
        if right:
            mask[np.arange(batch), lengths] = 1
        start = time.perf_counter()
        out = session.step(picked[:, None], mask, lengths[:, None], out.past)
        result.decode_seconds.append(time.perf_counter() - start)
        lengths = lengths + 1
        last = out.logits[:, -1]
    return result


__all__ = ["GenerationConfig", "GenerationResult", "generate", "left_pad", "pick_tokens", "right_pad"]
