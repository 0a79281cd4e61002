"""FASP structured pruning (interlinked channels + closed-form restoration), on the shared engine.

Removing input column j of ``down_proj`` also removes output row j of ``gate_proj``/``up_proj``;
removing a value channel (kv head g, dim d) removes ``o_proj`` column (h, d) of every query head h
of group g. Columns are scored with Wanda's metric summed over the column, and the consuming layer's
kept columns are refit by ridge least squares when a held-out slice says the refit helps: down_proj
on XᵀX, o_proj on the covariance of its inputs (about their calibration mean) with its output mean
held at the cut's.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.arch import architecture_for, attention_shape
from prunekit.errors import UserInputError
from prunekit.pruning.engine import InputStats
from prunekit.pruning.restoration import KeptSystem, refit_kept
from prunekit.pruning.structure import (check_shapes, describe_structure, needs_structure_manifest,
                                        set_value_head_dim, shrink_linear)

GRANULARITIES = ("channels", "heads")


def column_scores(weight: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """FASP's column score: Σ_i |W_ij| · ‖X_j‖₂."""
    return (weight.abs() * x_norm.reshape(1, -1)).sum(0)


def kept_width(total: int, sparsity: float, multiple: int, up: bool = False) -> int:
    """Channels kept: total·(1 − sparsity) rounded to the nearest multiple, or up to one when ``up``
    (at least one multiple, never more than total); 0 when the ratio leaves less than one channel."""
    wanted = total * (1 - sparsity)
    if wanted < 1:
        return 0
    multiple = max(1, min(multiple, total))
    kept = (math.ceil(wanted / multiple - 1e-6) if up else math.floor(wanted / multiple + 0.5)) * multiple
    return min(max(kept, multiple), total)


@dataclass(frozen=True)
class Refit:
    """How a consumer's kept columns are refit: on XᵀX or on the covariance of its inputs about
    their calibration mean (``centered``), with the output mean held at the cut's (``hold_mean``),
    and how much of the held-out gain to give up for a more cut-like λ (``tolerance``)."""

    centered: bool = False
    hold_mean: bool = False
    tolerance: float = 0.0


@dataclass
class FaspPruner:
    sparsity: float
    granularity: str = "channels"
    channel_multiple: int = 32
    value_multiple: int = 4
    restore: bool = True
    held_out_fraction: float = 0.125
    lambdas: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    _digest: "hashlib._Hash" = field(default_factory=hashlib.sha256, repr=False)
    _restoration: list = field(default_factory=list, repr=False)
    _last_lambda: dict = field(default_factory=dict, repr=False)  # per refit rule: where the λ search starts
    _config: object = field(default=None, repr=False)

    # The method's refit rules (class constants: the benchmark's ablations are subclasses).
    # down_proj on XᵀX at its held-out optimum; o_proj about its inputs' mean (rebuilding the removed
    # value channels' calibration mean from the kept ones fits the calibration text and costs on
    # other text) with its output mean held where the cut leaves it, rather than drifting.
    MLP_REFIT = Refit()
    ATTENTION_REFIT = Refit(centered=True, hold_mean=True)
    # Each batch's XᵀX is a float32 GEMM already; summing a few dozen of them in float64 changes no
    # mask here (SmolLM2-135M's hash is the same) and costs 320 MB more at a 9k-wide MLP. SparseGPT,
    # whose updates go through H⁻¹, keeps float64.
    gram_dtype = torch.float32

    @property
    def needs_gram(self) -> bool:
        return self.restore

    @property
    def gram_groups(self) -> set[str]:
        """Only the consuming layers are refit: o_proj and down_proj inputs need XᵀX."""
        arch = architecture_for(self._config)  # set by validate(), which runs before any work
        return {f"{arch.attention}.{arch.o}", f"{arch.mlp}.{arch.down}"}

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise UserInputError(f"granularity '{self.granularity}' is not valid: use "
                                 f"{' or '.join(GRANULARITIES)}")
        if not self.restore:
            self.held_out_fraction = 0.0

    def widths(self, config) -> dict:
        heads, kv_heads, head_dim = attention_shape(config)
        widths = {"intermediate": kept_width(config.intermediate_size, self.sparsity, self.channel_multiple)}
        if self.granularity == "channels":
            # One step of 4 is 6% of a 64-wide head, and value channels cost far more quality per
            # parameter than MLP channels: round up, never cutting a head more than asked.
            widths["value_head_dim"] = kept_width(head_dim, self.sparsity, self.value_multiple, up=True)
        elif kv_heads > 1:  # whole key/value groups, their query heads with them
            widths["kv_heads"] = kv_heads - int(round(kv_heads * self.sparsity))
        else:  # one key/value head (multi-query): query heads, the shared key/value head stays
            widths["heads"] = heads - int(round(heads * self.sparsity))
        return widths

    def validate(self, model) -> None:
        """Refuse, before any work, a ratio that empties a layer or a granularity the model can't take."""
        self._config = model.config
        heads, kv_heads, head_dim = attention_shape(model.config)
        widths = self.widths(model.config)
        if widths["intermediate"] < 1:
            raise UserInputError(f"sparsity {self.sparsity:g} would remove every MLP channel "
                                 f"({model.config.intermediate_size} at a multiple of {self.channel_multiple}): "
                                 f"use a lower --sparsity")
        if self.sparsity > 0 and widths["intermediate"] >= model.config.intermediate_size:
            raise UserInputError(f"sparsity {self.sparsity:g} at a channel multiple of {self.channel_multiple} "
                                 f"keeps all {model.config.intermediate_size} MLP channels: use a smaller "
                                 f"--channel-multiple or a higher --sparsity")
        if widths.get("value_head_dim", 1) < 1:
            raise UserInputError(f"sparsity {self.sparsity:g} would remove every value channel of a "
                                 f"{head_dim}-wide head: use a lower --sparsity")
        if widths.get("kv_heads", 1) < 1:
            raise UserInputError(f"sparsity {self.sparsity:g} would remove all {kv_heads} key/value "
                                 f"heads: use a lower --sparsity")
        if widths.get("heads", 1) < 1:
            raise UserInputError(f"sparsity {self.sparsity:g} would remove all {heads} query heads: "
                                 f"use a lower --sparsity")

    def prune_block(self, index: int, block: nn.Module, linears: dict[str, nn.Linear],
                    stats: dict[str, InputStats]) -> dict:
        config = self._config
        arch = architecture_for(config)
        widths = self.widths(config)
        mlp, attention = block.get_submodule(arch.mlp), block.get_submodule(arch.attention)
        info = {"mlp": self._prune_mlp(mlp, arch, stats[f"{arch.mlp}.{arch.down}"], widths["intermediate"])}
        o_stats = stats[f"{arch.attention}.{arch.o}"]
        if self.granularity == "channels":
            info["attention"] = self._prune_values(attention, arch, config, o_stats, widths["value_head_dim"])
        elif "kv_heads" in widths:
            info["attention"] = self._prune_heads(attention, arch, config, o_stats, widths["kv_heads"])
        else:
            info["attention"] = self._prune_query_heads(attention, arch, config, o_stats, widths["heads"])
        return info

    def _scores(self, weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
        return column_scores(weight.float().cpu(), stats.norm)  # indices are built on the CPU

    def _refit(self, consumer: nn.Linear, keep: torch.Tensor, stats: InputStats, rule: Refit):
        if not self.restore:
            return consumer.weight.data[:, keep.to(consumer.weight.device)], {"lambda": None, "reason": "restoration off"}
        mean = stats.mean if rule.centered else None
        # Built a part at a time, each statistic freed once read (this refit is their only reader):
        # the held-out rows, then the Gram, never beside the whole system.
        system = KeptSystem.cut_of(consumer.weight.data, keep, stats.held_rows)
        if system.held:
            system.take_held_rows(consumer.weight.data, keep, stats.held_rows, mean)
            stats.release_held_rows()
            system.take_gram(consumer.weight.data, keep, stats.covariance if rule.centered else stats.gram)
        stats.release_grams()
        weight, info = refit_kept(system, keep, self.lambdas, rule.tolerance, mean if rule.hold_mean else None,
                                  consumer.weight.device, consumer.weight.dtype, self._last_lambda.get(rule))
        if info["lambda"] is not None:
            self._last_lambda[rule] = info["lambda"]
        return weight, info

    def _record(self, kind: str, keep: torch.Tensor, info: dict):
        self._digest.update(kind.encode() + keep.cpu().numpy().astype("int64").tobytes())
        self._restoration.append(info.get("lambda"))

    def _prune_mlp(self, mlp, arch, stats: InputStats, kept: int) -> dict:
        down = mlp.get_submodule(arch.down)
        scores = self._scores(down.weight.data, stats)
        keep = torch.sort(torch.topk(scores, kept).indices).values
        weight, info = self._refit(down, keep, stats, self.MLP_REFIT)
        setattr(mlp, arch.gate, shrink_linear(mlp.get_submodule(arch.gate), rows=keep))
        setattr(mlp, arch.up, shrink_linear(mlp.get_submodule(arch.up), rows=keep))
        setattr(mlp, arch.down, shrink_linear(down, weight=weight))
        self._record("mlp", keep, info)
        return {"kept": kept, **info}

    def _prune_values(self, attention, arch, config, stats: InputStats, v_dim: int) -> dict:
        heads, kv_heads, head_dim = attention_shape(config)
        old_dim = getattr(attention, "v_head_dim", head_dim)
        if v_dim >= old_dim:
            return {"value_head_dim": old_dim}
        o = attention.get_submodule(arch.o)
        col = self._scores(o.weight.data, stats).reshape(heads, old_dim)
        group = heads // kv_heads
        # A value channel of kv head g feeds the same dim of every query head of group g.
        per_kv = col.reshape(kv_heads, group, old_dim).sum(1)
        keep_dims = torch.sort(torch.topk(per_kv, v_dim, dim=1).indices, dim=1).values  # (kv, v_dim)
        offsets = torch.arange(kv_heads).unsqueeze(1) * old_dim
        v_rows = (keep_dims + offsets).reshape(-1)
        o_dims = keep_dims.repeat_interleave(group, dim=0)  # (heads, v_dim)
        o_cols = (o_dims + torch.arange(heads).unsqueeze(1) * old_dim).reshape(-1)
        weight, info = self._refit(o, o_cols, stats, self.ATTENTION_REFIT)
        setattr(attention, arch.v, shrink_linear(attention.get_submodule(arch.v), rows=v_rows))
        setattr(attention, arch.o, shrink_linear(o, weight=weight))
        set_value_head_dim(attention, v_dim)
        self._record("values", v_rows, info)
        return {"value_head_dim": v_dim, **info}

    def _prune_heads(self, attention, arch, config, stats: InputStats, kept_kv: int) -> dict:
        heads, kv_heads, head_dim = attention_shape(config)
        current_kv = attention.get_submodule(arch.k).out_features // head_dim
        if kept_kv >= current_kv:
            return {"kv_heads": current_kv}
        group = heads // kv_heads
        o = attention.get_submodule(arch.o)
        col = self._scores(o.weight.data, stats)
        per_kv = col.reshape(current_kv, group * head_dim).sum(1)
        keep_kv = torch.sort(torch.topk(per_kv, kept_kv).indices).values
        dims = torch.arange(head_dim)
        kv_rows = (keep_kv.unsqueeze(1) * head_dim + dims).reshape(-1)
        keep_q = (keep_kv.unsqueeze(1) * group + torch.arange(group)).reshape(-1)
        q_rows = (keep_q.unsqueeze(1) * head_dim + dims).reshape(-1)
        weight, info = self._refit(o, q_rows, stats, self.ATTENTION_REFIT)
        for name, rows in ((arch.q, q_rows), (arch.k, kv_rows), (arch.v, kv_rows)):
            setattr(attention, name, shrink_linear(attention.get_submodule(name), rows=rows))
        setattr(attention, arch.o, shrink_linear(o, weight=weight))
        self._record("heads", keep_kv, info)
        return {"kv_heads": kept_kv, **info}

    def _prune_query_heads(self, attention, arch, config, stats: InputStats, kept: int) -> dict:
        """One key/value head serves every query head: remove the query heads (q rows, o columns)
        whose o inputs score least; the key/value head and the cache stay."""
        heads, _, head_dim = attention_shape(config)
        if kept >= heads:
            return {"heads": heads}
        o = attention.get_submodule(arch.o)
        per_head = self._scores(o.weight.data, stats).reshape(heads, head_dim).sum(1)
        keep = torch.sort(torch.topk(per_head, kept).indices).values
        rows = (keep.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)
        weight, info = self._refit(o, rows, stats, self.ATTENTION_REFIT)
        setattr(attention, arch.q, shrink_linear(attention.get_submodule(arch.q), rows=rows))
        setattr(attention, arch.o, shrink_linear(o, weight=weight))
        attention.num_key_value_groups = kept  # transformers repeats the one kv head this often
        self._record("query_heads", keep, info)
        return {"heads": kept, **info}

    def finish(self, model) -> dict:
        """Write the new widths into the config, check every shape, describe what the config can't."""
        widths = self.widths(model.config)
        heads, kv_heads, head_dim = attention_shape(model.config)
        model.config.intermediate_size = widths["intermediate"]
        if "kv_heads" in widths:
            model.config.num_key_value_heads = widths["kv_heads"]
            model.config.num_attention_heads = widths["kv_heads"] * (heads // kv_heads)
            model.config.head_dim = head_dim
        if "heads" in widths:
            model.config.num_attention_heads = widths["heads"]
            model.config.head_dim = head_dim
        check_shapes(model)
        refits = [lam for lam in self._restoration if lam is not None]
        details = {"granularity": self.granularity, "widths": widths,
                   "restoration": {"enabled": self.restore, "refit_layers": len(refits),
                                   "total_layers": len(self._restoration),
                                   "lambdas_chosen": sorted({str(lam) for lam in self._restoration})}}
        if needs_structure_manifest(model):
            details["structure"] = describe_structure(model)
        return details

    def mask_hash(self) -> str:
        return self._digest.hexdigest()
