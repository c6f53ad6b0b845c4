"""Quality measurement: perplexity of a causal LM on token blocks."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Perplexity of `model` on `blocks` [num_blocks, seq_len] (next-token loss, mean over tokens).

    Every block is scored independently from its first token; the model is put
    in eval mode. Returns exp(mean negative log-likelihood per predicted token).
    """
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)
