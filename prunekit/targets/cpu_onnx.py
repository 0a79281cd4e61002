"""cpu-onnx back end: export pruned model to ONNX with KV cache, verify, INT8, measure, side by side."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from prunekit.evaluation import measure_quality
from prunekit.exporters.latency import measure_in_subprocess
from prunekit.exporters.onnx import (OnnxDecoder, export_onnx, export_verified, onnx_bytes, onnx_logits,
                                     quantize_int8)
from prunekit.progress import say
from prunekit.targets import ExportContext, ExportOutcome


def build(context: ExportContext) -> ExportOutcome:
    plan, stage = context.plan, Path(context.stage)
    pruned, dense = context.model, context.dense
    windows, probe = context.eval_windows, context.probe_tokens
    flavour, quiet = context.int8_flavour, context.quiet
    timings, checks, variants = {}, {}, []
    with tempfile.TemporaryDirectory(prefix="prunekit-onnx-") as scratch:
        scratch = Path(scratch)
        start = time.perf_counter()
        say("exporting the pruned model to ONNX", quiet)
        pruned_fp32, checks["pruned_fp32"] = export_verified(pruned, scratch / "pruned-fp32" / "model.onnx", probe)
        timings["export_onnx"] = time.perf_counter() - start
        candidates = [("pruned fp32", pruned_fp32)]
        shipped = pruned_fp32
        if plan.precision == "int8":
            start = time.perf_counter()
            say(f"quantizing to INT8 ({flavour})", quiet)
            shipped = quantize_int8(pruned_fp32, scratch / "pruned-int8" / "model.onnx", flavour,
                                    calibration=list(context.calib_tokens[:8]))
            timings["quantize"] = time.perf_counter() - start
            runner = OnnxDecoder(shipped)
            checks["pruned_int8"] = {"kv_cache_io": len(runner.past_names) == len(runner.present_names) > 0,
                                     "flavour": flavour}
            candidates.append((f"pruned int8 ({flavour})", shipped))
        if dense is not None:
            start = time.perf_counter()
            say("exporting the dense model for a side-by-side measurement", quiet)
            candidates.insert(0, ("dense fp32", export_onnx(dense, scratch / "dense-fp32" / "model.onnx")))
            timings["export_dense_reference"] = time.perf_counter() - start
        start = time.perf_counter()
        for name, path in candidates:
            say(f"measuring {name} with ONNX Runtime", quiet)
            variant = {"name": name, "bytes": onnx_bytes(path)}
            if windows is not None and path != shipped:  # the shipped one is measured by deploy
                variant["perplexity"] = measure_quality(onnx_logits(OnnxDecoder(path)), windows).perplexity
            variant.update(measure_in_subprocess(path))
            variants.append(variant)
        timings["measure"] = time.perf_counter() - start
        target = stage / "onnx"
        target.mkdir()
        for file in shipped.parent.iterdir():
            shutil.copy2(file, target / file.name)
    import onnxruntime

    base = variants[0]
    for v in variants:
        v["decode_speedup_vs_first"] = base["decode_ms"] / v["decode_ms"]
        v["prefill_speedup_vs_first"] = base["prefill_ms"] / v["prefill_ms"]
    latency = {"basis": "measured", "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
               "threads": variants[0]["threads"], "shipped": variants[-1]["name"],
               "reference": base["name"], "prompt_tokens": base["prompt_tokens"],
               "decode_tokens": base["decode_tokens"], "repeats": base["repeats"],
               "perplexity_text": context.eval_label}
    return ExportOutcome("written", None, variants, latency, checks, timings,
                         shipped_onnx=target / "model.onnx", shipped_runtime=latency["runtime"])
