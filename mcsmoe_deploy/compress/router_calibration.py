"""Router calibration: after experts were merged or pruned, fit the routers alone to the dense model.

Only the routers learn (and, when asked, the norms that feed the MoE blocks); every expert weight
stays bit for bit as compression left it. The loss is KL(teacher || student) of the next-token
distributions on the calibration text, the teacher being the dense model: the routers learn to
send tokens where the compressed experts best reproduce the dense model's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models import FamilyAdapter
from .distill import DistillReport, train_parameters
from .recipe import ROUTER_LR, ROUTER_STEPS
from .stats import forward_inputs


def router_parameters(model: nn.Module, adapter: FamilyAdapter, norms: bool = False) -> list[nn.Parameter]:
    """The parameters of every MoE block's router; with `norms`, also those of the normalisation layer
    right before each MoE block (the decoder layer's post-attention norm; stacked families only)."""
    layers = adapter.moe_layers(model)
    params = [p for layer in layers for p in adapter.router(layer.block).parameters()]
    if norms:
        moe_blocks = {id(layer.block) for layer in layers}
        for module in model.modules():
            norm = getattr(module, "post_attention_layernorm", None)
            if norm is not None and any(id(child) in moe_blocks for child in module.children()):
                params += list(norm.parameters())
    return params


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
    norms: bool = False,
    progress: bool = True,
) -> DistillReport:
    """Train the routers of `student` (a compressed model, either format) for `steps` batches of token
    `blocks` [N, S] to match `teacher`'s logits (see `kl_to_teacher`); returns the first and last loss.

    norms: also train the norm before each MoE block (measured on the embedded model: see the module's
    benchmark notes; off by default).
    """
    trainable = router_parameters(student, adapter, norms)
    if not trainable:
        raise ValueError("the student has no routers to calibrate")
    generator = torch.Generator().manual_seed(seed)
    device = next(student.parameters()).device
    teacher.eval()

    def batch_loss(_step: int) -> torch.Tensor:
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=generator)].to(device)
        inputs = forward_inputs(student, adapter, batch)
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits.float()
        return kl_to_teacher(student(**inputs).logits.float(), teacher_logits)

    return train_parameters(student, trainable, batch_loss, steps, lr, progress, desc="router calibration")
