"""The layer-by-layer engine every method runs on.

Capture the inputs of decoder block 0 once; then for each block: collect the input statistics its
method asks for, let the method prune the block, and rerun the pruned block to get the next block's
inputs. Memory holds the model plus one block's calibration activations, never all blocks'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm import tqdm

from prunekit.arch import architecture_for, decoder_layers


GRAM_PANEL = 256  # columns per panel of XᵀX: small enough to skip most of the lower half


def add_upper_gram(accumulator: torch.Tensor, x: torch.Tensor, panel: int = GRAM_PANEL) -> None:
    """accumulator += XᵀX, computed only on and above the diagonal panels (read it back with
    ``symmetrize_``): torch has no symmetric rank-k update, and a full XᵀX does twice the work."""
    features = x.shape[1]
    for start in range(0, features, panel):
        stop = min(start + panel, features)
        accumulator[start:stop, start:] += (x[:, start:stop].T @ x[:, start:]).to(accumulator.device,
                                                                                  accumulator.dtype)


def symmetrize_(upper: torch.Tensor, panel: int = GRAM_PANEL) -> torch.Tensor:
    """The full matrix from one whose upper triangle is right (``add_upper_gram``'s accumulator),
    in place, panel by panel: a 9k-wide float64 Gram is 640 MB, and triu(U) + triu(U, 1)ᵀ holds
    four of them at once."""
    features = upper.shape[0]
    for start in range(0, features, panel):
        stop = min(start + panel, features)
        upper[start:stop, :start] = upper[:start, start:stop].T
        diagonal = upper[start:stop, start:stop]
        diagonal.copy_(torch.triu(diagonal) + torch.triu(diagonal, 1).T)
    return upper


@dataclass
class InputStats:
    """Running statistics of the inputs X (tokens x features) of one group of linear layers.

    ``sumsq`` gives Wanda's ‖X_j‖₂² over every token; ``gram`` is XᵀX over the fit tokens, for
    methods that solve least squares, and ``covariance`` the same about the mean of all calibration
    tokens. The held-out tokens are kept apart, as rows (``held_rows``), so a method can check a refit
    on tokens it did not fit on: a few thousand rows are smaller than a second Gram (73 MB against
    640 MB at a 9k-wide MLP) and cheaper to test a candidate on. ``held_tokens`` is their count over
    every process; a batch's rows go to a fixed offset, so processes fill disjoint rows.
    """

    features: int
    want_gram: bool
    held_tokens: int = 0
    gram_dtype: torch.dtype = torch.float64
    sumsq: torch.Tensor = None
    _gram_upper: torch.Tensor = None
    _held_rows: torch.Tensor = None
    _sums: torch.Tensor = None  # per split (fit, held out): Σ_t x_t
    _tokens: list = None  # per split: token count
    _full: bool = False  # the Gram accumulator holds the full matrix (no more tokens can be added)

    def __post_init__(self):
        self.sumsq = torch.zeros(self.features, dtype=torch.float64)
        if self.want_gram:
            self._gram_upper = torch.zeros(self.features, self.features, dtype=self.gram_dtype)
            self._held_rows = torch.zeros(self.held_tokens, self.features)
            self._sums = torch.zeros(2, self.features, dtype=torch.float64)
            self._tokens = [0, 0]

    def add(self, x: torch.Tensor, held_at: int | None = None):
        """Tokens of one batch: fit tokens, or held-out ones that start at row ``held_at``."""
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.sumsq += (x * x).sum(0).to(self.sumsq.device, torch.float64)
        if self.want_gram:
            assert not self._full, "statistics were read: no more tokens can be added"
            held = held_at is not None
            if held:
                self._held_rows[held_at:held_at + x.shape[0]] = x.to(self._held_rows.device)
            else:
                add_upper_gram(self._gram_upper, x)
            self._sums[int(held)] += x.sum(0).to(self._sums.device, torch.float64)
            self._tokens[int(held)] += x.shape[0]

    def release_held_rows(self) -> None:
        """Free the held-out rows (300 MB at a 9k-wide MLP and 8k held-out tokens) once read."""
        self._held_rows = None

    def release_grams(self) -> None:
        """Free the Gram (320 MB at a 9k-wide MLP) and the held-out rows once their reader is done."""
        self._gram_upper = self._held_rows = None
        self.want_gram = False

    def sum_across_processes(self) -> None:
        """Statistics of every process's tokens (prunekit.pruning.distributed), before any is read.
        Each held-out row is filled by one process and zero elsewhere, so the sum is that row."""
        from prunekit.pruning.distributed import sum_across_processes

        tokens = torch.tensor(self._tokens or [0, 0], dtype=torch.float64)
        tensors = [self.sumsq] + ([self._gram_upper, self._held_rows, self._sums, tokens]
                                  if self.want_gram else [])
        sum_across_processes(tensors)
        if self.want_gram:
            self._tokens = [int(t) for t in tokens.tolist()]

    def permute_(self, order: torch.Tensor) -> None:
        """The statistics of the same tokens with the features reordered (new j = old ``order[j]``):
        for a block whose channels were reordered (prunekit.pruning.permutation). Once every token
        is in: the Gram is read, and so complete."""
        self.sumsq = self.sumsq[order]
        if self.want_gram:
            gram = self.gram
            self._gram_upper = gram[order][:, order]
            self._held_rows = self._held_rows[:, order]
            self._sums = self._sums[:, order]

    @property
    def gram(self) -> torch.Tensor | None:
        """XᵀX over the fit tokens; the accumulator becomes the full matrix on first read."""
        if not self.want_gram:
            return None
        if not self._full:
            symmetrize_(self._gram_upper)
            self._full = True
        return self._gram_upper

    @property
    def held_rows(self) -> torch.Tensor | None:
        """The held-out tokens' inputs (tokens x features, float32); None without a Gram."""
        return self._held_rows if self.gram is not None else None

    @property
    def mean(self) -> torch.Tensor | None:
        """Mean input over every calibration token, fit and held out."""
        return self._sums.sum(0) / max(sum(self._tokens), 1) if self.want_gram else None

    @property
    def covariance(self) -> torch.Tensor | None:
        """Σ_t (x_t − μ)(x_t − μ)ᵀ over the fit tokens, μ = ``mean``."""
        if not self.want_gram:
            return None
        # Σ (x − μ)(x − μ)ᵀ = XᵀX − s μᵀ − μ sᵀ + n μ μᵀ, with s = Σ x over the same tokens
        mu, sums = self.mean, self._sums[0]
        cross = torch.outer(sums, mu)
        return self.gram - cross - cross.T + self._tokens[0] * torch.outer(mu, mu)

    @property
    def norm(self) -> torch.Tensor:
        return self.sumsq.sqrt().to(torch.float32)


class BlockPruner(Protocol):
    """What a method tells the engine: which statistics it needs, and how it prunes one block."""

    needs_gram: bool  # XᵀX for the groups named in gram_groups (all groups if that is None)
    held_out_fraction: float
    # (optional) gram_dtype: what XᵀX sums in, float64 unless the method says otherwise

    def prune_block(self, index: int, block: nn.Module, linears: dict[str, nn.Linear],
                    stats: dict[str, InputStats]) -> dict:
        """Prune in place; return what the report should show about this block."""


@dataclass
class EngineResult:
    blocks: list[dict] = field(default_factory=list)
    probe_logits: torch.Tensor | None = None


class _StopForward(Exception):
    pass


def _stop_forward(*_):
    raise _StopForward


def _linear_groups(model) -> dict[str, list[str]]:
    """Linear layers that read the same tensor share one set of input statistics; in the order
    they run, the last one last."""
    a = architecture_for(model.config)
    return {
        f"{a.attention}.{a.q}": [f"{a.attention}.{p}" for p in (a.q, a.k, a.v)],
        f"{a.attention}.{a.o}": [f"{a.attention}.{a.o}"],
        f"{a.mlp}.{a.gate}": [f"{a.mlp}.{p}" for p in (a.gate, a.up)],
        f"{a.mlp}.{a.down}": [f"{a.mlp}.{a.down}"],
    }


def compute_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _BlockRecorder(nn.Module):
    """Stands in for a decoder block while inputs are captured: records what the model passes it
    and hands the hidden states on unchanged (or stops the forward)."""

    def __init__(self, sink: dict, key, stop: bool):
        super().__init__()
        self.sink, self.key, self.stop = sink, key, stop

    def forward(self, hidden_states, *args, **kwargs):
        self.sink[self.key] = (hidden_states.detach(), kwargs)
        if self.stop:
            raise _StopForward
        return hidden_states


@torch.no_grad()
def capture_block_inputs(model, input_ids: torch.Tensor, batch_size: int):
    """Hidden states entering block 0, and the keyword arguments the model passes to its blocks
    (rotary tables, masks) by layer type (families with sliding-window layers pass each type its
    own), one (hidden, {layer type: kwargs}) per batch. The blocks before the first layer of the
    last type are bypassed, not run."""
    arch = architecture_for(model.config)
    layers = decoder_layers(model)
    types = arch.layer_types(model.config)
    firsts = {kind: types.index(kind) for kind in dict.fromkeys(types)}
    last = max(firsts.values())
    originals = [layers[i] for i in range(last + 1)]
    captured = []
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            sink = {}
            for i in range(last + 1):
                layers[i] = _BlockRecorder(sink, i, stop=i == last)
            try:
                model(input_ids[start:start + batch_size], use_cache=False)
            except _StopForward:
                pass
            captured.append((sink[0][0], {kind: sink[i][1] for kind, i in firsts.items()}))
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return captured


def run_block(block, hidden, kwargs):
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def attach_stats(linears: dict[str, nn.Linear], groups: dict[str, list[str]], make_stats,
                 held_at=lambda: None) -> tuple[dict[str, InputStats], list]:
    """One InputStats per group of linears that read the same tensor (``make_stats(leader,
    module)``), filled by a hook on the group's leader with each batch (held out from row
    ``held_at()``, or fit tokens when None). Returns (statistics by linear name, hook handles)."""
    stats, handles = {}, []
    for leader, members in groups.items():
        module = linears[leader]
        group_stats = make_stats(leader, module)
        stats.update({name: group_stats for name in members})
        handles.append(module.register_forward_pre_hook(lambda _m, args, s=group_stats: s.add(args[0], held_at())))
    return stats, handles


def stat_groups(stats: dict[str, InputStats]) -> list[tuple[InputStats, list[str]]]:
    """Each distinct InputStats of ``stats`` (by linear name) with the names that share it, in order."""
    groups: dict[int, tuple[InputStats, list[str]]] = {}
    for name, group_stats in stats.items():
        groups.setdefault(id(group_stats), (group_stats, []))[1].append(name)
    return list(groups.values())


@torch.no_grad()
def dense_pass(blocks, states: list, types: list[str], groups: dict[str, list[str]], measure) -> list:
    """``states`` (block 0's inputs) through every dense block, before anything is pruned:
    ``measure(index, linears, stats)`` on each block's input norms (no Grams), every process's
    tokens summed. For methods that plan the blocks from the whole dense model (OWL's per-block
    sparsity); a few batches cost a small share of the prune."""
    results = []
    for index, kind in enumerate(types):
        block = blocks.load(index).to(compute_device())
        linears = {name: block.get_submodule(name) for members in groups.values() for name in members}
        stats, handles = attach_stats(linears, groups, lambda _leader, module: InputStats(module.in_features, False))
        try:
            states = [(run_block(block, hidden, kwargs[kind]), kwargs) for hidden, kwargs in states]
        finally:
            for handle in handles:
                handle.remove()
        for group_stats, _ in stat_groups(stats):
            group_stats.sum_across_processes()
        results.append(measure(index, linears, stats))
        blocks.discard(index, block)
    return results


@torch.no_grad()
def prune_layerwise(model, input_ids: torch.Tensor, pruner: BlockPruner, batch_size: int = 8,
                    progress: bool = True, blocks=None, probe: torch.Tensor | None = None) -> EngineResult:
    """Prune every block of ``model`` in order. ``blocks`` (prunekit.pruning.blocks) says where a
    block comes from and goes to: the model in memory by default, or a weight source and an
    output checkpoint. ``probe`` (token ids) rides along without entering the statistics: its
    logits through the pruned blocks come back in ``EngineResult.probe_logits``, for checking the
    saved checkpoint against the model as it was pruned."""
    from prunekit.exporters.latency import peak_rss_gb
    from prunekit.pruning.blocks import ResidentBlocks
    from prunekit.pruning.distributed import my_batches

    blocks = blocks or ResidentBlocks(model)
    device = compute_device()
    samples, seqlen = input_ids.shape
    n_batches = -(-samples // batch_size)
    mine = my_batches(n_batches)  # all of them in one process; under torchrun, this rank's share
    if len(mine) < n_batches:
        input_ids = torch.cat([input_ids[b * batch_size:(b + 1) * batch_size] for b in mine])
    blocks.open_embedding(input_ids if probe is None else torch.cat([input_ids.flatten(), probe.flatten()]))
    captured = capture_block_inputs(model, input_ids, batch_size)
    probe_state = capture_block_inputs(model, probe, probe.shape[0])[0] if probe is not None else None
    blocks.close_embedding()
    held_batches = round(n_batches * pruner.held_out_fraction)
    if pruner.held_out_fraction > 0 and n_batches > 1:
        held_batches = max(1, min(held_batches, n_batches - 1))
    else:
        held_batches = 0
    held_from = n_batches - held_batches
    held_tokens = (samples - held_from * batch_size) * seqlen if held_batches else 0
    groups = _linear_groups(model)
    result = EngineResult()
    states = [(_to(h, device), {kind: {k: _to(v, device) for k, v in kw.items()} for kind, kw in by_type.items()})
              for h, by_type in captured]
    del captured
    types = architecture_for(model.config).layer_types(model.config)
    plan = getattr(pruner, "plan_blocks", None)  # (planning batches, measure, take the results)
    if plan is not None:
        batches, measure, take = plan
        take(dense_pass(blocks, states[:batches], types, groups, measure))
    bar = tqdm(range(len(decoder_layers(model))), desc="pruning", unit="layer", disable=not progress, leave=False)
    for index in bar:
        block = blocks.load(index).to(device)
        linears = {name: block.get_submodule(name) for members in groups.values() for name in members}
        current = {"held_at": None}
        wanted = getattr(pruner, "gram_groups", None)

        def make_stats(leader, module):
            gram = pruner.needs_gram and (wanted is None or leader in wanted)
            return InputStats(module.in_features, gram, held_tokens if gram else 0,
                              getattr(pruner, "gram_dtype", torch.float64))

        stats, handles = attach_stats(linears, groups, make_stats, lambda: current["held_at"])
        # The last group's input is the last thing the statistics need: skip the rest of the block
        # (down_proj's GEMM, a fifth of the block's work) in this pass.
        last_leader = linears[list(groups)[-1]]
        handles.append(last_leader.register_forward_pre_hook(_stop_forward))
        try:
            for b, (hidden, kwargs) in zip(mine, states):
                current["held_at"] = (b - held_from) * batch_size * seqlen if b >= held_from else None
                try:
                    run_block(block, hidden, kwargs[types[index]])
                except _StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        for group_stats, _ in stat_groups(stats):
            group_stats.sum_across_processes()
        info = pruner.prune_block(index, block, linears, stats)
        result.blocks.append({"layer": index, **info})
        del stats, linears
        if index < len(types) - 1:  # the last block's outputs feed no block: not computed
            for b, (hidden, kwargs) in enumerate(states):  # in place: one copy of the activations
                states[b] = (run_block(block, hidden, kwargs[types[index]]), kwargs)
        if probe_state is not None:
            probe_state = (run_block(block, probe_state[0], probe_state[1][types[index]]), probe_state[1])
        blocks.release(index, block)
        del block
        bar.set_postfix_str(f"layer {index + 1}/{len(types)}, peak {peak_rss_gb():.2f} GB")
    bar.close()
    if probe_state is not None:
        result.probe_logits = blocks.logits(probe_state[0]).float().cpu()
    blocks.close()
    return result
