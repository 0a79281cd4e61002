"""Per-runtime back ends of `deploy`: quantize, export, verify and measure for one kind of artifact.

A back end is looked up by the profile's runtime; one that is not available here says why in one
line, and deploy still writes the pruned model and the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from prunekit.plan import Plan
    from prunekit.profile import Profile


@dataclass
class ExportContext:
    """What a back end needs: the plan, the model to ship, the dense reference for side-by-side
    variants, calibration tokens (static INT8 is calibrated on these, never on evaluation text),
    evaluation windows (perplexity of each variant) and a probe for the export checks."""

    profile: Profile
    plan: Plan
    model: nn.Module
    stage: Path
    probe_tokens: torch.Tensor
    calib_tokens: torch.Tensor
    eval_windows: torch.Tensor | None = None
    eval_label: str | None = None
    dense: nn.Module | None = None
    int8_flavour: str = "weight-only"
    quiet: bool = False
    dense_blocks: tuple[int, ...] = ()  # blocks an N:M plan kept dense on purpose (prunekit.pruning.partial)


@dataclass
class ExportOutcome:
    status: str  # "written" | "not_available"
    reason: str | None = None
    variants: list[dict] = field(default_factory=list)  # name, bytes, latency figures, perplexity
    latency: dict | None = None  # {"basis": "measured"|"estimated", ...}
    checks: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    # The shipped artifact where this machine can run it (its quality is then measured by its runtime)
    shipped_onnx: Path | None = None
    shipped_runtime: str | None = None


def _cpu_onnx(context: ExportContext) -> ExportOutcome:
    from prunekit.targets.cpu_onnx import build

    return build(context)


def _coreml(context: ExportContext) -> ExportOutcome:
    from prunekit.targets.coreml_iphone import build

    return build(context)


def _tensorrt(context: ExportContext) -> ExportOutcome:
    from prunekit.targets.tensorrt_sparse import build

    return build(context)


# runtime -> callable(context) -> ExportOutcome
BACKENDS: dict[str, Callable] = {"onnxruntime": _cpu_onnx, "coreml": _coreml, "tensorrt": _tensorrt}


def candidate_builder(profile: Profile, scratch: Path, probe, quiet: bool = False, int8_flavour: str = "weight-only",
                      calibration: list | None = None):
    """The search's back end for the profile's runtime: builds and judges candidates, times or
    estimates them, and ships the chosen one (see prunekit.search.explore)."""
    if profile.runtime == "onnxruntime":
        from prunekit.targets.cpu_onnx import OnnxCandidates

        return OnnxCandidates(scratch, probe, quiet, int8_flavour, calibration)
    from prunekit.targets.estimated import EstimatedCandidates

    judges = {}
    if profile.runtime == "tensorrt":
        from prunekit.targets.cpu_onnx import QDQ_WINDOWS
        from prunekit.targets.tensorrt_sparse import QdqJudge

        judges["int8"] = QdqJudge(scratch, probe, (calibration or [])[:QDQ_WINDOWS], quiet)
    return EstimatedCandidates(profile, BACKENDS[profile.runtime], quiet, judges)


def streamed_candidate_builder(profile: Profile, plan: Plan, scratch: Path, probe, calibration: torch.Tensor,
                               dense, quiet: bool = False):
    """``candidate_builder`` for a streamed deploy (no model in memory; prunekit.deploy_memory
    refuses the runtimes that have none): cpu-onnx, or the TensorRT targets, whose static INT8 is
    calibrated on the first windows of ``calibration``; ``dense``: the dense model's skeleton."""
    if profile.runtime == "tensorrt":
        from prunekit.targets.cpu_onnx import QDQ_WINDOWS
        from prunekit.targets.tensorrt_streamed import StreamedTensorrtCandidates

        return StreamedTensorrtCandidates(profile, plan, scratch, probe, calibration[:QDQ_WINDOWS], dense, quiet)
    from prunekit.targets.cpu_onnx_streamed import StreamedOnnxCandidates

    return StreamedOnnxCandidates(scratch, probe, quiet)


def export_for(runtime: str, context: ExportContext) -> ExportOutcome:
    backend = BACKENDS.get(runtime)
    if backend is None:
        return ExportOutcome("not_available", f"the {runtime} back end is not built yet; the pruned "
                                              f"model folder is written instead")
    return backend(context)
