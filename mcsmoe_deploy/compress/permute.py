"""Neuron permutation alignment (weight matching) of an expert to a reference expert.

An expert's hidden neurons can be reordered without changing its function:
permute the rows of its input projections (gate/up, or wi) and the columns of
its output projection (down, or wo) alike. Weight matching picks the
permutation that maximises the inner product with the reference expert,

    C = sum_in W_ref @ W_member^T  +  sum_out W_ref^T @ W_member      [I, I]

solved exactly with scipy's linear_sum_assignment.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from ..models import ExpertLayout, ExpertWeights


def alignment_permutation(reference: ExpertWeights, member: ExpertWeights, layout: ExpertLayout) -> torch.Tensor:
    """Permutation [I] such that `member`'s neuron perm[i] is matched to `reference`'s neuron i."""
    device = reference[layout.input_projections[0]].device
    cost = torch.zeros(layout.intermediate_size, layout.intermediate_size, dtype=torch.float64, device=device)
    for name in layout.input_projections:
        cost += reference[name].double() @ member[name].double().T
    for name in layout.output_projections:
        cost += reference[name].double().T @ member[name].double()
    rows, cols = linear_sum_assignment(cost.cpu().numpy(), maximize=True)
    permutation = torch.empty(layout.intermediate_size, dtype=torch.long)
    permutation[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return permutation.to(device)


def permute_expert(expert: ExpertWeights, permutation: torch.Tensor, layout: ExpertLayout) -> ExpertWeights:
    """The same function with its hidden neurons reordered: neuron i of the result is `permutation[i]`."""
    permuted = {}
    for name in layout.input_projections:
        permuted[name] = expert[name][permutation]
    for name in layout.output_projections:
        permuted[name] = expert[name][:, permutation]
    return permuted


def align_to(reference: ExpertWeights, member: ExpertWeights, layout: ExpertLayout) -> ExpertWeights:
    """`member` with its neurons reordered to match `reference` as closely as possible."""
    return permute_expert(member, alignment_permutation(reference, member, layout), layout)
