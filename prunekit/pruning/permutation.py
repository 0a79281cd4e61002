"""Channel permutations before N:M grouping, where they change nothing the model computes.

An N:M mask keeps N of every M *consecutive* inputs of each row. When two loud input channels sit in
one group, every row must drop one of them. Two orders are free to choose: the MLP's intermediate
channels (``down_proj``'s inputs, with the rows of ``gate_proj``/``up_proj`` and their biases) and
the value channels within a key/value head (``v_proj``'s rows, with the matching ``o_proj`` columns
of every query head that reads that key/value head). Each is dealt so every group of M holds one
channel of each importance band (importance: ‖X_j‖²·‖W_:,j‖², the Wanda energy of the column).
The model stays an ordinary checkpoint of the same shapes; only the order of its channels moves.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.arch import architecture_for, attention_shape


def balanced_order(importance: torch.Tensor, m: int) -> torch.Tensor:
    """A channel order (new position → old channel) in which group g of M consecutive positions
    gets the channels ranked g, 2G−1−g, 2G+g, … (G groups): one from each band of G, dealt in a
    snake so the groups' total importance stays even. Ties break by channel index."""
    channels = importance.numel()
    groups = channels // m
    ranked = torch.sort(importance.double(), descending=True, stable=True).indices
    rank = torch.arange(channels)
    band, within = rank // groups, rank % groups
    group = torch.where(band % 2 == 0, within, groups - 1 - within)
    order = torch.empty_like(ranked)
    order[group * m + band] = ranked
    return order


def _reorder_rows_(linear: nn.Linear, order: torch.Tensor) -> None:
    linear.weight.data = linear.weight.data[order.to(linear.weight.device)]
    if linear.bias is not None:
        linear.bias.data = linear.bias.data[order.to(linear.bias.device)]


def _reorder_columns_(linear: nn.Linear, order: torch.Tensor) -> None:
    linear.weight.data = linear.weight.data[:, order.to(linear.weight.device)]


def column_importance(weight: torch.Tensor, sumsq: torch.Tensor) -> torch.Tensor:
    """‖X_j‖²·‖W_:,j‖² per input column j."""
    return weight.detach().float().square().sum(0).cpu().double() * sumsq.double().cpu()


def value_orders(o_importance: torch.Tensor, heads: int, kv_heads: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The value channels' balanced order within each key/value head, from the importance of
    ``o_proj``'s input columns (summed over the query heads that read each key/value head):
    (``v_proj`` row order, ``o_proj`` column order)."""
    value_dim = o_importance.numel() // heads
    importance = o_importance.reshape(heads, value_dim)
    per_group = heads // kv_heads
    orders = [balanced_order(importance[g * per_group:(g + 1) * per_group].sum(0), m) for g in range(kv_heads)]
    v_order = torch.cat([g * value_dim + order for g, order in enumerate(orders)])
    o_order = torch.cat([h * value_dim + orders[h // per_group] for h in range(heads)])
    return v_order, o_order


def permute_block_(block: nn.Module, config, stats: dict, m: int) -> dict:
    """Reorder ``block``'s MLP and value channels in place for groups of ``m``, and the input
    statistics of ``down_proj`` and ``o_proj`` (``stats``, by linear name) with them. Returns the
    orders applied (the mask hash includes them)."""
    arch = architecture_for(config)
    mlp, attention = block.get_submodule(arch.mlp), block.get_submodule(arch.attention)
    applied = {}
    down = mlp.get_submodule(arch.down)
    if down.in_features % m == 0:
        name = f"{arch.mlp}.{arch.down}"
        order = balanced_order(column_importance(down.weight, stats[name].sumsq), m)
        for producer in (arch.gate, arch.up):
            _reorder_rows_(mlp.get_submodule(producer), order)
        _reorder_columns_(down, order)
        stats[name].permute_(order)
        applied["mlp"] = order
    heads, kv_heads, _ = attention_shape(config)
    v, o = attention.get_submodule(arch.v), attention.get_submodule(arch.o)
    value_dim = v.out_features // kv_heads  # narrower than head_dim after FASP's value pruning
    if value_dim % m == 0:
        name = f"{arch.attention}.{arch.o}"
        v_order, o_order = value_orders(column_importance(o.weight, stats[name].sumsq), heads, kv_heads, m)
        _reorder_rows_(v, v_order)
        _reorder_columns_(o, o_order)
        stats[name].permute_(o_order)
        applied["values"] = v_order
    return applied
