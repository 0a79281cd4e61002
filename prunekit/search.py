"""The budgeted search's bookkeeping: one record per candidate (amount x precision) and the choice.

Candidates are judged on held-out calibration tokens (never the evaluation text, so the report's
evaluation stays a test of the choice), by the upper confidence bound of their perplexity increase
over those windows (prunekit.evaluation.increase_upper_bound), not its point estimate. The choice
is a plain function of the records: among the candidates within budget, the one with the least of
the objective (decode latency, or artifact size) wins, the other as tie-break, and measured decode
times within LATENCY_RESOLUTION of the fastest count as a tie that the least drift from the dense
model breaks; with none within budget, the one that overshoots least ships, and deploy exits 3.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from prunekit.plan import Budget

BUILT, SKIPPED = "built", "skipped"
# The screen first prunes an amount on this share of the fit samples: an amount whose float model
# then misses the budget SLICE_MARGIN times over is not pruned on all of them (fewer tokens fit
# somewhat worse, never several times worse); one that does not is pruned on all and screened again.
# A quarter rather than a half: a prune's cost is partly fixed (the per-layer solves), so halving
# the slice again saves less than halving it did, but it is the stage most searches stop at.
SLICE_SHARE, SLICE_MARGIN, SLICE_MIN_SAMPLES = 0.25, 2.0, 8
# Measured decode times closer than this are one speed to the choice: the fastest of 12 rounds of
# one artifact moved 0.1-8.7% between two deploys on the 2-core EPYC, and two windows of rounds
# in one process were more than 10% apart in 2-31% of pairs (docs/results.md, "How much of that
# is the host"). Within it the candidate closest to the dense model ships: on gemma-3-270m,
# INT4-mixed read 2% faster than INT8 at ten times its KL, and missed the gate on the test text.
LATENCY_RESOLUTION = 0.10


@dataclass
class Candidate:
    amount: float
    precision: str
    status: str = BUILT  # built (artifact made and measured) or skipped (with ``why``)
    ppl_increase: float | None = None  # percent, on the selection tokens
    ppl_increase_upper: float | None = None  # its one-sided 95% upper bound over the selection windows
    kl: float | None = None
    top1: float | None = None
    quality_by: str | None = None  # what computed the selection logits (a runtime, or torch)
    decode_ms: float | None = None
    prefill_ms: float | None = None
    latency_basis: str | None = None  # measured | estimated
    bytes: int | None = None
    size_basis: str | None = None  # file (the artifact's bytes) | computed (from shapes and bits)
    why: str | None = None
    misses: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{'dense' if self.amount == 0 else f'pruned {self.amount:g}'} {self.precision}"

    @property
    def size_mb(self) -> float | None:
        return None if self.bytes is None else self.bytes / 1e6

    @property
    def ppl_judged(self) -> float | None:
        """The perplexity increase the budget judges: the upper bound where the windows give one."""
        return self.ppl_increase_upper if self.ppl_increase_upper is not None else self.ppl_increase

    def judge(self, budget: Budget) -> "Candidate":
        self.misses = budget.misses(self.ppl_judged, self.kl, self.decode_ms, self.size_mb,
                                    bounded=self.ppl_increase_upper is not None)
        return self

    @property
    def within_budget(self) -> bool:
        return self.status == BUILT and not self.misses

    def as_dict(self) -> dict:
        return {"name": self.name, **asdict(self), "within_budget": self.within_budget}


@dataclass
class Selection:
    chosen: Candidate
    runner_up: Candidate | None
    fits: bool  # False: nothing was within budget and ``chosen`` is the closest
    reason: str

    def as_dict(self) -> dict:
        return {"chosen": self.chosen.name, "runner_up": self.runner_up and self.runner_up.name,
                "fits": self.fits, "reason": self.reason}


def _objective_key(objective: str):
    def key(c: Candidate):
        latency = c.decode_ms if c.decode_ms is not None else float("inf")
        size = c.bytes if c.bytes is not None else float("inf")
        return (latency, size) if objective == "latency" else (size, latency)
    return key


def select(candidates: list[Candidate], budget: Budget, objective: str) -> Selection:
    """The fastest (objective ``latency``) or smallest (``size``) built candidate within budget;
    the runner-up is the next by the same order. With none within budget, the built candidate
    whose limits are broken least (summed relative excess) ships, and ``fits`` is False."""
    built = [c.judge(budget) for c in candidates if c.status == BUILT]
    if not built:
        raise ValueError("no candidate was built")
    key = _objective_key(objective)
    measure = "decode latency" if objective == "latency" else "size"
    fits = sorted((c for c in built if c.within_budget), key=key)
    if fits:
        tied = _tied_with_fastest(fits) if objective == "latency" else [fits[0]]
        chosen = min(tied, key=_drift)
        rest = [c for c in fits if c is not chosen]
        runner_up = rest[0] if rest else None
        if chosen is fits[0]:
            reason = f"{chosen.name}: the least {measure} of the {len(fits)} candidates within budget"
        else:
            reason = (f"{chosen.name}: within {LATENCY_RESOLUTION:.0%} of the fastest of the {len(fits)} candidates "
                      f"within budget ({fits[0].name}), which this host's run-to-run spread cannot tell apart, and "
                      f"the closest of those to the dense model ({_drift_text(chosen)} vs {_drift_text(fits[0])})")
        if runner_up:
            reason += f"; runner-up {runner_up.name}" + _versus(chosen, runner_up, objective)
        return Selection(chosen, runner_up, True, reason)

    def overshoot(c: Candidate):
        return budget.overshoot(c.ppl_judged, c.kl, c.decode_ms, c.size_mb)

    ranked = sorted(built, key=lambda c: (overshoot(c), key(c)))
    chosen = ranked[0]
    runner_up = ranked[1] if len(ranked) > 1 else None
    reason = (f"no candidate is within budget; the closest, {chosen.name}, misses it: "
              f"{'; '.join(chosen.misses)}")
    return Selection(chosen, runner_up, False, reason)


def _tied_with_fastest(fits: list[Candidate]) -> list[Candidate]:
    """The candidates (of ``fits``, fastest first) whose measured decode is within LATENCY_RESOLUTION
    of the fastest: the speed measurement cannot order them, so quality does. Estimated latencies
    (a roofline, deterministic) are never ties: their order is the estimate's own."""
    fastest = fits[0]
    if fastest.latency_basis != "measured" or fastest.decode_ms is None:
        return [fastest]
    return [c for c in fits if c.latency_basis == "measured" and c.decode_ms is not None
            and c.decode_ms <= fastest.decode_ms * (1 + LATENCY_RESOLUTION)]


def _drift(c: Candidate) -> tuple:
    """How far a candidate is from the dense model: its KL (the steadier measure over a few selection
    windows: perplexity can read low on them while the distributions moved), then the judged
    perplexity increase."""
    def value(v):
        return float("inf") if v is None else v
    return value(c.kl), value(c.ppl_judged)


def _drift_text(c: Candidate) -> str:
    return f"KL {c.kl:.3f}" if c.kl is not None else f"perplexity up to +{c.ppl_judged:.1f}%"


def _versus(chosen: Candidate, other: Candidate, objective: str) -> str:
    if objective == "latency" and chosen.decode_ms and other.decode_ms:
        return f" ({other.decode_ms:.2f} vs {chosen.decode_ms:.2f} ms/token)"
    if objective == "size" and chosen.bytes and other.bytes:
        return f" ({other.bytes / 1e6:.1f} vs {chosen.bytes / 1e6:.1f} MB)"
    return ""


def selection_count(total: int, fraction: float = 0.125, minimum: int = 2) -> int:
    """How many of ``total`` calibration samples are held out for selection: at least ``minimum``,
    at most half (none of fewer than 2)."""
    return 0 if total < 2 else min(max(minimum, round(total * fraction)), total // 2)


def selection_split(calib_ids, text_samples: int | None = None):
    """(fit, selection): the last ``selection_count`` samples of the calibration text (of
    ``text_samples``, all of ``calib_ids`` by default; the model's own samples mixed in come
    before them) are held out for choosing among candidates and never pruned or quantized on
    (prunekit.calibration draws them from the end of the text, apart from the others)."""
    held = selection_count(calib_ids.shape[0] if text_samples is None else text_samples)
    return calib_ids[: calib_ids.shape[0] - held], calib_ids[calib_ids.shape[0] - held:]


@dataclass
class Exploration:
    candidates: list[Candidate]
    pruned: dict  # amount -> PruneResult of that amount (amount 0: None, the dense model ships)
    screen: list[dict] = field(default_factory=list)  # torch quality of each pruned amount, before building
    seconds: dict = field(default_factory=dict)


def skipped(amount: float, precisions, why: str) -> list[Candidate]:
    return [Candidate(amount, p, status=SKIPPED, why=why) for p in precisions]


def slice_budget(budget: Budget) -> Budget:
    """The budget the slice screen applies: the quality limits SLICE_MARGIN times looser."""
    return replace(budget, **{k: v * SLICE_MARGIN for k, v in budget.limits.items()
                              if k in ("max_ppl_increase", "max_kl")})


def slice_miss(amount: float, sliced: int, total: int, far: list[str]) -> str:
    return (f"the float model pruned at {amount:g} on {sliced} of the {total} samples misses the quality budget "
            f"{SLICE_MARGIN:g} times over on the selection tokens ({'; '.join(far)}), so it was not pruned on all "
            f"of them")


def screen_miss(amount: float, misses: list[str]) -> str:
    return (f"the float model pruned at {amount:g} already misses the quality budget on the selection tokens "
            f"({'; '.join(misses)})")


def explore(loaded, dense, plan, grid: list[tuple[float, tuple[str, ...]]], fit_ids, selection_ids, builder,
            calib_source: str, screen: bool = True, progress: bool = True, reference=None,
            calib_own: int = 0) -> Exploration:
    """Build and judge every (amount, precision) of ``grid`` in increasing amount. Each amount is
    pruned once from the dense model on ``fit_ids``; with ``screen``, an amount whose pruned float
    model already breaks the quality budget on the selection tokens is not built (quantizing only
    adds loss), nor is any larger one (pruning more only loses more). The screen looks first at the
    amount pruned on a slice of ``fit_ids`` (SLICE_SHARE): far outside the budget there, it stops
    without the full prune (on the default model's self-calibrated search, the largest saving).
    With an N:M pattern, an amount below the pattern's own (2:4: 0.5) keeps N:M on that share of
    the blocks, the most sensitive ones dense (prunekit.pruning.partial), all from one prune of
    every block.
    ``reference`` (default: ``dense``) gives the dense logits that candidates are judged against
    (prunekit.evaluation.StoredLogits computes them once for the whole search). ``calib_own``: how
    many of ``fit_ids`` the model wrote itself (recorded with each full prune; slices record 0)."""
    import copy
    import time

    from prunekit.errors import UserInputError
    from prunekit.evaluation import measure_quality
    from prunekit.models import LoadedModel
    from prunekit.progress import say
    from prunekit.pruning.partial import keep_dense_blocks
    from prunekit.pruning.run import prune

    reference = dense if reference is None else reference
    out = Exploration([], {}, seconds={"prune": 0.0, "screen": 0.0, "build": 0.0})
    stop_why, every_block = None, None  # every_block: the N:M prune of all blocks, made once
    implied = plan.pattern.implied_sparsity if plan.pattern.n_m else None

    def pruned_at(amount, ids=fit_ids, own=calib_own):
        say(f"pruning {plan.method} {plan.pattern} at {implied or amount:g} on {ids.shape[0]} calibration "
            f"samples", not progress)
        return prune(LoadedModel(copy.deepcopy(dense), loaded.tokenizer, loaded.source), plan.method,
                     implied or amount, plan.pattern, calib=calib_source, calib_ids=ids, calib_own=own,
                     progress=progress, **plan.pruner_options())

    def screened(model, amount, samples: int, budget) -> list[str]:
        """The pruned float model's quality on the selection tokens, recorded; what ``budget`` misses."""
        start = time.perf_counter()
        q = measure_quality(model, selection_ids, reference)
        out.seconds["screen"] += time.perf_counter() - start
        misses = budget.misses(ppl_increase=q.increase_pct, kl=q.kl)
        out.screen.append({"amount": amount, "fit_samples": samples, "ppl_increase": q.increase_pct, "kl": q.kl,
                           "top1": q.top1, "misses": plan.budget.misses(ppl_increase=q.increase_pct, kl=q.kl)})
        return misses

    sliced = int(fit_ids.shape[0] * SLICE_SHARE)
    slack = slice_budget(plan.budget)

    for amount, precisions in grid:
        if stop_why is not None:
            out.candidates += skipped(amount, precisions, stop_why)
            continue
        model, result = dense, None
        if amount > 0:
            start = time.perf_counter()
            try:
                if implied and amount < implied:  # N:M on the least sensitive blocks only
                    every_block = every_block or pruned_at(implied)
                    result = keep_dense_blocks(every_block, dense, amount)
                    say(f"{plan.pattern} kept on {len(result.details['sparse_blocks'])} of "
                        f"{len(every_block.layers)} blocks (amount {amount:g}), the most sensitive dense", not progress)
                elif screen and not implied and sliced >= SLICE_MIN_SAMPLES:
                    slice_result = pruned_at(amount, fit_ids[:sliced], 0)
                    out.seconds["prune"] += time.perf_counter() - start
                    far = screened(slice_result.model, amount, sliced, slack)
                    start = time.perf_counter()
                    del slice_result
                    if far:
                        stop_why = slice_miss(amount, sliced, fit_ids.shape[0], far)
                        out.candidates += skipped(amount, precisions, stop_why)
                        continue
                    result = pruned_at(amount)
                else:
                    result = every_block if implied and every_block else pruned_at(amount)
            except UserInputError as exc:
                out.candidates += skipped(amount, precisions, str(exc))
                continue
            finally:
                out.seconds["prune"] += time.perf_counter() - start
            model = result.model
            if screen:
                misses = screened(model, amount, fit_ids.shape[0], plan.budget)
                if misses:
                    stop_why = screen_miss(amount, misses)
                    out.candidates += skipped(amount, precisions, stop_why)
                    continue
        start = time.perf_counter()
        out.candidates += builder.build(model, amount, precisions, selection_ids, reference)
        out.seconds["build"] += time.perf_counter() - start
        out.pruned[amount] = result
    return out

