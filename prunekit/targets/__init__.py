"""Per-runtime back ends of `deploy`: quantize, export, verify and measure for one kind of artifact.

A back end is looked up by the profile's runtime; one that is not available here says why in one
line, and deploy still writes the pruned model and the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class ExportOutcome:
    status: str  # "written" | "not_available"
    reason: str | None = None
    variants: list[dict] = field(default_factory=list)  # name, bytes, latency figures, perplexity
    latency: dict | None = None  # {"basis": "measured"|"estimated", ...}
    checks: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def _cpu_onnx(context) -> ExportOutcome:
    from prunekit.targets.cpu_onnx import build

    return build(context)


def _coreml(context) -> ExportOutcome:
    from prunekit.targets.coreml_iphone import build

    return build(context)


def _tensorrt(context) -> ExportOutcome:
    from prunekit.targets.tensorrt_sparse import build

    return build(context)


# runtime -> callable(context) -> ExportOutcome
BACKENDS: dict[str, Callable] = {"onnxruntime": _cpu_onnx, "coreml": _coreml, "tensorrt": _tensorrt}


def export_for(runtime: str, context) -> ExportOutcome:
    backend = BACKENDS.get(runtime)
    if backend is None:
        return ExportOutcome("not_available", f"the {runtime} back end is not built yet; the pruned "
                                              f"model folder is written instead")
    return backend(context)
