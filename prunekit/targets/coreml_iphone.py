"""coreml-iphone13 back end: .mlpackage (fp16; INT8, INT4 or 4-bit palettized weights), inspected on
Linux, latency estimated."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from prunekit.errors import PrunekitError
from prunekit.estimate import estimate_latency, model_cost
from prunekit.exporters.coreml import (check_package, convert_coreml, inspect_package, package_bytes,
                                       predict_check, quantize_weights, reference_check)
from prunekit.progress import say
from prunekit.targets import ExportContext, ExportOutcome

MAX_LENGTH = 512  # KV cache positions in the package's state


def _weight_bytes(package: Path) -> int:
    return sum(p.stat().st_size for p in Path(package).rglob("weight*.bin"))


def build(context: ExportContext) -> ExportOutcome:
    profile, plan, stage = context.profile, context.plan, Path(context.stage)
    pruned, probe = context.model, context.probe_tokens
    quiet = context.quiet
    timings, checks, variants = {}, {}, []
    precision = plan.precision
    peak = profile.peak_tflops["fp16"]  # every precision computes in fp16 (A15: no faster int8 path)
    with tempfile.TemporaryDirectory(prefix="prunekit-coreml-") as scratch:
        scratch = Path(scratch)
        start = time.perf_counter()
        checks["reference"] = reference_check(pruned, probe, MAX_LENGTH)
        if not checks["reference"]["passed"]:
            raise PrunekitError(f"the Core ML export wrapper changes the model's output beyond fp16 rounding "
                                f"(a prunekit bug, please report): {checks['reference']}")
        say("converting the model to Core ML (torch.export + coremltools)", quiet)
        fp16 = convert_coreml(pruned, MAX_LENGTH, profile.deployment_target or "iOS18")
        timings["convert_coreml"] = time.perf_counter() - start
        shipped = stage / "model.mlpackage"
        candidates = []
        if precision != "fp16":
            fp16_path = scratch / "fp16.mlpackage"
            fp16.save(str(fp16_path))
            candidates.append(("fp16", fp16_path))
            start = time.perf_counter()
            say(f"compressing weights to {precision} (coremltools.optimize)", quiet)
            quantize_weights(fp16, precision).save(str(shipped))
            timings["quantize"] = time.perf_counter() - start
        else:
            fp16.save(str(shipped))
        candidates.append((precision, shipped))
        info = inspect_package(shipped)
        checks["package"] = {**check_package(info, 2 * pruned.config.num_hidden_layers, precision=precision),
                             "spec": {k: info[k] for k in ("specification_version", "inputs", "outputs")},
                             "states": len(info["states"]), "quantized_weight_tensors": info["quantized_weight_tensors"],
                             "palettized_weight_tensors": info["palettized_weight_tensors"]}
        if not checks["package"]["passed"]:
            raise PrunekitError(f"the saved Core ML package is not what was asked: {checks['package']}")
        checks["prediction"] = predict_check(shipped, pruned, probe)
        for name, path in candidates:
            estimate = estimate_latency(model_cost(pruned), _weight_bytes(path), peak, profile.memory_bandwidth_gbs)
            variants.append({"name": f"package {name}", "bytes": package_bytes(path),
                             "weight_bytes": _weight_bytes(path), **estimate})
    latency = {"basis": "estimated", "device": profile.device_name, "peak_tflops_fp16": peak,
               "memory_bandwidth_gbs": profile.memory_bandwidth_gbs, "shipped": variants[-1]["name"],
               "formula": variants[-1]["formula"],
               "why": "Core ML runs only on Apple hardware; this is a roofline from the profile's "
                      "datasheet figures (a lower bound), not a measurement"}
    return ExportOutcome("written", None, variants, latency, checks, timings)
