"""N:M on a subset of the decoder blocks, the most sensitive ones kept dense.

Sparse tensor cores speed up only the GEMMs that are 2:4, and the quality a block loses to 2:4
differs from block to block. From one N:M prune of every block, a candidate at a smaller amount
restores the dense weights of the blocks whose pruning removed the most of their output (the
pruner's per-layer ``error``: prunekit.pruning.unstructured.relative_output_error, averaged over
the block's projections). The blocks left sparse keep the masks they got on the outputs of the
pruned blocks before them, not a fresh prune: the candidate is judged on held-out tokens like
every other, so this shows in its measured quality rather than hiding in it. The amount stays the
fraction of block weights zeroed: 2:4 on half the blocks is amount 0.25.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib

from prunekit.arch import block_linears, decoder_layers
from prunekit.pattern import Pattern
from prunekit.pruning.checker import check_model, summarize


def block_errors(result) -> list[float]:
    """Mean relative output error of each block's projections, from the pruner's block records."""
    return [sum(block["error"].values()) / len(block["error"]) for block in result.layers]


def sparse_blocks(result, amount: float) -> list[int]:
    """The blocks that keep N:M at ``amount``: the least sensitive ones, as many as the amount
    allows (rounded to whole blocks)."""
    errors = block_errors(result)
    count = round(len(errors) * amount / Pattern.parse(result.pattern).implied_sparsity)
    return sorted(sorted(range(len(errors)), key=lambda i: (errors[i], i))[:count])


def keep_dense_blocks(result, dense_model, amount: float):
    """A PruneResult at ``amount`` made from ``result`` (N:M on every block): a copy of its model
    with the most sensitive blocks' projections restored from ``dense_model``."""
    n_m = Pattern.parse(result.pattern).n_m
    sparse = sparse_blocks(result, amount)
    model = copy.deepcopy(result.model)
    dense_layers = decoder_layers(dense_model)
    digest = hashlib.sha256()
    for index, layer in enumerate(decoder_layers(model)):
        originals = block_linears(dense_model, dense_layers[index])
        for name, linear in block_linears(model, layer).items():
            if index in sparse:
                digest.update(f"{index}.{name}".encode())
                digest.update((linear.weight.data != 0).cpu().numpy().tobytes())
            else:
                linear.load_state_dict(originals[name].state_dict())
    dense_blocks = sorted(set(range(len(dense_layers))) - set(sparse))
    check = summarize(check_model(model, n_m, frozenset(dense_blocks)))
    return dataclasses.replace(
        result, model=model, sparsity=check["overall_sparsity"], mask_hash=digest.hexdigest(), check=check,
        details={**result.details, "sparse_blocks": sparse, "dense_blocks": dense_blocks,
                 "block_errors": [round(e, 6) for e in block_errors(result)]})
