"""A plain decoder forward over a LLaMA-family model's own modules, with the KV cache as flat
tensors: the graph exporters (torch.onnx, torch.export for Core ML) trace this instead of the
Hugging Face forward, whose cache objects and mask helpers do not export (see docs/toolchain.md).

Hand-written because it must also run pruned shapes (narrower value heads, smaller MLPs) that no
library exporter knows.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.arch import architecture_for, attention_shape, decoder_layers


def kv_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return past, present


class PlainDecoder(nn.Module):
    """The shared math; subclasses say where the KV cache lives (flat tensors, or Core ML state)."""

    def __init__(self, model: nn.Module, untie_lm_head: bool = True):
        super().__init__()
        self.model = model
        self.arch = architecture_for(model.config)
        self.layers = decoder_layers(model)
        heads, kv_heads, head_dim = attention_shape(model.config)
        self.group = heads // kv_heads
        # A tied lm_head reaches the graph as a transposed embedding, which weight quantizers skip
        # as a non-constant input; its own copy is quantized like every other projection.
        head = model.lm_head.weight
        self.lm_head_weight = nn.Parameter(head.detach().clone(), requires_grad=False) if untie_lm_head else head

    def cache_shapes(self, batch: int, length: int) -> list[tuple[int, ...]]:
        """Key and value cache shapes, layer by layer: (batch, kv_heads, length, head width)."""
        shapes = []
        _, _, head_dim = attention_shape(self.model.config)
        for layer in self.layers:
            attention = layer.get_submodule(self.arch.attention)
            kv = attention.get_submodule(self.arch.k).out_features // head_dim
            v_dim = getattr(attention, "v_head_dim", head_dim)
            shapes += [(batch, kv, length, head_dim), (batch, kv, length, v_dim)]
        return shapes

    def empty_cache(self, batch: int = 1, past_len: int = 0) -> list[torch.Tensor]:
        dtype = next(self.model.parameters()).dtype
        return [torch.zeros(s, dtype=dtype) for s in self.cache_shapes(batch, past_len)]

    def decode(self, input_ids: torch.Tensor, past_len, mask: torch.Tensor, update_cache) -> torch.Tensor:
        """Logits for ``input_ids`` at positions past_len.. ; ``update_cache(i, k, v)`` stores the new
        keys/values of layer i and returns all keys/values so far; ``mask`` is additive."""
        a = self.arch
        base = self.model.get_submodule(a.layers.rsplit(".", 1)[0])
        batch, seq = input_ids.shape
        positions = (torch.arange(seq, device=input_ids.device) + past_len).unsqueeze(0)
        hidden = base.embed_tokens(input_ids)
        cos, sin = base.rotary_emb(hidden, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for i, layer in enumerate(self.layers):
            attention = layer.get_submodule(a.attention)
            head_dim = attention.head_dim
            v_dim = getattr(attention, "v_head_dim", head_dim)
            x = layer.input_layernorm(hidden)
            q = attention.get_submodule(a.q)(x).view(batch, seq, -1, head_dim).transpose(1, 2)
            k = attention.get_submodule(a.k)(x).view(batch, seq, -1, head_dim).transpose(1, 2)
            v = attention.get_submodule(a.v)(x).view(batch, seq, -1, v_dim).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            k, v = update_cache(i, k, v)
            k_all = k.repeat_interleave(self.group, dim=1)
            v_all = v.repeat_interleave(self.group, dim=1)
            scores = (q @ k_all.transpose(2, 3)) * attention.scaling + mask
            out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v_all
            out = out.transpose(1, 2).reshape(batch, seq, -1)
            hidden = hidden + attention.get_submodule(a.o)(out)
            hidden = hidden + layer.get_submodule(a.mlp)(layer.post_attention_layernorm(hidden))
        return torch.nn.functional.linear(base.norm(hidden), self.lm_head_weight)


def causal_mask(seq: int, past_len, dtype: torch.dtype) -> torch.Tensor:
    """Additive (seq, past_len + seq) mask: 0 where a query may look, the dtype's minimum elsewhere."""
    positions = torch.arange(seq).unsqueeze(1) + past_len
    allowed = torch.arange(seq + past_len).unsqueeze(0) <= positions
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)


class FlatCacheDecoder(PlainDecoder):
    """forward(input_ids, *past) -> (logits, *present); past[2i], past[2i+1] are layer i's key and
    value, shaped (batch, kv_heads, past_len, head_dim or v_head_dim). For ONNX."""

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        present = []

        def update(i, k, v):
            k, v = torch.cat([past[2 * i], k], dim=2), torch.cat([past[2 * i + 1], v], dim=2)
            present.extend((k, v))
            return k, v

        past_len = past[0].shape[2]
        mask = causal_mask(input_ids.shape[1], past_len, past[0].dtype)
        return (self.decode(input_ids, past_len, mask, update), *present)


class StatefulDecoder(PlainDecoder):
    """forward(input_ids, causal_mask) -> logits, with the KV cache in registered buffers that Core
    ML turns into model state (iOS 18). ``causal_mask`` is (1, 1, seq, past_len + seq), additive;
    the app builds it, which also tells the model how long the cache already is."""

    def __init__(self, model: nn.Module, max_length: int):
        # Core ML's quantizer handles the shared embedding / lm_head weight: keep it once.
        super().__init__(model, untie_lm_head=False)
        self.max_length = max_length
        for i, shape in enumerate(self.cache_shapes(1, max_length)):
            kind = "key" if i % 2 == 0 else "value"
            self.register_buffer(f"{kind}_cache_{i // 2}", torch.zeros(shape, dtype=torch.float16))

    def state_names(self) -> list[str]:
        return [f"{kind}_cache_{i}" for i in range(len(self.layers)) for kind in ("key", "value")]

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        end = mask.shape[-1]
        past_len = end - input_ids.shape[1]

        def update(i, k, v):
            key, value = getattr(self, f"key_cache_{i}"), getattr(self, f"value_cache_{i}")
            key[:, :, past_len:end] = k.to(key.dtype)
            value[:, :, past_len:end] = v.to(value.dtype)
            return key[:, :, :end].to(k.dtype), value[:, :, :end].to(v.dtype)

        return self.decode(input_ids, past_len, mask, update)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
