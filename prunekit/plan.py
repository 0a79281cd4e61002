"""The plan: which pruning method, pattern, sparsity and precision pay off on a profile, and why."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from prunekit.errors import UserInputError
from prunekit.profile import METHODS, Profile

STRUCTURED_METHODS = ("fasp",)


def parse_pattern(pattern: str) -> tuple[int, int] | str:
    """'structured' | 'unstructured' | (n, m) for an 'N:M' string with 0 < N < M."""
    if pattern in ("structured", "unstructured"):
        return pattern
    match = re.fullmatch(r"(\d+):(\d+)", pattern or "")
    if not match:
        raise UserInputError(f"pattern '{pattern}' is not valid: use unstructured, structured or N:M "
                             f"with N < M (e.g. 2:4, 4:8)")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise UserInputError(f"pattern '{pattern}' is not valid: N:M needs 0 < N < M (e.g. 2:4, 4:8)")
    return n, m


def check_sparsity(sparsity: float) -> float:
    if not 0 <= sparsity < 1:
        raise UserInputError(f"sparsity {sparsity} is out of range: use a fraction in [0, 1), e.g. 0.5")
    return sparsity


@dataclass
class Plan:
    target: str
    method: str
    pattern: str
    sparsity: float
    precision: str
    runtime: str
    artifact: str
    latency_basis: str
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def n_m(self) -> tuple[int, int] | None:
        parsed = parse_pattern(self.pattern)
        return parsed if isinstance(parsed, tuple) else None

    def as_dict(self) -> dict:
        return asdict(self)


def dense_precision(profile: Profile) -> str:
    """The float precision the runtime computes in when INT8 is off."""
    return "fp32" if profile.runtime == "onnxruntime" else "fp16"


def make_plan(profile: Profile, method: str | None = None, pattern: str | None = None,
              sparsity: float | None = None, int8: bool | None = None) -> Plan:
    """Decide method, pattern, sparsity and precision; overrides win, with a warning where they
    cannot pay off on this hardware."""
    if method is not None and method not in METHODS:
        raise UserInputError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    if pattern is not None:
        parse_pattern(pattern)
    if sparsity is not None:
        check_sparsity(sparsity)

    reasons, warnings = [], []
    if profile.sparse_tensor_cores:
        reasons.append(f"{profile.device_name} has sparse tensor cores: a 2:4 pattern runs its GEMMs "
                       f"up to {profile.sparse_gemm_speedup:g}x faster, so unstructured Wanda 2:4 "
                       f"keeps the model's shapes and still gains speed")
    else:
        reasons.append(f"{profile.device_name} has no sparse tensor cores: zeros cost as much as any "
                       f"weight, so only removing whole channels (FASP structured pruning) makes the "
                       f"model smaller and faster")

    if method is None:
        wants_unstructured = pattern is not None and pattern != "structured"
        method = profile.default_method
        if wants_unstructured and method in STRUCTURED_METHODS:
            method = "wanda"
    structured = method in STRUCTURED_METHODS

    if pattern is None:
        default_ok = (profile.default_pattern == "structured") == structured
        pattern = profile.default_pattern if default_ok else ("structured" if structured else "unstructured")
    if structured and pattern != "structured":
        raise UserInputError(f"method {method} removes whole channels: use --pattern structured, or "
                             f"--method wanda/sparsegpt/magnitude for pattern {pattern}")
    if not structured and pattern == "structured":
        raise UserInputError(f"method {method} zeroes single weights: use --pattern unstructured or N:M, "
                             f"or --method fasp for structured pruning")

    n_m = parse_pattern(pattern)
    if isinstance(n_m, tuple):
        implied = 1 - n_m[0] / n_m[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise UserInputError(f"pattern {pattern} fixes the sparsity at {implied:g}: drop --sparsity "
                                 f"or pass --sparsity {implied:g}")
        sparsity = implied
    elif sparsity is None:
        same_kind = (profile.default_method in STRUCTURED_METHODS) == structured
        sparsity = profile.default_sparsity if same_kind else 0.5

    if not profile.sparse_tensor_cores and not structured:
        warnings.append(f"{method} {pattern} on {profile.name} will not run faster: {profile.device_name} "
                        f"has no sparse tensor cores and the {profile.runtime} artifact stays dense; "
                        f"use --method fasp to remove channels instead")
    if profile.sparse_tensor_cores and not structured and pattern != "2:4":
        warnings.append(f"{pattern} on {profile.name} will not use the sparse tensor cores: they "
                        f"accelerate only the 2:4 pattern; use --pattern 2:4")
    reasons.append(f"method {method}, pattern {pattern}, sparsity {sparsity:g}"
                   + (" (from the profile)" if method == profile.default_method else " (override)"))

    precision = profile.default_precision if int8 is None else ("int8" if int8 else dense_precision(profile))
    reasons.append(f"precision {precision}: " + ("INT8 weights halve the bytes moved per token again"
                                                  if precision == "int8" else "no INT8 quantization"))
    basis = profile.latency_basis
    reasons.append(f"latency {basis}: " + ("timed on this machine with the target's runtime"
                                           if basis == "measured" else
                                           f"from the profile's device facts ({profile.runtime} "
                                           f"cannot run on this machine)"))
    return Plan(target=profile.name, method=method, pattern=pattern, sparsity=sparsity,
                precision=precision, runtime=profile.runtime, artifact=profile.artifact,
                latency_basis=basis, reasons=reasons, warnings=warnings)
