"""Non-uniform sparsity across blocks for unstructured targets (OWL, Yin et al. ICML 2024).

Blocks whose weights carry more outliers (scores |W_ij|·‖X_j‖ far above their block's mean) lose
more to pruning: they keep more weights, the others fewer, and the mean sparsity is the one asked.
The outlier shares come from the dense model on a batch of calibration tokens, before any block is
pruned (prunekit.pruning.engine.dense_pass); N:M fixes every row's sparsity, so it does not apply.
"""

from __future__ import annotations

import torch

OUTLIER_MULTIPLE = 5.0  # a score is an outlier above this multiple of its block's mean score (OWL's M)
PLANNING_BATCHES = 1  # calibration batches the dense pass runs: the shares settle on a few thousand tokens


def outlier_share(linears: dict, stats: dict, multiple: float = OUTLIER_MULTIPLE) -> float:
    """The share of the block's Wanda scores above ``multiple`` × their mean."""
    scores = torch.cat([(linear.weight.detach().abs().float() * stats[name].norm.to(linear.weight.device)).flatten()
                        for name, linear in linears.items()])
    return float((scores > multiple * scores.mean()).float().mean())


def block_sparsities(shares: list[float], sparsity: float, spread: float) -> list[float]:
    """Per-block sparsity: ``sparsity`` ± ``spread``, least where the outlier share is largest,
    centred so that the mean over blocks is exactly ``sparsity`` (OWL's λ is ``spread``)."""
    shares_t = torch.tensor(shares, dtype=torch.float64)
    width = float(shares_t.max() - shares_t.min())
    if width == 0 or spread == 0:
        return [sparsity] * len(shares)
    keep = (shares_t - shares_t.min()) / width * 2 * spread
    keep = keep - keep.mean() + (1 - sparsity)
    return [round(1 - float(k), 6) for k in keep]
