"""Candidates for runtimes that cannot run here (Core ML on Linux, TensorRT without a GPU).

Each candidate is judged in torch on the weights its precision ships (prunekit.weight_rounding),
its size is computed from the shapes and bits, and its latency is the profile's roofline
estimate; the report labels all three. Only the chosen candidate is converted (``ship``), by the
runtime's own back end, with every check that back end runs.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

from prunekit.estimate import TWO_FOUR_STORED_FRACTION, estimate_latency, model_cost
from prunekit.evaluation import measure_quality
from prunekit.progress import say
from prunekit.search import Candidate
from prunekit.targets import ExportOutcome
from prunekit.weight_rounding import rounded_copy, stored_bytes

QUALITY_BY = "torch, on the weights the precision ships (runtime not available here)"


class EstimatedCandidates:
    latency_basis = "estimated"

    def __init__(self, profile, ship: Callable, quiet: bool = False):
        self.profile, self._ship, self.quiet = profile, ship, quiet
        self.models: dict[float, object] = {}
        self.timings: dict[str, float] = defaultdict(float)
        self.int4_comparison: list[dict] = []

    def _peak(self, precision: str, sparse: bool) -> float:
        rates = self.profile.sparse_peak_tflops if sparse and self.profile.sparse_peak_tflops else self.profile.peak_tflops
        return rates.get(precision, rates["fp16"])  # 4-bit and palettized weights compute in fp16

    def _bytes(self, model, amount: float, precision: str) -> int:
        stored = stored_bytes(model, precision)
        if amount > 0 and self.profile.sparse_tensor_cores:
            from prunekit.arch import block_linears, decoder_layers

            bits = 8 if precision == "int8" else 16
            gemm = sum(lin.weight.numel() for layer in decoder_layers(model)
                       for lin in block_linears(model, layer).values())
            stored -= int(gemm * bits / 8 * (1 - TWO_FOUR_STORED_FRACTION))
        return stored

    def build(self, model, amount: float, precisions: tuple[str, ...], windows, dense) -> list[Candidate]:
        start = time.perf_counter()
        out = []
        sparse = amount > 0 and self.profile.sparse_tensor_cores
        speedup = self.profile.sparse_gemm_speedup if sparse else 1.0
        cost = model_cost(model)
        for precision in precisions:
            say(f"judging {precision} weights at amount {amount:g} in torch", self.quiet)
            q = measure_quality(rounded_copy(model, precision), windows, dense)
            size = self._bytes(model, amount, precision)
            estimate = estimate_latency(cost, size, self._peak(precision, sparse), self.profile.memory_bandwidth_gbs,
                                        gemm_speedup=speedup)
            out.append(Candidate(amount, precision, ppl_increase=q.increase_pct, kl=q.kl, top1=q.top1,
                                 quality_by=QUALITY_BY, decode_ms=estimate["decode_ms"],
                                 prefill_ms=estimate["prefill_ms"], latency_basis="estimated", bytes=size,
                                 size_basis="computed", extra={"estimate": estimate}))
        self.models[amount] = model
        self.timings["judge"] += time.perf_counter() - start
        return out

    def measure(self, candidates: list[Candidate]) -> None:
        """Nothing to time here: the estimates were made with the candidates."""

    def ship(self, chosen: Candidate, stage: Path, context) -> ExportOutcome:
        return self._ship(context)
