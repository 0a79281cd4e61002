"""`deploy`: profile -> plan -> calibrate -> prune -> quantize -> export -> measure -> report."""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prunekit.checkpoint import save_checkpoint
from prunekit.errors import QualityGateFailed, UserInputError
from prunekit.evaluation import evaluate_texts, parse_eval_spec, text_windows
from prunekit.models import load_model
from prunekit.outputs import check_output, staged_output
from prunekit.plan import make_plan
from prunekit.profile import load_profile
from prunekit.progress import say
from prunekit.pruning.run import prune
from prunekit.report import SCHEMA, artifact_list, hardware, versions, write_report
from prunekit.targets import export_for


@dataclass
class DeployResult:
    out: Path
    report: dict

    @property
    def gate_passed(self) -> bool:
        return self.report["gate"]["status"] != "failed"


def quality_gate(quality: list, max_ppl_increase: float | None, max_kl: float | None) -> dict:
    """Passed, failed (with the text that missed) or not set."""
    if max_ppl_increase is None and max_kl is None:
        return {"status": "not set"}
    misses = []
    for q in quality:
        increase = 100 * (q.perplexity / q.dense_perplexity - 1)
        if max_ppl_increase is not None and increase > max_ppl_increase:
            misses.append(f"{q.language}: perplexity +{increase:.1f}% > {max_ppl_increase:g}%")
        if max_kl is not None and q.kl > max_kl:
            misses.append(f"{q.language}: KL {q.kl:.4f} > {max_kl:g}")
    return {"status": "failed" if misses else "passed", "max_ppl_increase": max_ppl_increase,
            "max_kl": max_kl, "reason": "; ".join(misses) or None}


def export_context(profile, plan, model, dense, stage, eval_spec, windows, int8_flavour="weight-only",
                   quiet=False) -> dict:
    """What a back end needs: the model to ship, the dense reference, text to check quality on."""
    eval_seqlen = windows.shape[1]
    return {"profile": profile, "plan": plan, "model": model, "dense": dense, "stage": stage,
            "eval_windows": windows, "eval_label": f"{eval_spec.language} ({eval_spec.source}), "
                                                  f"{len(windows)} x {eval_seqlen} tokens",
            "probe_tokens": windows[0][:32], "int8_flavour": int8_flavour, "quiet": quiet}


def deploy(target: str, model: str | None = None, out: str | Path | None = None, force: bool = False,
           method: str | None = None, sparsity: float | None = None, pattern: str | None = None,
           int8: bool | None = None, calib: str | None = None, calib_samples: int | None = None,
           calib_seqlen: int | None = None, seed: int = 0, evals: list[str] | None = None,
           eval_seqlen: int = 512, eval_windows: int | None = 16, max_ppl_increase: float | None = None,
           max_kl: float | None = None, granularity: str = "channels", int8_flavour: str = "weight-only",
           quiet: bool = False) -> DeployResult:
    """Run the whole job; raises QualityGateFailed (exit 3) after writing everything if the gate misses."""
    timings = {}
    profile = load_profile(target)
    plan = make_plan(profile, method, pattern, sparsity, int8)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    out = Path(out or f"prunekit-out/{profile.name}")
    check_output(out, force)
    eval_specs = [parse_eval_spec(s) for s in (evals or ["pydoc"])]
    if max_ppl_increase is not None and max_ppl_increase < 0:
        raise UserInputError(f"--max-ppl-increase {max_ppl_increase} must be >= 0 (a percentage)")

    with staged_output(out, force) as stage:
        start = time.perf_counter()
        say(f"loading {model or 'the embedded default model'}", quiet)
        loaded = load_model(model)
        dense = copy.deepcopy(loaded.model)
        timings["load"] = time.perf_counter() - start

        say(f"plan: {plan.method} {plan.pattern} sparsity {plan.sparsity:g}, {plan.precision}", quiet)
        options = ({"granularity": granularity, "channel_multiple": profile.preferred_channel_multiple}
                   if plan.method == "fasp" else {})
        result = prune(loaded, plan.method, plan.sparsity, plan.pattern,
                       calib=calib or profile.default_calib,
                       calib_samples=calib_samples or profile.default_calib_samples,
                       calib_seqlen=calib_seqlen or profile.default_calib_seqlen,
                       seed=seed, progress=not quiet, **options)
        timings["calibrate"] = result.seconds["calibration_data"]
        timings["prune"] = result.seconds["prune"]

        start = time.perf_counter()
        save_checkpoint(result.model, loaded.tokenizer, stage / "model", result.manifest(loaded.source))
        timings["save"] = time.perf_counter() - start

        start = time.perf_counter()
        say("evaluating quality against the dense model", quiet)
        windows = [text_windows(loaded.tokenizer, spec, eval_seqlen, eval_windows) for spec in eval_specs]
        quality = evaluate_texts(result.model, loaded.tokenizer, eval_specs, eval_seqlen, eval_windows,
                                 dense=dense, progress=not quiet, windows=windows)
        timings["evaluate"] = time.perf_counter() - start

        context = export_context(profile, plan, result.model, dense, stage, eval_specs[0], windows[0],
                                 int8_flavour, quiet)
        start = time.perf_counter()
        export = export_for(profile.runtime, context)
        timings["export"] = time.perf_counter() - start
        if export.status != "written":
            print(f"note: {export.reason}", file=sys.stderr)
        timings.update(export.timings)

        gate = quality_gate(quality, max_ppl_increase, max_kl)
        report = {
            "schema": SCHEMA, "target": profile.name, "model": loaded.source, "plan": plan.as_dict(),
            "method": plan.method, "pattern": plan.pattern, "sparsity": plan.sparsity,
            "precision": plan.precision,
            "parameters": {"before": result.parameters_before, "after": result.parameters_after},
            "calibration": result.calibration, "seed": seed, "mask_hash": result.mask_hash,
            "pruning": {"check": result.check,
                        **{k: v for k, v in result.details.items() if k != "structure"}},
            "quality": [q.as_dict() for q in quality],
            "latency": export.latency, "variants": export.variants,
            "export": {"status": export.status, "reason": export.reason, "checks": export.checks},
            "gate": gate, "hardware": hardware(), "timings": {k: round(v, 2) for k, v in timings.items()},
            "versions": versions(), "artifacts": [],
        }
        report["artifacts"] = artifact_list(stage)
        write_report(report, stage)
    say(f"wrote {out}", quiet)
    deployed = DeployResult(out, report)
    if not deployed.gate_passed:
        raise QualityGateFailed(f"quality gate failed: {gate['reason']} (artifacts written to {out})")
    return deployed
