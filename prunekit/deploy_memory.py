"""Whether deploy holds the model in memory or streams it, decided from the config alone before any
weight is read, and the one-line refusals of a streamed deploy that cannot work.

The in-memory deploy holds the dense model, a pruned copy per amount, the 4-bit preparation's
copies and ONNX Runtime's sessions of every candidate side by side: 3.51 GB on SmolLM2-135M, whose
float32 weights are 0.54 GB (docs/results.md, the README's main job) — the process plus about 5.4
times the weights. Past the budget (``--max-memory``, default: the machine's memory) the deploy is
streamed (prunekit.pipeline._search_streamed): one decoder block in memory for pruning, and at
most one float32 model's worth of ONNX Runtime sessions at a time, in processes of their own. The
cpu-onnx and TensorRT targets write ONNX a tensor at a time (TensorRT's static INT8 too:
prunekit.exporters.qdq_streamed); Core ML's converter takes a whole traced model.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunekit.errors import UserInputError
from prunekit.memory import GB, PROCESS_BYTES, calibration_batch, machine_bytes, text_writing_bytes

IN_MEMORY_COPIES = 5.5  # the in-memory deploy's peak, in float32 copies of the weights (above)
STREAMED_RUNTIMES = ("onnxruntime", "tensorrt")  # ONNX written a tensor at a time (Core ML converts a whole model)
SESSION_OVERHEAD = 0.3e9  # ONNX Runtime's own share of a session (7.51 GB for a 7.11 GB file, docs/memory.md)


@dataclass(frozen=True)
class DeployMemory:
    streamed: bool
    budget: int
    float32_bytes: int
    in_memory_bytes: float  # the estimate of an in-memory deploy's peak
    calibration_batch: int
    reason: str
    self_calibration_bytes: float = 0.0  # streamed: the estimate of the model writing its own text

    def as_dict(self) -> dict:
        return {"streamed": self.streamed, "budget_gb": round(self.budget / GB, 2),
                "float32_gb": round(self.float32_bytes / GB, 3),
                "in_memory_estimate_gb": round(self.in_memory_bytes / GB, 2),
                "calibration_batch": self.calibration_batch, "reason": self.reason,
                "self_calibration_estimate_gb": round(self.self_calibration_bytes / GB, 2)}


def deploy_memory(skeleton, profile, method: str, calibration, max_memory: int | None = None,
                  stream: bool = False, int8_flavour: str = "weight-only") -> DeployMemory:
    """In memory when the estimate fits the budget (and ``stream`` is not asked for); streamed
    otherwise, refused in one line when the target's converter needs the whole model (Core ML),
    when the model writing its own calibration text (in bfloat16, prunekit.weights.whole_model)
    would not fit, when cpu-onnx's INT8 flavour calibrates or rewrites a whole model, or when the
    budget cannot hold one block's prune or the largest ONNX Runtime session. ``skeleton``: the
    model without weights (prunekit.models.open_streamed)."""
    budget = max_memory or machine_bytes()
    config, weights = skeleton.config, 4 * sum(p.numel() for p in skeleton.parameters())
    in_memory = PROCESS_BYTES + IN_MEMORY_COPIES * weights
    if in_memory <= budget and not stream:
        return DeployMemory(False, budget, weights, in_memory, 8, "the whole model in memory")
    why = ("--stream" if stream else
           f"an in-memory deploy needs about {in_memory / GB:.1f} GB ({IN_MEMORY_COPIES:g} x the "
           f"{weights / GB:.2f} GB of float32 weights), more than the {budget / GB:.1f} GB budget")
    if profile.runtime not in STREAMED_RUNTIMES:
        raise UserInputError(f"{why}, and --target {profile.name} converts the whole model in memory "
                             f"({profile.runtime}): deploy streamed only to cpu-onnx or a TensorRT target, "
                             f"or raise --max-memory")
    writing = 0.0
    if calibration.needs_model:
        writing = text_writing_bytes(config, weights // 4, calibration.own or calibration.samples,
                                     calibration.seqlen, budget, why,
                                     "--calib-own 0" if calibration.own else "--calib FILE")
    if profile.runtime == "onnxruntime" and int8_flavour != "weight-only":
        raise UserInputError(f"{why}; a streamed deploy writes INT8 weight-only (MatMulNBits, a tensor at a time), "
                             f"and --int8-flavour {int8_flavour} quantizes a whole model: drop it, or raise --max-memory")
    session = PROCESS_BYTES + weights + SESSION_OVERHEAD
    if session > budget:
        raise UserInputError(f"{why}; even streamed, ONNX Runtime's session of the float32 artifact needs about "
                             f"{session / GB:.1f} GB: raise --max-memory")
    batch, _ = calibration_batch(config, method, calibration.samples + calibration.own, calibration.seqlen, budget)
    return DeployMemory(True, budget, weights, in_memory, batch,
                        f"deploying streamed (one decoder block in memory): {why}", writing)

