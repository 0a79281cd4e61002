"""A plain decoder forward over a supported model's own modules, with the KV cache as flat
tensors: the graph exporters (torch.onnx, torch.export for Core ML) trace this instead of the
Hugging Face forward, whose cache objects and mask helpers do not export (see docs/toolchain.md).

Hand-written because it must also run pruned shapes (narrower value heads, smaller MLPs) that no
library exporter knows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.arch import architecture_for, attention_shape, decoder_layers, norm_eps


def kv_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return past, present


class PlainDecoder(nn.Module):
    """The shared math; subclasses say where the KV cache lives (flat tensors, or Core ML state).

    ``fused`` writes the block the way ONNX Runtime runs fastest: one GEMM for q/k/v and one for
    gate/up, and RMS norm and attention as single operators (exported at opset 23 as
    RMSNormalization and Attention, one kernel each instead of ~20 small ones per layer, whose
    per-call overhead dominates decode of a small model on a CPU). Off, it is plain primitives that
    every converter (Core ML, TensorRT's parser) reads.
    """

    def __init__(self, model: nn.Module, untie_lm_head: bool = True, fused: bool = False):
        super().__init__()
        self.model = model
        self.arch = architecture_for(model.config)
        self.layers = decoder_layers(model)
        heads, kv_heads, head_dim = attention_shape(model.config)
        self.group = heads // kv_heads
        self.fused = fused
        # Parameters of this module that are not the model's own, each with the model parameters
        # it stacks (rows concatenated): a streamed export computes them from those one at a time.
        self.built_from: dict[str, list[nn.Parameter]] = {}
        if fused:
            self.qkv = nn.ModuleList(self._stacked(f"qkv.{i}", layer, self.arch.attention, "q", "k", "v")
                                     for i, layer in enumerate(self.layers))
            self.gate_up = nn.ModuleList(self._stacked(f"gate_up.{i}", layer, self.arch.mlp, "gate", "up")
                                         for i, layer in enumerate(self.layers))
        # A tied lm_head reaches the graph as a transposed embedding, which weight quantizers skip
        # as a non-constant input; its own copy is quantized like every other projection.
        self.layer_types = self.arch.layer_types(model.config)
        self.windows = [self.arch.sliding_window(model.config, i) for i in range(len(self.layers))]
        head = model.get_submodule(self.arch.head).weight
        self.lm_head_weight = nn.Parameter(head.detach().clone(), requires_grad=False) if untie_lm_head else head
        if untie_lm_head:
            self.built_from["lm_head_weight"] = [head]

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
        keys/values of layer i and returns all keys/values so far; ``mask`` is additive and causal,
        and layers with a sliding window narrow it to their window."""
        a = self.arch
        batch, seq = input_ids.shape
        positions = (torch.arange(seq, device=input_ids.device) + past_len).unsqueeze(0)
        hidden = self.model.get_submodule(a.embedding)(input_ids)
        tables = {kind: tuple(t.unsqueeze(1) for t in a.position_embeddings(self.model, hidden, positions, kind))
                  for kind in dict.fromkeys(self.layer_types)}
        windows = {w: window_mask(mask, past_len, w) for w in dict.fromkeys(self.windows) if w}
        for i, layer in enumerate(self.layers):
            attention = layer.get_submodule(a.attention)
            head_dim = attention.head_dim
            v_dim = getattr(attention, "v_head_dim", head_dim)
            q, k, v = self._qkv(i, self._norm(layer.get_submodule(a.input_norm), hidden))
            q = q.view(batch, seq, -1, head_dim)
            k = k.view(batch, seq, -1, head_dim)
            if a.qk_norms:
                q_norm, k_norm = (attention.get_submodule(n) for n in a.qk_norms)
                q, k = self._norm(q_norm, q), self._norm(k_norm, k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = v.view(batch, seq, -1, v_dim).transpose(1, 2)
            cos, sin = tables[self.layer_types[i]]
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            k, v = update_cache(i, k, v)
            out = self._attend(q, k, v, windows.get(self.windows[i], mask), attention.scaling)
            out = attention.get_submodule(a.o)(out.transpose(1, 2).reshape(batch, seq, -1))
            hidden = hidden + self._maybe_norm(layer, a.attention_out_norm, out)
            out = self._mlp(i, self._norm(layer.get_submodule(a.mlp_norm), hidden))
            hidden = hidden + self._maybe_norm(layer, a.mlp_out_norm, out)
        return F.linear(self._norm(self.model.get_submodule(a.final_norm), hidden), self.lm_head_weight)

    def _projections(self, layer: nn.Module, parent: str, *roles: str) -> list[nn.Linear]:
        return [layer.get_submodule(f"{parent}.{getattr(self.arch, role)}") for role in roles]

    def _stacked(self, name: str, layer: nn.Module, parent: str, *roles: str) -> nn.Linear:
        linears = self._projections(layer, parent, *roles)
        stacked = _stacked_linear(linears)
        self.built_from[f"{name}.weight"] = [lin.weight for lin in linears]
        if stacked.bias is not None:
            self.built_from[f"{name}.bias"] = [lin.bias for lin in linears]
        return stacked

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return norm(x)
        return F.rms_norm(x, norm.weight.shape, self.arch.norm_scale(norm), norm_eps(norm))

    def _maybe_norm(self, layer: nn.Module, name: str | None, x: torch.Tensor) -> torch.Tensor:
        return self._norm(layer.get_submodule(name), x) if name else x

    def _qkv(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q_proj, k_proj, v_proj = self._projections(self.layers[i], self.arch.attention, "q", "k", "v")
        if not self.fused:
            return q_proj(x), k_proj(x), v_proj(x)
        return self.qkv[i](x).split([q_proj.out_features, k_proj.out_features, v_proj.out_features], dim=-1)

    def _attend(self, q, k, v, mask, scaling: float) -> torch.Tensor:
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        k_all = k.repeat_interleave(self.group, dim=1)
        v_all = v.repeat_interleave(self.group, dim=1)
        scores = (q @ k_all.transpose(2, 3)) * scaling + mask
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v_all

    def _mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        mlp = self.layers[i].get_submodule(self.arch.mlp)
        if not self.fused:
            return mlp(x)
        gate, up = self.gate_up[i](x).chunk(2, dim=-1)
        return mlp.get_submodule(self.arch.down)(mlp.act_fn(gate) * up)


def causal_mask(seq: int, past_len, dtype: torch.dtype) -> torch.Tensor:
    """Additive (seq, past_len + seq) mask: 0 where a query may look, the dtype's minimum elsewhere."""
    positions = torch.arange(seq).unsqueeze(1) + past_len
    allowed = torch.arange(seq + past_len).unsqueeze(0) <= positions
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)


def window_mask(mask: torch.Tensor, past_len, window: int) -> torch.Tensor:
    """``mask`` (additive, last two dims (seq, past_len + seq)) narrowed to a sliding window: query
    position p sees keys p - window + 1 .. p, as transformers' sliding-window layers do. The cache
    keeps every position; the window is the mask's, so one graph serves prompts of any length."""
    seq, total = mask.shape[-2], mask.shape[-1]
    distance = (torch.arange(seq, device=mask.device) + past_len).unsqueeze(1) - torch.arange(total, device=mask.device)
    return mask.masked_fill(distance >= window, torch.finfo(mask.dtype).min)


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


def _stacked_linear(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear computing all of ``linears`` at once (outputs side by side)."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    biases = [lin.bias for lin in linears]
    stacked = nn.Linear(weight.shape[1], weight.shape[0], bias=biases[0] is not None,
                        dtype=weight.dtype, device=weight.device)
    stacked.weight = nn.Parameter(weight, requires_grad=False)
    if stacked.bias is not None:
        stacked.bias = nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)
    return stacked


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
