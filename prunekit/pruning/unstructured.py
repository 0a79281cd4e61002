"""Block pruners that zero single weights (Wanda, SparseGPT, ADMM reconstruction, magnitude) on the
shared engine."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.pruning.engine import InputStats
from prunekit.pruning.masks import magnitude_mask, wanda_mask
from prunekit.pruning.reconstruction import reconstruct
from prunekit.pruning.sparsegpt import sparsegpt_prune


def relative_output_error(before: torch.Tensor, after: torch.Tensor, sumsq: torch.Tensor) -> float:
    """‖(W − W')X‖² / ‖WX‖² with cross-channel terms dropped (Wanda's diagonal view: Σ ΔW²‖X_j‖²
    over Σ W²‖X_j‖²): how much of the layer's output the pruning removed, comparable across layers."""
    weights = sumsq.to(torch.float64)
    lost = ((before.double() - after.double()) ** 2 * weights).sum()
    return round(float(lost / (before.double() ** 2 * weights).sum().clamp(min=1e-30)), 6)


@dataclass
class UnstructuredPruner:
    method: str  # wanda | sparsegpt | admm | magnitude
    sparsity: float
    n_m: tuple[int, int] | None = None
    held_out_fraction: float = 0.0
    _digest: "hashlib._Hash" = field(default_factory=hashlib.sha256, repr=False)

    def __post_init__(self):
        if self.method == "admm" and not self.held_out_fraction:
            self.held_out_fraction = 0.125  # the refit's λ is chosen on these tokens

    @property
    def needs_gram(self) -> bool:
        return self.method in ("sparsegpt", "admm")

    @property
    def gram_dtype(self) -> torch.dtype:
        # SparseGPT's updates go through H⁻¹ in float64; ADMM normalizes the Gram and solves in float32
        return torch.float32 if self.method == "admm" else torch.float64

    def prune_block(self, index: int, block: nn.Module, linears: dict[str, nn.Linear],
                    stats: dict[str, InputStats]) -> dict:
        if self.method == "admm":
            return self._reconstruct_block(index, linears, stats)
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

    def _reconstruct_block(self, index: int, linears: dict[str, nn.Linear], stats: dict[str, InputStats]) -> dict:
        """Layers that read the same inputs (q/k/v, gate/up) are solved as one stack of rows: one
        Gram, one eigendecomposition, one λ."""
        zeroed, errors, lambdas = {}, {}, {}
        groups: dict[int, list[str]] = {}
        for name in linears:
            groups.setdefault(id(stats[name]), []).append(name)
        for names in groups.values():
            group_stats = stats[names[0]]
            weights = [linears[n].weight.data for n in names]
            stacked = torch.cat([w.detach().cpu().float() for w in weights])
            new, mask, info = reconstruct(stacked, group_stats.gram, group_stats.held_rows, self.sparsity, self.n_m)
            group_stats.release_grams()
            for name, weight, part, keep in zip(names, weights, new.split([w.shape[0] for w in weights]),
                                                mask.split([w.shape[0] for w in weights])):
                before = weight.clone()
                weight.copy_(part.to(weight.device, weight.dtype))
                self._digest.update(f"{index}.{name}".encode())
                self._digest.update(keep.cpu().numpy().tobytes())
                zeroed[name] = round(1 - keep.float().mean().item(), 4)
                errors[name] = relative_output_error(before, weight, group_stats.sumsq.to(weight.device))
                lambdas[name] = info["lambda"]
        return {"sparsity": zeroed, "error": errors, "lambda": lambdas}

    def mask_hash(self) -> str:
        """One hash over every mask, in order: equal hashes mean identical masks run to run."""
        return self._digest.hexdigest()
