"""The plan: which pruning method, pattern, amount, widths and precision pay off on a profile, and why.

A ``Plan`` is what every command runs: ``deploy`` makes one from the profile and the overrides,
``export`` from the folder's ``prunekit.json``, so both ship what the plan says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prunekit.errors import UserInputError
from prunekit.pattern import Pattern, check_sparsity
from prunekit.profile import Profile
from prunekit.pruning.registry import default_pattern, method as lookup_method

GRANULARITIES = ("channels", "heads")
VALUE_MULTIPLE = 4  # value heads round to multiples of 4 (see FaspPruner.widths)


@dataclass(frozen=True)
class Budget:
    """Quality the shipped model must keep: exit 3 (artifacts still written) when it does not."""

    max_ppl_increase: float | None = None  # percent
    max_kl: float | None = None

    def __post_init__(self):
        for name, value in (("--max-ppl-increase", self.max_ppl_increase), ("--max-kl", self.max_kl)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UserInputError(f"{name} {value} is not valid: use a finite number >= 0")

    @property
    def is_set(self) -> bool:
        return self.max_ppl_increase is not None or self.max_kl is not None


@dataclass(frozen=True)
class Widths:
    """How kept widths round: MLP channels to ``channel_multiple``, value heads to ``value_multiple``."""

    channel_multiple: int
    value_multiple: int = VALUE_MULTIPLE


@dataclass
class Plan:
    target: str
    method: str
    pattern: Pattern
    sparsity: float
    granularity: str
    widths: Widths
    precision: str
    runtime: str
    artifact: str
    latency_basis: str
    budget: Budget = field(default_factory=Budget)
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def structured(self) -> bool:
        return self.pattern.structured

    def pruner_options(self) -> dict:
        """What the method's pruner takes beyond sparsity and pattern."""
        if not self.structured:
            return {}
        return {"granularity": self.granularity, "channel_multiple": self.widths.channel_multiple,
                "value_multiple": self.widths.value_multiple}

    def as_dict(self) -> dict:
        return {"target": self.target, "method": self.method, "pattern": str(self.pattern),
                "sparsity": self.sparsity, "granularity": self.granularity,
                "widths": vars(self.widths), "precision": self.precision, "runtime": self.runtime,
                "artifact": self.artifact, "latency_basis": self.latency_basis,
                "budget": vars(self.budget), "reasons": self.reasons, "warnings": self.warnings}


def dense_precision(profile: Profile) -> str:
    """The float precision the runtime computes in when INT8 is off."""
    return "fp32" if profile.runtime == "onnxruntime" else "fp16"


def _precision(profile: Profile, int8: bool | None) -> str:
    return profile.default_precision if int8 is None else ("int8" if int8 else dense_precision(profile))


def make_plan(profile: Profile, method: str | None = None, pattern: str | Pattern | None = None,
              sparsity: float | None = None, int8: bool | None = None, granularity: str = "channels",
              channel_multiple: int | None = None, budget: Budget | None = None) -> Plan:
    """Decide method, pattern, sparsity and precision; overrides win, with a warning where they
    cannot pay off on this hardware."""
    if method is not None:
        lookup_method(method)
    if isinstance(pattern, str):
        pattern = Pattern.parse(pattern)
    if sparsity is not None:
        check_sparsity(sparsity)
    if granularity not in GRANULARITIES:
        raise UserInputError(f"granularity '{granularity}' is not valid: use {' or '.join(GRANULARITIES)}")

    reasons, warnings = [], []
    if profile.sparse_tensor_cores:
        reasons.append(f"{profile.device_name} has sparse tensor cores: a 2:4 pattern runs its GEMMs "
                       f"up to {profile.sparse_gemm_speedup:g}x faster, so unstructured Wanda 2:4 "
                       f"keeps the model's shapes and still gains speed")
    else:
        reasons.append(f"{profile.device_name} has no sparse tensor cores: zeros cost as much as any "
                       f"weight, so only removing whole channels (FASP structured pruning) makes the "
                       f"model smaller and faster")

    profile_pattern = Pattern.parse(profile.default_pattern)
    if method is None:
        method = profile.default_method
        if pattern is not None and pattern.structured != lookup_method(method).structured:
            method = "fasp" if pattern.structured else "wanda"
    chosen = lookup_method(method)
    if pattern is None:
        pattern = profile_pattern if profile_pattern.structured == chosen.structured else default_pattern(method)
    chosen.check_pattern(pattern)

    same_kind = lookup_method(profile.default_method).structured == chosen.structured
    sparsity = pattern.resolve_sparsity(sparsity, profile.default_sparsity if same_kind else 0.5)

    if not profile.sparse_tensor_cores and not chosen.structured:
        warnings.append(f"{method} {pattern} on {profile.name} will not run faster: {profile.device_name} "
                        f"has no sparse tensor cores and the {profile.runtime} artifact stays dense; "
                        f"use --method fasp to remove channels instead")
    if profile.sparse_tensor_cores and not chosen.structured and pattern.n_m != (2, 4):
        warnings.append(f"{pattern} on {profile.name} will not use the sparse tensor cores: they "
                        f"accelerate only the 2:4 pattern; use --pattern 2:4")
    reasons.append(f"method {method}, pattern {pattern}, sparsity {sparsity:g}"
                   + (" (from the profile)" if method == profile.default_method else " (override)"))

    precision = _precision(profile, int8)
    reasons.append(f"precision {precision}: " + ("INT8 weights halve the bytes moved per token again"
                                                  if precision == "int8" else "no INT8 quantization"))
    basis = profile.latency_basis
    reasons.append(f"latency {basis}: " + ("timed on this machine with the target's runtime"
                                           if basis == "measured" else
                                           f"from the profile's device facts ({profile.runtime} "
                                           f"cannot run on this machine)"))
    return Plan(target=profile.name, method=method, pattern=pattern, sparsity=sparsity,
                granularity=granularity,
                widths=Widths(channel_multiple or profile.preferred_channel_multiple),
                precision=precision, runtime=profile.runtime, artifact=profile.artifact,
                latency_basis=basis, budget=budget or Budget(), reasons=reasons, warnings=warnings)


def plan_for_folder(profile: Profile, manifest: dict | None, int8: bool | None = None) -> Plan:
    """The plan a pruned folder was made with (its ``prunekit.json``), checked against what the
    target needs: a folder that cannot serve the target is refused, naming what it needs."""
    precision = _precision(profile, int8)
    common = dict(target=profile.name, precision=precision, runtime=profile.runtime,
                  artifact=profile.artifact, latency_basis=profile.latency_basis)
    if manifest is None:
        plan = Plan(method="none", pattern=Pattern("unstructured"), sparsity=0.0, granularity="channels",
                    widths=Widths(1), reasons=["an unpruned folder (no prunekit.json): exported as it is"],
                    **common)
    else:
        try:
            pattern = Pattern.parse(str(manifest["pattern"]))
            plan = Plan(method=str(manifest["method"]), pattern=pattern, sparsity=float(manifest["sparsity"]),
                        granularity=str(manifest.get("granularity", "channels")), widths=Widths(1),
                        reasons=[f"from prunekit.json: {manifest['method']} {pattern} "
                                 f"sparsity {float(manifest['sparsity']):g}"], **common)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserInputError(f"prunekit.json is missing or has a bad field ({exc}): re-run "
                                 f"`prunekit prune` to write it") from None
    if manifest is not None and not profile.sparse_tensor_cores and not plan.structured:
        plan.warnings.append(f"{plan.method} {plan.pattern} zeros make nothing faster on {profile.name}: the "
                             f"artifact stays dense; prune with --method fasp to remove channels instead")
    if profile.sparse_tensor_cores and Pattern.parse(profile.default_pattern).n_m is not None:
        wanted = Pattern.parse(profile.default_pattern)
        if plan.pattern != wanted:
            raise UserInputError(
                f"{profile.name} runs {wanted} sparse weights, but this folder is "
                f"{'unpruned' if manifest is None else f'{plan.method} {plan.pattern}'}: prune it with "
                f"`prunekit prune --method wanda --pattern {wanted}` first, or export it for cpu-onnx "
                f"or coreml-iphone13")
    return plan
