"""The 4-bit grid a weight already lies on, found from its values, so it can ship at 4 bits exactly.

A GGUF model is 4-bit already: Q4_0, Q4_1 and the 4-bit K-quants store every block of 32 inputs
as ``step * q + low`` with ``q`` in 0..15 (Q4_0: ``low = -8 * step``; Q4_K: a step and low per
32-input sub-block). prunekit dequantizes that file to float32 as its dense reference, and any
requantization then rounds those values a second time onto another grid: on the default model
(Q4_1) ONNX Runtime's symmetric 4-bit costs +18-40% perplexity against the reference, while
llama.cpp, running the file's own integers, loses nothing. Recovering the integers does the same
in ONNX Runtime: per block the low end and the step are read off the values (the step is the
span over the number of levels it covers: 15, 14, ... 1, the first that puts every value on a
level), and a tensor is on the grid only when every one of its blocks is.

MatMulNBits' fast kernel takes a symmetric grid (``scale * (q - 8)``), so the block's ``low`` goes
to an offset: ``w = step * (q - 8) + offset`` with ``offset = low + 8 * step``, and
``x @ w`` is the kernel's product plus ``block_sums(x) @ offsets``, a product 1/32 the size
(prunekit.exporters.onnx.quantize_int4_source writes both).

Hand-written because no converter reads quantized GGUF blocks into ONNX: transformers and
optimum dequantize GGUF on load, and ONNX Runtime's quantizers only round float weights anew.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32  # inputs per block: GGUF's 4-bit blocks and sub-blocks, and MatMulNBits' block_size here
LEVELS = 16
# How far a value may sit from its level, relative to its block's largest magnitude: GGUF's
# dequantization computes step * q + low in float32 from float16 factors (~1e-7 off), while values
# not from a 4-bit grid miss a level by a good part of a step (~1e-2 of the block's peak).
TOLERANCE = 1e-5
PROBE_BLOCKS = 64  # blocks tried first: a weight that is not on a grid is turned down without a full pass


@dataclass
class Grid:
    """One weight ``[rows, inputs]`` as ``step * (codes - 8) + offset``, per row and block of inputs."""
    codes: np.ndarray  # [rows, blocks, BLOCK] uint8 in 0..15
    steps: np.ndarray  # [rows, blocks] float32
    offsets: np.ndarray  # [rows, blocks] float32

    def packed(self) -> np.ndarray:
        """The codes as MatMulNBits stores 4-bit weights: [rows, blocks, BLOCK / 2] bytes, the even
        input in the low nibble."""
        pairs = self.codes.reshape(*self.codes.shape[:2], BLOCK // 2, 2)
        return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)

    def weight(self) -> np.ndarray:
        """The float weight the grid stands for (what ONNX Runtime computes with)."""
        values = self.steps[..., None] * (self.codes.astype(np.float32) - 8) + self.offsets[..., None]
        return values.reshape(values.shape[0], -1)


def fit_grid(weight: np.ndarray) -> Grid | None:
    """``weight`` ``[rows, inputs]`` on a 4-bit grid per row and block of BLOCK inputs, or None when
    any block has a value off every grid of 16 levels (or the inputs are not whole blocks)."""
    rows, inputs = weight.shape
    if inputs % BLOCK:
        return None
    values = weight.reshape(-1, BLOCK).astype(np.float32, copy=False)
    if len(values) > PROBE_BLOCKS and fit_grid(values[:PROBE_BLOCKS]) is None:  # most weights fail at once
        return None
    low, span = values.min(-1), np.ptp(values, axis=-1)
    if not np.isfinite(span).all():
        return None
    tolerance = TOLERANCE * np.abs(values).max(-1)
    steps, codes = np.zeros_like(low), np.zeros(values.shape, np.uint8)
    todo = np.flatnonzero(span > 0)  # a constant block: step 0, code 0
    for levels in range(LEVELS - 1, 0, -1):  # most levels first: a grid of fewer is a coarser one
        if not todo.size:
            break
        step = span[todo] / levels
        level = np.rint((values[todo] - low[todo, None]) / step[:, None])
        fits = np.abs(low[todo, None] + level * step[:, None] - values[todo]).max(-1) <= tolerance[todo]
        steps[todo[fits]], codes[todo[fits]] = step[fits], level[fits]
        todo = todo[~fits]
    if todo.size:
        return None
    shape = (rows, inputs // BLOCK)
    return Grid(codes.reshape(*shape, BLOCK), steps.reshape(shape), (low + 8 * steps).reshape(shape))
