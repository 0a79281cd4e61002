"""cpu-onnx back end: export pruned model to ONNX with KV cache, verify, INT8, measure, side by side."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from prunekit.errors import PrunekitError
from prunekit.exporters.latency import measure_in_subprocess
from prunekit.exporters.onnx import OnnxDecoder, export_onnx, onnx_bytes, quantize_int8, verify_export
from prunekit.targets import ExportOutcome


def _say(context, message):
    if not context.get("quiet"):
        print(f"[prunekit] {message}", file=sys.stderr, flush=True)


def build(context) -> ExportOutcome:
    plan, stage = context["plan"], Path(context["stage"])
    pruned, dense = context["model"], context.get("dense")
    windows, probe = context["eval_windows"], context["probe_tokens"]
    flavour = context.get("int8_flavour") or "weight-only"
    timings, checks, variants = {}, {}, []
    with tempfile.TemporaryDirectory(prefix="prunekit-onnx-") as scratch:
        scratch = Path(scratch)
        start = time.perf_counter()
        _say(context, "exporting the pruned model to ONNX")
        pruned_fp32 = export_onnx(pruned, scratch / "pruned-fp32" / "model.onnx")
        timings["export_onnx"] = time.perf_counter() - start
        checks["pruned_fp32"] = verify_export(pruned_fp32, pruned, probe)
        if not checks["pruned_fp32"]["passed"]:
            raise PrunekitError(f"the ONNX export does not match PyTorch: {checks['pruned_fp32']} "
                                f"(a prunekit bug, please report)")
        candidates = [("pruned fp32", pruned_fp32)]
        shipped = pruned_fp32
        if plan.precision == "int8":
            start = time.perf_counter()
            _say(context, f"quantizing to INT8 ({flavour})")
            shipped = quantize_int8(pruned_fp32, scratch / "pruned-int8" / "model.onnx", flavour,
                                    calibration=list(windows[:8]))
            timings["quantize"] = time.perf_counter() - start
            runner = OnnxDecoder(shipped)
            checks["pruned_int8"] = {"kv_cache_io": len(runner.past_names) == len(runner.present_names) > 0,
                                     "flavour": flavour}
            candidates.append((f"pruned int8 ({flavour})", shipped))
        if dense is not None:
            start = time.perf_counter()
            _say(context, "exporting the dense model for a side-by-side measurement")
            candidates.insert(0, ("dense fp32", export_onnx(dense, scratch / "dense-fp32" / "model.onnx")))
            timings["export_dense_reference"] = time.perf_counter() - start
        start = time.perf_counter()
        for name, path in candidates:
            _say(context, f"measuring {name} with ONNX Runtime")
            variant = {"name": name, "bytes": onnx_bytes(path), "perplexity": OnnxDecoder(path).perplexity(windows)}
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
               "perplexity_text": context.get("eval_label")}
    return ExportOutcome("written", None, variants, latency, checks, timings)
