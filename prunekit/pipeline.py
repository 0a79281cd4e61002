"""The four flows, one function each: ``deploy``, ``prune_to_folder``, ``evaluate`` and ``export``.

Each checks every input it can before a model loads (a bad input costs seconds, not a prune), then
runs its stages in order; the CLI only parses arguments and prints what these return.

deploy: profile -> plan -> memory (in memory, or streamed: prunekit.deploy_memory) -> load ->
calibrate + prune -> save -> export (verify, quantize, measure) -> quality of the shipped artifact,
by its runtime, on every evaluation text -> gate -> report. The in-memory and the streamed search
(``_search_resident``, ``_search_streamed``) leave the report the same record (``Searched``).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prunekit.arch import architecture_for
from prunekit.errors import QualityGateFailed, UserInputError
from prunekit.evaluation import EvalText, Quality, measure_qualities, parse_eval_spec, text_windows
from prunekit.outputs import check_output, staged_output
from prunekit.pattern import Pattern
from prunekit.plan import Budget, Plan, dense_precision, make_plan, plan_for_folder
from prunekit.profile import load_profile
from prunekit.progress import quiet_libraries, say
from prunekit.pruning.registry import method as method_entry
from prunekit.textsources import check_source

SELF_CALIBRATION = "self"
MAX_SEED = 2**63 - 1


@dataclass
class DeployResult:
    out: Path
    report: dict

    @property
    def gate_passed(self) -> bool:
        return self.report["gate"]["status"] != "failed"


@dataclass(frozen=True)
class Calibration:
    source: str
    samples: int
    seqlen: int
    seed: int = 0
    own: int = 0  # samples the model writes itself, mixed in among a text's (prunekit.calibration.mix_own_text)

    @property
    def needs_model(self) -> bool:
        """Whether calibrating generates text with the whole model."""
        return self.source == SELF_CALIBRATION or self.own > 0

    def check(self) -> "Calibration":
        if self.samples < 1 or self.seqlen < 2:
            raise UserInputError(f"calibration needs at least 1 sample of 2 tokens, got {self.samples} x "
                                 f"{self.seqlen}: raise --calib-samples / --calib-seqlen")
        if self.own < 0:
            raise UserInputError(f"--calib-own {self.own} is not valid: use a count >= 0 (0: the text alone)")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserInputError(f"--seed {self.seed} is out of range: use an integer in [0, 2^63 - 1]")
        check_source(self.source, "calibration")
        return self


@dataclass(frozen=True)
class Evaluation:
    texts: tuple[EvalText, ...]
    seqlen: int = 512
    windows: int | None = 16  # first K windows of each text; None: all

    @classmethod
    def parse(cls, specs: list[str] | None, seqlen: int = 512, windows: int | None = 16) -> "Evaluation":
        if seqlen < 2:
            raise UserInputError(f"--eval-seqlen {seqlen} is too short: a window needs at least 2 tokens")
        if windows is not None and windows < 1:
            raise UserInputError(f"--eval-windows {windows} is not valid: use a count >= 1, or 0 for all")
        texts = tuple(parse_eval_spec(s) for s in (specs or ["pydoc"]))
        for text in texts:
            check_source(text.source, "evaluation")
        return cls(texts, seqlen, windows)

    def token_windows(self, tokenizer) -> list:
        return [text_windows(tokenizer, t, self.seqlen, self.windows) for t in self.texts]


def quality_gate(quality: list[Quality], budget: Budget, shipped=None) -> dict:
    """Passed, failed (with what missed) or not set: the shipped artifact's quality on every
    evaluation text, and the shipped candidate's latency and size, against the budget."""
    if not budget.is_set:
        return {"status": "not set"}
    misses = [f"{q.language}: {miss}" for q in quality for miss in budget.misses(ppl_increase=q.increase_pct, kl=q.kl)]
    if shipped is not None:
        misses += budget.misses(latency_ms=shipped.decode_ms, size_mb=shipped.size_mb)
    return {"status": "failed" if misses else "passed", **budget.limits, "sources": dict(budget.sources),
            "judged": _judged(quality[0].runtime if quality else "torch"),
            "reason": "; ".join(misses) or None}


def _judged(runtime: str) -> str:
    if runtime == "torch":
        return "pruned model in torch"
    return "shipped weights in torch" if runtime.startswith("torch") else "shipped artifact"


def _announce_self_calibration(calibration: Calibration, quiet: bool) -> None:
    if calibration.source == SELF_CALIBRATION:
        say(f"no --calib: the model writes its own calibration text ({calibration.samples} x "
            f"{calibration.seqlen} tokens, minutes on a CPU); pass --calib FILE for in-domain text "
            f"(better quality, faster)", quiet)
    elif calibration.own:
        say(f"the model writes {calibration.own} x {calibration.seqlen} tokens of its own to mix into the "
            f"calibration text, so the refit holds on other text (--calib-own 0: the text alone)", quiet)


def _load(model: str | None, quiet: bool):
    from prunekit.models import load_model

    say(f"loading {model or 'the embedded default model'}", quiet)
    return load_model(model)


@dataclass
class Searched:
    """What deploy's search left for the report, resident or streamed: the candidates, the choice,
    the shipped export and its quality."""

    source: str
    config: object
    parameters: dict
    fit_ids: object
    selection_ids: object
    explored: object
    builder: object
    selection: object
    result: object  # the chosen amount's PruneResult (None: the dense model ships)
    export: object
    quality: list
    quality_pruned_torch: list
    memory: dict


def deploy(target: str, model: str | None = None, out: str | Path | None = None, force: bool = False,
           method: str | None = None, sparsity: float | None = None, pattern: str | Pattern | None = None,
           precision: str | None = None, calib: str | None = None, calib_samples: int | None = None,
           calib_seqlen: int | None = None, seed: int = 0, evals: list[str] | None = None,
           eval_seqlen: int = 512, eval_windows: int | None = 16, max_ppl_increase: float | None = None,
           max_kl: float | None = None, max_latency_ms: float | None = None, max_size_mb: float | None = None,
           granularity: str = "channels", int8_flavour: str = "weight-only", quiet: bool = False,
           max_memory: int | None = None, stream: bool = False, calib_own: int | None = None) -> DeployResult:
    """Run the whole job; raises QualityGateFailed (exit 3) after writing everything if the shipped
    artifact misses the budget (nothing within it: the closest candidate ships). A model whose
    in-memory deploy would not fit ``max_memory`` bytes (default: the machine's memory) is deployed
    streamed, one decoder block in memory (prunekit.deploy_memory), as with ``stream``."""
    quiet_libraries(quiet)
    import tempfile

    from prunekit.deploy_memory import deploy_memory
    from prunekit.exporters.latency import peak_rss_gb
    from prunekit.models import gguf_parsed_once, open_streamed
    from prunekit.report import SCHEMA, artifact_list, hardware, versions, write_report
    from prunekit.threads import use_usable_cores

    profile = load_profile(target)
    budget = Budget.resolve(profile, max_ppl_increase=max_ppl_increase, max_kl=max_kl,
                            max_latency_ms=max_latency_ms, max_size_mb=max_size_mb)
    plan = make_plan(profile, method, pattern, sparsity, precision, granularity, budget=budget)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    out = Path(out or f"prunekit-out/{profile.name}")
    source, samples = calib or profile.default_calib, calib_samples or profile.default_calib_samples
    calibration = Calibration(source, samples, calib_seqlen or profile.default_calib_seqlen, seed,
                              method_entry(plan.method).own_samples(samples, source, calib_own)).check()
    if calibration.samples < 4:
        raise UserInputError(f"deploy holds calibration samples out to judge candidates: use --calib-samples "
                             f">= 4 (got {calibration.samples})")
    evaluation = Evaluation.parse(evals, eval_seqlen, eval_windows)
    check_output(out, force, keep=tuple(p for p in [model] if p and Path(p).exists()))
    use_usable_cores()

    timings, began = {}, time.perf_counter()
    with gguf_parsed_once():  # the memory decision and an in-memory load parse a GGUF's metadata once
        opened = open_streamed(model)  # config, tokenizer and a skeleton: no weight is read
        memory = deploy_memory(opened.model, profile, plan.method, calibration, max_memory, stream,
                               int8_flavour)  # refuses before any weight is read
        if memory.streamed:
            say(memory.reason, quiet)
            loaded = opened
        else:
            loaded = _load(model, quiet)
    timings["load"] = time.perf_counter() - began
    del opened
    with staged_output(out, force) as stage, tempfile.TemporaryDirectory(prefix="prunekit-candidates-") as scratch:
        search = _search_streamed if memory.streamed else _search_resident
        found = search(loaded, model, profile, plan, calibration, evaluation, Path(scratch), stage, int8_flavour,
                       memory, timings, quiet)
        chosen = found.selection.chosen
        gate = quality_gate(found.quality, plan.budget, chosen)
        result, explored, selection_ids = found.result, found.explored, found.selection_ids
        report = {
            "schema": SCHEMA, "target": profile.name, "model": found.source,
            "architecture": architecture_for(found.config).family, "plan": plan.as_dict(),
            "method": plan.method if chosen.amount > 0 else "none",
            "pattern": str(plan.pattern) if chosen.amount > 0 else "none",
            "sparsity": plan.sparsity, "precision": plan.precision, "parameters": found.parameters,
            "calibration": {"source": calibration.source, "samples": int(found.fit_ids.shape[0]),
                            "seqlen": calibration.seqlen, "own_samples": calibration.own,
                            "selection_samples": int(selection_ids.shape[0])},
            "seed": seed, "mask_hash": result.mask_hash if result is not None else None,
            "pruning": ({"check": result.check, **{k: v for k, v in result.details.items() if k != "structure"}}
                        if result is not None else {"check": None, "note": "no pruning was chosen"}),
            "search": {"space": plan.search and plan.search.as_dict(), "budget": budget.as_dict(),
                       "selected_on": f"{selection_ids.shape[0]} held-out calibration samples x "
                                      f"{selection_ids.shape[1]} tokens ("
                                      + ("self-generated" if calibration.source == "self" else
                                         "from the end of the calibration text, apart from the fitted ones")
                                      + "; never the evaluation text), each candidate judged by the 95% "
                                        "upper confidence bound of its perplexity increase over them",
                       "selection": found.selection.as_dict(), "screen": explored.screen,
                       "int4_quantizers": found.builder.int4_comparison,
                       "candidates": [c.as_dict() for c in explored.candidates]},
            "quality": [q.as_dict() for q in found.quality],
            "quality_pruned_torch": [q.as_dict() for q in found.quality_pruned_torch],
            "latency": found.export.latency, "variants": found.export.variants,
            "export": {"status": found.export.status, "reason": found.export.reason, "checks": found.export.checks},
            "gate": gate, "hardware": hardware(), "timings": {k: round(v, 2) for k, v in timings.items()},
            "resources": {"wall_seconds": round(time.perf_counter() - began, 1),
                          "peak_rss_gb": round(peak_rss_gb(), 3), "memory": found.memory,
                          "note": "peak RSS (VmHWM) of the deploy process; the latency process reports "
                                  "its own with each candidate"
                                  + ("; in a streamed deploy, each ONNX Runtime judging process its own "
                                     "(export.checks)" if memory.streamed else "")},
            "versions": versions(), "artifacts": [],
        }
        report["artifacts"] = artifact_list(stage)
        write_report(report, stage)
    say(f"wrote {out}", quiet)
    deployed = DeployResult(out, report)
    if not deployed.gate_passed:
        raise QualityGateFailed(f"budget missed: {gate['reason']} (the closest candidate, {chosen.name}, "
                                f"and its report are written to {out})")
    return deployed


def _grid(plan: Plan, profile, quiet: bool) -> list:
    """The (amount, precisions) deploy builds: the search's, or the fixed plan beside the dense float model."""
    reference = dense_precision(profile)
    if plan.search is not None:
        say(f"searching {plan.search.size} candidates ({plan.method} amounts x precisions) for the "
            f"{'fastest' if plan.search.objective == 'latency' else 'smallest'} within budget", quiet)
        return [(a, plan.search.precisions) for a in plan.search.amounts]
    say(f"plan: {plan.method} {plan.pattern} sparsity {plan.sparsity:g}, {plan.precision}", quiet)
    return [(0.0, (reference,)), (plan.sparsity, (plan.precision,))] if plan.sparsity > 0 else \
        [(0.0, tuple(dict.fromkeys((reference, plan.precision))))]


def _choose(plan: Plan, candidates: list, quiet: bool):
    """The budgeted choice among ``candidates``, or the fixed plan's candidate; the plan records it."""
    from prunekit.search import Selection, select

    if plan.search is not None:
        selection = select(candidates, plan.budget, plan.search.objective)
    else:
        fixed = next(c for c in candidates if (c.amount, c.precision) == (plan.sparsity, plan.precision))
        fixed.judge(plan.budget)
        selection = Selection(fixed, None, not fixed.misses, "the fixed plan (--sparsity and --precision given)")
    plan.sparsity, plan.precision = selection.chosen.amount, selection.chosen.precision
    plan.reasons.append(f"chosen: {selection.reason}")
    say(f"chose {selection.chosen.name}: {selection.reason}", quiet)
    return selection


def _calibrate(calibration: Calibration, tokenizer, model, quiet: bool, timings: dict):
    from prunekit.calibration import calibration_ids
    from prunekit.search import selection_count, selection_split

    _announce_self_calibration(calibration, quiet)
    start = time.perf_counter()
    calib_ids = calibration_ids(calibration.source, tokenizer, calibration.samples, calibration.seqlen,
                                calibration.seed, model=model, progress=not quiet,
                                held_out=selection_count(calibration.samples), own=calibration.own)
    timings["calibrate"] = time.perf_counter() - start
    return selection_split(calib_ids, calibration.samples)


def _calibrate_streamed(loaded, calibration: Calibration, quiet: bool, timings: dict):
    """Calibration of a streamed deploy: a text needs no model; the model writing its own text
    (all of it, or some to mix in) needs every block at once, so it is read whole for that step
    only, blocks in bfloat16 and head in float32 (prunekit.weights.whole_model), and freed: on
    Qwen2.5-Coder-1.5B (7.1 GB in float32) that step peaked at 5.65 GB and wrote 64 x 256 tokens
    in 360 s (docs/memory.md)."""
    if not calibration.needs_model:
        return _calibrate(calibration, loaded.tokenizer, None, quiet, timings)
    with _own_text_writer(loaded, quiet) as writer:
        return _calibrate(calibration, loaded.tokenizer, writer, quiet, timings)


@contextlib.contextmanager
def _own_text_writer(loaded, quiet: bool):
    """The model that writes calibration text: ``loaded.model`` when it is in memory; a streamed
    one read whole for the step, blocks in bfloat16 and head in float32
    (prunekit.weights.whole_model), and freed after it."""
    if not loaded.streamed:
        yield loaded.model
        return
    from prunekit.pruning.blocks import return_freed_memory
    from prunekit.weights import whole_model

    say("reading the whole model in bfloat16 for it to write its calibration text", quiet)
    writer = whole_model(loaded.model.config, loaded.weights)
    try:
        yield writer
    finally:
        del writer
        return_freed_memory()


def _search_resident(loaded, model, profile, plan, calibration, evaluation, scratch: Path, stage: Path,
                     int8_flavour: str, memory, timings: dict, quiet: bool) -> Searched:
    """The whole model in memory (``loaded``): each amount prunes a copy of the dense model."""
    from prunekit.checkpoint import save_checkpoint
    from prunekit.evaluation import StoredLogits
    from prunekit.search import explore
    from prunekit.targets import ExportContext, candidate_builder

    dense = loaded.model  # never modified: each amount prunes a copy
    fit_ids, selection_ids = _calibrate(calibration, loaded.tokenizer, dense, quiet, timings)

    windows = evaluation.token_windows(loaded.tokenizer)
    probe = windows[0][0][:32]
    builder = candidate_builder(profile, scratch, probe, quiet, int8_flavour, list(fit_ids))
    explored = explore(loaded, dense, plan, _grid(plan, profile, quiet), fit_ids, selection_ids, builder,
                       calibration.source, screen=plan.search is not None, progress=not quiet,
                       reference=StoredLogits(dense, scratch / "dense-logits"), calib_own=calibration.own)
    builder.measure(explored.candidates)
    timings.update({f"search_{k}": v for k, v in explored.seconds.items()})
    selection = _choose(plan, explored.candidates, quiet)
    chosen = selection.chosen
    result = explored.pruned.get(chosen.amount)
    shipped_model = result.model if result is not None else dense

    start = time.perf_counter()
    manifest = result.manifest(loaded.source) if result is not None else _dense_manifest(loaded.source)
    save_checkpoint(shipped_model, loaded.tokenizer, stage / "model", manifest)
    timings["save"] = time.perf_counter() - start

    first = evaluation.texts[0]
    context = ExportContext(profile=profile, plan=plan, model=shipped_model, stage=stage, probe_tokens=probe,
                            calib_tokens=fit_ids, eval_windows=windows[0], dense=dense,
                            int8_flavour=int8_flavour, quiet=quiet,
                            dense_blocks=tuple(result.details.get("dense_blocks", ())) if result else (),
                            eval_label=f"{first.language} ({first.source}), {len(windows[0])} x "
                                       f"{evaluation.seqlen} tokens")
    export = _ship(builder, chosen, stage, context, timings)
    start = time.perf_counter()
    shipped, pruned_torch = _quality(shipped_model, dense, export, evaluation, windows, quiet, plan.precision)
    timings["evaluate"] = time.perf_counter() - start
    return Searched(loaded.source, dense.config, _parameters(dense, shipped_model), fit_ids, selection_ids,
                    explored, builder, selection, result, export, shipped, pruned_torch, memory.as_dict())


def _search_streamed(loaded, model, profile, plan, calibration, evaluation, scratch: Path, stage: Path,
                     int8_flavour: str, memory, timings: dict, quiet: bool) -> Searched:
    """One decoder block in memory (prunekit.search_streamed): ``loaded`` is the model opened
    streamed (prunekit.models.open_streamed), ``model`` its path, opened afresh for each prune. The
    dense logits of the selection tokens, the probe and every evaluation text come from one pass
    over the model's blocks; each amount is pruned into a folder, its artifacts written from there
    and judged in ONNX Runtime processes of their own (prunekit.targets.cpu_onnx_streamed,
    prunekit.targets.tensorrt_streamed)."""
    from prunekit.evaluation import StoredLogits
    from prunekit.pruning.blocks import StreamedLogits
    from prunekit.search_streamed import explore_streamed
    from prunekit.targets import streamed_candidate_builder

    fit_ids, selection_ids = _calibrate_streamed(loaded, calibration, quiet, timings)
    windows = evaluation.token_windows(loaded.tokenizer)
    probe = windows[0][0][:32]

    start = time.perf_counter()
    say("computing the dense model's logits on the selection tokens, the probe and the evaluation texts, one "
        "decoder block at a time", quiet)
    dense = StreamedLogits(loaded.model, loaded.weights, [selection_ids, probe[None], *windows])
    reference = StoredLogits(dense, scratch / "dense-logits")
    timings["reference"] = time.perf_counter() - start

    builder = streamed_candidate_builder(profile, plan, scratch, probe, fit_ids, loaded.model, quiet)
    explored = explore_streamed(model, loaded, plan, _grid(plan, profile, quiet), fit_ids, selection_ids, builder,
                                calibration.source, scratch, probe, dense.logits_of(probe[None])[0], reference,
                                memory.calibration_batch, screen=plan.search is not None, progress=not quiet,
                                calib_own=calibration.own)
    builder.measure(explored.candidates)
    timings.update({f"search_{k}": v for k, v in explored.seconds.items()})
    selection = _choose(plan, explored.candidates, quiet)
    chosen = selection.chosen
    pruned = explored.pruned.get(chosen.amount)

    start = time.perf_counter()
    if pruned is None:
        _copy_streamed(loaded, stage / "model")
        shipped = None
    elif pruned.partial:  # the every-block folder with dense blocks blended in: written as its own checkpoint
        shipped = pruned.open()
        _copy_streamed(shipped, stage / "model", pruned.result.manifest(loaded.source))
    else:
        shutil.copytree(pruned.folder, stage / "model")
        shipped = pruned.open()
    timings["save"] = time.perf_counter() - start
    shipped_model = loaded.model if shipped is None else shipped.model
    export = _ship(builder, chosen, stage, None, timings)

    start = time.perf_counter()
    quality, pruned_torch = _quality_streamed(shipped, dense, export, evaluation, windows, scratch, quiet)
    timings["evaluate"] = time.perf_counter() - start
    return Searched(loaded.source, loaded.model.config, _parameters(loaded.model, shipped_model), fit_ids,
                    selection_ids, explored, builder, selection, pruned and pruned.result, export, quality,
                    pruned_torch, memory.as_dict())


def _quality_streamed(pruned, dense, export, evaluation: Evaluation, windows: list, scratch: Path, quiet: bool):
    """``_quality`` for a streamed deploy, per evaluation text: the shipped artifact judged in an
    ONNX Runtime process of its own, and (when an amount was pruned: ``pruned``, its folder opened
    streamed) the pruned model in torch, block by block, against ``dense``
    (prunekit.pruning.blocks.StreamedLogits)."""
    from prunekit.evaluation import StoredLogits
    from prunekit.exporters.onnx_judge import judge_in_subprocess
    from prunekit.pruning.blocks import StreamedLogits

    say("evaluating quality against the dense model (the shipped artifact in ONNX Runtime, a process of its "
        "own" + (", and the pruned model in torch, one block at a time)" if pruned else ")"), quiet)
    candidates = {}
    if pruned is not None:
        candidates["torch"] = StreamedLogits(pruned.model, pruned.weights, windows)
    shipped, pruned_torch = [], []
    for text, text_windows_ in zip(evaluation.texts, windows):
        logits = scratch / "shipped-logits"
        judge_in_subprocess(export.shipped_onnx, text_windows_.numpy(), logits)
        measured = measure_qualities({**candidates, "shipped": StoredLogits(None, logits)}, text_windows_, dense,
                                     text.language, text.source, progress=not quiet,
                                     runtimes={"shipped": export.shipped_runtime})
        shutil.rmtree(logits)
        shipped.append(measured["shipped"])
        pruned_torch += [measured["torch"]] if "torch" in measured else []
    return shipped, pruned_torch


def _copy_streamed(loaded, folder: Path, manifest: dict | None = None) -> None:
    """A streamed model (the dense one unless ``manifest`` says otherwise) as a reloadable
    checkpoint, a block at a time from its source (prunekit.checkpoint)."""
    from prunekit.checkpoint import ShardWriter
    from prunekit.pruning.blocks import StreamedBlocks

    writer = ShardWriter(folder)
    blocks = StreamedBlocks(loaded.model, loaded.weights, writer)
    blocks.close_embedding()
    for index in range(loaded.model.config.num_hidden_layers):
        blocks.release(index, blocks.load(index))
    blocks.close()
    writer.finish(loaded.model, loaded.tokenizer, manifest or _dense_manifest(loaded.source))


def _dense_manifest(source: str) -> dict:
    return {"prunekit_manifest": 1, "source_model": source, "method": "none", "pattern": "unstructured",
            "sparsity": 0.0}


def _parameters(dense, shipped) -> dict:
    """Parameter counts (meta tensors count too: a streamed model's skeleton)."""
    return {"before": sum(p.numel() for p in dense.parameters()),
            "after": sum(p.numel() for p in shipped.parameters())}


def _ship(builder, chosen, stage: Path, context, timings: dict):
    start = time.perf_counter()
    export = builder.ship(chosen, stage, context)
    timings["ship"] = time.perf_counter() - start
    if export.status != "written":
        print(f"note: {export.reason}", file=sys.stderr)
    timings.update({f"export_{k}": v for k, v in export.timings.items()})
    return export


def _quality(pruned, dense, export, evaluation: Evaluation, windows: list, quiet: bool, precision: str):
    """Per evaluation text, one pass: the dense model, the pruned torch model and the shipped
    model: the artifact in its own runtime where this machine runs it, else torch on the weights
    ``precision`` ships (prunekit.weight_rounding, as the search judged it). The gate judges the
    shipped one. When no pruning was chosen, the torch row would be the dense model itself: it is
    left out."""
    from prunekit.weight_rounding import rounded_copy

    candidates, runtimes = {}, {}
    if export.shipped_onnx is not None:
        from prunekit.exporters.onnx import OnnxDecoder, onnx_logits

        candidates["shipped"] = onnx_logits(OnnxDecoder(export.shipped_onnx))
        runtimes["shipped"] = export.shipped_runtime
    elif precision != "fp32":
        candidates["shipped"] = rounded_copy(pruned, precision)
        runtimes["shipped"] = (f"torch, on the {precision} weights the artifact ships "
                               "(its runtime is not available here)")
    if not (pruned is dense and candidates):
        candidates = {"torch": pruned, **candidates}
    say("evaluating quality against the dense model" + (" (shipped artifact in its runtime, and torch)"
                                                          if len(candidates) > 1 else ""), quiet)
    measured = [measure_qualities(candidates, w, dense, t.language, t.source, progress=not quiet,
                                  runtimes=runtimes) for t, w in zip(evaluation.texts, windows)]
    pruned_torch = [m["torch"] for m in measured if "torch" in m]
    return [m.get("shipped", m.get("torch")) for m in measured], pruned_torch


def prune_to_folder(out: str | Path, method: str, model: str | None = None, sparsity: float | None = None,
                    pattern: str | Pattern | None = None, granularity: str = "channels", channel_multiple: int = 32,
                    restore: bool = True, calib: str | None = None, calib_samples: int | None = None,
                    calib_seqlen: int | None = None, seed: int = 0, force: bool = False,
                    quiet: bool = False, max_memory: int | None = None, calib_own: int | None = None):
    """`prunekit prune`: a reloadable Hugging Face folder with prunekit.json. With no --calib the
    model calibrates on its own text, 64 x 256 tokens (as the profiles do), and says so. With a
    calibration text the model is streamed (one decoder block in memory), its calibration batch
    the largest that fits ``max_memory`` bytes (default: the machine's memory); the samples of its
    own it mixes in (``calib_own``, the method's default share otherwise) are written by the
    model read whole in bfloat16 for that step (_own_text_writer)."""
    quiet_libraries(quiet)
    from prunekit.checkpoint import ShardWriter, probe_ids, probe_record, save_checkpoint
    from prunekit.calibration import calibration_ids
    from prunekit.memory import calibration_batch, machine_bytes, text_writing_bytes
    from prunekit.pruning.distributed import is_writer, start_from_environment
    from prunekit.pruning.registry import default_pattern, method as lookup_method
    from prunekit.pruning.run import make_pruner, prune
    from prunekit.threads import use_usable_cores

    chosen = lookup_method(method)
    parsed = (Pattern.parse(pattern) if isinstance(pattern, str) else pattern) or default_pattern(method)
    chosen.check_pattern(parsed)
    sparsity = parsed.resolve_sparsity(sparsity, 0.5)
    options = ({"granularity": granularity, "channel_multiple": channel_multiple, "restore": restore}
               if chosen.structured else {})
    make_pruner(method, sparsity, parsed, **options)  # option errors before the model loads
    source = calib or SELF_CALIBRATION
    self_written = source == SELF_CALIBRATION  # all of it (``calibration.own``: the samples mixed into a text)
    samples = calib_samples or (64 if self_written else 128)
    calibration = Calibration(source, samples, calib_seqlen or (256 if self_written else 512), seed,
                              chosen.own_samples(samples, source, calib_own)).check()
    if self_written and max_memory is not None:
        raise UserInputError("--max-memory bounds a streamed prune, and self-calibration generates text with "
                             "the whole model in memory: pass --calib FILE")
    out = Path(out)
    check_output(out, force, keep=tuple(p for p in [model] if p and Path(p).exists()))
    use_usable_cores()

    start_from_environment()  # under torchrun: this process's share of the calibration batches
    quiet = quiet or not is_writer()
    batch_size = 8
    if self_written:  # the model writes its calibration text: that takes the whole model in memory
        loaded = _load(model, quiet)
        _announce_self_calibration(calibration, quiet)
    else:
        from prunekit.models import open_streamed

        say(f"opening {model or 'the embedded default model'} (streamed: one decoder block in memory at a time)",
            quiet)
        loaded = open_streamed(model)
        budget = max_memory or machine_bytes()
        config = loaded.model.config
        batch_size, need = calibration_batch(config, method, calibration.samples + calibration.own,
                                             calibration.seqlen, budget)
        say(f"memory: about {need.total / 1e9:.1f} GB at a calibration batch of {batch_size} "
            f"(budget {budget / 1e9:.1f} GB)", quiet)
        if calibration.own:
            text_writing_bytes(config, loaded.num_parameters(), calibration.own, calibration.seqlen, budget,
                               f"the memory budget is {budget / 1e9:.1f} GB", "--calib-own 0")
    calib_ids = None
    if calibration.own:
        _announce_self_calibration(calibration, quiet)
        with _own_text_writer(loaded, quiet) as writer_model:
            calib_ids = calibration_ids(calibration.source, loaded.tokenizer, calibration.samples,
                                        calibration.seqlen, calibration.seed, model=writer_model,
                                        progress=not quiet, own=calibration.own)
    with (staged_output(out, force) if is_writer() else contextlib.nullcontext(None)) as stage:
        writer = ShardWriter(stage) if loaded.streamed and stage else None
        result = prune(loaded, method, sparsity, parsed, calib=calibration.source,
                       calib_samples=calibration.samples, calib_seqlen=calibration.seqlen,
                       seed=calibration.seed, progress=not quiet, writer=writer, batch_size=batch_size,
                       probe=probe_ids(loaded.tokenizer), calib_ids=calib_ids, calib_own=calibration.own,
                       **options)
        manifest = result.manifest(loaded.source)
        manifest["probe"] = probe_record(loaded.tokenizer, result.probe_logits)
        if writer:
            writer.finish(result.model, loaded.tokenizer, manifest)
        elif stage:
            save_checkpoint(result.model, loaded.tokenizer, stage, manifest)
    return result


def evaluate(model: str | None, evals: list[str] | None = None, dense: str | None = None,
             eval_seqlen: int = 512, eval_windows: int | None = 16, quiet: bool = False) -> list[Quality]:
    """`prunekit eval`: perplexity per text, and KL / top-1 against ``dense`` ('default' = the
    embedded model)."""
    quiet_libraries(quiet)
    from prunekit.threads import use_usable_cores

    evaluation = Evaluation.parse(evals, eval_seqlen, eval_windows)
    use_usable_cores()
    loaded = _load(model, quiet)
    reference = None
    if dense:
        reference = _load(None if dense == "default" else dense, quiet).model
    windows = evaluation.token_windows(loaded.tokenizer)
    return [measure_qualities({"model": loaded.model}, w, reference, t.language, t.source,
                              progress=not quiet)["model"] for t, w in zip(evaluation.texts, windows)]


def export(target: str, model_dir: str | Path, out: str | Path, force: bool = False,
           precision: str | None = None, calib: str = "pydoc", quiet: bool = False):
    """`prunekit export`: a pruned folder to the target's artifact, with the plan the folder was
    pruned with (its prunekit.json); a folder that cannot serve the target is refused first.
    ``calib`` is the text static INT8 calibrates on. ONNX Runtime's fp32, INT8 and int4-source are written
    without loading the folder (prunekit.targets.cpu_onnx.build_streamed); the other artifacts
    load it, as their converters need the whole model."""
    quiet_libraries(quiet)
    from prunekit.calibration import calibration_ids
    from prunekit.models import read_manifest
    from prunekit.targets import ExportContext, export_for
    from prunekit.threads import use_usable_cores

    folder = Path(model_dir)
    if not folder.is_dir():
        raise UserInputError(f"--model {model_dir} is not a folder: pass the folder `prunekit prune` wrote")
    profile = load_profile(target)
    manifest = read_manifest(folder)
    plan: Plan = plan_for_folder(profile, manifest, precision)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    calibration = Calibration(calib, 8, 512).check()
    out = Path(out)
    check_output(out, force, keep=(folder,))
    use_usable_cores()

    from prunekit.targets.cpu_onnx import STREAMED_PRECISIONS

    if profile.runtime == "onnxruntime" and plan.precision in STREAMED_PRECISIONS:
        from prunekit.models import open_streamed
        from prunekit.targets.cpu_onnx import build_streamed

        say(f"opening {folder} (streamed: one tensor or decoder block in memory at a time)", quiet)
        loaded = open_streamed(str(folder))
        with staged_output(out, force) as stage:
            return build_streamed(loaded, plan.sparsity, plan.precision, stage, quiet)
    loaded = _load(str(folder), quiet)
    with staged_output(out, force) as stage:
        tokens = calibration_ids(calibration.source, loaded.tokenizer, calibration.samples,
                                 calibration.seqlen, calibration.seed, model=loaded.model, progress=not quiet)
        context = ExportContext(profile=profile, plan=plan, model=loaded.model, stage=stage,
                                probe_tokens=tokens[0][:32], calib_tokens=tokens, quiet=quiet,
                                dense_blocks=tuple((manifest or {}).get("dense_blocks", ())))
        outcome = export_for(profile.runtime, context)
    return outcome
