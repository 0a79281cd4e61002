"""Architecture adapter: where a model keeps its decoder blocks and projections.

Every algorithm reaches the model only through this table, so supporting a new family means one
entry here, never a copy of an algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from prunekit.errors import UserInputError


@dataclass(frozen=True)
class Architecture:
    family: str
    layers: str = "model.layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    input_norm: str = "input_layernorm"  # the RMSNorm before attention (inside a block)
    mlp_norm: str = "post_attention_layernorm"  # the RMSNorm before the MLP (inside a block)
    final_norm: str = "model.norm"
    head: str = "lm_head"

    def linear_names(self) -> list[str]:
        """Pruned linear layers of one block, in the order they run."""
        return [f"{self.attention}.{p}" for p in (self.q, self.k, self.v, self.o)] + [
            f"{self.mlp}.{p}" for p in (self.gate, self.up, self.down)]


# LLaMA, Mistral and Qwen2 (SmolLM is LLaMA) share one block layout in transformers.
ARCHITECTURES = {t: Architecture(family=t) for t in ("llama", "mistral", "qwen2")}


def architecture_for(config) -> Architecture:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserInputError(f"architecture '{model_type}' is not supported: prunekit supports "
                             f"{', '.join(sorted(ARCHITECTURES))} (LLaMA family, SmolLM included)")
    return ARCHITECTURES[model_type]


def decoder_layers(model) -> nn.ModuleList:
    return model.get_submodule(architecture_for(model.config).layers)


def block_linears(model, layer: nn.Module) -> dict[str, nn.Linear]:
    arch = architecture_for(model.config)
    return {name: layer.get_submodule(name) for name in arch.linear_names()}


def attention_shape(config) -> tuple[int, int, int]:
    """(query heads, kv heads, head_dim)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim
