"""SparseGPT (Frantar & Alistarh 2023): prune column by column and push each column's error onto
the columns not yet visited, through the inverse Hessian of the layer's inputs."""

from __future__ import annotations

import torch


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    n_m: tuple[int, int] | None = None, blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (updated weight, keep-mask). ``hessian`` is X Xᵀ over the layer's calibration inputs."""
    W = weight.detach().to(torch.float64).clone()
    H = hessian.detach().to(torch.float64).clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    # Upper Cholesky factor of H⁻¹: row i holds the update direction once columns < i are fixed.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    mask = torch.ones_like(W, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        W1, Hinv1 = W[:, start:end].clone(), Hinv[start:end, start:end]
        d = torch.diag(Hinv1)
        err = torch.zeros_like(W1)
        mask1 = torch.ones_like(W1, dtype=torch.bool)
        if n_m is None:
            # Adaptive selection: the block's lowest saliency w²/[H⁻¹]²_ii, over the whole block.
            saliency = W1 ** 2 / d.reshape(1, -1) ** 2
            drop = int(saliency.numel() * sparsity)
            if drop:
                order = torch.sort(saliency.flatten(), stable=True).indices[:drop]
                mask1.view(-1)[order] = False
        for i in range(end - start):
            if n_m is not None and i % n_m[1] == 0:
                n, m = n_m
                saliency = W1[:, i:i + m] ** 2 / d[i:i + m].reshape(1, -1) ** 2
                worst = torch.topk(saliency, m - n, dim=1, largest=False).indices
                mask1[:, i:i + m].scatter_(1, worst, False)
            w = W1[:, i]
            q = torch.where(mask1[:, i], w, torch.zeros_like(w))
            e = (w - q) / d[i]
            W1[:, i:] -= e.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            err[:, i] = e
        W[:, start:end] = W1
        mask[:, start:end] = mask1
        W[:, end:] -= err @ Hinv[start:end, end:]
    W[~mask] = 0
    return W.to(weight.dtype), mask
