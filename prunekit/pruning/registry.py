"""The pruning methods, one entry each: what kind of pattern a method makes and how to build its
block pruner. Profiles, plans and the CLI read the names from here; nothing else lists methods.

Importing this module is cheap (no torch): the CLI's argument choices come from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from prunekit.errors import UserInputError
from prunekit.pattern import Pattern


@dataclass(frozen=True)
class Method:
    name: str
    structured: bool  # removes whole channels (pattern "structured") or zeroes single weights
    summary: str
    build: Callable  # (sparsity, pattern, **options) -> block pruner
    # Samples the model writes itself, as a share of a calibration text's, mixed in by default
    # (prunekit.calibration.mix_own_text): the methods whose weights refit on the Gram.
    own_text: float = 0.0

    def own_samples(self, text_samples: int, source: str, given: int | None = None) -> int:
        """How many of the model's own samples join a calibration text: ``given``, or this method's
        share of ``text_samples``; none when the model writes all of it (``source`` self)."""
        if given is not None and given > 0 and source == "self":
            raise UserInputError("--calib-own mixes the model's own text into a --calib text; with no --calib "
                                 "the model writes all of it already: pass --calib FILE, or drop --calib-own")
        if source == "self":
            return 0
        return given if given is not None else round(text_samples * self.own_text)

    def check_pattern(self, pattern: Pattern) -> None:
        if self.structured and not pattern.structured:
            raise UserInputError(f"method {self.name} removes whole channels: use --pattern structured, "
                                 f"or --method wanda/sparsegpt/admm/magnitude for pattern {pattern}")
        if not self.structured and pattern.structured:
            raise UserInputError(f"method {self.name} zeroes single weights: use --pattern unstructured "
                                 f"or N:M, or --method fasp for structured pruning")


def _fasp(sparsity: float, pattern: Pattern, **options):
    from prunekit.pruning.fasp import FaspPruner

    return FaspPruner(sparsity=sparsity, **options)


# What the methods that zero single weights take (Python API and benchmarks): ``permute`` deals
# the MLP and value channels into balanced N:M groups first (prunekit.pruning.permutation);
# ``outlier_spread`` sets unstructured sparsity per block by outlier share (prunekit.pruning.layer_sparsity).
ZEROING_OPTIONS = {"permute", "outlier_spread"}


def _zeroing(name: str) -> Callable:
    def build(sparsity: float, pattern: Pattern, **options):
        from prunekit.pruning.unstructured import UnstructuredPruner

        unknown = set(options) - ZEROING_OPTIONS
        if unknown:
            raise UserInputError(f"method {name} takes no option {', '.join(sorted(unknown))} "
                                 f"(FASP-only)")
        return UnstructuredPruner(name, pattern.implied_sparsity or sparsity, pattern.n_m, **options)
    return build


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("fasp", True, "structured: MLP and value channels removed, consumer refit", _fasp),
    Method("wanda", False, "|W|·‖X‖ per output row, unstructured or N:M", _zeroing("wanda")),
    Method("sparsegpt", False, "column-wise pruning with inverse-Hessian weight update", _zeroing("sparsegpt")),
    Method("admm", False, "mask and weights solved on the layer's outputs (ADMM), refit toward the cut with "
                          "λ chosen on held-out tokens, the model's own text mixed into the calibration",
           _zeroing("admm"), own_text=0.25),
    Method("magnitude", False, "|W| per layer (baseline)", _zeroing("magnitude")),
)}
METHODS = tuple(REGISTRY)


def method(name: str) -> Method:
    if name not in REGISTRY:
        raise UserInputError(f"unknown method '{name}': use one of {', '.join(METHODS)}")
    return REGISTRY[name]


def default_pattern(name: str) -> Pattern:
    return Pattern("structured" if method(name).structured else "unstructured")
