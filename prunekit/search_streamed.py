"""The budgeted search of a model that is never whole in memory (a streamed deploy).

The same candidates and choice as prunekit.search.explore, in the memory of one decoder block: each
amount is pruned from the model's weight source straight into a folder of its own (the streamed
engine, prunekit.pruning.run with a ShardWriter), never as a copy of a dense model in memory; the
pruned float model is screened on the selection tokens from that folder, block by block
(prunekit.pruning.blocks.StreamedLogits); each candidate's artifacts are written from the folder a
tensor at a time (prunekit.targets.cpu_onnx_streamed). An N:M pattern on a share of the blocks
(prunekit.pruning.partial) reads the folder of the prune of every block with the dense blocks'
projections taken from the model's own source, so it costs no prune and no folder of its own.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from prunekit.progress import say
from prunekit.search import (SLICE_MIN_SAMPLES, SLICE_SHARE, Exploration, screen_miss, skipped, slice_budget,
                             slice_miss)


@dataclasses.dataclass
class StreamedPrune:
    """One amount's prune: the engine's result (its model a skeleton) and the folder it wrote. A
    partial N:M amount shares the folder of the prune of every block and reads the projections of
    the blocks it keeps dense from ``dense`` (the model's weight source)."""

    result: object
    folder: Path
    dense: object = None

    def open(self):
        from prunekit.models import open_streamed
        from prunekit.pruning.partial import blended_weights

        opened = open_streamed(str(self.folder))
        if self.dense is None:
            return opened
        source = (opened.manifest or {}).get("source_model", opened.source)
        return dataclasses.replace(opened, manifest=self.result.manifest(source),
                                   weights=blended_weights(opened.weights, self.dense,
                                                           self.result.details["dense_blocks"]))

    @property
    def partial(self) -> bool:
        return self.dense is not None


def partial_amount(every: StreamedPrune, dense_weights, amount: float, probe) -> StreamedPrune:
    """``every`` (N:M on every block) at the smaller ``amount``: the most sensitive blocks dense
    (prunekit.pruning.partial), its probe logits taken through the blend (the float export is
    verified against them)."""
    from prunekit.pruning.blocks import StreamedLogits
    from prunekit.pruning.partial import keep_dense_blocks_streamed

    pruned_weights = every.open().weights
    result = keep_dense_blocks_streamed(every.result, pruned_weights, dense_weights, amount)
    partial = StreamedPrune(result, every.folder, dense_weights)
    opened = partial.open()
    logits = StreamedLogits(opened.model, opened.weights, [probe[None]]).logits_of(probe[None])
    partial.result = dataclasses.replace(result, probe_logits=logits)
    return partial


def prune_streamed(model: str | None, plan, amount: float, ids, calib_source: str, folder: Path, probe,
                   batch_size: int, progress: bool, calib_own: int = 0) -> StreamedPrune:
    """``model`` (a path or id, opened streamed) pruned at ``amount`` on ``ids`` into ``folder``, a
    reloadable checkpoint; ``probe`` gets its logits through the pruned blocks on the way."""
    from prunekit.checkpoint import ShardWriter
    from prunekit.models import open_streamed
    from prunekit.pruning.run import prune

    loaded = open_streamed(model)
    writer = ShardWriter(folder)
    result = prune(loaded, plan.method, amount, plan.pattern, calib=calib_source, calib_ids=ids,
                   calib_own=calib_own, progress=progress, writer=writer, batch_size=batch_size, probe=probe[None],
                   **plan.pruner_options())
    writer.finish(result.model, loaded.tokenizer, result.manifest(loaded.source))
    return StreamedPrune(result, Path(folder))


def explore_streamed(model: str | None, loaded, plan, grid, fit_ids, selection_ids, builder, calib_source: str,
                     scratch: Path, probe, probe_reference, reference, batch_size: int, screen: bool = True,
                     progress: bool = True, calib_own: int = 0) -> Exploration:
    """prunekit.search.explore for a streamed model: ``loaded`` is ``model`` opened streamed (the
    dense candidates are written from it), ``reference`` its stored logits on ``selection_ids``,
    ``probe_reference`` its torch logits of ``probe`` (what the fp32 exports are verified against)."""
    from prunekit.errors import UserInputError
    from prunekit.evaluation import measure_quality
    from prunekit.pruning.blocks import StreamedLogits

    out = Exploration([], {}, seconds={"prune": 0.0, "screen": 0.0, "build": 0.0})
    stop_why = None
    implied = plan.pattern.implied_sparsity if plan.pattern.n_m else None
    sliced = int(fit_ids.shape[0] * SLICE_SHARE)
    slack = slice_budget(plan.budget)

    def pruned_at(amount, ids, name, own=calib_own):
        say(f"pruning {plan.method} {plan.pattern} at {amount:g} on {ids.shape[0]} calibration samples "
            f"(streamed: one decoder block in memory)", not progress)
        return prune_streamed(model, plan, amount, ids, calib_source, Path(scratch) / name, probe, batch_size,
                              progress, own)

    def screened(pruned: StreamedPrune, amount, samples: int, budget) -> list[str]:
        start = time.perf_counter()
        opened = pruned.open()
        q = measure_quality(StreamedLogits(opened.model, opened.weights, [selection_ids]), selection_ids, reference)
        out.seconds["screen"] += time.perf_counter() - start
        out.screen.append({"amount": amount, "fit_samples": samples, "ppl_increase": q.increase_pct, "kl": q.kl,
                           "top1": q.top1, "misses": plan.budget.misses(ppl_increase=q.increase_pct, kl=q.kl)})
        return budget.misses(ppl_increase=q.increase_pct, kl=q.kl)

    def in_use(pruned: StreamedPrune) -> bool:
        """Whether a built amount reads ``pruned``'s folder (a partial amount reads its every-block prune's)."""
        return any(p is not None and p.folder == pruned.folder for p in out.pruned.values())

    every = None  # the N:M prune of every block, made once: the partial amounts read its folder
    for amount, precisions in grid:
        if stop_why is not None:
            out.candidates += skipped(amount, precisions, stop_why)
            continue
        source, pruned, verify_against = loaded, None, probe_reference
        if amount > 0:
            start = time.perf_counter()
            try:
                if implied and amount < implied:  # N:M on the least sensitive blocks only
                    every = every or pruned_at(implied, fit_ids, f"pruned-{implied:g}")
                    pruned = partial_amount(every, loaded.weights, amount, probe)
                    say(f"{plan.pattern} kept on {len(pruned.result.details['sparse_blocks'])} of "
                        f"{len(every.result.layers)} blocks (amount {amount:g}), the most sensitive dense",
                        not progress)
                elif implied and every is not None:
                    pruned = every
                elif screen and not implied and sliced >= SLICE_MIN_SAMPLES:
                    part = pruned_at(amount, fit_ids[:sliced], f"slice-{amount:g}", 0)
                    out.seconds["prune"] += time.perf_counter() - start
                    far = screened(part, amount, sliced, slack)
                    shutil.rmtree(part.folder)
                    start = time.perf_counter()
                    if far:
                        stop_why = slice_miss(amount, sliced, fit_ids.shape[0], far)
                        out.candidates += skipped(amount, precisions, stop_why)
                        continue
                if pruned is None:
                    pruned = pruned_at(implied or amount, fit_ids, f"pruned-{implied or amount:g}")
            except UserInputError as exc:
                out.candidates += skipped(amount, precisions, str(exc))
                continue
            finally:
                out.seconds["prune"] += time.perf_counter() - start
            if screen:
                misses = screened(pruned, amount, fit_ids.shape[0], plan.budget)
                if misses:
                    stop_why = screen_miss(amount, misses)
                    out.candidates += skipped(amount, precisions, stop_why)
                    if not in_use(pruned):
                        shutil.rmtree(pruned.folder)
                    continue
            source, verify_against = pruned.open(), pruned.result.probe_logits[0]
        start = time.perf_counter()
        out.candidates += builder.build(source, amount, precisions, selection_ids, reference, verify_against)
        out.seconds["build"] += time.perf_counter() - start
        out.pruned[amount] = pruned
    return out
