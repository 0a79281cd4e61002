"""Block pruners that zero single weights (Wanda, SparseGPT, magnitude) on the shared engine."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.pruning.engine import InputStats
from prunekit.pruning.masks import magnitude_mask, wanda_mask
from prunekit.pruning.sparsegpt import sparsegpt_prune


def relative_output_error(before: torch.Tensor, after: torch.Tensor, sumsq: torch.Tensor) -> float:
    """‖(W − W')X‖² / ‖WX‖² with cross-channel terms dropped (Wanda's diagonal view: Σ ΔW²‖X_j‖²
    over Σ W²‖X_j‖²): how much of the layer's output the pruning removed, comparable across layers."""
    weights = sumsq.to(torch.float64)
    lost = ((before.double() - after.double()) ** 2 * weights).sum()
    return round(float(lost / (before.double() ** 2 * weights).sum().clamp(min=1e-30)), 6)


@dataclass
class UnstructuredPruner:
    method: str  # wanda | sparsegpt | magnitude
    sparsity: float
    n_m: tuple[int, int] | None = None
    held_out_fraction: float = 0.0
    _digest: "hashlib._Hash" = field(default_factory=hashlib.sha256, repr=False)

    @property
    def needs_gram(self) -> bool:
        return self.method == "sparsegpt"

    def prune_block(self, index: int, block: nn.Module, linears: dict[str, nn.Linear],
                    stats: dict[str, InputStats]) -> dict:
        zeroed, errors = {}, {}
        for name, linear in linears.items():
            weight = linear.weight.data
            before = weight.clone()
            if self.method == "wanda":
                mask = wanda_mask(weight, stats[name].norm.to(weight.device), self.sparsity, self.n_m)
                weight.mul_(mask)
            elif self.method == "magnitude":
                mask = magnitude_mask(weight, self.sparsity, self.n_m)
                weight.mul_(mask)
            elif self.method == "sparsegpt":
                new_weight, mask = sparsegpt_prune(weight.cpu(), stats[name].gram, self.sparsity, self.n_m)
                weight.copy_(new_weight.to(weight.device))
            else:
                raise ValueError(f"unknown unstructured method {self.method}")
            self._digest.update(f"{index}.{name}".encode())
            self._digest.update(mask.cpu().numpy().tobytes())
            zeroed[name] = round(1 - mask.float().mean().item(), 4)
            errors[name] = relative_output_error(before, weight, stats[name].sumsq.to(weight.device))
        return {"sparsity": zeroed, "error": errors}

    def mask_hash(self) -> str:
        """One hash over every mask, in order: equal hashes mean identical masks run to run."""
        return self._digest.hexdigest()
