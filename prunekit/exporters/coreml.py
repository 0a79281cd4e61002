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

from prunekit.errors import MissingExtraError
from prunekit.exporters.decoder import StatefulDecoder, causal_mask

DEPLOYMENT_TARGETS = {"iOS18": 9}  # Core ML spec version; state (KV cache) needs iOS 18
INT8_WEIGHT_OPS = ("constexpr_blockwise_shift_scale", "constexpr_affine_dequantize")


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


def quantize_int8(mlmodel):
    """Per-channel symmetric INT8 weights (coremltools.optimize), FP16 compute."""
    _coremltools()  # a clear message if the extra is missing
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

    config = OptimizationConfig(global_config=OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_channel"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return linear_quantize_weights(mlmodel, config=config)


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
            "int8_weight_tensors": sum(ops[o] for o in INT8_WEIGHT_OPS)}


def check_package(info: dict, expected_states: int, int8: bool, deployment_target: str = "iOS18") -> dict:
    checks = {
        "deployment_target": info["specification_version"] == DEPLOYMENT_TARGETS[deployment_target],
        "io_names": set(info["inputs"]) == {"input_ids", "causal_mask"} and set(info["outputs"]) == {"logits"},
        "kv_state": len(info["states"]) == expected_states,
        "int8_weights": (info["int8_weight_tensors"] > 0) if int8 else (info["int8_weight_tensors"] == 0),
    }
    checks["passed"] = all(checks.values())
    return checks


def reference_check(model: torch.nn.Module, tokens: torch.Tensor, max_length: int = 512) -> dict:
    """The converted program's PyTorch source (stateful decoder, fp16 cache) against the Hugging
    Face forward on the same tokens: catches an export wrapper that changes the math."""
    decoder = StatefulDecoder(model, max_length).eval()
    with torch.no_grad():
        ours = decoder(tokens[None], causal_mask(tokens.numel(), 0, torch.float32)[None, None])
        theirs = model(tokens[None], use_cache=False).logits
    diff = float((ours - theirs).abs().max())
    return {"max_abs_logit_diff": diff, "passed": diff < 5e-2, "note": "KV cache held in fp16"}


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
