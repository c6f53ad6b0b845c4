"""Knowledge-distillation recovery of a compressed model from the original one.

loss = language-model loss + 0.2 * KL(teacher || student) at temperature 2
(scaled by T^2), as in MC-SMoE. Routers stay frozen, and so does everything
outside the compressed experts: only the merged experts learn, so the routing
that the grouping was planned on does not move.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..grouped_experts import GroupedLowRankExperts
from ..models import FamilyAdapter
from .stats import forward_inputs

KL_WEIGHT = 0.2
TEMPERATURE = 2.0


@dataclass
class DistillReport:
    steps: int
    first_loss: float
    last_loss: float


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, causal: bool = True
) -> torch.Tensor:
    """Cross-entropy on `labels` [B, S] plus KL_WEIGHT x KL at TEMPERATURE; logits [B, S, V].

    causal: logits at position t predict labels[t + 1] (decoder-only LM); otherwise labels[t]
    (a teacher-forced decoder whose inputs are the labels shifted right).
    """
    vocab = student_logits.shape[-1]
    if causal:
        task = F.cross_entropy(student_logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))
    else:
        task = F.cross_entropy(student_logits.reshape(-1, vocab), labels.reshape(-1))
    kl = F.kl_div(
        F.log_softmax(student_logits / TEMPERATURE, dim=-1).reshape(-1, vocab),
        F.log_softmax(teacher_logits / TEMPERATURE, dim=-1).reshape(-1, vocab),
        log_target=True,
        reduction="batchmean",
    )
    return task + KL_WEIGHT * kl * TEMPERATURE**2


def distill(
    student: nn.Module,
    teacher: nn.Module,
    adapter: FamilyAdapter,
    blocks: torch.Tensor,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> DistillReport:
    """Train the compressed experts of `student` for `steps` batches drawn from `blocks` [N, S].

    For encoder-decoder models the decoder is teacher-forced on the same blocks.
    Returns the first and last training loss.
    """
    trainable = [p for m in student.modules() if isinstance(m, GroupedLowRankExperts) for p in m.parameters()]
    if not trainable:
        raise ValueError("the student has no compressed experts to train")
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    device = trainable[0].device
    # eval mode in both: no dropout or router jitter, only the expert weights change
    teacher.eval()
    student.eval()
    losses = []
    try:
        for _ in tqdm(range(steps), desc="distillation", unit="step", disable=not progress):
            batch = blocks[torch.randint(len(blocks), (batch_size,), generator=generator)].to(device)
            inputs = forward_inputs(student, adapter, batch)
            with torch.no_grad():
                teacher_logits = teacher(**inputs).logits.float()
            student_logits = student(**inputs).logits.float()
            loss = distillation_loss(student_logits, teacher_logits, batch, causal=not adapter.encoder_decoder)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        for parameter in student.parameters():
            parameter.requires_grad_(False)
    return DistillReport(steps=steps, first_loss=losses[0] if losses else float("nan"), last_loss=losses[-1] if losses else float("nan"))
