"""Checks a pruned model: the sparsity of every linear layer and whether every group obeys N:M."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunekit.arch import block_linears, decoder_layers


@dataclass
class LayerSparsity:
    name: str
    shape: tuple[int, int]
    sparsity: float
    nm_ok: bool | None
    bad_groups: int


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Groups of M consecutive inputs in a row holding more than N non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return rows * (cols // m + 1)
    nonzero = (weight.reshape(rows, cols // m, m) != 0).sum(-1)
    return int((nonzero > n).sum())


def check_weight(name: str, weight: torch.Tensor, n_m: tuple[int, int] | None = None,
                 dense: bool = False) -> LayerSparsity:
    """One projection's sparsity and, unless its block was kept ``dense``, its N:M check."""
    checked = n_m is not None and not dense
    bad = nm_violations(weight, *n_m) if checked else 0
    zeros = 1.0 - torch.count_nonzero(weight).item() / weight.numel()
    return LayerSparsity(name=name, shape=tuple(weight.shape), sparsity=zeros,
                         nm_ok=(bad == 0) if checked else None, bad_groups=bad)


def check_block(model, index: int, layer, n_m: tuple[int, int] | None = None,
                dense: bool = False) -> list[LayerSparsity]:
    """One block's projections: sparsity and, unless the block was kept ``dense``, the N:M check."""
    return [check_weight(f"layers.{index}.{name}", linear.weight.data, n_m, dense)
            for name, linear in block_linears(model, layer).items()]


def check_model(model, n_m: tuple[int, int] | None = None, dense_blocks=frozenset()) -> list[LayerSparsity]:
    """Every block projection's sparsity and N:M check; blocks in ``dense_blocks`` were kept dense
    on purpose (prunekit.pruning.partial): their N:M check is not applicable (None)."""
    return [row for i, layer in enumerate(decoder_layers(model))
            for row in check_block(model, i, layer, n_m, i in dense_blocks)]


def summarize(report: list[LayerSparsity]) -> dict:
    total = sum(r.shape[0] * r.shape[1] for r in report)
    zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in report)
    failing = [r.name for r in report if r.nm_ok is False]
    return {"linear_layers": len(report), "overall_sparsity": round(zeros / max(total, 1), 4),
            "min_sparsity": round(min((r.sparsity for r in report), default=0.0), 4),
            "max_sparsity": round(max((r.sparsity for r in report), default=0.0), 4),
            "nm_ok": None if all(r.nm_ok is None for r in report) else not failing,
            "nm_failing_layers": failing}
