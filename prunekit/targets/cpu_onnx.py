"""cpu-onnx back end: every candidate is a real artifact. Each amount's model is traced once and
written (verified against torch: logits and greedy tokens through the KV cache), then quantized
per precision; ONNX Runtime itself computes each candidate's quality on the selection tokens, and
one process times every artifact side by side. The chosen artifact is copied, not rebuilt.

INT4 has two quantizers, compared on the first amount (the better one quantizes every amount):
ONNX Runtime's round-to-nearest on the export, and the same rounding after prunekit's
activation-aware preparation (prunekit.activation_scaling), whose float file is the amount's
trace written with the prepared weights (prunekit.exporters.onnx_streamed.rebind). int4-mixed is
the same with the output head and the MLP's down projection at 8 bits. int4-source rounds nothing:
the weights already on a 4-bit grid (a Q4 GGUF's) keep their integers (prunekit.source_grid), the
rest go to 8 bits."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from prunekit.activation_scaling import prepare_int4, prepare_int4_pair
from prunekit.arch import architecture_for
from prunekit.evaluation import measure_qualities
from prunekit.errors import UserInputError
from prunekit.exporters.latency import SETTINGS as LATENCY_SETTINGS, measure_in_subprocess
from prunekit.exporters.onnx import (OnnxDecoder, export_verified, onnx_bytes, onnx_logits, quantize_int4,
                                     quantize_int4_source, quantize_int8, require_verified)
from prunekit.progress import say
from prunekit.search import BUILT, SKIPPED, Candidate
from prunekit.targets import ExportOutcome

INT4_QUANTIZERS = ("rtn-symmetric", "activation-aware")
# Calibration tokens the 4-bit preparation fits on (the first windows of the fit samples): on the
# default model int4-mixed reads +10.3% on 8 WikiText-2 test windows fitted on 8 x 256 and +5.5%
# on 64 x 256, INT4 +18.0% and +11.5%, the preparation then 74 s (bench/int4_rounding.py
# --fit-windows N); its memory grows with the widths only (its Grams), not with the tokens.
INT4_FIT_TOKENS = 64 * 256
QDQ_WINDOWS = 8  # static INT8 (qdq) calibrates on this many windows: an ONNX Runtime pass over each
INT4_PRECISIONS = ("int4", "int4-mixed")
NO_SOURCE_GRID = ("no weight lies on a 4-bit grid (the source was not a 4-bit GGUF): int4-source would be "
                  "int8 under another name")


def eight_bit_names(model, precision: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The projections ``precision`` keeps at 8 bits: (torch module names, ONNX names: "logits" is
    the exported graph's head)."""
    if precision == "int4":
        return (), ()
    arch = architecture_for(model.config)
    return (arch.head, arch.down), ("logits", arch.down)


def _runtime() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider"


def record_latency(candidate: Candidate, row: dict) -> None:
    """A latency process's row (prunekit.exporters.latency) on its candidate, as measured."""
    candidate.decode_ms, candidate.prefill_ms = row["decode_ms"], row["prefill_ms"]
    candidate.latency_basis = "measured"
    candidate.extra["latency"] = row


def shipped_latency(chosen: Candidate) -> dict:
    """The report's latency section: the chosen candidate's measurement and its settings."""
    return {"basis": "measured", "runtime": _runtime(), "shipped": chosen.name,
            **{k: chosen.extra["latency"][k] for k in LATENCY_SETTINGS}}


def copy_artifact(source: Path, stage: Path) -> Path:
    """The artifact's files (``source`` and its external data) copied to ``stage``/onnx."""
    target = Path(stage) / "onnx"
    target.mkdir()
    for file in source.parent.iterdir():
        shutil.copy2(file, target / file.name)
    return target / "model.onnx"


class OnnxCandidates:
    """Builds, judges and times cpu-onnx candidates in ``scratch``; ships the chosen one."""

    def __init__(self, scratch: Path, probe, quiet: bool = False, int8_flavour: str = "weight-only",
                 calibration: list | None = None):
        self.scratch, self.probe, self.quiet = Path(scratch), probe, quiet
        self.int8_flavour = int8_flavour
        self.calibration = list(calibration or [])  # fit windows: the 4-bit preparation's and static INT8's
        self.paths: dict[tuple[float, str], Path] = {}
        self.checks: dict = {}
        self.timings: dict[str, float] = defaultdict(float)
        self.int4_quantizer: str | None = None
        self.int4_comparison: list[dict] = []
        self.int4_used: dict[float, str] = {}  # amount -> the quantizer of its int4 artifact

    def build(self, model, amount: float, precisions: tuple[str, ...], windows, dense) -> list[Candidate]:
        from prunekit.exporters.onnx_streamed import streamed_graph
        from prunekit.weights import ModuleWeights

        folder = self.scratch / f"amount-{amount:g}"
        start = time.perf_counter()
        say(f"exporting the {'dense' if amount == 0 else f'{amount:g}-pruned'} model to ONNX", self.quiet)
        graph = streamed_graph(model, ModuleWeights(model))
        fp32 = self._written(graph, model, folder / "fp32" / "model.onnx", f"export {amount:g}")
        self.timings["export_onnx"] += time.perf_counter() - start
        judged = {}  # precision -> (path, quality) already measured
        int4s = tuple(p for p in precisions if p in INT4_PRECISIONS)
        compare = bool(int4s) and self.int4_quantizer is None and dense is not None and bool(self.calibration)
        quantizer = self.int4_quantizer or ("activation-aware" if self.calibration else "rtn-symmetric")
        prepared = self._prepared(model, graph, amount, folder, int4s) if compare or (
            int4s and quantizer == "activation-aware") else {}
        if compare:
            judged[int4s[0]] = self._choose_int4(model, amount, fp32, prepared, folder, windows, dense, int4s[0])
        paths, skipped = {}, []
        for precision in precisions:
            if precision in judged:
                paths[precision] = judged[precision][0]
            elif precision == "fp32":
                paths[precision] = fp32
            elif precision in INT4_PRECISIONS:
                used = self.int4_quantizer or quantizer
                paths[precision] = self._int4(model, amount, prepared.get(precision) if used == "activation-aware"
                                              else fp32, folder, precision, used)
            elif precision == "int4-source":
                start = time.perf_counter()
                say("keeping the weights' own 4-bit grid (int4-source)", self.quiet)
                path = quantize_int4_source(fp32, folder / precision / "model.onnx")
                self.timings["quantize"] += time.perf_counter() - start
                if path is None:
                    skipped.append(Candidate(amount, precision, status=SKIPPED, why=NO_SOURCE_GRID))
                else:
                    paths[precision] = path
            else:
                start = time.perf_counter()
                say(f"quantizing to {precision}", self.quiet)
                paths[precision] = quantize_int8(fp32, folder / precision / "model.onnx", self.int8_flavour,
                                                 calibration=self.calibration[:QDQ_WINDOWS])
                self.timings["quantize"] += time.perf_counter() - start
        for path in prepared.values():
            shutil.rmtree(path.parent)
        to_judge = {p: path for p, path in paths.items() if p not in judged}
        qualities = self._quality(to_judge, windows, dense) if dense is not None else {}
        qualities.update({p: quality for p, (_, quality) in judged.items()})
        out = []
        for precision, path in paths.items():
            q = qualities.get(precision)
            self.paths[(amount, precision)] = path
            out.append(Candidate(amount, precision, ppl_increase=q and q.increase_pct,
                                 ppl_increase_upper=q and q.increase_upper_pct, kl=q and q.kl, top1=q and q.top1,
                                 quality_by=q and _runtime(), bytes=onnx_bytes(path), size_basis="file"))
        return out + skipped

    def _quality(self, paths: dict, windows, dense) -> dict:
        start = time.perf_counter()
        say(f"judging {', '.join(paths)} with ONNX Runtime on the selection tokens", self.quiet)
        sessions = {name: onnx_logits(OnnxDecoder(path)) for name, path in paths.items()}
        try:
            return measure_qualities(sessions, windows, dense)
        finally:
            sessions.clear()  # close the sessions: their threads must not share the cores with timing
            self.timings["judge"] += time.perf_counter() - start

    def _written(self, graph, model, path: Path, key: str) -> Path:
        """The streamed graph ``graph`` (of ``model``'s weights) saved to ``path`` and verified."""
        from prunekit.exporters.onnx_streamed import save_streamed

        self.checks[key] = require_verified(save_streamed(graph, path), model, self.probe)
        return path

    def _prepared(self, model, graph, amount: float, folder: Path, precisions: tuple[str, ...]) -> dict[str, Path]:
        """Float exports of the model prepared for each 4-bit precision (prunekit.activation_scaling),
        verified: the amount's trace ``graph`` written with the prepared weights. One preparation
        serves both: int4-mixed differs from int4 only in the projections it keeps at 8 bits (not
        clipped)."""
        from prunekit.exporters.onnx_streamed import rebind
        from prunekit.weights import ModuleWeights

        start = time.perf_counter()
        say(f"preparing the {'dense' if amount == 0 else f'{amount:g}-pruned'} model for "
            f"{' and '.join(precisions)}", self.quiet)
        windows = torch.stack(list(self.calibration[:max(1, INT4_FIT_TOKENS // len(self.calibration[0]))]))
        if len(precisions) == 1:
            models = {precisions[0]: prepare_int4(model, windows, eight_bit=eight_bit_names(model, precisions[0])[0])}
        else:
            models = dict(zip(INT4_PRECISIONS, prepare_int4_pair(model, windows,
                                                                 eight_bit=eight_bit_names(model, "int4-mixed")[0])))
        self.timings["prepare_int4"] += time.perf_counter() - start
        start = time.perf_counter()
        paths: dict[str, Path] = {}
        for precision in precisions:
            path, key = folder / f"{precision}-prepared" / "model.onnx", f"export {amount:g} {precision}"
            try:
                rebind(graph, ModuleWeights(models[precision]))
            except LookupError:  # the optimizer folded a weight the preparation changed: a trace of its own
                paths[precision], self.checks[key] = export_verified(models[precision], path, self.probe)
            else:
                paths[precision] = self._written(graph, models[precision], path, key)
                self.checks[key]["from"] = f"the trace of export {amount:g}"
        self.timings["export_onnx"] += time.perf_counter() - start
        return paths

    def _int4(self, model, amount: float, fp32: Path, folder: Path, precision: str, quantizer: str) -> Path:
        """The amount's ``precision`` (INT4_PRECISIONS) artifact by ``quantizer`` (INT4_QUANTIZERS),
        from ``fp32``: the plain export for round-to-nearest, the prepared one otherwise."""
        start = time.perf_counter()
        say(f"quantizing to {precision} ({quantizer})", self.quiet)
        self.int4_used[amount] = quantizer
        path = quantize_int4(fp32, folder / f"{precision}-{quantizer}" / "model.onnx",
                             eight_bit=eight_bit_names(model, precision)[1])
        self.timings["quantize"] += time.perf_counter() - start
        return path

    def _choose_int4(self, model, amount: float, fp32: Path, prepared: dict, folder: Path, windows, dense,
                     precision: str) -> tuple:
        """Both 4-bit quantizers, compared at ``precision`` on the first amount's selection tokens;
        the one with the least perplexity increase (what the budget judges) quantizes every amount
        and 4-bit precision."""
        say(f"comparing 4-bit quantizers ({', '.join(INT4_QUANTIZERS)})", self.quiet)
        sources = {"rtn-symmetric": fp32, "activation-aware": prepared[precision]}
        paths = {q: self._int4(model, amount, sources[q], folder, precision, q) for q in INT4_QUANTIZERS}
        qualities = self._quality(paths, windows, dense)
        self.int4_comparison = [{"quantizer": q, "precision": precision, "ppl_increase": qualities[q].increase_pct,
                                 "kl": qualities[q].kl, "top1": qualities[q].top1} for q in paths]
        self.int4_quantizer = min(paths, key=lambda q: qualities[q].increase_pct)
        self.int4_used[amount] = self.int4_quantizer
        for quantizer, path in paths.items():
            if quantizer != self.int4_quantizer:
                shutil.rmtree(path.parent)
        return paths[self.int4_quantizer], qualities[self.int4_quantizer]

    def measure(self, candidates: list[Candidate]) -> None:
        """Every built candidate timed in one process, round-robin (see prunekit.exporters.latency)."""
        built = [c for c in candidates if c.status == BUILT]
        start = time.perf_counter()
        say(f"timing {len(built)} artifacts side by side with ONNX Runtime", self.quiet)
        rows = measure_in_subprocess([self.paths[(c.amount, c.precision)] for c in built])
        for candidate, row in zip(built, rows):
            record_latency(candidate, row)
        self.timings["measure"] += time.perf_counter() - start

    def ship(self, chosen: Candidate, stage: Path, model=None) -> ExportOutcome:
        shipped = copy_artifact(self.paths[(chosen.amount, chosen.precision)], stage)
        runner = OnnxDecoder(shipped)
        quantizer = self.int4_used.get(chosen.amount) if chosen.precision in INT4_PRECISIONS else None
        export = f"export {chosen.amount:g}" + (f" {chosen.precision}" if quantizer == "activation-aware" else "")
        self.checks["shipped"] = {"kv_cache_io": runner.has_kv_cache,
                                  "verified_export": self.checks[export]["passed"], "int4_quantizer": quantizer}
        del runner
        return ExportOutcome("written", None, [], shipped_latency(chosen), self.checks, dict(self.timings),
                             shipped_onnx=shipped, shipped_runtime=_runtime())


def build(context) -> ExportOutcome:
    """`prunekit export`: the folder's model at the plan's precision, verified, timed and written
    (no quality: export has no dense model to compare with)."""
    with tempfile.TemporaryDirectory(prefix="prunekit-onnx-") as scratch:
        builder = OnnxCandidates(Path(scratch), context.probe_tokens, context.quiet, context.int8_flavour,
                                 list(context.calib_tokens[:8]))
        (candidate,) = builder.build(context.model, context.plan.sparsity, (context.plan.precision,), None, None)
        builder.measure([candidate])
        outcome = builder.ship(candidate, context.stage)
    outcome.variants = [candidate.as_dict()]
    return outcome


STREAMED_PRECISIONS = ("fp32", "int8", "int4-source")


def build_streamed(loaded, amount: float, precision: str, stage: Path, quiet: bool = False) -> ExportOutcome:
    """`prunekit export` of a folder it never loads (``loaded`` from prunekit.models.open_streamed):
    the fp32 graph written a tensor at a time and verified against torch logits computed a block
    at a time (and through its own KV cache); INT8 and int4-source written the same way, each
    weight quantized (or its own 4-bit grid found) as it is written (prunekit.exporters.onnx_streamed). Memory: one block for the reference, one
    tensor for the writes, and ONNX Runtime's session of the fp32 file for its verification."""
    from prunekit.checkpoint import probe_ids
    from prunekit.exporters.onnx_streamed import (as_int4_source, as_matmul_nbits, check_streamed_logits,
                                                  save_streamed, streamed_graph)
    from prunekit.pruning.blocks import streamed_logits

    timings: dict[str, float] = defaultdict(float)
    probe = probe_ids(loaded.tokenizer)[0]
    with tempfile.TemporaryDirectory(prefix="prunekit-onnx-") as scratch:
        start = time.perf_counter()
        say("computing the reference logits one decoder block at a time", quiet)
        reference = streamed_logits(loaded.model, loaded.weights, probe[None])[0]
        timings["reference"] = time.perf_counter() - start
        start = time.perf_counter()
        say("exporting to ONNX one tensor at a time", quiet)
        graph = streamed_graph(loaded.model, loaded.weights)
        fp32 = save_streamed(graph, Path(scratch) / "fp32" / "model.onnx")
        timings["export_onnx"] = time.perf_counter() - start
        start = time.perf_counter()
        checks = {f"export {amount:g}": {**check_streamed_logits(fp32, probe, reference), "streamed": True}}
        timings["verify"] = time.perf_counter() - start
        path = fp32
        if precision == "int8":
            start = time.perf_counter()
            say("writing INT8 (MatMulNBits) one tensor at a time", quiet)
            as_matmul_nbits(graph, bits=8)  # the fp32 trace, its weights quantized as they are written
            path = save_streamed(graph, Path(scratch) / "int8" / "model.onnx")
            timings["quantize"] = time.perf_counter() - start
        elif precision == "int4-source":
            start = time.perf_counter()
            say("writing the weights' own 4-bit grid (int4-source) one tensor at a time", quiet)
            if not as_int4_source(graph):
                raise UserInputError(f"--precision int4-source: {NO_SOURCE_GRID}; use int8 or int4")
            path = save_streamed(graph, Path(scratch) / "int4-source" / "model.onnx")
            timings["quantize"] = time.perf_counter() - start
        candidate = Candidate(amount, precision, bytes=onnx_bytes(path), size_basis="file")
        start = time.perf_counter()
        say("timing the artifact with ONNX Runtime", quiet)
        row = measure_in_subprocess([path])[0]
        timings["measure"] = time.perf_counter() - start
        record_latency(candidate, row)
        target = Path(stage) / "onnx"
        target.mkdir()
        for file in path.parent.iterdir():
            shutil.move(str(file), target / file.name)
    checks["shipped"] = {"kv_cache_io": checks[f"export {amount:g}"]["kv_cache_io"],
                         "verified_export": checks[f"export {amount:g}"]["passed"], "int4_quantizer": None}
    latency = shipped_latency(candidate)
    return ExportOutcome("written", None, [candidate.as_dict()], latency, checks, dict(timings),
                         shipped_onnx=target / "model.onnx", shipped_runtime=_runtime())
