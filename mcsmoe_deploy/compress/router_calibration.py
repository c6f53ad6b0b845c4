"""Router calibration: after experts were merged or pruned, fit the routers alone to the dense model.

Only the routers learn; every expert weight stays bit for bit as compression left it. Training the
norm before each MoE block as well was measured and left out: on the embedded model (M-SMoE, G = 4,
8192 calibration tokens, 25 steps at 1e-3) held-out perplexity was 20.700 with routers alone and
20.702 with the norms too. The loss is KL(teacher || student) of the next-token
distributions on the calibration text, the teacher being the dense model: the routers learn to
send tokens where the compressed experts best reproduce the dense model's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models import FamilyAdapter
from .distill import DistillReport, teacher_batches, train_parameters
from .recipe import ROUTER_LR, ROUTER_STEPS


def router_parameters(model: nn.Module, adapter: FamilyAdapter) -> list[nn.Parameter]:
    """The parameters of every MoE block's router."""
    return [p for layer in adapter.moe_layers(model) for p in adapter.router(layer.block).parameters()]


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the distributions over the vocabulary, averaged over positions.
    Logits [..., V]."""
    vocab = student_logits.shape[-1]
    return F.kl_div(F.log_softmax(student_logits.reshape(-1, vocab), dim=-1),
                    F.log_softmax(teacher_logits.reshape(-1, vocab), dim=-1), log_target=True, reduction="batchmean")


def calibrate_routers(
    student: nn.Module,
    teacher: nn.Module,
    adapter: FamilyAdapter,
    blocks: torch.Tensor,
    steps: int = ROUTER_STEPS,
    lr: float = ROUTER_LR,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> DistillReport:
    """Train the routers of `student` (a compressed model, either format) for `steps` batches of token
    `blocks` [N, S] to match `teacher`'s logits (see `kl_to_teacher`); returns the first and last loss.
    """
    trainable = router_parameters(student, adapter)
    if not trainable:
        raise ValueError("the student has no routers to calibrate")
    next_batch = teacher_batches(student, teacher, adapter, blocks, batch_size, seed)

    def batch_loss(_step: int) -> torch.Tensor:
        _, inputs, teacher_logits = next_batch()
        return kl_to_teacher(student(**inputs).logits.float(), teacher_logits)

    return train_parameters(student, trainable, batch_loss, steps, lr, progress, desc="router calibration")
