"""FASP's ablations for the structured benchmark: subclasses that change one part of the method, so
that the library's FaspPruner carries no option that only a benchmark uses.

    fasp-norestore   no least-squares restoration (the plain cut)
    magnitude-norm   columns scored by weights alone (blind to activations), no restoration
    fasp-xtx         o_proj refit on XᵀX: rebuilds the removed value channels' mean from the kept ones
    fasp-free-mean   o_proj about its inputs' mean, output mean free to drift, shrunk to half the
                     held-out gain (the default before the mean was held)
"""

from __future__ import annotations

import torch

from prunekit.pruning.fasp import FaspPruner, Refit, column_scores


class FaspXtx(FaspPruner):
    ATTENTION_REFIT = Refit()


class FaspFreeMean(FaspPruner):
    ATTENTION_REFIT = Refit(centered=True, hold_mean=False, tolerance=0.5)


class MagnitudeNorm(FaspPruner):
    def _scores(self, weight, stats):
        return column_scores(weight.float().cpu(), torch.ones(weight.shape[1]))


# name -> (pruner class, constructor options)
VARIANTS = {
    "fasp": (FaspPruner, {}),
    "fasp-norestore": (FaspPruner, {"restore": False}),
    "magnitude-norm": (MagnitudeNorm, {"restore": False}),
    "fasp-xtx": (FaspXtx, {}),
    "fasp-free-mean": (FaspFreeMean, {}),
}
DEFAULT_TABLE = ("fasp", "fasp-norestore", "magnitude-norm")


def build(variant: str, sparsity: float, **options) -> FaspPruner:
    cls, own = VARIANTS[variant]
    return cls(sparsity=sparsity, **own, **options)
