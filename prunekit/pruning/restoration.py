"""Restoration: refit a consumer's kept input columns by ridge least squares toward the plain cut,
with λ chosen on held-out tokens (FASP's refit; plain functions over the statistics' tensors).

The λ search is where a wide layer's time goes: each λ is a Cholesky factorization of the kept
block of the Gram (6,272 wide at a 1.5B's MLP). The grid is walked from the previous block's
choice rather than scanned, on a subset of the output rows, with the held-out check on the
held-out tokens' own rows instead of a second Gram.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def ridge_toward_cut(G_SS: torch.Tensor, rhs: torch.Tensor, cut: torch.Tensor, lam: float,
                     mean: torch.Tensor | None = None, consume: bool = False,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
    """W' = (rhs + λ·s W_S)(G[S,S] + λ·s I)⁻¹ with rhs = W G[:,S] and s the mean of diag G[S,S];
    None when the system is not positive definite. With ``mean`` (μ_S), the least-squares W' under
    W' μ_S = W_S μ_S: the refit keeps the cut's output mean. ``consume`` factors G[S,S] in place
    (315 MB in float64 at a 9k-wide MLP) when nothing reads it after and it is ``dtype``, the
    precision of the solve: float64 whatever G[S,S] is stored in (a float32 Gram's block is exact
    in float32: half the memory), unless the caller only ranks λ (``SEARCH_DTYPE``)."""
    ridge = lam * torch.diag(G_SS).to(torch.float64).mean()
    system = G_SS if consume and G_SS.dtype == dtype else G_SS.to(dtype, copy=True)
    rhs, cut = rhs.to(dtype), cut.to(dtype)
    mean = None if mean is None else mean.to(dtype)
    system.diagonal().add_(ridge.to(dtype))  # G + λsI without an n×n identity beside it
    factor, failed = torch.linalg.cholesky_ex(system, out=(system, torch.empty((), dtype=torch.int32)))
    if failed:
        return None
    refit = torch.cholesky_solve((rhs + ridge * cut).T, factor).T  # reads only the lower triangle
    if mean is None:
        return refit
    direction = torch.cholesky_solve(mean.reshape(-1, 1), factor).reshape(-1)  # H⁻¹ μ_S
    weight = float(mean @ direction)
    if weight <= 0:
        return refit  # inputs with zero mean: no output mean to hold
    return refit + torch.outer((cut - refit) @ mean, direction) / weight


KEEP_PANEL = 1024  # kept columns per product with the Gram: G[:, S] whole is 450 MB at a 9k-wide MLP
# Output rows that rank λ. Every row is solved with the same factor and the held-out error is a sum
# over rows, so evenly spaced rows rank λ as all of them do, and a search solve costs that many rows
# (1536 at a 1.5B's down_proj: half the time of a λ). The chosen λ is then solved for every row.
SEARCH_ROWS = 768
# The λ search only ranks λ by held-out error, so it factors and solves in float32 (twice the
# speed of float64: three factorizations of a 6,272-wide block per layer at a 1.5B's MLP); the
# chosen λ's refit, the weights that ship, is solved in float64.
SEARCH_DTYPE = torch.float32


@dataclass
class KeptSystem:
    """What refitting the kept columns S needs: the S×S block of the fit Gram, its product with W,
    and the held-out tokens' kept inputs with the full layer's outputs on them. Small next to the
    Gram itself (640 MB in float64 at a 9k-wide MLP), which can be freed once this is built."""

    cut: torch.Tensor  # W[:, S]
    held: bool  # whether there are held-out tokens at all; without them the cut stands and nothing else is built
    G_SS: torch.Tensor | None = None  # float32 from a float32 Gram; the solves are float64; lower triangle only after add_held_out
    rhs: torch.Tensor | None = None  # W G[:, S]
    held_inputs: torch.Tensor | None = None  # X_h[:, S], held-out tokens x kept columns (float32)
    held_outputs: torch.Tensor | None = None  # X_h Wᵀ: what the uncut layer gives on them

    def heldout_error(self, candidate: torch.Tensor) -> float:
        """‖X_h,S W'ᵀ − X_h Wᵀ‖² over the held-out tokens."""
        predicted = self.held_inputs @ candidate.T.to(self.held_inputs.dtype)
        return float(predicted.sub_(self.held_outputs).square_().sum(dtype=torch.float64))

    @classmethod
    def cut_of(cls, weight: torch.Tensor, keep: torch.Tensor, held_rows: torch.Tensor | None) -> "KeptSystem":
        held = held_rows is not None and held_rows.shape[0] > 0 and bool(held_rows.any())
        return cls(weight.detach().cpu().to(torch.float64)[:, keep], held)  # statistics live on the CPU

    def take_held_rows(self, weight: torch.Tensor, keep: torch.Tensor, held_rows: torch.Tensor,
                       center: torch.Tensor | None = None) -> None:
        """The held-out rows' kept columns and the uncut layer's outputs on them; ``center`` (the
        mean input) is taken off first, for a refit on the covariance. The rows can go after this."""
        X = held_rows if center is None else held_rows - center.to(held_rows.dtype)
        self.held_inputs = X[:, keep]
        self.held_outputs = X @ weight.detach().cpu().to(X.dtype).T

    def take_gram(self, weight: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor) -> None:
        """G[S,S] and W G[:,S], a panel of G at a time, both in the Gram's own dtype (W G[:,S] is then
        held in float64 for the solve). The product in the Gram's precision: a float32 Gram's entries
        carry float32 rounding of their sums already, and the product in float64 took twice as long
        (2.3 s of a 1.5B's MLP layer). The Gram can go after this."""
        W = weight.detach().cpu().to(gram.dtype)
        self.G_SS = gram[keep.reshape(-1, 1), keep]
        self.rhs = torch.cat([(W @ gram[:, part]).to(torch.float64) for part in keep.split(KEEP_PANEL)], 1)

    def output_rows(self, count: int) -> "KeptSystem":
        """The same system for ``count`` evenly spaced output rows (all of them when there are fewer)."""
        rows = self.cut.shape[0]
        if rows <= count:
            return self
        pick = torch.linspace(0, rows - 1, count).round().long()
        return KeptSystem(self.cut[pick], self.held, self.G_SS, self.rhs[pick], self.held_inputs,
                          self.held_outputs[:, pick])

    def add_held_out(self) -> None:
        """Fold the held-out tokens into G[S,S] and W G[:,S], in place and panel by panel (the
        whole of X_h,Sᵀ X_h,S is another 315 MB at a 9k-wide MLP): for the final refit, on every token.
        Only the panels of G[S,S] on and below the diagonal take them: their one reader after this
        is the final refit's Cholesky factorization, which reads the lower triangle alone; the rest
        is left stale, and the search, which reads it whole, is over by then."""
        X = self.held_inputs
        self.G_SS = self.G_SS.to(torch.float64)
        for part in range(0, X.shape[1], KEEP_PANEL):
            stop = part + KEEP_PANEL
            panel = X[:, part:stop]
            self.G_SS[part:stop, :stop] += (panel.T @ X[:, :stop]).to(torch.float64)
            self.rhs[:, part:stop] += (self.held_outputs.T @ panel).to(torch.float64)
        self.held_inputs = self.held_outputs = None  # folded in: 250 MB at a 9k-wide MLP and 8k tokens


def kept_system(weight: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor,
                held_rows: torch.Tensor | None, center: torch.Tensor | None = None) -> KeptSystem:
    """``center`` (the mean input) is taken off the held-out rows, for a refit on the covariance.
    For tensors the caller keeps; FASP's ``_refit`` takes the same steps with each statistic freed
    between them, which a function holding its arguments cannot do."""
    system = KeptSystem.cut_of(weight, keep, held_rows)
    if system.held:
        system.take_held_rows(weight, keep, held_rows, center)
        system.take_gram(weight, keep, gram)
    return system


def restore_columns(weight: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor,
                    held_rows: torch.Tensor | None, lambdas: tuple[float, ...],
                    tolerance: float = 0.0, mean: torch.Tensor | None = None,
                    start: float | None = None) -> tuple[torch.Tensor, dict]:
    """Refit the kept columns S so that W'·X_S matches W·X, shrunk toward the plain cut W_S:
    W' = (W G[:,S] + λ W_S) (G[S,S] + λI)⁻¹ (λ relative to the mean of diag G[S,S]; λ → ∞ is the cut).
    G is XᵀX, or the covariance of X to match only the variation about the mean of X; then
    ``mean`` (the mean of X) holds W'μ_S at the cut's W_S μ_S and is taken off the held-out rows.
    (``refit_kept`` on ``kept_system``.)"""
    return refit_kept(kept_system(weight, keep, gram, held_rows, mean), keep, lambdas, tolerance, mean,
                      weight.device, weight.dtype, start)


def refit_kept(system: KeptSystem, keep: torch.Tensor, lambdas: tuple[float, ...], tolerance: float = 0.0,
               mean: torch.Tensor | None = None, device=None, dtype=None,
               start: float | None = None) -> tuple[torch.Tensor, dict]:
    """Each λ tried and the cut itself are scored on held-out tokens, so the refit never makes the
    layer worse than the cut on unseen tokens of the calibration text. With a ``tolerance``, of the
    λ whose held-out error is within ``tolerance`` × (the best gain over the cut) of the best, the
    largest, most cut-like, wins.
    The held-out error is unimodal in λ (overfit, then back to the cut), so the grid is walked
    downhill from ``start`` (the λ the previous block chose: neighbouring blocks choose alike)
    rather than scanned: each λ costs a factorization of G[S,S], and three usually find the best.
    The chosen λ is then refit on the fit and held-out tokens together: the held-out slice only
    picks λ, its tokens still inform W'. The system is spent: its G[S,S] becomes the factor."""
    cut = system.cut
    if not system.held:
        return cut.to(device, dtype), {"lambda": None, "reason": "no held-out tokens"}
    mean_S = None if mean is None else mean.to(torch.float64)[keep]
    search = system.output_rows(SEARCH_ROWS)
    cut_error = search.heldout_error(search.cut)
    grid = sorted(lambdas)
    errors: dict[int, float] = {}

    def error_at(i: int) -> float:
        if i not in errors:
            candidate = ridge_toward_cut(search.G_SS, search.rhs, search.cut, grid[i], mean_S, dtype=SEARCH_DTYPE)
            # not positive definite at this λ: a larger one will be
            errors[i] = math.inf if candidate is None else search.heldout_error(candidate)
        return errors[i]

    best = _downhill(error_at, len(grid), grid.index(start) if start in grid else len(grid) // 2)
    best_error = error_at(best)
    if tolerance > 0:  # the largest λ within tolerance of the best: walk up while within it
        ceiling = best_error + tolerance * max(cut_error - best_error, 0.0)
        while best + 1 < len(grid) and error_at(best + 1) <= ceiling:
            best += 1
    if best_error >= cut_error:
        chosen, best_lambda, error = cut, None, cut_error
    else:
        best_lambda, error = grid[best], errors[best]
        system.add_held_out()
        chosen = ridge_toward_cut(system.G_SS, system.rhs, cut, best_lambda, mean_S, consume=True)
    info = {"lambda": best_lambda, "lambdas_tried": len(errors),
            "heldout_error_vs_cut": round(error / cut_error, 4) if cut_error > 0 else 1.0}
    return chosen.to(device, dtype), info


def _downhill(error_at, count: int, start: int) -> int:
    """The index of a local minimum of ``error_at`` over 0..count−1: from ``start``, step toward
    the cut (larger λ) while the error falls strictly, else toward smaller λ while it does."""
    best = start
    for step in (1, -1):
        while 0 <= best + step < count and error_at(best + step) < error_at(best):
            best += step
        if best != start:
            return best
    return best
