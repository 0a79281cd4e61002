"""Keep-masks for unstructured and N:M pruning. True marks a weight that stays."""

from __future__ import annotations

import torch

from prunekit.errors import UserInputError


def keep_mask(scores: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None,
              per_row: bool = True) -> torch.Tensor:
    """Drop the lowest-scoring weights: within each output row (Wanda's comparison group), within
    the whole matrix (classic magnitude pruning), or keep the N best of every M consecutive inputs."""
    rows, cols = scores.shape
    if n_m is not None:
        n, m = n_m
        if cols % m:
            raise UserInputError(f"a layer with {cols} inputs cannot take pattern {n}:{m}: "
                                 f"{cols} is not a multiple of {m}")
        groups = scores.reshape(rows, cols // m, m)
        best = torch.topk(groups, n, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, best, True)
        return mask.reshape(rows, cols)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if per_row:
        drop = int(cols * sparsity)
        if drop:
            order = torch.sort(scores, dim=1, stable=True).indices[:, :drop]
            mask.scatter_(1, order, False)
    else:
        drop = int(scores.numel() * sparsity)
        if drop:
            order = torch.sort(scores.flatten(), stable=True).indices[:drop]
            mask.view(-1)[order] = False
    return mask


def wanda_mask(weight: torch.Tensor, x_norm: torch.Tensor, sparsity: float,
               n_m: tuple[int, int] | None = None) -> torch.Tensor:
    """Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output row."""
    return keep_mask(weight.abs() * x_norm.reshape(1, -1), sparsity, n_m, per_row=True)


def magnitude_mask(weight: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None) -> torch.Tensor:
    """The baseline: |W_ij| alone, compared over the whole layer."""
    return keep_mask(weight.abs(), sparsity, n_m, per_row=False)
