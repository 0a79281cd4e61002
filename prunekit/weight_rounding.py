"""The weights a Core ML or TensorRT precision ships, applied to a torch model: where the runtime
cannot run here (Core ML on Linux, TensorRT without a GPU), a candidate's quality is measured in
torch on these weights, and the report says so.

The arithmetic is the converters': INT8 symmetric per output channel in [-127, 127]; INT4
symmetric per block of 32 inputs in [-7, 7] (a tensor
whose inputs are not whole blocks stays fp16, as coremltools leaves it); 4-bit palettization as optimal 1-D k-means (16
values per tensor) over the fp16 weights, coremltools' own routine (its bundled kmeans1d); every result
is then held in fp16, as the package computes. Activation rounding (fp16, or TensorRT's INT8
activations) is not emulated.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

BLOCK = 32
PALETTE_MIN_VALUES = 10_000  # prunekit.exporters.coreml leaves smaller tensors in fp16


def round_tensor(weight: torch.Tensor, precision: str) -> torch.Tensor:
    w = weight.detach().float()
    if precision in ("fp32",):
        return w
    if precision == "fp16":
        return w.half().float()
    if precision == "int8":
        return _symmetric(w, w.abs().amax(1, keepdim=True), 127).half().float()
    if precision == "int4":
        rows, cols = w.shape
        if cols % BLOCK:  # coremltools skips a tensor whose inputs are not whole blocks: it stays fp16
            return w.half().float()
        blocks = w.reshape(rows, cols // BLOCK, BLOCK)
        return _symmetric(blocks, blocks.abs().amax(-1, keepdim=True), 7).reshape(rows, cols).half().float()
    if precision == "palette4":
        if w.numel() < PALETTE_MIN_VALUES:  # left in fp16 by the exporter (prunekit.exporters.coreml)
            return w.half().float()
        return _palettize(w.half(), 16).float()
    raise ValueError(f"no weight rounding for precision {precision}")


def _symmetric(w: torch.Tensor, amax: torch.Tensor, levels: int) -> torch.Tensor:
    scale = torch.where(amax > 0, amax / levels, torch.ones_like(amax))
    return (w / scale).round().clamp(-levels, levels) * scale


def _palettize(w: torch.Tensor, clusters: int) -> torch.Tensor:
    from coremltools._deps import _kmeans1d as kmeans1d  # the optimal 1-D k-means coremltools palettizes with

    values, inverse, counts = torch.unique(w.flatten(), return_inverse=True, return_counts=True)
    if values.numel() <= clusters:
        return w
    result = kmeans1d.cluster(values.float().tolist(), clusters, weights=counts.tolist())
    centroids = torch.tensor(result.centroids, dtype=torch.float32).half()
    assignment = torch.tensor(result.clusters, dtype=torch.long)
    return centroids[assignment][inverse].reshape(w.shape)


@torch.no_grad()
def rounded_copy(model: nn.Module, precision: str) -> nn.Module:
    """A copy of ``model`` whose linear and embedding weights hold what ``precision`` ships."""
    out = copy.deepcopy(model)
    seen = set()
    for module in out.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            module.weight.copy_(round_tensor(module.weight, precision))
    return out


def stored_bytes(model: nn.Module, precision: str, untied_head: bool = True) -> int:
    """Bytes of the weights a package of ``precision`` stores: linear and embedding weights at the
    precision's bits plus their scales or palettes (fp16), everything else in fp16. The exporters
    write a tied lm_head as a copy of its own (``untied_head``)."""
    bits = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "palette4": 4}[precision]
    total, seen = 0, set()
    modules = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    for module in modules:
        if not untied_head and id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        rows, cols = module.weight.shape
        scales = {"int8": rows, "int4": rows * -(-cols // BLOCK), "palette4": 16}.get(precision, 0)
        total += rows * cols * bits // 8 + 2 * scales
    others = sum(p.numel() for name, p in model.named_parameters() if p.dim() < 2)
    float_bytes = 4 if precision == "fp32" else 2
    return total + others * float_bytes
