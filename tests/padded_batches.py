"""A padded batch through a decoder session, against transformers on the same prompts.

The session pads as it declares (`padding_side`: the portable graph left, like transformers; a graph
with GroupQueryAttention right); the reference is transformers' forward on the left-padded batch.
"""

from __future__ import annotations

import numpy as np
import torch

from mcsmoe_deploy.models.kv_cache import forward_with_cache
from mcsmoe_deploy.runtime.generation import left_pad, right_pad

PROMPTS = ([5, 17, 99, 3, 250, 41, 9], [7, 8, 9])
NEXT_TOKENS = np.array([[11], [12]])


def padded_batch_errors(session, model, prompts=PROMPTS, next_tokens=NEXT_TOKENS) -> tuple[float, float]:
    """Relative errors (max |got - torch| / max |torch|) of the prefill's real positions and of one decode step."""
    ids, mask, positions = left_pad(prompts, 0)
    with torch.no_grad():
        out, cache = forward_with_cache(model, None, input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                        position_ids=torch.tensor(positions))
        step, _ = forward_with_cache(model, cache, input_ids=torch.tensor(next_tokens),
                                     attention_mask=torch.tensor(np.pad(mask, ((0, 0), (0, 1)), constant_values=1)),
                                     position_ids=torch.tensor(positions[:, -1:] + 1))
    lengths = mask.sum(axis=1)
    right = session.padding_side == "right"
    if right:
        ids, mask, positions = right_pad(prompts, 0)
    first = session.step(ids, mask, positions, session.empty_past(len(prompts)))
    expected = out.logits.numpy()
    width = mask.shape[1]
    rows = [(first.logits[row, :n] if right else first.logits[row, width - n:]) - expected[row, width - n:]
            for row, n in enumerate(lengths)]
    prefill = max(float(np.abs(r).max()) for r in rows) / float(np.abs(expected).max())
    mask = np.pad(mask, ((0, 0), (0, 1)), constant_values=0 if right else 1)
    mask[np.arange(len(prompts)), lengths if right else -1] = 1
    second = session.step(next_tokens, mask, lengths[:, None], first.past)
    expected = step.logits.numpy()
    return prefill, float(np.abs(second.logits - expected).max() / np.abs(expected).max())
