"""The plan: which pruning method, pattern, amount, widths and precision pay off on a profile, and why.

A ``Plan`` is what every command runs: ``deploy`` makes one from the profile and the overrides,
``export`` from the folder's ``prunekit.json``, so both ship what the plan says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prunekit.errors import UserInputError
from prunekit.pattern import Pattern, check_sparsity
from prunekit.profile import RUNTIME_PRECISIONS, Profile
from prunekit.pruning.registry import default_pattern, method as lookup_method

GRANULARITIES = ("channels", "heads")
VALUE_MULTIPLE = 4  # value heads round to multiples of 4 (see FaspPruner.widths)


LIMIT_FLAGS = {"max_ppl_increase": "--max-ppl-increase", "max_kl": "--max-kl",
               "max_latency_ms": "--max-latency-ms", "max_size_mb": "--max-size-mb"}


@dataclass(frozen=True)
class Budget:
    """What the shipped artifact must meet: quality kept (perplexity increase in percent, mean KL
    against dense), decode latency per token on the target, artifact size. The search ships the best
    candidate within it; when none fits, the closest ships and deploy exits 3. ``sources`` says where
    each limit came from (a flag, or the profile's default budget)."""

    max_ppl_increase: float | None = None  # percent
    max_kl: float | None = None
    max_latency_ms: float | None = None
    max_size_mb: float | None = None
    sources: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        for key, flag in LIMIT_FLAGS.items():
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UserInputError(f"{flag} {value} is not valid: use a finite number >= 0")

    @classmethod
    def resolve(cls, profile: Profile, **flags: float | None) -> "Budget":
        """The profile's default budget, each limit replaced by its flag where one is given."""
        limits, sources = {}, []
        for key in LIMIT_FLAGS:
            if flags.get(key) is not None:
                limits[key], source = flags[key], f"flag {LIMIT_FLAGS[key]}"
            elif key in profile.budget:
                limits[key], source = profile.budget[key], f"profile {profile.name}"
            else:
                continue
            sources.append((key, source))
        return cls(**limits, sources=tuple(sources))

    @property
    def limits(self) -> dict[str, float]:
        return {key: getattr(self, key) for key in LIMIT_FLAGS if getattr(self, key) is not None}

    @property
    def is_set(self) -> bool:
        return bool(self.limits)

    def misses(self, ppl_increase: float | None = None, kl: float | None = None,
               latency_ms: float | None = None, size_mb: float | None = None, bounded: bool = False) -> list[str]:
        """One phrase per limit a measurement breaks; a measurement that is None is not judged.
        ``bounded``: ``ppl_increase`` is an upper confidence bound, and the phrase says so."""
        out = []
        ppl_text = ("perplexity up to {:+.1f}% > {:g}% (95% bound)" if bounded
                    else "perplexity {:+.1f}% > {:g}%")
        for value, limit, text in ((ppl_increase, self.max_ppl_increase, ppl_text),
                                   (kl, self.max_kl, "KL {:.4f} > {:g}"),
                                   (latency_ms, self.max_latency_ms, "decode {:.3g} ms > {:g} ms"),
                                   (size_mb, self.max_size_mb, "size {:.1f} MB > {:g} MB")):
            if value is not None and limit is not None and value > limit:
                out.append(text.format(value, limit))
        return out

    def overshoot(self, ppl_increase: float | None = None, kl: float | None = None,
                  latency_ms: float | None = None, size_mb: float | None = None) -> float:
        """How far outside the budget, as the sum of each broken limit's relative excess (0 inside):
        what "closest" means when nothing fits."""
        total = 0.0
        for value, limit in ((ppl_increase, self.max_ppl_increase), (kl, self.max_kl),
                             (latency_ms, self.max_latency_ms), (size_mb, self.max_size_mb)):
            if value is not None and limit is not None and value > limit:
                total += (value - limit) / max(limit, 1e-9)
        return total

    def as_dict(self) -> dict:
        return {**{key: getattr(self, key) for key in LIMIT_FLAGS}, "sources": dict(self.sources)}


@dataclass(frozen=True)
class Search:
    """The candidates a budgeted deploy builds: each amount of the plan's method x each precision,
    and what it minimises among those within budget (decode latency, or artifact size)."""

    objective: str
    amounts: tuple[float, ...]
    precisions: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.amounts) * len(self.precisions)

    def as_dict(self) -> dict:
        return {"objective": self.objective, "amounts": list(self.amounts), "precisions": list(self.precisions)}


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
    search: Search | None = None  # None: one fixed candidate (amount and precision both given)
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
                "budget": self.budget.as_dict(), "search": self.search and self.search.as_dict(),
                "reasons": self.reasons, "warnings": self.warnings}


def dense_precision(profile: Profile) -> str:
    """The float precision the runtime computes in when INT8 is off."""
    return "fp32" if profile.runtime == "onnxruntime" else "fp16"


def check_precision(profile: Profile, precision: str) -> str:
    runs = RUNTIME_PRECISIONS[profile.runtime]
    if precision not in runs:
        raise UserInputError(f"--precision {precision} does not run on {profile.name} ({profile.runtime}): "
                             f"use one of {', '.join(runs)}")
    return precision


PRECISION_REASONS = {
    "fp32": "float weights, no quantization", "fp16": "half-precision float weights, no quantization",
    "int8": "INT8 weights halve the bytes moved per token again",
    "int4": "4-bit block-wise weights quarter the bytes moved per token",
    "int4-mixed": "4-bit block-wise weights, the output head and the MLP's down projection at 8 "
                  "bits: the most sensitive projections keep their quality, as in llama.cpp's Q4_K_M",
    "int4-source": "4-bit weights exactly as the source file holds them (a Q4 GGUF: no second rounding), "
                   "the weights that are not on a 4-bit grid at 8 bits",
    "palette4": "4-bit palettized weights (16 shared values per group of 32 channels): a quarter of the bytes"}


def make_plan(profile: Profile, method: str | None = None, pattern: str | Pattern | None = None,
              sparsity: float | None = None, precision: str | None = None, granularity: str = "channels",
              channel_multiple: int | None = None, budget: Budget | None = None, search: bool = True) -> Plan:
    """Decide method, pattern, sparsity and precision; overrides win, with a warning where they
    cannot pay off on this hardware. With ``search``, what the user left open (the amount, the
    precision, or both) becomes the plan's search space; sparsity and precision then hold the
    profile's fixed choice until the search picks."""
    if method is not None:
        lookup_method(method)
    if isinstance(pattern, str):
        pattern = Pattern.parse(pattern)
    if sparsity is not None:
        check_sparsity(sparsity)
    if precision is not None:
        check_precision(profile, precision)
    if granularity not in GRANULARITIES:
        raise UserInputError(f"granularity '{granularity}' is not valid: use {' or '.join(GRANULARITIES)}")

    reasons, warnings = [], []
    if profile.sparse_tensor_cores:
        reasons.append(f"{profile.device_name} has sparse tensor cores: a 2:4 pattern runs its GEMMs "
                       f"up to {profile.sparse_gemm_speedup:g}x faster, so 2:4 sparsity "
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
    fixed_sparsity = pattern.resolve_sparsity(sparsity, profile.default_sparsity if same_kind else 0.5)

    if not profile.sparse_tensor_cores and not chosen.structured:
        warnings.append(f"{method} {pattern} on {profile.name} will not run faster: {profile.device_name} "
                        f"has no sparse tensor cores and the {profile.runtime} artifact stays dense; "
                        f"use --method fasp to remove channels instead")
    if profile.sparse_tensor_cores and not chosen.structured and pattern.n_m != (2, 4):
        warnings.append(f"{pattern} on {profile.name} will not use the sparse tensor cores: they "
                        f"accelerate only the 2:4 pattern; use --pattern 2:4")

    plan_search = None
    if search and (sparsity is None or precision is None):
        if sparsity is not None:
            amounts = (fixed_sparsity,)
        elif same_kind and (pattern.n_m is None or pattern == profile_pattern):
            amounts = profile.search_amounts
        else:  # another kind of method than the profile's: no pruning, or its one amount
            amounts = tuple(sorted({0.0, fixed_sparsity}))
        if pattern.n_m is not None:  # N:M zeros its own share: off, on some blocks (less), on every block
            amounts = tuple(a for a in amounts if a <= fixed_sparsity + 1e-9) or (fixed_sparsity,)
        precisions = (precision,) if precision is not None else profile.search_precisions
        plan_search = Search(profile.objective, amounts, precisions)
        reasons.append(f"search: {method} {pattern} at amounts {', '.join(f'{a:g}' for a in amounts)} x "
                       f"{', '.join(precisions)}; the {'fastest' if profile.objective == 'latency' else 'smallest'}"
                       f" candidate within the budget ships")
    else:
        reasons.append(f"method {method}, pattern {pattern}, sparsity {fixed_sparsity:g}"
                       + (" (from the profile)" if sparsity is None else " (override)"))

    chosen_precision = precision or profile.default_precision
    if plan_search is None:
        reasons.append(f"precision {chosen_precision}: {PRECISION_REASONS[chosen_precision]}")
    basis = profile.latency_basis
    reasons.append(f"latency {basis}: " + ("timed on this machine with the target's runtime"
                                           if basis == "measured" else
                                           f"from the profile's device facts ({profile.runtime} "
                                           f"cannot run on this machine)"))
    return Plan(target=profile.name, method=method, pattern=pattern, sparsity=fixed_sparsity,
                granularity=granularity,
                widths=Widths(channel_multiple or profile.preferred_channel_multiple),
                precision=chosen_precision, runtime=profile.runtime, artifact=profile.artifact,
                latency_basis=basis, budget=budget or Budget(), search=plan_search, reasons=reasons,
                warnings=warnings)


def plan_for_folder(profile: Profile, manifest: dict | None, precision: str | None = None) -> Plan:
    """The plan a pruned folder was made with (its ``prunekit.json``), checked against what the
    target needs: a folder that cannot serve the target is refused, naming what it needs."""
    precision = check_precision(profile, precision or profile.default_precision)
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
                f"`prunekit prune --method admm --pattern {wanted}` first, or export it for cpu-onnx "
                f"or coreml-iphone13")
    return plan
