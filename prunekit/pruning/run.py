"""`prune`: calibrate, then prune a loaded model layer by layer with the chosen method."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prunekit.calibration import calibration_ids
from prunekit.models import LoadedModel
from prunekit.pattern import Pattern, check_sparsity
from prunekit.pruning.blocks import StreamedBlocks
from prunekit.pruning.checker import check_model, summarize
from prunekit.pruning.engine import prune_layerwise
from prunekit.pruning.registry import method as lookup_method


@dataclass
class PruneResult:
    """What a notebook wants to inspect after pruning."""

    model: object
    tokenizer: object
    method: str
    pattern: str
    sparsity: float
    seed: int
    calibration: dict
    parameters_before: int
    parameters_after: int
    mask_hash: str | None
    layers: list[dict]
    check: dict
    seconds: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    calib_ids: object = field(default=None, repr=False)  # the tokens it was calibrated on (static INT8 reuses them)
    probe_logits: object = field(default=None, repr=False)  # logits of the probe through the pruned blocks

    def manifest(self, source: str) -> dict:
        return {"prunekit_manifest": 1, "source_model": source, "method": self.method,
                "pattern": self.pattern, "sparsity": self.sparsity, "seed": self.seed,
                "calibration": self.calibration, "mask_hash": self.mask_hash,
                "parameters_before": self.parameters_before, "parameters_after": self.parameters_after,
                **self.details}


def make_pruner(method: str, sparsity: float, pattern: str | Pattern, **options):
    """The method's block pruner, after checking that the method makes this kind of pattern."""
    pattern = Pattern.parse(pattern) if isinstance(pattern, str) else pattern
    chosen = lookup_method(method)
    chosen.check_pattern(pattern)
    return chosen.build(sparsity, pattern, **options)


def prune(loaded: LoadedModel, method: str, sparsity: float = 0.5, pattern: str | Pattern = "unstructured",
          calib: str = "self", calib_samples: int = 128, calib_seqlen: int = 512, seed: int = 0,
          batch_size: int = 8, progress: bool = True, calib_ids=None, pruner=None, writer=None, probe=None,
          calib_own: int = 0, **options) -> PruneResult:
    """Prune ``loaded.model`` in place. ``calib_ids`` (a tensor) skips loading calibration text;
    ``calib_own`` samples the model writes itself join the text's (prunekit.calibration.mix_own_text);
    ``pruner`` (a block pruner built elsewhere, e.g. a benchmark's ablation) replaces the method's.
    A streamed model (``loaded.streamed``) is pruned block by block from its weight source into
    ``writer`` (prunekit.checkpoint.ShardWriter); ``probe`` token ids get their logits through the
    pruned model (``probe_logits``)."""
    check_sparsity(sparsity)
    pattern = Pattern.parse(pattern) if isinstance(pattern, str) else pattern
    pruner = pruner or make_pruner(method, sparsity, pattern, **options)
    if hasattr(pruner, "validate"):
        pruner.validate(loaded.model)  # refuse impossible requests before any work
    before = loaded.num_parameters()
    seconds = {}
    start = time.perf_counter()
    if calib_ids is None:
        if (calib == "self" or calib_own) and loaded.streamed:
            raise ValueError("self-calibration generates text with the whole model: load it, not streamed")
        calib_ids = calibration_ids(calib, loaded.tokenizer, calib_samples, calib_seqlen, seed,
                                    model=loaded.model, progress=progress, own=calib_own)
    seconds["calibration_data"] = time.perf_counter() - start
    start = time.perf_counter()
    blocks = StreamedBlocks(loaded.model, loaded.weights, writer, pattern.n_m) if loaded.streamed else None
    engine = prune_layerwise(loaded.model, calib_ids, pruner, batch_size=batch_size, progress=progress,
                             blocks=blocks, probe=probe)
    seconds["prune"] = time.perf_counter() - start
    check = summarize(blocks.checks if blocks else check_model(loaded.model, pattern.n_m))
    finish = getattr(pruner, "finish", None)
    details = finish(loaded.model) if finish else {}
    return PruneResult(
        model=loaded.model, tokenizer=loaded.tokenizer, method=method, pattern=str(pattern),
        sparsity=pruner.sparsity, seed=seed,
        calibration={"source": calib, "samples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]),
                     "own_samples": calib_own},  # samples: every row, the model's own among them
        parameters_before=before, parameters_after=loaded.num_parameters(),
        mask_hash=pruner.mask_hash(), layers=engine.blocks, check=check, seconds=seconds, details=details,
        calib_ids=calib_ids, probe_logits=engine.probe_logits)
