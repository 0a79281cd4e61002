"""cpu-onnx candidates of a model that is never whole in memory (a streamed deploy, prunekit.pipeline).

Each amount's model is a weight source (the GGUF itself, or the folder its streamed prune wrote),
exported a tensor at a time (prunekit.exporters.onnx_streamed), traced once and the trace cloned
per precision (onnx_ir's clone; on a tiny model the files are byte for byte those of a trace
each): fp32;
INT8 and 4-bit weights by ONNX Runtime's block quantizer as they are written (int4-mixed keeps the
head and the down projection at 8 bits); int4-source. The 4-bit weights are rounded to nearest: the
activation-aware preparation (prunekit.activation_scaling) runs the whole model, so a streamed
deploy leaves it out and says so in each 4-bit candidate's record (NOT_PREPARED).

ONNX Runtime's session of an artifact holds all its weights (7.5 GB for the 1.5B model in fp32),
so no session opens in the deploy process: each artifact is judged in a process of its own
(prunekit.exporters.onnx_judge), its logits written to disk and read back here; the fp32 one is
verified there against the torch logits its source gives block by block. Artifacts are timed
round-robin in groups whose sessions together hold at most the largest artifact (the dense fp32
one alone) or GROUP_BYTES, whichever is more, one group after another: a small model's candidates
all side by side, as in the in-memory deploy; the 1.5B model's 8 in five groups (docs/memory.md).
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from prunekit.arch import architecture_for
from prunekit.evaluation import StoredLogits, measure_qualities
from prunekit.exporters.latency import measure_in_subprocess
from prunekit.exporters.onnx import onnx_bytes
from prunekit.progress import say
from prunekit.pruning.blocks import return_freed_memory
from prunekit.search import BUILT, SKIPPED, Candidate
from prunekit.targets import ExportOutcome
from prunekit.targets.cpu_onnx import (INT4_PRECISIONS, NO_SOURCE_GRID, _runtime, copy_artifact, record_latency,
                                       shipped_latency)

ROUNDING = "rtn-symmetric"
GROUP_BYTES = 4_000_000_000
NOT_PREPARED = ("streamed deploy: 4-bit weights are rounded to nearest (rtn-symmetric); the activation-aware "
                "preparation runs the whole model in memory and is left out")


def session_bytes(path: Path) -> int:
    """What ONNX Runtime's session of ``path`` holds: its weights, plus the runtime itself
    (0.3 GB; 7.51 GB for the 1.5B model's 7.11 GB fp32 file, docs/memory.md)."""
    return onnx_bytes(path) + 300_000_000


def latency_groups(paths: list[Path], limit: int) -> list[list[int]]:
    """Indices of ``paths`` in groups, in order, each group's sessions holding at most ``limit``
    bytes (a path larger than that alone): the sessions timed side by side at one time."""
    groups, held = [], limit + 1
    for index, path in enumerate(paths):
        need = session_bytes(path)
        if held + need > limit:
            groups.append([])
            held = 0
        groups[-1].append(index)
        held += need
    return groups


class StreamedOnnxCandidates:
    """Builds, judges and times cpu-onnx candidates from weight sources in ``scratch``; ships the chosen one."""

    int4_comparison = None  # one 4-bit quantizer only: nothing compared

    def __init__(self, scratch: Path, probe, quiet: bool = False):
        self.scratch, self.probe, self.quiet = Path(scratch), probe, quiet
        self.paths: dict[tuple[float, str], Path] = {}
        self.checks: dict[str, dict] = {}
        self.timings: dict[str, float] = defaultdict(float)
        self.groups: list[list[str]] = []

    def build(self, loaded, amount: float, precisions: tuple[str, ...], windows, reference,
              probe_reference) -> list[Candidate]:
        """Every precision of the model ``loaded`` (prunekit.models.open_streamed) written and judged
        on ``windows`` against ``reference``; ``probe_reference``: torch logits of the probe."""
        from prunekit.exporters.onnx_streamed import compare_probe, streamed_graph

        folder, out = self.scratch / f"amount-{amount:g}", []
        start = time.perf_counter()
        say(f"tracing the {'dense' if amount == 0 else f'{amount:g}-pruned'} model for ONNX", self.quiet)
        trace = streamed_graph(loaded.model, loaded.weights)
        self.timings["export_onnx"] += time.perf_counter() - start
        for precision in dict.fromkeys(("fp32", *precisions)):  # fp32 first: every amount's export is verified
            path = self._written(trace if precision == "fp32" else trace.clone(), loaded, precision, folder)
            if path is None:
                out.append(Candidate(amount, precision, status=SKIPPED, why=NO_SOURCE_GRID))
                continue
            start = time.perf_counter()
            candidate, verify = precision in precisions, precision == "fp32"
            say(f"{'judging' if candidate else 'verifying'} {precision} with ONNX Runtime (a process of its own)",
                self.quiet)
            logits = folder / f"{precision}-logits"
            judged = judge_in_subprocess(path, windows if candidate else windows[:0], logits,
                                         self.probe.numpy() if verify else None)
            if verify:
                self.checks[f"export {amount:g}"] = {
                    **compare_probe(np.load(logits / "probe-prefill.npy"), np.load(logits / "probe-steps.npy"),
                                    probe_reference, judged["kv_cache_io"]),
                    "streamed": True, "judge_peak_rss_gb": judged["peak_rss_gb"]}
            q = measure_qualities({precision: StoredLogits(None, logits)}, windows, reference)[precision] \
                if candidate else None
            shutil.rmtree(logits)
            self.timings["judge"] += time.perf_counter() - start
            if not candidate:  # written only to verify the trace the quantized files share
                shutil.rmtree(path.parent)
                continue
            self.paths[(amount, precision)] = path
            out.append(Candidate(amount, precision, ppl_increase=q.increase_pct, ppl_increase_upper=q.increase_upper_pct,
                                 kl=q.kl, top1=q.top1, quality_by=_runtime(), bytes=onnx_bytes(path),
                                 size_basis="file", extra={"int4_quantizer": ROUNDING, "note": NOT_PREPARED}
                                 if precision in INT4_PRECISIONS else {}))
        return out

    def _written(self, graph, loaded, precision: str, folder: Path) -> Path | None:
        """``precision``'s artifact from ``graph`` (a streamed trace of ``loaded``, changed in place),
        written a tensor at a time; None for int4-source when no weight lies on a 4-bit grid."""
        from prunekit.exporters.onnx_streamed import as_int4_source, as_matmul_nbits, save_streamed

        start = time.perf_counter()
        say(f"writing {precision}, one tensor at a time", self.quiet)
        if precision == "int8":
            as_matmul_nbits(graph, bits=8)
        elif precision in INT4_PRECISIONS:
            arch = architecture_for(loaded.model.config)
            as_matmul_nbits(graph, bits=4, exclude=("logits", arch.down) if precision == "int4-mixed" else ())
            as_matmul_nbits(graph, bits=8)  # int4-mixed's head and down projections; nothing left for int4
        elif precision == "int4-source" and not as_int4_source(graph):
            return None
        path = save_streamed(graph, folder / precision / "model.onnx")
        self.timings["export_onnx"] += time.perf_counter() - start
        return path

    def measure(self, candidates: list[Candidate], limit: int | None = None) -> None:
        """Every built candidate timed round-robin (prunekit.exporters.latency) in groups whose
        sessions hold at most ``limit`` bytes together (default: the largest artifact's session, or
        GROUP_BYTES if more)."""
        built = [c for c in candidates if c.status == BUILT]
        paths = [self.paths[(c.amount, c.precision)] for c in built]
        limit = limit or max(GROUP_BYTES, *map(session_bytes, paths))
        start = time.perf_counter()
        return_freed_memory()
        for group in latency_groups(paths, limit):
            self.groups.append([built[i].name for i in group])
            say(f"timing {', '.join(built[i].name for i in group)} side by side with ONNX Runtime", self.quiet)
            for index, row in zip(group, measure_in_subprocess([paths[i] for i in group])):
                record_latency(built[index], row)
        self.timings["measure"] += time.perf_counter() - start

    def ship(self, chosen: Candidate, stage: Path, context=None) -> ExportOutcome:
        shipped = copy_artifact(self.paths[(chosen.amount, chosen.precision)], stage)
        self.checks["shipped"] = {"kv_cache_io": self.checks[f"export {chosen.amount:g}"]["kv_cache_io"],
                                  "verified_export": self.checks[f"export {chosen.amount:g}"]["passed"],
                                  "int4_quantizer": ROUNDING if chosen.precision in INT4_PRECISIONS else None,
                                  "streamed": True, "latency_groups": self.groups}
        return ExportOutcome("written", None, [], shipped_latency(chosen), self.checks, dict(self.timings),
                             shipped_onnx=shipped, shipped_runtime=_runtime())


def judge_in_subprocess(path: Path, windows, folder: Path, probe) -> dict:
    """prunekit.exporters.onnx_judge's process, once this one has handed its free heap back: the
    two together are the deploy's peak."""
    from prunekit.exporters.onnx_judge import judge_in_subprocess as judge

    return_freed_memory()
    return judge(path, windows.numpy(), folder, probe)
