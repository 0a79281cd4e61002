"""Estimated latency from a hardware profile: a roofline, not a measurement.

Each phase takes the longer of its compute time (FLOPs / peak throughput) and its memory time
(bytes moved / bandwidth); the report names the bound that dominates. Peaks are datasheet figures,
so the estimate is a lower bound on latency; it is always labelled ``estimated``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from prunekit.arch import architecture_for, attention_shape, decoder_layers


# A 2:4 GEMM weight is stored compressed: half the values plus 2-bit indices per kept value.
TWO_FOUR_STORED_FRACTION = 0.5 + 0.0625


@dataclass
class ModelCost:
    """Per-token work of a decoder: linear FLOPs, attention FLOPs per cached token, KV bytes."""

    linear_flops_per_token: float  # 2 x multiply-adds of every projection and lm_head
    attention_flops_per_context_token: float  # QK and AV, per token of context, all layers
    kv_values_per_token: int  # cached key + value numbers per token, all layers

    def as_dict(self):
        return asdict(self)


def model_cost(model) -> ModelCost:
    arch = architecture_for(model.config)
    heads, kv_heads, head_dim = attention_shape(model.config)
    linear = attention = kv_values = 0
    for layer in decoder_layers(model):
        for name in arch.linear_names():
            module = layer.get_submodule(name)
            linear += 2 * module.in_features * module.out_features
        attn = layer.get_submodule(arch.attention)
        v_dim = getattr(attn, "v_head_dim", head_dim)
        q_heads = attn.get_submodule(arch.q).out_features // head_dim
        kv = attn.get_submodule(arch.k).out_features // head_dim
        attention += 2 * q_heads * (head_dim + v_dim)
        kv_values += kv * (head_dim + v_dim)
    head = model.get_submodule(arch.head).weight
    linear += 2 * head.shape[0] * head.shape[1]
    return ModelCost(linear, attention, kv_values)


def roofline(flops: float, bytes_moved: float, peak_tflops: float, bandwidth_gbs: float) -> dict:
    compute_ms = flops / (peak_tflops * 1e12) * 1e3
    memory_ms = bytes_moved / (bandwidth_gbs * 1e9) * 1e3
    return {"ms": max(compute_ms, memory_ms), "compute_ms": compute_ms, "memory_ms": memory_ms,
            "bound": "compute" if compute_ms >= memory_ms else "memory", "flops": flops,
            "bytes": bytes_moved}


def sparse_gemm_weights(model, n_m: tuple[int, int] = (2, 4)) -> int:
    """Weights of the decoder's projections that hold zeros in the ``n_m`` pattern: the GEMMs
    sparse tensor cores run compressed. Counted per layer, so a model with some blocks kept dense
    (prunekit.pruning.partial) gets the speed-up and the compression only where they apply."""
    from prunekit.pruning.checker import check_model

    return sum(r.shape[0] * r.shape[1] for r in check_model(model, n_m) if r.nm_ok and r.sparsity > 0)


def sparse_stored_bytes(model, precision: str, sparse_weights: int) -> int:
    """Bytes of the weights at ``precision`` (prunekit.weight_rounding.stored_bytes), with
    ``sparse_weights`` of them (``sparse_gemm_weights``) stored compressed at
    TWO_FOUR_STORED_FRACTION of their values."""
    from prunekit.weight_rounding import PRECISION_BITS, stored_bytes

    return stored_bytes(model, precision) - int(sparse_weights * PRECISION_BITS[precision] / 8
                                                * (1 - TWO_FOUR_STORED_FRACTION))


def estimate_latency(cost: ModelCost, weight_bytes: int, peak_tflops: float, bandwidth_gbs: float,
                     prompt_tokens: int = 128, decode_context: int = 160, kv_bytes_per_value: int = 2,
                     gemm_speedup: float = 1.0, batch: int = 1, sparse_flops_per_token: float | None = None) -> dict:
    """Prefill of ``prompt_tokens`` and one decode step at ``decode_context`` cached tokens.

    Prefill: weights are read once, FLOPs scale with the prompt (the ``sparse_flops_per_token`` of
    the linear work, all of it if None, divided by ``gemm_speedup``, e.g. 2:4 sparse tensor cores).
    Decode: every weight byte and the KV cache are read for one token; at batch 1 memory
    dominates, so sparsity of the math barely helps."""
    avg_context = (prompt_tokens + 1) / 2
    sparse = cost.linear_flops_per_token if sparse_flops_per_token is None else sparse_flops_per_token
    linear = cost.linear_flops_per_token - sparse + sparse / gemm_speedup
    prefill_flops = batch * prompt_tokens * (linear + cost.attention_flops_per_context_token * avg_context)
    prefill_bytes = weight_bytes + batch * prompt_tokens * cost.kv_values_per_token * kv_bytes_per_value
    decode_flops = batch * (linear + cost.attention_flops_per_context_token * decode_context)
    decode_bytes = weight_bytes + batch * decode_context * cost.kv_values_per_token * kv_bytes_per_value
    prefill = roofline(prefill_flops, prefill_bytes, peak_tflops, bandwidth_gbs)
    decode = roofline(decode_flops, decode_bytes, peak_tflops, bandwidth_gbs)
    return {"prefill_ms": prefill["ms"], "decode_ms": decode["ms"], "tokens_per_s": batch * 1e3 / decode["ms"],
            "prefill": prefill, "decode": decode, "prompt_tokens": prompt_tokens,
            "decode_context": decode_context, "batch": batch, "gemm_speedup": gemm_speedup,
            "formula": "phase ms = max(FLOPs / peak, bytes moved / bandwidth); decode bytes = weights + KV cache"}
