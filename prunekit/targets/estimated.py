"""Candidates for runtimes that cannot run here (Core ML on Linux, TensorRT without a GPU).

Each candidate is judged in torch on the weights its precision ships (prunekit.weight_rounding),
or on the artifact itself where this machine runs it (a TensorRT INT8 candidate's QDQ ONNX, in
ONNX Runtime); its size is computed from the shapes and bits, and its latency is the profile's
roofline estimate; the report labels all three. Only the chosen candidate is converted (``ship``), by the
runtime's own back end, with every check that back end runs.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

from prunekit.estimate import estimate_latency, model_cost, sparse_gemm_weights, sparse_stored_bytes
from prunekit.evaluation import measure_quality
from prunekit.progress import say
from prunekit.search import Candidate
from prunekit.targets import ExportOutcome
from prunekit.weight_rounding import rounded_copy

QUALITY_BY = "torch, on the weights the precision ships (runtime not available here)"


class EstimatedCandidates:

    def __init__(self, profile, ship: Callable, quiet: bool = False, judges: dict | None = None):
        """``judges``: precision -> an object whose ``quality(model, amount, windows, dense)`` judges
        that precision on the artifact itself where this machine can run it (``quality_by`` says how)."""
        self.profile, self._ship, self.quiet = profile, ship, quiet
        self.judges = judges or {}
        self.models: dict[float, object] = {}
        self.timings: dict[str, float] = defaultdict(float)
        self.int4_comparison: list[dict] = []

    def build(self, model, amount: float, precisions: tuple[str, ...], windows, dense) -> list[Candidate]:
        start = time.perf_counter()
        out = []
        sparse_weights = sparse_gemm_weights(model) if amount > 0 and self.profile.sparse_tensor_cores else 0
        cost = model_cost(model)
        for precision in precisions:
            judge = self.judges.get(precision)
            if judge is not None:
                q, quality_by = judge.quality(model, amount, windows, dense), judge.quality_by
            else:
                say(f"judging {precision} weights at amount {amount:g} in torch", self.quiet)
                q, quality_by = measure_quality(rounded_copy(model, precision), windows, dense), QUALITY_BY
            out.append(estimated_candidate(self.profile, model, cost, amount, precision, q, quality_by,
                                           sparse_weights))
        self.models[amount] = model
        self.timings["judge"] += time.perf_counter() - start
        return out

    def measure(self, candidates: list[Candidate]) -> None:
        """Nothing to time here: the estimates were made with the candidates."""

    def ship(self, chosen: Candidate, stage: Path, context) -> ExportOutcome:
        return self._ship(context)


def estimated_candidate(profile, model, cost, amount: float, precision: str, quality, quality_by: str,
                        sparse_weights: int) -> Candidate:
    """A candidate judged by ``quality`` whose size is computed and whose latency is the profile's
    roofline. Sparse tensor cores (a TensorRT profile): the GEMMs that hold 2:4
    (``sparse_weights`` of them) are stored compressed and their share of the linear FLOPs runs
    ``sparse_gemm_speedup`` faster, counted per layer (a subset of blocks may be kept dense); the
    dense peak is the base rate. ``model`` may be a skeleton: only shapes are read."""
    rates = profile.peak_tflops
    peak = rates.get(precision, rates["fp16"])  # 4-bit and palettized weights compute in fp16
    size = sparse_stored_bytes(model, precision, sparse_weights)
    estimate = estimate_latency(cost, size, peak, profile.memory_bandwidth_gbs,
                                gemm_speedup=profile.sparse_gemm_speedup if sparse_weights else 1.0,
                                sparse_flops_per_token=2 * sparse_weights)
    return Candidate(amount, precision, ppl_increase=quality.increase_pct,
                     ppl_increase_upper=quality.increase_upper_pct, kl=quality.kl, top1=quality.top1,
                     quality_by=quality_by, decode_ms=estimate["decode_ms"], prefill_ms=estimate["prefill_ms"],
                     latency_basis="estimated", bytes=size, size_basis="computed", extra={"estimate": estimate})
