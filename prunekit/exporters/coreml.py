"""Core ML export: torch.export of the stateful plain decoder, coremltools conversion to an ML
Program with the KV cache as iOS 18 state, INT8 weights through coremltools' own optimizer, and
inspection of the saved package (Core ML cannot predict on Linux)."""

from __future__ import annotations

import platform
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prunekit.errors import MissingExtraError
from prunekit.exporters.decoder import StatefulDecoder, causal_mask

DEPLOYMENT_TARGETS = {"iOS18": 9}  # Core ML spec version; state (KV cache) needs iOS 18
INT8_WEIGHT_OPS = ("constexpr_blockwise_shift_scale", "constexpr_affine_dequantize")
PALETTE_OPS = ("constexpr_lut_to_dense",)
PALETTE_MIN_VALUES = 10_000
# How far the wrapper's logits may differ from the fp16-cache reference, as fractions of the logits'
# spread (see reference_check).
RMS_DIFF_OF_SPREAD, MAX_DIFF_OF_SPREAD = 2e-3, 5e-2


def _coremltools():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import coremltools
    except ImportError:
        raise MissingExtraError("coremltools", "coreml") from None
    return coremltools


def convert_coreml(model: torch.nn.Module, max_length: int = 512, deployment_target: str = "iOS18"):
    """An fp16 ML Program: input_ids (1, n) int32 and causal_mask (1, 1, n, past + n) fp32 in,
    logits (1, n, vocab) out, key_cache_i / value_cache_i as state."""
    ct = _coremltools()
    if deployment_target not in DEPLOYMENT_TARGETS:
        raise ValueError(f"deployment target {deployment_target} is not supported: use iOS18")
    decoder = StatefulDecoder(model, max_length).eval()
    from torch.export import Dim

    # torch.export needs the dynamic lengths' bound one below the cache size.
    query, end = Dim("query_length", min=1, max=max_length - 1), Dim("end_step", min=1, max=max_length - 1)
    example = (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 1, 2, 5))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.export.export(decoder, example, dynamic_shapes=({1: query}, {2: query, 3: end}))
        program = program.run_decompositions({})
        mlmodel = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                             compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    spec = mlmodel.get_spec()
    ct.utils.rename_feature(spec, spec.description.output[0].name, "logits")
    ct.utils.rename_feature(spec, spec.description.input[1].name, "causal_mask")
    mlmodel = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)
    mlmodel.short_description = "prunekit: decoder with its KV cache as Core ML state"
    return mlmodel


def quantize_weights(mlmodel, precision: str):
    """Weights compressed by coremltools' own optimizer, compute in fp16: int8 symmetric per output
    channel; int4 symmetric per block of 32 inputs (iOS 18); palette4, 16 values per group of 32 output
    channels found by k-means (iOS 18). fp16 returns the model as it is."""
    _coremltools()  # a clear message if the extra is missing
    from coremltools.optimize.coreml import (OpLinearQuantizerConfig, OpPalettizerConfig, OptimizationConfig,
                                             linear_quantize_weights, palettize_weights)

    if precision == "fp16":
        return mlmodel
    if precision == "palette4":
        # One 16-value palette per group of 32 output channels (iOS 18): one palette per tensor
        # left the default model at KL 9 from dense. The LUT function is prunekit's kmeans1d
        # (prunekit.weight_rounding.palette_lut), the one the torch emulation uses; tensors under
        # 10,000 values stay fp16, a negligible part of any model's bytes.
        from prunekit.weight_rounding import PALETTE_GROUP, palette_lut

        config = OptimizationConfig(global_config=OpPalettizerConfig(
            mode="custom", lut_function=palette_lut, granularity="per_grouped_channel", group_size=PALETTE_GROUP,
            channel_axis=0, weight_threshold=PALETTE_MIN_VALUES))
        optimize = palettize_weights
    elif precision in ("int8", "int4"):
        per_block = dict(granularity="per_block", block_size=32) if precision == "int4" else dict(granularity="per_channel")
        config = OptimizationConfig(global_config=OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype=precision, **per_block))
        optimize = linear_quantize_weights
    else:
        raise ValueError(f"Core ML precisions are fp16, int8, int4 and palette4, not {precision}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optimize(mlmodel, config=config)


def quantize_int8(mlmodel):
    """Per-channel symmetric INT8 weights (coremltools.optimize), FP16 compute."""
    return quantize_weights(mlmodel, "int8")


def inspect_package(path: Path) -> dict:
    """What the saved package holds: spec version, inputs/outputs/states with shapes, op counts."""
    ct = _coremltools()
    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlmodel.get_spec()

    def shape(feature):
        array = getattr(feature.type, feature.type.WhichOneof("Type"))
        if hasattr(array, "arrayType"):
            array = array.arrayType
        ranges = [(r.lowerBound, r.upperBound) for r in array.shapeRange.sizeRanges] if array.HasField("shapeRange") else []
        return {"shape": list(array.shape), "ranges": ranges,
                "dtype": ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType)}

    ops = Counter()
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                ops[op.type] += 1
    return {"specification_version": spec.specificationVersion,
            "inputs": {f.name: shape(f) for f in spec.description.input},
            "outputs": {f.name: shape(f) for f in spec.description.output},
            "states": {f.name: shape(f) for f in spec.description.state},
            "ops": dict(ops),
            "int8_weight_tensors": sum(ops[o] for o in INT8_WEIGHT_OPS),
            "quantized_weight_tensors": sum(ops[o] for o in INT8_WEIGHT_OPS),
            "palettized_weight_tensors": sum(ops[o] for o in PALETTE_OPS)}


def check_package(info: dict, expected_states: int, int8: bool | None = None, deployment_target: str = "iOS18",
                  precision: str | None = None) -> dict:
    """Spec version, I/O names, one state per cache tensor, and weights stored as ``precision``
    says: quantized (int8, int4) or palettized (palette4) tensors present, none in an fp16 package."""
    precision = precision or ("int8" if int8 else "fp16")
    quantized, palettized = info["quantized_weight_tensors"], info["palettized_weight_tensors"]
    stored = {"fp16": quantized == 0 and palettized == 0, "int8": quantized > 0, "int4": quantized > 0,
              "palette4": palettized > 0}[precision]
    checks = {
        "deployment_target": info["specification_version"] == DEPLOYMENT_TARGETS[deployment_target],
        "io_names": set(info["inputs"]) == {"input_ids", "causal_mask"} and set(info["outputs"]) == {"logits"},
        "kv_state": len(info["states"]) == expected_states,
        f"{precision}_weights": stored,
    }
    checks["passed"] = all(checks.values())
    return checks


def reference_check(model: torch.nn.Module, tokens: torch.Tensor, max_length: int = 512,
                    prefill: int | None = None) -> dict:
    """The converted program's PyTorch source (the stateful decoder, KV cache held in fp16) against
    an fp16 reference, judged as fp16 numerics are: catches a wrapper that changes the math
    (position, mask, cache slot, scaling), not the rounding an fp16 cache brings.

    The reference is the Hugging Face forward with its own KV cache held in fp16 (keys after RoPE,
    values), so both round the same numbers: what is left between them is float32 summation order,
    which can still move a value across an fp16 rounding boundary, and so stays a small fraction of
    the logits' spread (RMS 0.01-0.04%, largest 0.1-0.9% on the default model) where a wrong
    position or cache slot moves it by percents. The first ``prefill`` tokens go in at once, the
    rest one at a time through the cache (teacher forced). The wrapper may differ by 0.2% of the
    spread in RMS and 5% at most, and may pick another next token only where the reference's two
    candidates were tied within twice its largest difference. The drift from the fp32 forward (what
    fp16 costs the model; 0.01-0.7 on the default model) is reported, not judged."""
    n = tokens.numel()
    prefill = prefill or max(1, n // 2)
    decoder = StatefulDecoder(model, max_length).eval()
    with torch.no_grad():
        steps = [decoder(tokens[None, :prefill], causal_mask(prefill, 0, torch.float32)[None, None])[0]]
        for t in range(prefill, n):
            steps.append(decoder(tokens[None, t:t + 1], causal_mask(1, t, torch.float32)[None, None])[0])
        ours = torch.cat(steps).float()
        fp32 = model(tokens[None], use_cache=False).logits[0].float()
        reference = _fp16_cache_forward(model, tokens)
    spread = float(reference.std())
    diff = ours - reference
    largest, rms = float(diff.abs().max()), float(diff.pow(2).mean().sqrt())
    ref_top, our_top = reference.argmax(-1), ours.argmax(-1)
    margins = (reference.gather(1, ref_top[:, None]) - reference.gather(1, our_top[:, None]))[:, 0]
    flips = ref_top != our_top
    log_ref, log_ours = F.log_softmax(reference, -1), F.log_softmax(ours, -1)
    checks = {"max_abs_logit_diff": largest, "allowed": MAX_DIFF_OF_SPREAD * spread,
              "rms_logit_diff": rms, "allowed_rms": RMS_DIFF_OF_SPREAD * spread, "logit_spread": spread,
              "kl": float((log_ref.exp() * (log_ref - log_ours)).sum(-1).mean()),
              "next_token_agreement": float((~flips).float().mean()),
              "flips_outside_ties": int((flips & (margins > 2 * largest)).sum()),
              "fp16_cost_vs_fp32": float((reference - fp32).abs().max()),
              "tokens": n, "through_cache": n - prefill,
              "reference": "Hugging Face forward with its KV cache in fp16"}
    checks["passed"] = (largest <= checks["allowed"] and rms <= checks["allowed_rms"]
                        and checks["flips_outside_ties"] == 0)
    return checks


def _fp16_cache_forward(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the Hugging Face forward with its KV cache held in fp16, as the Core ML state
    holds it: every key (after RoPE) and value is rounded to fp16 where the cache stores it."""
    from transformers import DynamicCache

    class Fp16Cache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return super().update(key_states.half().to(key_states.dtype),
                                  value_states.half().to(value_states.dtype), layer_idx, *args, **kwargs)

    return model(tokens[None], cache=Fp16Cache(config=model.config), use_cache=True).logits[0].float()


def predict_check(path: Path, model: torch.nn.Module, tokens: torch.Tensor) -> dict:
    """On macOS, run the package and compare logits; elsewhere say why it was skipped."""
    if platform.system() != "Darwin":
        return {"status": "skipped", "reason": "Core ML runs predictions only on macOS (this is "
                                               f"{platform.system()}); the package was inspected instead"}
    ct = _coremltools()
    mlmodel = ct.models.MLModel(str(path))
    state = mlmodel.make_state()
    n = tokens.numel()
    out = mlmodel.predict({"input_ids": tokens[None].numpy().astype(np.int32),
                           "causal_mask": causal_mask(n, 0, torch.float32)[None, None].numpy()},
                          state=state)
    with torch.no_grad():
        reference = model(tokens[None], use_cache=False).logits.numpy()
    diff = float(np.abs(out["logits"] - reference).max())
    same_top1 = float((out["logits"].argmax(-1) == reference.argmax(-1)).mean())
    return {"status": "ran", "max_abs_logit_diff": diff, "top1_agreement": same_top1}


def package_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
