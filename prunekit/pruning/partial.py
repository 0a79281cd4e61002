"""N:M on a subset of the decoder blocks, the most sensitive ones kept dense.

Sparse tensor cores speed up only the GEMMs that are 2:4, and the quality a block loses to 2:4
differs from block to block. From one N:M prune of every block, a candidate at a smaller amount
restores the dense weights of the blocks whose pruning removed the most of their output (the
pruner's per-layer ``error``: prunekit.pruning.unstructured.relative_output_error, averaged over
the block's projections). The blocks left sparse keep the masks they got on the outputs of the
pruned blocks before them, not a fresh prune: the candidate is judged on held-out tokens like
every other, so this shows in its measured quality rather than hiding in it. The amount stays the
fraction of block weights zeroed: 2:4 on half the blocks is amount 0.25. A streamed model's
partial amount is the every-block folder read through a blend that takes the dense blocks'
projections from the model's own source: no second checkpoint is written until one ships.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib

from prunekit.arch import architecture_for, block_linears, decoder_layers
from prunekit.pattern import Pattern
from prunekit.pruning.checker import check_weight, summarize


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
    sparse = sparse_blocks(result, amount)
    model = copy.deepcopy(result.model)
    layers, dense_layers = decoder_layers(model), decoder_layers(dense_model)
    for index, layer in enumerate(layers):
        if index not in sparse:
            originals = block_linears(dense_model, dense_layers[index])
            for name, linear in block_linears(model, layer).items():
                linear.load_state_dict(originals[name].state_dict())
    return _partial_result(result, model, sparse, lambda i, name: block_linears(model, layers[i])[name].weight.data)


def blended_weights(pruned_weights, dense_weights, dense_blocks):
    """``pruned_weights`` (N:M on every block) with the projections of ``dense_blocks`` read from
    ``dense_weights``: a streamed model's partial amount without a second checkpoint on disk."""
    from prunekit.weights import BlendedWeights

    arch = architecture_for(pruned_weights.config)
    held = set(pruned_weights.names())
    from_dense = {f"{arch.layers}.{i}.{name}.{kind}" for i in dense_blocks for name in arch.linear_names()
                  for kind in ("weight", "bias")} & held
    return BlendedWeights(pruned_weights, dense_weights, from_dense)


def keep_dense_blocks_streamed(result, pruned_weights, dense_weights, amount: float):
    """keep_dense_blocks for a streamed model: ``result``'s model is a skeleton and its weights are
    ``pruned_weights`` (a folder's source). Nothing is written; the check and the mask hash read one
    projection at a time from the blend (blended_weights), which the caller opens the model with."""
    sparse = sparse_blocks(result, amount)
    dense_blocks = sorted(set(range(len(result.layers))) - set(sparse))
    blend = blended_weights(pruned_weights, dense_weights, dense_blocks)
    prefix = architecture_for(pruned_weights.config).layers
    return _partial_result(result, result.model, sparse,
                           lambda i, name: blend.get(f"{prefix}.{i}.{name}.weight"))


def _partial_result(result, model, sparse: list[int], weight_of):
    """The PruneResult of ``model`` with N:M on the ``sparse`` blocks only: its check (the other
    blocks' N:M not applicable) and a mask hash over the sparse blocks' projections, each read by
    ``weight_of(block, projection name)``."""
    n_m = Pattern.parse(result.pattern).n_m
    blocks = len(result.layers)
    digest, rows = hashlib.sha256(), []
    for index in range(blocks):
        for name in architecture_for(model.config).linear_names():
            weight = weight_of(index, name)
            if index in sparse:
                digest.update(f"{index}.{name}".encode())
                digest.update((weight != 0).cpu().numpy().tobytes())
            rows.append(check_weight(f"layers.{index}.{name}", weight, n_m, dense=index not in sparse))
    dense_blocks = sorted(set(range(blocks)) - set(sparse))
    check = summarize(rows)
    return dataclasses.replace(
        result, model=model, sparsity=check["overall_sparsity"], mask_hash=digest.hexdigest(), check=check,
        details={**result.details, "sparse_blocks": sparse, "dense_blocks": dense_blocks,
                 "block_errors": [round(e, 6) for e in block_errors(result)]})
