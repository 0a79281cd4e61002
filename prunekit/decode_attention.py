"""Attention for the one-token steps of a bfloat16 model writing text on a CPU.

torch's CPU attention kernel takes 3.5 ms for one query of 32 rows x 9 heads over 230 cached
bfloat16 positions here, where two grouped matrix products in float32 take about 1 ms; at 30 layers
that kernel was 60% of a step of the default model writing its own calibration text. In float32,
because torch's bfloat16 matrix products go through oneDNN, which keeps a compiled kernel for every
shape it meets: the cache grows a position a step, and 512 steps held 0.9 GB more at 32 x 512.
Written by hand because the fix is those few lines: transformers lets a model name its attention
function (AttentionInterface), so this one is registered beside sdpa and handles only what it is for.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "prunekit_one_token"


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one query position (rows, heads, 1, width) over every cached one (rows, kv
    heads, positions, width), the query heads grouped by the key/value head they share (GQA without
    repeating the cache), in float32. Returns (rows, 1, heads, width) in the query's dtype."""
    rows, heads, _, width = query.shape
    kv_heads = key.shape[1]
    grouped = query.float().reshape(rows, kv_heads, heads // kv_heads, width)
    weights = ((grouped @ key.float().transpose(-1, -2)) * scale).softmax(-1)
    out = weights @ value.float()  # rows, kv heads, group, width
    return out.reshape(rows, heads, 1, width).transpose(1, 2).contiguous().to(query.dtype)


def one_token_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: one query position with no mask on a CPU goes
    to ``grouped_attention``; anything else (a prompt, a sliding window's mask, a soft cap, a GPU)
    to transformers' sdpa function unchanged."""
    if (query.shape[2] != 1 or attention_mask is not None or query.device.type != "cpu"
            or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    return grouped_attention(query, key, value, scaling if scaling is not None else query.shape[-1] ** -0.5), None


@contextlib.contextmanager
def writing_attention(model):
    """``model`` runs its attention through ``one_token_attention`` inside the ``with``, when its
    weights are bfloat16 (float32 has no slow kernel to avoid: torch's takes 0.5 ms there, and the
    float32 self-calibration keeps its text). The config is shared with any copy of the model, so
    the previous setting is put back on the way out."""
    if next(model.parameters()).dtype != torch.bfloat16:
        yield model
        return
    AttentionInterface.register(NAME, one_token_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks sdpa gets: None where none is needed
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield model
    finally:
        config._attn_implementation = previous
