"""Architecture adapters: where a model family keeps its blocks, projections and norms, and what
its block computes beyond the LLaMA layout (q/k norms, norms around the attention and MLP outputs,
``1 + w`` norm weights, per-layer sliding windows and rotary tables).

Every algorithm, the structure code, the exporters and the estimates reach a model only through
this table, so supporting a new family is one entry here (and one tiny config in the tests),
never a copy of an algorithm. The split follows optimum's per-architecture config classes: data
that describes the family, plus the few calls whose signature differs between families.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.errors import UserInputError

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class Architecture:
    family: str
    model_types: tuple[str, ...]  # the transformers ``model_type`` values this adapter serves
    layers: str = "model.layers"
    embedding: str = "model.embed_tokens"  # its module applies any embedding scale (Gemma's √hidden)
    rotary: str = "model.rotary_emb"
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
    attention_out_norm: str | None = None  # an RMSNorm on the attention output, before the residual add
    mlp_out_norm: str | None = None  # an RMSNorm on the MLP output, before the residual add
    qk_norms: tuple[str, str] | None = None  # per-head RMSNorms on queries and keys (inside attention)
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + weight): Gemma stores w - 1
    rope_by_layer_type: bool = False  # the rotary module takes the layer type (one table per type)
    window_on_every_layer: bool = False  # config.sliding_window, when set, applies to every layer
    final_norm: str = "model.norm"
    head: str = "lm_head"
    unsupported: tuple[tuple[str, object], ...] = ()  # (config attribute, value it must have)

    def linear_names(self) -> list[str]:
        """Pruned linear layers of one block, in the order they run."""
        return [f"{self.attention}.{p}" for p in (self.q, self.k, self.v, self.o)] + [
            f"{self.mlp}.{p}" for p in (self.gate, self.up, self.down)]

    def layer_types(self, config) -> list[str]:
        """FULL or SLIDING for every decoder layer."""
        types = getattr(config, "layer_types", None)
        if types and not self.window_on_every_layer:
            return list(types)
        window = getattr(config, "sliding_window", None) if self.window_on_every_layer else None
        return [SLIDING if window else FULL] * config.num_hidden_layers

    def sliding_window(self, config, index: int) -> int | None:
        """Layer ``index`` attends to the last this-many positions (itself included); None: all."""
        return config.sliding_window if self.layer_types(config)[index] == SLIDING else None

    def norm_scale(self, norm: nn.Module) -> torch.Tensor:
        """The per-channel factor the norm multiplies by, whatever way the family stores it."""
        return norm.weight + self.norm_offset if self.norm_offset else norm.weight

    def divide_norm_(self, norm: nn.Module, s: torch.Tensor) -> None:
        """Make the norm's output channels ``s`` times smaller (a consumer absorbs ``s``)."""
        scale = self.norm_scale(norm).detach().float() / s
        norm.weight.data.copy_((scale - self.norm_offset).to(norm.weight.dtype))

    def position_embeddings(self, model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
                            layer_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        rotary = model.get_submodule(self.rotary)
        return rotary(hidden, positions, layer_type) if self.rope_by_layer_type else rotary(hidden, positions)

    def check_config(self, config) -> None:
        for name, allowed in self.unsupported:
            value = getattr(config, name, allowed)
            if value != allowed:
                raise UserInputError(f"{self.family} models with {name}={value!r} are not supported "
                                     f"(prunekit's exporters implement {name}={allowed!r})")


_GEMMA3 = Architecture(
    family="gemma3", model_types=("gemma3_text",), mlp_norm="pre_feedforward_layernorm",
    attention_out_norm="post_attention_layernorm", mlp_out_norm="post_feedforward_layernorm",
    qk_norms=("q_norm", "k_norm"), norm_offset=1.0, rope_by_layer_type=True,
    unsupported=(("final_logit_softcapping", None), ("attn_logit_softcapping", None),
                 ("use_bidirectional_attention", False)))

ADAPTERS = (
    Architecture(family="llama", model_types=("llama",)),
    Architecture(family="mistral", model_types=("mistral",), window_on_every_layer=True),
    Architecture(family="qwen2", model_types=("qwen2",)),
    Architecture(family="qwen3", model_types=("qwen3",), qk_norms=("q_norm", "k_norm")),
    _GEMMA3,
)
ARCHITECTURES = {model_type: arch for arch in ADAPTERS for model_type in arch.model_types}
SUPPORTED = "Llama (SmolLM included), Mistral, Qwen2/Qwen2.5, Qwen3 and Gemma 3 text decoders"


def architecture_for(config) -> Architecture:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserInputError(f"architecture '{model_type}' is not supported: prunekit supports {SUPPORTED} "
                             f"(model types {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[model_type]


def check_supported(config) -> Architecture:
    """The adapter for ``config``, refusing configurations the adapter does not implement."""
    arch = architecture_for(config)
    arch.check_config(config)
    return arch


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


def missing_weights(config, missing) -> list[str]:
    """State-dict keys a checkpoint lacks, less the output head when it is tied to the embedding
    (a tied head is saved once, under the embedding's name)."""
    head = f"{architecture_for(config).head}.weight"
    return [k for k in missing if not (k == head and getattr(config, "tie_word_embeddings", False))]


def norm_eps(norm: nn.Module) -> float:
    """The epsilon of an RMSNorm module, under either name transformers uses for it."""
    eps = getattr(norm, "variance_epsilon", None)
    return norm.eps if eps is None else eps
