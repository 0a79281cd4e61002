"""Activation-aware 4-bit weights for ONNX Runtime's MatMulNBits (after AWQ, Lin et al. 2024,
and GPTQ, Frantar et al. 2023).

Round-to-nearest INT4 spends its 16 levels evenly, while a projection's error is dominated by the
few input channels that carry large activations. Two steps on a copy of the model make ONNX
Runtime's own symmetric round-to-nearest land on a better grid:

1. per input channel, scale the weights up by s = mean|x|^a and the producer down by 1/s (the
   RMSNorm before q/k/v, before gate/up and before lm_head; up_proj's rows before down_proj), the
   exponent a chosen per group from a small grid on calibration inputs; the float model computes
   the same function;
2. round the scaled weights onto ONNX Runtime's grid with GPTQ (prunekit.gptq: per block of 32
   inputs a clipped scale, each column's rounding error moved onto the columns not yet rounded
   through the inputs' Gram); ONNX Runtime, re-deriving each block's scale from these weights,
   keeps exactly their integers, so the fast kernel runs them.

Measured on the default model, every projection at 4 bits (`python bench/int4_rounding.py`: 8
WikiText-2 test windows, torch emulation of the grid, fitted on 8 x 256 tokens): round-to-nearest
+40.4% perplexity, scaling with the per-block clipping this replaced +24.0%, scaling with GPTQ
+18.0%; fitted on 64 x 256 tokens as deploy does, +11.5%, and int4-mixed +5.5% (docs/search.md).
Hand-written because AutoAWQ and
llm-compressor write their own checkpoint formats and need a GPU, and ONNX Runtime's calibrated
4-bit quantizers either keep float zero points (a kernel 10x slower here) or need a separate
toolkit.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from prunekit.arch import architecture_for, decoder_layers
from prunekit.gptq import BLOCK, gptq_int4

EXPONENTS = tuple(i / 10 for i in range(10))
TOKENS = 1024  # calibration tokens per group: enough to rank 10 exponents, cheap to multiply
RANK_ROWS = 256  # output rows (evenly strided) that rank the exponents: the 49k-row head needs no more


def int4_round(weight: torch.Tensor) -> torch.Tensor:
    """ONNX Runtime's symmetric 4-bit round-to-nearest per block of BLOCK inputs: the
    largest-magnitude value maps to -8, levels -8..7. Rows whose width is not whole blocks are
    returned as they are (the ONNX quantizer pads them; close enough for ranking)."""
    rows, cols = weight.shape
    if cols % BLOCK:
        return weight
    blocks = weight.reshape(rows, cols // BLOCK, BLOCK)
    peak = torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True))
    scale = torch.where(peak == 0, torch.ones_like(peak), peak / -8)
    return ((blocks / scale).round().clamp(-8, 7) * scale).reshape(rows, cols)


def channel_scale(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The per-input-channel scale (mean|x|^a, a from EXPONENTS) whose 4-bit rounding of
    ``weights`` reproduces their outputs on ``x`` best: the least ‖x Δᵀ‖² summed over the
    weights, Δ = round(w·s)/s − w (the scaled input x/s meets the rounded scaled weight). With
    fewer input channels than tokens, through the Gram xᵀx: tr(Δ xᵀx Δᵀ) costs outputs × inputs²
    instead of outputs × inputs × tokens. The error is summed over RANK_ROWS evenly strided rows
    of each weight: it only ranks exponents, and the default model's 49k-row head cost 33 GFLOP
    per exponent in full."""
    magnitude = x.abs().mean(0).clamp(min=1e-5)
    gram = x.T @ x if x.shape[1] < x.shape[0] else None

    def error_of(delta: torch.Tensor) -> float:
        if gram is None:
            return float((x @ delta.T).pow(2).sum())
        return float(((delta @ gram) * delta).sum())

    weights = [w[::max(1, w.shape[0] // RANK_ROWS)] for w in weights]
    best, best_error = torch.ones_like(magnitude), float("inf")
    for exponent in EXPONENTS:
        s = magnitude ** exponent
        s = s / (s.max() * s.min()).sqrt()
        error = sum(error_of(int4_round(w * s) / s - w) for w in weights)
        if error < best_error:
            best, best_error = s, error
    return best


def _groups(model: nn.Module) -> list[tuple[str, nn.Module, list[nn.Linear]]]:
    """(kind, producer, consumers): each consumer group shares one input, made by the producer,
    whose output channels absorb 1/s: an RMSNorm's weight, or up_proj's rows for down_proj."""
    arch = architecture_for(model.config)
    groups = []
    for layer in decoder_layers(model):
        attention, mlp = layer.get_submodule(arch.attention), layer.get_submodule(arch.mlp)
        groups.append(("norm", layer.get_submodule(arch.input_norm),
                       [attention.get_submodule(getattr(arch, r)) for r in ("q", "k", "v")]))
        groups.append(("norm", layer.get_submodule(arch.mlp_norm),
                       [mlp.get_submodule(arch.gate), mlp.get_submodule(arch.up)]))
        groups.append(("rows", mlp.get_submodule(arch.up), [mlp.get_submodule(arch.down)]))
    groups.append(("norm", model.get_submodule(arch.final_norm), [model.get_submodule(arch.head)]))
    return groups


@torch.no_grad()
def _sample_inputs(model: nn.Module, modules: list[nn.Module], windows: torch.Tensor, tokens: int,
                   seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``tokens`` input rows of each module, sampled (seeded) from a forward over ``windows``, and
    the Gram XᵀX of all its input rows (GPTQ's), summed a window at a time: the rows themselves are
    never all held (64 windows of 256 tokens would be 6 GB of them on the default model)."""
    length = windows.shape[1]
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(windows.shape[0] * length, generator=generator)[:tokens]
    sampled: list[torch.Tensor | None] = [None] * len(modules)
    grams: list[torch.Tensor | None] = [None] * len(modules)

    def keep(i: int, inputs) -> None:
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        if sampled[i] is None:
            sampled[i] = x.new_empty(len(rows), x.shape[1])
        here = (rows >= window * length) & (rows < (window + 1) * length)
        sampled[i][here] = x[rows[here] - window * length]
        grams[i] = x.T @ x if window == 0 else grams[i].add_(x.T @ x)

    hooks = [m.register_forward_hook(lambda _m, inp, _o, i=i: keep(i, inp)) for i, m in enumerate(modules)]
    try:
        for window, ids in enumerate(windows):
            model(ids[None])
    finally:
        for hook in hooks:
            hook.remove()
    return sampled, grams


@torch.no_grad()
def _prepare(model: nn.Module, windows: torch.Tensor, seed: int, eight_bit: tuple[str, ...],
             round_eight_bit: bool) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The prepared copy. Projections named in ``eight_bit`` stay scaled but not rounded, or with
    ``round_eight_bit`` are rounded like the rest and their scaled, unrounded weights returned too
    (by qualified name)."""
    out = copy.deepcopy(model)
    head = out.get_submodule(architecture_for(out.config).head)
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    named = {id(m): name for name, m in out.named_modules() if name.rsplit(".", 1)[-1] in eight_bit}
    unrounded: dict[str, torch.Tensor] = {}
    groups = _groups(out)
    grouped = {id(c) for _, _, consumers in groups for c in consumers}
    alone = [m for m in out.modules() if isinstance(m, nn.Linear) and id(m) not in grouped]  # o_proj
    inputs, grams = _sample_inputs(out, [consumers[0] for _, _, consumers in groups] + alone, windows, TOKENS, seed)

    def settle(linears: list[nn.Linear], weights: list[torch.Tensor], gram: torch.Tensor):
        """Write the (scaled) ``weights``, rounded unless kept at 8 bits; the projections of one
        input are rounded stacked, sharing GPTQ's factorization of its Gram."""
        rounding = []
        for linear, weight in zip(linears, weights):
            if id(linear) in named:
                if not round_eight_bit:
                    linear.weight.copy_(weight.to(linear.weight.dtype))
                    continue
                unrounded[named[id(linear)]] = weight.to(linear.weight.dtype, copy=True)  # weight may alias it
            rounding.append((linear, weight))
        if rounding:
            rounded = gptq_int4(torch.cat([weight for _, weight in rounding]), gram)
            for (linear, _), part in zip(rounding, rounded.split([w.shape[0] for _, w in rounding])):
                linear.weight.copy_(part.to(linear.weight.dtype))

    arch = architecture_for(out.config)
    for (kind, producer, consumers), x, gram in zip(groups, inputs, grams):
        s = channel_scale([c.weight.float() for c in consumers], x)
        if kind == "norm":
            arch.divide_norm_(producer, s)
        else:
            producer.weight.div_(s[:, None].to(producer.weight.dtype))
            if producer.bias is not None:
                producer.bias.div_(s.to(producer.bias.dtype))
        scaled_gram = gram / s[:, None] / s[None, :]  # of the scaled inputs x / s
        settle(consumers, [consumer.weight.float() * s for consumer in consumers], scaled_gram)
    for linear, gram in zip(alone, grams[len(groups):]):  # no producer that could absorb a scale: rounded only
        settle([linear], [linear.weight.float()], gram)
    return out, unrounded


def prepare_int4(model: nn.Module, windows: torch.Tensor, seed: int = 0, eight_bit: tuple[str, ...] = ()) -> nn.Module:
    """A copy of ``model`` (lm_head untied) whose projections are scaled (the float function kept)
    and rounded onto ONNX Runtime's symmetric 4-bit grid, which its quantizer then keeps;
    ``windows`` are calibration token windows, never selection or evaluation text. Projections
    named in ``eight_bit`` (module names, e.g. "lm_head", "down_proj") will be rounded to 8 bits
    by ONNX Runtime: they are scaled with their group but not rounded here."""
    return _prepare(model, windows, seed, eight_bit, round_eight_bit=False)[0]


def prepare_int4_pair(model: nn.Module, windows: torch.Tensor, seed: int = 0,
                      eight_bit: tuple[str, ...] = ()) -> tuple[nn.Module, nn.Module]:
    """``prepare_int4`` for every projection at 4 bits and for ``eight_bit`` kept at 8, from one
    preparation: the two copies differ only in those projections' weights (rounded or not)."""
    four, unrounded = _prepare(model, windows, seed, eight_bit, round_eight_bit=True)
    mixed = copy.deepcopy(four)
    with torch.no_grad():
        for name, weight in unrounded.items():
            mixed.get_submodule(name).weight.copy_(weight)
    return four, mixed
