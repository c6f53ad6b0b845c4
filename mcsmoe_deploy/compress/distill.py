"""Knowledge-distillation recovery of a compressed model from the original one.

loss = task loss + 0.2 * KL(teacher || student) at temperature 2 (scaled by T^2), as in
MC-SMoE. Routers stay frozen, and so does everything outside the compressed experts: only
the merged experts learn, so the routing that the grouping was planned on does not move.

`distill` recovers a language model on calibration text (the task is next-token prediction).
For another task, `train_compressed_experts` takes any batch loss: the paper distils each
fine-tuned task model on its own task data, which is what a task-specific model needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..grouped_experts import GroupedLowRankExperts
from ..models import FamilyAdapter
from .recipe import MERGED_DISTILL_LR
from .stats import forward_inputs

KL_WEIGHT = 0.2
TEMPERATURE = 2.0


@dataclass
class DistillReport:
    """What a recovery run did: its step count, peak learning rate, and first and last batch loss."""

    steps: int
    lr: float
    first_loss: float
    last_loss: float


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, causal: bool = True
) -> torch.Tensor:
    """Cross-entropy on `labels` plus KL_WEIGHT x KL at TEMPERATURE, averaged over predictions.

    Shapes: logits [..., V], labels [...] (for example [B, S, V] and [B, S] for a language
    model, [B, C] and [B] for a C-way classifier).
    causal: logits at position t predict labels[t + 1] (decoder-only LM, logits [B, S, V]);
    otherwise labels[t] (a classifier, or a teacher-forced decoder whose inputs are the labels shifted right).
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


def train_compressed_experts(
    student: nn.Module,
    batch_loss: Callable[[int], torch.Tensor],
    steps: int,
    lr: float = MERGED_DISTILL_LR,
    progress: bool = True,
    desc: str = "distillation",
) -> DistillReport:
    """Minimise `batch_loss(step)` over the compressed experts of `student` alone, for `steps` AdamW steps.

    batch_loss: draws the step's batch and returns a scalar loss computed with `student`.
    The learning rate decays linearly from `lr` to 0 (a constant rate undoes a good merge:
    measured on the embedded model, 1e-3 constant took a merged model's held-out perplexity
    from 20.6 to 23.5, 3e-4 decaying to 20.5). Parameters outside GroupedLowRankExperts,
    routers included, are frozen, and the student stays in eval mode (no dropout, no jitter).
    `desc` labels the progress bar.
    """
    trainable = [p for m in student.modules() if isinstance(m, GroupedLowRankExperts) for p in m.parameters()]
    if not trainable:
        raise ValueError("the student has no compressed experts to train")
    return train_parameters(student, trainable, batch_loss, steps, lr, progress, desc)


def train_parameters(
    student: nn.Module,
    trainable: list[nn.Parameter],
    batch_loss: Callable[[int], torch.Tensor],
    steps: int,
    lr: float,
    progress: bool = True,
    desc: str = "training",
) -> DistillReport:
    """Minimise `batch_loss(step)` over `trainable` (parameters of `student`) alone: `steps` AdamW steps
    without weight decay, the rate decaying linearly from `lr` to 0; every other parameter is frozen
    and never handed to the optimizer, so it stays bit for bit as it was. The student stays in eval mode."""
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(steps, 1))
    student.eval()
    losses = []
    try:
        for step in tqdm(range(steps), desc=desc, unit="step", disable=not progress):
            loss = batch_loss(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    finally:
        for parameter in student.parameters():
            parameter.requires_grad_(False)
    return DistillReport(steps, lr, losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"))


def teacher_batches(student: nn.Module, teacher: nn.Module, adapter: FamilyAdapter, blocks: torch.Tensor,
                    batch_size: int, seed: int) -> Callable[[], tuple[torch.Tensor, dict, torch.Tensor]]:
    """A draw of training batches from token `blocks` [N, S] (seeded): each call returns (token ids
    [batch_size, S], the student's forward inputs, the teacher's fp32 logits on them, no gradient)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(student.parameters()).device
    teacher.eval()

    def draw() -> tuple[torch.Tensor, dict, torch.Tensor]:
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=generator)].to(device)
        inputs = forward_inputs(student, adapter, batch)
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits.float()
        return batch, inputs, teacher_logits

    return draw


def distill(
    student: nn.Module,
    teacher: nn.Module,
    adapter: FamilyAdapter,
    blocks: torch.Tensor,
    steps: int,
    lr: float = MERGED_DISTILL_LR,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> DistillReport:
    """Train the compressed experts of `student` for `steps` batches drawn from token `blocks` [N, S].

    Loss: next-token cross-entropy plus KL to `teacher` (see `distillation_loss`). For
    encoder-decoder models the decoder is teacher-forced on the same blocks.
    Returns the first and last training loss.
    """
    next_batch = teacher_batches(student, teacher, adapter, blocks, batch_size, seed)

    def batch_loss(_step: int) -> torch.Tensor:
        batch, inputs, teacher_logits = next_batch()
        student_logits = student(**inputs).logits.float()
        return distillation_loss(student_logits, teacher_logits, batch, causal=not adapter.encoder_decoder)

    return train_compressed_experts(student, batch_loss, steps, lr, progress)
