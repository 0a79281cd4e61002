"""Activation-aware 4-bit weights for ONNX Runtime's MatMulNBits (after AWQ, Lin et al. 2024).

Round-to-nearest INT4 spends its 16 levels evenly, while a projection's error is dominated by the
few input channels that carry large activations. Two output-preserving steps on a copy of the
model make ONNX Runtime's own symmetric round-to-nearest land on a better grid:

1. per input channel, scale the weights up by s = mean|x|^a and the producer down by 1/s (the
   RMSNorm before q/k/v, before gate/up and before lm_head; up_proj's rows before down_proj), the
   exponent a chosen per group from a small grid on calibration inputs; the float model computes
   the same function;
2. per block of 32 inputs, clip the weights to a fraction of their largest magnitude, the fraction
   that minimises the activation-weighted rounding error; ONNX Runtime then derives its block scale
   from the clipped maximum, so the integer grid (and the fast kernel) stays.

Measured on the default model (8 held-out WikiText-2 windows, torch emulation of the grid):
round-to-nearest +22.5% perplexity, this +13.7% (docs/toolchain.md). Hand-written because
AutoAWQ and llm-compressor write their own checkpoint formats and need a GPU, and ONNX Runtime's
calibrated 4-bit quantizers either keep float zero points (a kernel 10x slower here) or need a
separate toolkit.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from prunekit.arch import architecture_for, decoder_layers

BLOCK = 32  # inputs per MatMulNBits block (prunekit.exporters.onnx.quantize_int4)
EXPONENTS = tuple(i / 10 for i in range(10))
CLIP_FRACTIONS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
TOKENS = 1024  # calibration tokens per group: enough to rank 10 exponents, cheap to multiply


def int4_round(weight: torch.Tensor, fraction: float = 1.0) -> torch.Tensor:
    """ONNX Runtime's symmetric 4-bit grid per block of BLOCK inputs: the largest-magnitude value
    (times ``fraction``) maps to -8, levels -8..7. Rows whose width is not whole blocks are
    returned as they are (the ONNX quantizer pads them; close enough for ranking)."""
    rows, cols = weight.shape
    if cols % BLOCK:
        return weight
    blocks = weight.reshape(rows, cols // BLOCK, BLOCK)
    peak = torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True)) * fraction
    scale = torch.where(peak == 0, torch.ones_like(peak), peak / -8)
    return ((blocks / scale).round().clamp(-8, 7) * scale).reshape(rows, cols)


def channel_scale(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The per-input-channel scale (mean|x|^a, a from EXPONENTS) whose 4-bit rounding of
    ``weights`` reproduces their outputs on ``x`` best: the least ‖x Δᵀ‖² summed over the
    weights, Δ = round(w·s)/s − w (the scaled input x/s meets the rounded scaled weight). With
    fewer input channels than tokens, through the Gram xᵀx: tr(Δ xᵀx Δᵀ) costs outputs × inputs²
    instead of outputs × inputs × tokens (the 49k-row head of the default model: 33 against
    58 GFLOP per exponent)."""
    magnitude = x.abs().mean(0).clamp(min=1e-5)
    gram = x.T @ x if x.shape[1] < x.shape[0] else None

    def error_of(delta: torch.Tensor) -> float:
        if gram is None:
            return float((x @ delta.T).pow(2).sum())
        return float(((delta @ gram) * delta).sum())

    best, best_error = torch.ones_like(magnitude), float("inf")
    for exponent in EXPONENTS:
        s = magnitude ** exponent
        s = s / (s.max() * s.min()).sqrt()
        error = sum(error_of(int4_round(w * s) / s - w) for w in weights)
        if error < best_error:
            best, best_error = s, error
    return best


def clip_blocks(weight: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """``weight`` clamped per block to the fraction of its peak (CLIP_FRACTIONS) whose rounding
    error, weighted by the input channel's mean square activation, is least."""
    rows, cols = weight.shape
    if cols % BLOCK:
        return weight
    blocks = weight.reshape(rows, cols // BLOCK, BLOCK)
    weights = importance.reshape(1, cols // BLOCK, BLOCK)
    peak = blocks.abs().amax(-1, keepdim=True)
    best_fraction, best_error = torch.ones_like(peak), None
    for fraction in CLIP_FRACTIONS:
        error = ((int4_round(weight, fraction).reshape(blocks.shape) - blocks).pow(2) * weights).sum(-1, keepdim=True)
        if best_error is None:
            best_error = error
            continue
        better = error < best_error
        best_fraction = torch.where(better, torch.full_like(peak, fraction), best_fraction)
        best_error = torch.where(better, error, best_error)
    limit = peak * best_fraction
    return torch.maximum(torch.minimum(blocks, limit), -limit).reshape(rows, cols)


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
                   seed: int) -> list[torch.Tensor]:
    """``tokens`` input rows of each module, sampled (seeded) from a forward over ``windows``."""
    seen: list[list[torch.Tensor]] = [[] for _ in modules]
    hooks = [m.register_forward_hook(lambda _m, inp, _o, i=i: seen[i].append(inp[0].reshape(-1, inp[0].shape[-1])))
             for i, m in enumerate(modules)]
    try:
        for window in windows:
            model(window[None])
    finally:
        for hook in hooks:
            hook.remove()
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(sum(x.shape[0] for x in seen[0]), generator=generator)[:tokens]
    return [torch.cat(x).float()[rows] for x in seen]


@torch.no_grad()
def _prepare(model: nn.Module, windows: torch.Tensor, seed: int, eight_bit: tuple[str, ...],
             clip_eight_bit: bool) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The prepared copy. Projections named in ``eight_bit`` stay unclipped, or with
    ``clip_eight_bit`` are clipped like the rest and their scaled, unclipped weights returned too
    (by qualified name)."""
    out = copy.deepcopy(model)
    head = out.get_submodule(architecture_for(out.config).head)
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    named = {id(m): name for name, m in out.named_modules() if name.rsplit(".", 1)[-1] in eight_bit}
    unclipped: dict[str, torch.Tensor] = {}
    groups = _groups(out)
    grouped = {id(c) for _, _, consumers in groups for c in consumers}
    alone = [m for m in out.modules() if isinstance(m, nn.Linear) and id(m) not in grouped]  # o_proj
    inputs = _sample_inputs(out, [consumers[0] for _, _, consumers in groups] + alone, windows, TOKENS, seed)

    def settle(linear: nn.Linear, weight: torch.Tensor, importance: torch.Tensor):
        if id(linear) in named and not clip_eight_bit:
            linear.weight.copy_(weight.to(linear.weight.dtype))
            return
        if id(linear) in named:
            unclipped[named[id(linear)]] = weight.to(linear.weight.dtype, copy=True)  # weight may alias it
        linear.weight.copy_(clip_blocks(weight, importance).to(linear.weight.dtype))

    arch = architecture_for(out.config)
    for (kind, producer, consumers), x in zip(groups, inputs):
        s = channel_scale([c.weight.float() for c in consumers], x)
        if kind == "norm":
            arch.divide_norm_(producer, s)
        else:
            producer.weight.div_(s[:, None].to(producer.weight.dtype))
            if producer.bias is not None:
                producer.bias.div_(s.to(producer.bias.dtype))
        importance = (x / s).pow(2).mean(0)
        for consumer in consumers:
            settle(consumer, consumer.weight.float() * s, importance)
    for linear, x in zip(alone, inputs[len(groups):]):  # no producer that could absorb a scale: clipped only
        settle(linear, linear.weight.float(), x.pow(2).mean(0))
    return out, unclipped


def prepare_int4(model: nn.Module, windows: torch.Tensor, seed: int = 0, eight_bit: tuple[str, ...] = ()) -> nn.Module:
    """A copy of ``model`` (lm_head untied) that computes the same function in float, with every
    projection scaled and clipped for symmetric 4-bit round-to-nearest; ``windows`` are
    calibration token windows, never selection or evaluation text. Projections named in
    ``eight_bit`` (module names, e.g. "lm_head", "down_proj") will be rounded to 8 bits: they are
    scaled with their group but not clipped, since clipping for a 4-bit grid only loses at 8 bits."""
    return _prepare(model, windows, seed, eight_bit, clip_eight_bit=False)[0]


def prepare_int4_pair(model: nn.Module, windows: torch.Tensor, seed: int = 0,
                      eight_bit: tuple[str, ...] = ()) -> tuple[nn.Module, nn.Module]:
    """``prepare_int4`` for every projection at 4 bits and for ``eight_bit`` kept at 8, from one
    preparation: the two copies differ only in those projections' weights (clipped or not)."""
    four, unclipped = _prepare(model, windows, seed, eight_bit, clip_eight_bit=True)
    mixed = copy.deepcopy(four)
    with torch.no_grad():
        for name, weight in unclipped.items():
            mixed.get_submodule(name).weight.copy_(weight)
    return four, mixed
