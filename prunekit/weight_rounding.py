"""The weights a Core ML or TensorRT precision ships, applied to a torch model: where the runtime
cannot run here (Core ML on Linux, TensorRT without a GPU), a candidate's quality is measured in
torch on these weights, and the report says so.

The arithmetic is the converters': INT8 symmetric per output channel in [-127, 127]; INT4
symmetric per block of 32 inputs in [-7, 7] (a tensor
whose inputs are not whole blocks stays fp16, as coremltools leaves it); 4-bit palettization as
optimal 1-D k-means (16 values per group of 32 output channels) over the fp16 weights, with the
LUT function the Core ML exporter hands coremltools (``palette_lut``); every result is then held
in fp16, as the package computes. Activation rounding (fp16, or TensorRT's INT8
activations) is not emulated.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

BLOCK = 32
PALETTE_MIN_VALUES = 10_000  # prunekit.exporters.coreml leaves smaller tensors in fp16
PRECISION_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "palette4": 4}
PALETTE_GROUP = 32  # output channels sharing one 16-value palette (Core ML per-grouped-channel LUT, iOS 18)


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


def palette_lut(values: np.ndarray, clusters: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """One palette: the optimal 1-D k-means of ``values`` (each distinct value weighted by its count,
    coremltools' bundled kmeans1d, as its own kmeans1d path does), as (``clusters`` centroids, zero
    padded, in ``values``' dtype; the index of every value, flat). The Core ML exporter passes this
    to coremltools as its LUT function, so the emulation and the package cluster alike, and no
    group falls to coremltools' scikit-learn path (used under 10,000 values, and not installed)."""
    from coremltools._deps import _kmeans1d as kmeans1d

    distinct, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    lut = np.zeros(clusters, dtype=values.dtype)
    n = min(len(distinct), clusters)
    result = kmeans1d.cluster(distinct.astype(np.float64), n, weights=counts)
    lut[:n] = result.centroids
    return lut, np.asarray(result.clusters, dtype=np.uint8)[inverse.reshape(-1)]


def _palettize(w: torch.Tensor, clusters: int) -> torch.Tensor:
    """Per group of PALETTE_GROUP rows (output channels); a tensor whose rows are not whole groups
    stays as it is (coremltools skips it)."""
    rows = w.shape[0]
    if rows % PALETTE_GROUP:
        return w
    out = np.empty(w.shape, dtype=np.float16)
    array = w.numpy()
    for first in range(0, rows, PALETTE_GROUP):
        group = array[first:first + PALETTE_GROUP]
        lut, indices = palette_lut(group, clusters)
        out[first:first + PALETTE_GROUP] = lut[indices].reshape(group.shape)
    return torch.from_numpy(out)


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
    bits = PRECISION_BITS[precision]
    total, seen = 0, set()
    modules = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    for module in modules:
        if not untied_head and id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        rows, cols = module.weight.shape
        scales = {"int8": rows, "int4": rows * -(-cols // BLOCK), "palette4": 16 * -(-rows // PALETTE_GROUP)
                  }.get(precision, 0)
        total += rows * cols * bits // 8 + 2 * scales
    others = sum(p.numel() for name, p in model.named_parameters() if p.dim() < 2)
    float_bytes = 4 if precision == "fp32" else 2
    return total + others * float_bytes
