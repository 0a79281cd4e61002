"""a100/h100-tensorrt-sparse candidates of a model that is never whole in memory (a streamed deploy).

Per amount, one streamed trace of plain opset ops (``fused=False``: what TensorRT's parser reads),
written a tensor at a time (prunekit.exporters.onnx_streamed): the float file, verified in an ONNX
Runtime process of its own against the torch logits of its source (TensorRT builds the fp16 engine
from it), and, cloned, the INT8 QDQ file, its activation ranges gathered in torch block by block
on the calibration windows (prunekit.exporters.qdq_streamed). The candidates are judged as the
in-memory deploy judges them (prunekit.targets.estimated): fp16 in torch on fp16-rounded weights,
here block by block (prunekit.weights.RoundedWeights); INT8 on its QDQ file in ONNX Runtime, here
in a process of its own. Sizes are computed and latencies estimated from shapes, the GEMMs that
keep 2:4 counted from the exported file; the 2:4 check runs on the files a tensor at a time.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from prunekit.estimate import model_cost
from prunekit.evaluation import StoredLogits, measure_qualities, measure_quality
from prunekit.exporters.onnx_sparsity import block_prefixes, iter_gemm_weights, nm_report, patterned_weights
from prunekit.progress import say
from prunekit.search import Candidate
from prunekit.targets import ExportOutcome
from prunekit.targets.cpu_onnx import copy_artifact
from prunekit.targets.cpu_onnx_streamed import judge_in_subprocess
from prunekit.targets.estimated import QUALITY_BY, estimated_candidate
from prunekit.targets.tensorrt_sparse import QdqJudge, raise_on_broken_pattern, ship_for_tensorrt


class StreamedTensorrtCandidates:
    """Builds and judges TensorRT candidates from weight sources in ``scratch``; ships the chosen
    one. ``calibration``: the windows static INT8 is calibrated on; ``dense``: the dense model's
    skeleton (its estimates sit beside the shipped one's)."""

    int4_comparison = None  # no 4-bit candidates

    def __init__(self, profile, plan, scratch: Path, probe, calibration, dense, quiet: bool = False):
        self.profile, self.plan, self.scratch, self.probe = profile, plan, Path(scratch), probe
        self.calibration, self.dense, self.quiet = calibration, dense, quiet
        self.paths: dict[tuple[float, str], Path] = {}
        self.models: dict[float, object] = {}  # each amount's skeleton: shapes for the estimates
        self.patterns: dict[float, dict] = {}  # each pruned amount's 2:4 check of its float file
        self.skips: dict[float, tuple[str, ...]] = {}  # each pruned amount's blocks kept dense, as name prefixes
        self.checks: dict[str, dict] = {}
        self.timings: dict[str, float] = defaultdict(float)

    def build(self, loaded, amount: float, precisions: tuple[str, ...], windows, reference,
              probe_reference) -> list[Candidate]:
        """Every precision of the model ``loaded`` (prunekit.models.open_streamed) written and judged
        on ``windows`` against ``reference``; ``probe_reference``: torch logits of the probe."""
        from prunekit.exporters.onnx_streamed import compare_probe, save_streamed, streamed_graph
        from prunekit.pruning.blocks import StreamedLogits
        from prunekit.weights import RoundedWeights

        folder = self.scratch / f"amount-{amount:g}"
        start = time.perf_counter()
        say(f"tracing the {'dense' if amount == 0 else f'{amount:g}-pruned'} model for ONNX (plain ops, "
            f"for TensorRT)", self.quiet)
        trace = streamed_graph(loaded.model, loaded.weights, fused=False)
        qdq_trace = trace.clone() if "int8" in precisions else None
        say("writing the float ONNX, one tensor at a time", self.quiet)
        fp32 = save_streamed(trace, folder / "fp32" / "model.onnx")
        self.timings["export_onnx"] += time.perf_counter() - start

        start = time.perf_counter()
        say("verifying the float ONNX with ONNX Runtime (a process of its own)", self.quiet)
        logits = folder / "fp32-logits"
        judged = judge_in_subprocess(fp32, windows[:0], logits, self.probe.numpy())
        self.checks[f"export {amount:g}"] = {
            **compare_probe(np.load(logits / "probe-prefill.npy"), np.load(logits / "probe-steps.npy"),
                            probe_reference, judged["kv_cache_io"]),
            "streamed": True, "judge_peak_rss_gb": judged["peak_rss_gb"]}
        shutil.rmtree(logits)
        self.paths[(amount, "fp32")] = fp32
        if amount > 0 and self.plan.pattern.n_m:
            # blocks a partial amount kept dense on purpose (prunekit.pruning.partial) are counted, not checked
            self.skips[amount] = block_prefixes((loaded.manifest or {}).get("dense_blocks", ()))
            self.patterns[amount] = nm_report(iter_gemm_weights(fp32), *self.plan.pattern.n_m,
                                              skip=self.skips[amount])
        sparse_weights = self._sparse_weights(amount)
        self.timings["judge"] += time.perf_counter() - start

        out, cost = [], model_cost(loaded.model)
        for precision in precisions:
            start = time.perf_counter()
            if precision == "int8":
                quality, quality_by = self._qdq_quality(qdq_trace, loaded, amount, folder, windows, reference), \
                    QdqJudge.quality_by
            else:
                say(f"judging {precision} weights at amount {amount:g} in torch, one block at a time", self.quiet)
                rounded = StreamedLogits(loaded.model, RoundedWeights(loaded.weights, precision), [windows])
                quality, quality_by = measure_quality(rounded, windows, reference), f"{QUALITY_BY}, block by block"
            self.timings["judge"] += time.perf_counter() - start
            out.append(estimated_candidate(self.profile, loaded.model, cost, amount, precision, quality, quality_by,
                                           sparse_weights))
        self.models[amount] = loaded.model
        return out

    def _sparse_weights(self, amount: float) -> int:
        """The weights sparse tensor cores run compressed at ``amount``: its GEMMs that keep 2:4 in
        its float file (0 without a 2:4 check, or on a device without sparse tensor cores)."""
        if amount not in self.patterns or self.plan.pattern.n_m != (2, 4) or not self.profile.sparse_tensor_cores:
            return 0
        return patterned_weights(self.patterns[amount])

    def _qdq_quality(self, trace, loaded, amount: float, folder: Path, windows, reference):
        """The INT8 QDQ file of ``trace`` written and judged in ONNX Runtime (a process of its own)."""
        from prunekit.exporters.onnx_streamed import save_streamed
        from prunekit.exporters.qdq_streamed import as_qdq, linear_input_ranges

        say(f"calibrating INT8 activations on {len(self.calibration)} windows, one block at a time", self.quiet)
        as_qdq(trace, linear_input_ranges(loaded.model, loaded.weights, self.calibration))
        say("writing the INT8 QDQ ONNX, one tensor at a time; judging it with ONNX Runtime", self.quiet)
        path = save_streamed(trace, folder / "int8" / "model.onnx")
        logits = folder / "int8-logits"
        judge_in_subprocess(path, windows, logits, None)
        quality = measure_qualities({"int8": StoredLogits(None, logits)}, windows, reference)["int8"]
        shutil.rmtree(logits)
        self.paths[(amount, "int8")] = path
        return quality

    def measure(self, candidates: list[Candidate]) -> None:
        """Nothing to time here: the estimates were made with the candidates."""

    def ship(self, chosen: Candidate, stage: Path, context=None) -> ExportOutcome:
        amount, int8 = chosen.amount, chosen.precision == "int8"
        path = self.paths[(amount, "int8" if int8 else "fp32")]
        start = time.perf_counter()
        copy_artifact(path, stage)
        checks = {"onnx": self.checks[f"export {amount:g}"]}
        if amount in self.patterns:
            checks["nm_after_export"] = self.patterns[amount]
            if int8:
                checks["nm_after_int8"] = nm_report(iter_gemm_weights(path), *self.plan.pattern.n_m,
                                                    skip=self.skips[amount])
        raise_on_broken_pattern(self.plan, checks)
        checks["shipped"] = {"streamed": True, "verified_export": checks["onnx"]["passed"],
                             "kv_cache_io": checks["onnx"]["kv_cache_io"]}
        timings = {**self.timings, "copy": time.perf_counter() - start}
        return ship_for_tensorrt(self.profile, self.plan, stage, self.models[amount], self.dense,
                                 self._sparse_weights(amount), checks, timings, self.quiet)
