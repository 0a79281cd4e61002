"""`prunekit export`: turn a pruned folder into a target's artifact, staged like deploy's outputs."""

from __future__ import annotations

from pathlib import Path

from prunekit.evaluation import parse_eval_spec, text_windows

from prunekit.models import load_model
from prunekit.outputs import check_output, staged_output
from prunekit.pipeline import export_context
from prunekit.plan import make_plan
from prunekit.profile import load_profile
from prunekit.targets import ExportOutcome, export_for


def export_model(target: str, model_dir: str, out: Path, force: bool, int8: bool | None,
                 quiet: bool = False) -> ExportOutcome:
    profile = load_profile(target)
    plan = make_plan(profile, int8=int8)
    check_output(out, force)
    loaded = load_model(model_dir)
    with staged_output(out, force) as stage:
        spec = parse_eval_spec("pydoc")
        context = export_context(profile, plan, loaded.model, None, stage, spec,
                                 text_windows(loaded.tokenizer, spec, 512, 4), quiet=quiet)
        outcome = export_for(profile.runtime, context)
    return outcome
