"""a100/h100-tensorrt-sparse back end: ONNX (verified), 2:4 kept through export and INT8 QDQ, a
build script, the engine where TensorRT and a GPU exist, and an estimate labelled as such."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from prunekit.errors import PrunekitError
from prunekit.estimate import estimate_latency, model_cost, sparse_gemm_weights, sparse_stored_bytes
from prunekit.exporters.onnx import OnnxDecoder, require_verified
from prunekit.exporters.onnx_sparsity import block_prefixes, gemm_weights, nm_report
from prunekit.exporters.tensorrt import build_engine, cache_inputs, tensorrt_available, write_build_script
from prunekit.progress import say
from prunekit.targets import ExportContext, ExportOutcome
from prunekit.targets.cpu_onnx import copy_artifact
from prunekit.weight_rounding import stored_bytes

SHIPPED_RUNTIME = "onnxruntime CPU (the ONNX the TensorRT engine is built from)"


def export_for_tensorrt(model, folder: Path, probe, int8: bool, calibration: list) -> tuple[Path, Path, dict]:
    """The ONNX TensorRT builds from: plain opset-20 ops (TensorRT parses them; the 2:4 check names
    each GEMM), verified against PyTorch; with ``int8``, the same trace with explicit QDQ on the
    projections, calibrated on ``calibration`` (prunekit.exporters.qdq_streamed, as a streamed
    deploy writes it). Returns (the file to ship, the fp32 file, the export check)."""
    from prunekit.exporters.onnx_streamed import save_streamed, streamed_graph
    from prunekit.exporters.qdq_streamed import as_qdq, linear_input_ranges
    from prunekit.weights import ModuleWeights

    trace = streamed_graph(model, ModuleWeights(model), fused=False)
    qdq = trace.clone() if int8 else None
    fp32 = save_streamed(trace, folder / "fp32" / "model.onnx")
    check = require_verified(fp32, model, probe)
    if not int8:
        return fp32, fp32, check
    as_qdq(qdq, linear_input_ranges(model, None, calibration))
    return save_streamed(qdq, folder / "qdq" / "model.onnx"), fp32, check


class QdqJudge:
    """Judges a TensorRT INT8 candidate on the artifact itself: the QDQ ONNX the engine is built
    from, run by ONNX Runtime here. Rounding only the weights in torch leaves out the activation
    quantization, which is what costs: gemma-3-270m's INT8 judged on rounded weights shipped at
    +819% perplexity on its QDQ file (docs/results.md, model families)."""

    quality_by = "onnxruntime CPU, on the INT8 QDQ ONNX the TensorRT engine is built from"

    def __init__(self, scratch: Path, probe, calibration: list, quiet: bool = False):
        self.scratch, self.probe, self.calibration, self.quiet = Path(scratch), probe, calibration, quiet

    def quality(self, model, amount: float, windows, dense):
        from prunekit.evaluation import measure_quality
        from prunekit.exporters.onnx import onnx_logits

        folder = self.scratch / f"judge-int8-{amount:g}"
        say(f"judging int8 at amount {amount:g} on its QDQ ONNX in ONNX Runtime", self.quiet)
        try:
            shipped, _, _ = export_for_tensorrt(model, folder, self.probe, True, self.calibration)
            runner = OnnxDecoder(shipped)
            quality = measure_quality(onnx_logits(runner), windows, dense)
            del runner
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # a 1.5B model's fp32 ONNX is 7 GB
        return quality


def build(context: ExportContext) -> ExportOutcome:
    profile, plan, stage = context.profile, context.plan, Path(context.stage)
    pruned, probe, quiet = context.model, context.probe_tokens, context.quiet
    int8 = plan.precision == "int8"
    n_m = plan.pattern.n_m if plan.sparsity > 0 else None  # the dense model shipped: no pattern to check
    timings, checks = {}, {}
    dense_blocks = block_prefixes(context.dense_blocks)  # not pruned: not checked for N:M
    with tempfile.TemporaryDirectory(prefix="prunekit-trt-") as scratch:
        start = time.perf_counter()
        say("exporting the pruned model to ONNX", quiet)
        if int8:
            say("INT8 as explicit QDQ (per-channel weights, calibrated activations)", quiet)
        shipped, fp32, checks["onnx"] = export_for_tensorrt(pruned, Path(scratch), probe, int8,
                                                            list(context.calib_tokens[:8]))
        timings["export_onnx"] = time.perf_counter() - start
        if n_m:
            checks["nm_after_export"] = nm_report(gemm_weights(fp32), *n_m, skip=dense_blocks)
            if int8:
                checks["nm_after_int8"] = nm_report(gemm_weights(shipped), *n_m, skip=dense_blocks)
        copy_artifact(shipped, stage)
    raise_on_broken_pattern(plan, checks)
    sparse_weights = sparse_gemm_weights(pruned, n_m) if n_m == (2, 4) and profile.sparse_tensor_cores else 0
    return ship_for_tensorrt(profile, plan, stage, pruned, context.dense, sparse_weights, checks, timings, quiet)


def raise_on_broken_pattern(plan, checks: dict) -> None:
    for key in ("nm_after_export", "nm_after_int8"):
        if key in checks and not checks[key]["passed"]:
            raise PrunekitError(f"{plan.pattern} broke in {key.replace('_', ' ')}: {checks[key]['failing'][:5]}")


def ship_for_tensorrt(profile, plan, stage: Path, pruned, dense, sparse_weights: int, checks: dict,
                      timings: dict, quiet: bool) -> ExportOutcome:
    """What follows the ONNX in ``stage``/onnx, for a model in memory or streamed (``pruned`` and
    ``dense`` may be skeletons: only shapes are read): the build script, the engine where TensorRT
    and a GPU exist, and the latency estimates of dense and pruned at batch 1 and 8, labelled so.
    ``sparse_weights``: the pruned GEMMs' weights that hold 2:4 (stored compressed, run faster)."""
    int8 = plan.precision == "int8"
    target = stage / "onnx"
    past_names, cache_dims = cache_inputs(target / "model.onnx")
    write_build_script(stage, "onnx/model.onnx", past_names, cache_dims, profile.device_name, int8)

    ok, why = tensorrt_available()
    if ok:
        start = time.perf_counter()
        say("building the TensorRT engine with sparse weights", quiet)
        checks["engine"] = build_engine(target / "model.onnx", stage / "model.engine", past_names, cache_dims, int8)
        timings["engine"] = time.perf_counter() - start
    else:
        checks["engine"] = {"built": False, "reason": f"{why}: run build_engine.sh on the target machine"}
        print(f"note: no TensorRT engine here ({why}); wrote onnx/ and build_engine.sh", file=sys.stderr)

    precision = "int8" if int8 else "fp16"
    cost = model_cost(pruned)
    # the GEMMs that hold 2:4 are stored compressed and run faster, per layer (blocks kept dense
    # stay dense); embeddings, lm_head and norms stay dense
    stored = sparse_stored_bytes(pruned, precision, sparse_weights)
    speedup = profile.sparse_gemm_speedup if sparse_weights else 1.0
    # a dense choice (the search's amount 0) is its own shipped variant: no "pruned" row that repeats it
    beside_dense = dense is not None and plan.sparsity > 0
    if beside_dense:
        dense_cost, dense_bytes = model_cost(dense), stored_bytes(dense, precision)
    shipped_name = f"pruned {plan.pattern} {precision}" if plan.sparsity > 0 else f"dense {precision}"
    variants = []
    for batch in (1, 8):
        if beside_dense:
            variants.append({"name": f"dense {precision} batch {batch}", "bytes": dense_bytes,
                             **estimate_latency(dense_cost, dense_bytes, profile.peak_tflops[precision],
                                                profile.memory_bandwidth_gbs, batch=batch)})
        variants.append({"name": f"{shipped_name} batch {batch}", "bytes": int(stored),
                         **estimate_latency(cost, stored, profile.peak_tflops[precision], profile.memory_bandwidth_gbs,
                                            gemm_speedup=speedup, batch=batch,
                                            sparse_flops_per_token=2 * sparse_weights)})
    latency = {"basis": "estimated", "device": profile.device_name, "precision": precision,
               "sparse_gemm_speedup": profile.sparse_gemm_speedup,
               "why": "no engine was timed here: GEMM-bound phases scaled by the profile's sparse speed-up, "
                      "memory-bound decode by bytes; at batch 1, decode is memory-bound and gains little "
                      "from 2:4 beyond the smaller weights",
               "formula": variants[-1]["formula"]}
    status_reason = None if ok else f"ONNX and build script written; engine not built: {why}"
    return ExportOutcome("written", status_reason, variants, latency, checks, timings,
                         shipped_onnx=target / "model.onnx", shipped_runtime=SHIPPED_RUNTIME)
