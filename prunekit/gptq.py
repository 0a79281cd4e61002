"""GPTQ rounding (Frantar et al., ICLR 2023) onto ONNX Runtime's symmetric 4-bit block grid.

Round-to-nearest rounds every weight on its own; GPTQ rounds one input column at a time and
moves the rounding error onto the columns not yet rounded, through the inverse of the layer's
input Gram, so the layer's output on calibration inputs stays close. On the default model with
every projection at 4 bits (`python bench/int4_rounding.py`, 8 WikiText-2 test windows, fitted
on 8 x 256 tokens): channel scaling with per-block clipping +24.0% perplexity, the same scaling
with this rounding +18.0%; fitted on deploy's 64 x 256, +11.5% (docs/search.md).

The grid is the one MatMulNBits' symmetric quantizer derives from the weights it is given: per
block of BLOCK inputs the largest-magnitude value maps to -8, levels -8..7. GPTQ picks each
block's scale (from the block's updated weights, clipped to the fraction of its peak that rounds
best) and then forces the peak's level to -8, so ONNX Runtime, re-deriving the scale from the
rounded weights, lands on exactly these integers (tests/test_gptq.py). A partial last block is
rounded as ONNX Runtime pads it: with zeros, which never move the peak.

Hand-written because GPTQ's libraries (AutoGPTQ, llm-compressor, Intel Neural Compressor behind
ONNX Runtime's GPTQ config) write asymmetric grids with zero points, a checkpoint format of their
own, or need a toolkit this project does not carry; the rounding must land on ONNX Runtime's
symmetric grid for its fast kernel.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 32  # inputs per MatMulNBits block (prunekit.exporters.onnx.quantize_int4)
CLIP_FRACTIONS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
DAMPING = 0.01  # of the Gram's mean diagonal: keeps its inverse finite on few or collinear tokens


def _block_scale(block: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the grid step of ``block`` clipped to the fraction of its signed peak (CLIP_FRACTIONS)
    whose rounding error, weighted by ``importance`` (the Gram's diagonal), is least; and the
    column of the peak (-1 for an all-zero row, which has no peak to pin)."""
    peak_at = block.abs().argmax(-1, keepdim=True)
    peak = block.gather(1, peak_at)
    fractions = torch.tensor(CLIP_FRACTIONS, dtype=block.dtype)[:, None, None]
    scales = peak * fractions / -8  # (fractions, rows, 1)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    errors = (((block / scales).round().clamp(-8, 7) * scales - block).pow(2) * importance).sum(-1)
    best = errors.argmin(0)  # the first of equals: the least clipping
    return scales[best, torch.arange(block.shape[0]), 0], torch.where(peak[:, 0] == 0, -1, peak_at[:, 0])


@torch.no_grad()
def gptq_int4(weight: torch.Tensor, gram: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """``weight`` (outputs, inputs) rounded to the 4-bit grid, returned dequantized in float32.
    ``gram`` is XᵀX (inputs, inputs) of calibration inputs, any positive scale. Rows sharing an
    input (q, k and v) may come stacked: one factorization serves them all."""
    w = weight.detach().float().clone()
    cols = w.shape[1]
    h = gram.detach().float().clone()
    dead = torch.diagonal(h) == 0  # inputs that never carry signal: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damping * torch.diagonal(h).mean())
    # the upper Cholesky factor of H⁻¹: row j holds column j's error propagation to later columns
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    importance = torch.diagonal(h)
    out = torch.empty_like(w)
    for start in range(0, cols, BLOCK):
        stop = min(start + BLOCK, cols)
        scale, peak_at = _block_scale(w[:, start:stop], importance[start:stop])
        rounded, errors = _round_block(w[:, start:stop].T.contiguous().numpy(), scale.numpy(), peak_at.numpy(),
                                       u[start:stop, start:stop].numpy())
        out[:, start:stop] = torch.from_numpy(rounded).T
        w[:, stop:] -= torch.from_numpy(errors).T @ u[start:stop, stop:]
    return out


def _round_block(columns: np.ndarray, scale: np.ndarray, peak_at: np.ndarray, u: np.ndarray):
    """GPTQ's sequential step inside one block, over its columns (block width, rows) in order:
    round, pin each row's peak to -8, and move the error onto the block's later columns. NumPy
    because the loop is a few small vector operations per column, where torch's per-call overhead
    cost 10x more."""
    rounded, errors = np.empty_like(columns), np.empty_like(columns)
    for j in range(columns.shape[0]):
        level = np.clip(np.rint(columns[j] / scale), -8, 7)
        level[peak_at == j] = -8  # ONNX Runtime's scale: peak / -8
        rounded[j] = level * scale
        errors[j] = (columns[j] - rounded[j]) / u[j, j]
        columns[j + 1:] -= np.outer(u[j, j + 1:], errors[j])
    return rounded, errors
