"""Block pruners that zero single weights (Wanda, SparseGPT, ADMM reconstruction, magnitude) on the
shared engine."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.errors import UserInputError
from prunekit.pruning.engine import InputStats, stat_groups
from prunekit.pruning.layer_sparsity import PLANNING_BATCHES, block_sparsities, outlier_share
from prunekit.pruning.masks import magnitude_mask, wanda_mask
from prunekit.pruning.permutation import permute_block_
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
    permute: bool = False  # N:M: deal the MLP and value channels into balanced groups first
    outlier_spread: float = 0.0  # unstructured: per-block sparsity ± this by outlier share (OWL); 0: uniform
    _digest: "hashlib._Hash" = field(default_factory=hashlib.sha256, repr=False)
    _config: object = field(default=None, repr=False)
    _block_sparsity: list = field(default=None, repr=False)

    @property
    def plan_blocks(self):
        """The engine's dense pass before pruning, when the blocks' sparsities come from it."""
        if not self.outlier_spread:  # refused with N:M (__post_init__)
            return None
        return PLANNING_BATCHES, lambda _index, linears, stats: outlier_share(linears, stats), self._take_shares

    def _take_shares(self, shares: list[float]) -> None:
        self._block_sparsity = block_sparsities(shares, self.sparsity, self.outlier_spread)
        self._digest.update(repr(self._block_sparsity).encode())

    def block_sparsity(self, index: int) -> float:
        return self._block_sparsity[index] if self._block_sparsity else self.sparsity

    def validate(self, model) -> None:
        self._config = model.config

    def finish(self, model) -> dict:
        """What the manifest and report add: the parts of the method and the blocks' sparsities."""
        details = {"permuted": True} if self.permute else {}
        if self._block_sparsity:
            details["block_sparsity"] = self._block_sparsity
        return details

    def __post_init__(self):
        if self.permute and not self.n_m:
            raise UserInputError("channel permutation applies to N:M patterns: drop permute or use --pattern 2:4")
        if self.outlier_spread and self.n_m:
            raise UserInputError("N:M fixes every row's sparsity: per-block sparsity (outlier_spread) needs "
                                 "--pattern unstructured")
        if not 0 <= self.outlier_spread < min(self.sparsity, 1 - self.sparsity) + 1e-9:
            raise UserInputError(f"outlier_spread {self.outlier_spread:g} must lie in [0, "
                                 f"{min(self.sparsity, 1 - self.sparsity):g}) at sparsity {self.sparsity:g}")
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
        if self.permute:  # N:M only (__post_init__)
            for part, order in permute_block_(block, self._config, stats, self.n_m[1]).items():
                self._digest.update(f"{index}.{part}".encode())
                self._digest.update(order.numpy().tobytes())
        sparsity = self.block_sparsity(index)
        if self.method == "admm":
            return self._reconstruct_block(index, linears, stats, sparsity)
        zeroed, errors = {}, {}
        for name, linear in linears.items():
            weight = linear.weight.data
            before = weight.clone()
            if self.method == "wanda":
                mask = wanda_mask(weight, stats[name].norm.to(weight.device), sparsity, self.n_m)
                weight.mul_(mask)
            elif self.method == "magnitude":
                mask = magnitude_mask(weight, sparsity, self.n_m)
                weight.mul_(mask)
            elif self.method == "sparsegpt":
                new_weight, mask = sparsegpt_prune(weight.cpu(), stats[name].gram, sparsity, self.n_m)
                weight.copy_(new_weight.to(weight.device))
            else:
                raise ValueError(f"unknown unstructured method {self.method}")
            zeroed[name], errors[name] = self._record(f"{index}.{name}", mask, before, weight, stats[name])
        return {"sparsity": zeroed, "error": errors}

    def _record(self, key: str, mask: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                stats: InputStats) -> tuple[float, float]:
        """A pruned layer's mask into the mask hash; returns its block record: (share zeroed,
        relative output error)."""
        self._digest.update(key.encode())
        self._digest.update(mask.cpu().numpy().tobytes())
        return (round(1 - mask.float().mean().item(), 4),
                relative_output_error(before, after, stats.sumsq.to(after.device)))

    def _reconstruct_block(self, index: int, linears: dict[str, nn.Linear], stats: dict[str, InputStats],
                           sparsity: float) -> dict:
        """Layers that read the same inputs (q/k/v, gate/up) are solved as one stack of rows: one
        Gram, one eigendecomposition, one λ."""
        zeroed, errors, lambdas = {}, {}, {}
        for group_stats, names in stat_groups(stats):
            weights = [linears[n].weight.data for n in names]
            stacked = torch.cat([w.detach().cpu().float() for w in weights])
            new, mask, info = reconstruct(stacked, group_stats.gram, group_stats.held_rows, sparsity, self.n_m)
            group_stats.release_grams()
            for name, weight, part, keep in zip(names, weights, new.split([w.shape[0] for w in weights]),
                                                mask.split([w.shape[0] for w in weights])):
                before = weight.clone()
                weight.copy_(part.to(weight.device, weight.dtype))
                zeroed[name], errors[name] = self._record(f"{index}.{name}", keep, before, weight, group_stats)
                lambdas[name] = info["lambda"]
        return {"sparsity": zeroed, "error": errors, "lambda": lambdas}

    def mask_hash(self) -> str:
        """One hash over every mask, in order: equal hashes mean identical masks run to run."""
        return self._digest.hexdigest()
