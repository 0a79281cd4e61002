"""Block pruners that zero single weights (Wanda, SparseGPT, magnitude) on the shared engine."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from torch import nn

from prunekit.pruning.engine import InputStats
from prunekit.pruning.masks import magnitude_mask, wanda_mask
from prunekit.pruning.sparsegpt import sparsegpt_prune


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
        zeroed = {}
        for name, linear in linears.items():
            weight = linear.weight.data
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
        return {"sparsity": zeroed}

    def mask_hash(self) -> str:
        """One hash over every mask, in order: equal hashes mean identical masks run to run."""
        return self._digest.hexdigest()
