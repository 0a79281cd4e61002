"""Model surgery for structured pruning: smaller linear layers, attention whose value heads are
narrower than its query/key heads, and rebuilding such a model from a saved folder.

The value-width attention is hand-written because no library expresses v_head_dim != head_dim for
the supported families; it reuses the model's own rotary and attention kernels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from prunekit.arch import architecture_for, attention_shape, decoder_layers, missing_weights
from prunekit.errors import UserInputError


def shrink_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                  weight: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear keeping the given output rows / input columns (or taking ``weight``)."""
    w = linear.weight.data
    if rows is not None:
        rows = rows.to(w.device)
        w = w[rows]
    if cols is not None:
        w = w[:, cols.to(w.device)]
    if weight is not None:
        w = weight
    bias = linear.bias
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=w.dtype, device=w.device)
    out.weight.data.copy_(w)
    if bias is not None:
        out.bias.data.copy_(bias.data[rows] if rows is not None else bias.data)
    return out


def _value_width_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                         cache=None, **kwargs):
    """The family's attention forward with value heads of width ``self.v_head_dim``."""
    modeling = sys.modules[type(self).__mro__[1].__module__]
    arch = architecture_for(self.config)
    input_shape = hidden_states.shape[:-1]
    query = self.get_submodule(arch.q)(hidden_states).view(*input_shape, -1, self.head_dim)
    key = self.get_submodule(arch.k)(hidden_states).view(*input_shape, -1, self.head_dim)
    if arch.qk_norms:
        query, key = (self.get_submodule(n)(x) for n, x in zip(arch.qk_norms, (query, key)))
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    value = self.get_submodule(arch.v)(hidden_states).view(*input_shape, -1, self.v_head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = modeling.apply_rotary_pos_emb(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    # torch's fused CPU attention needs values as wide as the keys (else a ~3x slower path):
    # zero channels add nothing to the output, and are dropped from it below.
    value = nn.functional.pad(value, (0, self.head_dim - self.v_head_dim))
    interface = modeling.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, modeling.eager_attention_forward)
    extra = {"sliding_window": self.sliding_window} if getattr(self, "sliding_window", None) else {}
    output, weights = interface(self, query, key, value, attention_mask,
                                dropout=0.0 if not self.training else self.attention_dropout,
                                scaling=self.scaling, **extra, **kwargs)
    output = output[..., :self.v_head_dim].reshape(*input_shape, -1).contiguous()
    return self.get_submodule(arch.o)(output), weights


_VALUE_WIDTH_CLASSES: dict[type, type] = {}


def set_value_head_dim(attention: nn.Module, v_head_dim: int) -> None:
    """Switch an attention module to value heads of ``v_head_dim`` (its v/o layers already cut)."""
    base = type(attention)
    if base in _VALUE_WIDTH_CLASSES.values():
        base = base.__mro__[1]
    if v_head_dim == attention.head_dim:
        attention.__class__ = base
        return
    if base not in _VALUE_WIDTH_CLASSES:
        _VALUE_WIDTH_CLASSES[base] = type(f"ValueWidth{base.__name__}", (base,),
                                          {"forward": _value_width_forward})
    attention.__class__ = _VALUE_WIDTH_CLASSES[base]
    attention.v_head_dim = v_head_dim


def describe_structure(model) -> dict:
    """Per-layer linear shapes and value widths: what a stock config cannot say."""
    arch = architecture_for(model.config)
    shapes, value_dims = {}, []
    for i, layer in enumerate(decoder_layers(model)):
        for name in arch.linear_names():
            linear = layer.get_submodule(name)
            shapes[f"{i}.{name}"] = [linear.out_features, linear.in_features]
        attention = layer.get_submodule(arch.attention)
        value_dims.append(getattr(attention, "v_head_dim", attention.head_dim))
    return {"linear_shapes": shapes, "value_head_dims": value_dims}


def needs_structure_manifest(model) -> bool:
    """True when the stock config cannot rebuild the model: narrower value heads or uneven widths."""
    heads, kv_heads, head_dim = attention_shape(model.config)
    arch = architecture_for(model.config)
    for layer in decoder_layers(model):
        attention = layer.get_submodule(arch.attention)
        if getattr(attention, "v_head_dim", head_dim) != head_dim:
            return True
        if layer.get_submodule(f"{arch.mlp}.{arch.down}").in_features != model.config.intermediate_size:
            return True
    return False


def apply_structure(model, structure: dict) -> None:
    """Reshape a freshly built model to the saved per-layer shapes (weights loaded afterwards)."""
    arch = architecture_for(model.config)
    layers = decoder_layers(model)
    for key, (out_features, in_features) in structure["linear_shapes"].items():
        index, name = key.split(".", 1)
        parent_name, attr = name.rsplit(".", 1)
        parent = layers[int(index)].get_submodule(parent_name)
        old = getattr(parent, attr)
        if (old.out_features, old.in_features) != (out_features, in_features):
            setattr(parent, attr, nn.Linear(in_features, out_features, bias=old.bias is not None,
                                            dtype=old.weight.dtype))
    for layer, v_dim in zip(layers, structure["value_head_dims"]):
        set_value_head_dim(layer.get_submodule(arch.attention), v_dim)


def load_restructured(folder: Path, config, structure: dict, dtype) -> nn.Module:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply_structure(model, structure)
    state = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UserInputError(f"{folder} holds no .safetensors weights")
    for file in files:
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = missing_weights(config, missing)
    if missing or unexpected:
        raise UserInputError(f"checkpoint in {folder} does not match its prunekit.json: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype)


def check_shapes(model) -> None:
    """Every block's projections must chain; name the first layer that does not."""
    arch = architecture_for(model.config)
    heads, kv_heads, head_dim = attention_shape(model.config)
    hidden = model.config.hidden_size
    for i, layer in enumerate(decoder_layers(model)):
        attention = layer.get_submodule(arch.attention)
        get = lambda n: layer.get_submodule(n)  # noqa: E731
        q, k, v, o = (get(f"{arch.attention}.{p}") for p in (arch.q, arch.k, arch.v, arch.o))
        gate, up, down = (get(f"{arch.mlp}.{p}") for p in (arch.gate, arch.up, arch.down))
        v_dim = getattr(attention, "v_head_dim", head_dim)
        expected = {
            arch.q: (heads * head_dim, hidden), arch.k: (kv_heads * head_dim, hidden),
            arch.v: (kv_heads * v_dim, hidden), arch.o: (hidden, heads * v_dim),
            arch.gate: (gate.out_features, hidden), arch.up: (gate.out_features, hidden),
            arch.down: (hidden, gate.out_features)}
        for name, linear in zip(expected, (q, k, v, o, gate, up, down)):
            got = (linear.out_features, linear.in_features)
            if got != expected[name]:
                raise RuntimeError(f"layer {i} {name} has shape {got}, expected {expected[name]}: "
                                   f"the pruned structure is inconsistent (a prunekit bug, please report)")
