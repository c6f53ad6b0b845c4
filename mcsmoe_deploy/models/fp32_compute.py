"""Run a model held in bf16 or fp16 as if it were fp32, one part at a time.

A bf16 checkpoint loaded in fp32 takes twice its bytes. Held in its own dtype instead, each part
(every layer of a stack, and every other module with weights of its own: embeddings, final norm,
LM head) is upcast just before its forward and given its stored tensors back right after, so only
one layer is ever in fp32. bf16 and fp16 values are exact in fp32, so every forward computes what
the fp32-loaded model computes, bit for bit, on the same inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def compute_units(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """The parts upcast one at a time: (module, recursive). Each element of a ModuleList or ModuleDict
    (a layer of a stack) is one part with all its tensors; any other module with parameters of its own
    is a part with just those."""
    units: list[tuple[nn.Module, bool]] = []

    def visit(module: nn.Module) -> None:
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            units.extend((child, True) for child in module.children())
            return
        if any(True for _ in module.parameters(recurse=False)):
            units.append((module, False))
        for child in module.children():
            visit(child)

    visit(model)
    return units


def _held_tensors(module: nn.Module, recursive: bool) -> list[nn.Parameter]:
    """The floating parameters of a part that are not fp32."""
    return [p for p in module.parameters(recurse=recursive) if p.is_floating_point() and p.dtype != torch.float32]


@contextmanager
def computed_in_fp32(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model`'s forwards compute in fp32 while its weights stay in their dtype but for
    the part running (see the module docstring). A no-op for a model already in fp32. Not for training:
    the upcast copies are dropped after each part's forward, so gradients would not reach the weights."""
    if not any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        yield model
        return
    handles = []
    for module, recursive in compute_units(model):
        stored: dict[int, torch.Tensor] = {}

        def upcast(_module, _inputs, module=module, recursive=recursive, stored=stored):
            for param in _held_tensors(module, recursive):
                stored[id(param)] = param.data
                param.data = param.data.float()
            return None

        def restore(_module, _inputs, _output, module=module, recursive=recursive, stored=stored):
            for param in module.parameters(recurse=recursive):
                if id(param) in stored:
                    param.data = stored.pop(id(param))
            return None

        handles.append(module.register_forward_pre_hook(upcast))
        handles.append(module.register_forward_hook(restore, always_call=True))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["compute_units", "computed_in_fp32"]
