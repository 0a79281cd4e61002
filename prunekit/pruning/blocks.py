"""Where the engine gets each decoder block and where a pruned block goes.

``ResidentBlocks``: the whole model is in memory (a notebook's model, the deploy search's copies).
``StreamedBlocks``: the model is a skeleton without weights; a block is read from its weight
source when the engine reaches it, checked and written to the output checkpoint once pruned, and
dropped, so memory holds one block (plus the embedding while the inputs of block 0 are captured).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from prunekit.arch import architecture_for, decoder_layers
from prunekit.pruning.checker import check_block


class ResidentBlocks:
    def __init__(self, model: nn.Module):
        self.model = model
        self.arch = architecture_for(model.config)

    def open_embedding(self, token_ids: torch.Tensor) -> None:
        """The embedding is needed while block 0's inputs (of ``token_ids``) are captured."""

    def close_embedding(self) -> None:
        pass

    def load(self, index: int) -> nn.Module:
        return decoder_layers(self.model)[index]

    def release(self, index: int, block: nn.Module) -> None:
        decoder_layers(self.model)[index] = block.to("cpu")

    def discard(self, index: int, block: nn.Module) -> None:
        """A block that was only read (a dense pass before pruning): nothing to write."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits from the last block's output (final norm, then head)."""
        norm, head = (self.model.get_submodule(n) for n in (self.arch.final_norm, self.arch.head))
        return head(norm(hidden.to(head.weight.device)))

    def close(self) -> None:
        pass


def drop_weights(module: nn.Module) -> nn.Module:
    """``module``'s parameters back on the meta device, its buffers kept where they are: a
    skeleton's buffers are real (prunekit.weights.empty_model) and the checkpoint does not hold the
    non-persistent ones, so ``module.to("meta")`` lost them for good (Gemma 3's embedding scale:
    a later trace of the skeleton failed on a meta tensor)."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False))
    return module


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim). A block's tensors of a
    few MB come from the heap, not from their own mapping, and the pages they leave stay in RSS:
    measured on Qwen2.5-Coder-1.5B, ~35 MB more per block without this. A no-op without glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class StreamedBlocks(ResidentBlocks):
    """Blocks from ``weights`` (prunekit.weights) into the skeleton ``model`` one at a time; each
    pruned block's tensors go to ``writer`` (prunekit.checkpoint.ShardWriter; None: nowhere) and
    its N:M check to ``checks``, since the block is gone when the run ends."""

    def __init__(self, model: nn.Module, weights, writer, n_m: tuple[int, int] | None = None):
        super().__init__(model)
        self.weights, self.writer, self.n_m = weights, writer, n_m
        self.checks = []

    def _module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def _write(self, name: str, module: nn.Module) -> None:
        if self.writer is None:  # a process other than rank 0 under torchrun
            return
        self.writer.write({f"{name}.{key}": value for key, value in module.state_dict().items()})

    def _write_rows(self, name: str) -> None:
        """A 2-D tensor straight from the source to the output, a block of rows at a time."""
        if self.writer is not None:
            self.writer.write_rows(name, self.weights.shape(name), self.weights.row_blocks(name))

    def open_embedding(self, token_ids: torch.Tensor) -> None:
        """Only the rows of the tokens that occur: the rest of an uninitialized tensor is never
        touched, so it takes no memory (a 150k-token embedding is 1 GB in float32; the rows that
        16k calibration tokens use are a few MB)."""
        name = f"{self.arch.embedding}.weight"
        weight = torch.empty(self.weights.shape(name))
        used = torch.unique(token_ids)
        for start, rows in self.weights.row_blocks(name):
            chosen = used[(used >= start) & (used < start + rows.shape[0])]
            weight[chosen] = rows[chosen - start]
        self._module(self.arch.embedding).weight = nn.Parameter(weight, requires_grad=False)

    def close_embedding(self) -> None:
        self._write_rows(f"{self.arch.embedding}.weight")
        drop_weights(self._module(self.arch.embedding))
        return_freed_memory()

    def load(self, index: int) -> nn.Module:
        block = decoder_layers(self.model)[index]
        return self.weights.materialize(block, f"{self.arch.layers}.{index}")

    def release(self, index: int, block: nn.Module) -> None:
        block = block.to("cpu")
        self.checks += check_block(self.model, index, block, self.n_m)
        self._write(f"{self.arch.layers}.{index}", block)
        self.discard(index, block)

    def discard(self, index: int, block: nn.Module) -> None:
        decoder_layers(self.model)[index] = drop_weights(block)
        return_freed_memory()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm, then the head a block of vocabulary rows at a time (never whole)."""
        norm = self.weights.materialize(self._module(self.arch.final_norm), self.arch.final_norm)
        hidden = norm(hidden)
        name = f"{self.arch.head}.weight"
        logits = torch.empty(*hidden.shape[:-1], self.weights.shape(name)[0])
        for start, rows in self.weights.row_blocks(name):
            logits[..., start:start + rows.shape[0]] = hidden @ rows.T
        return logits

    def close(self) -> None:
        """The final norm, and the head unless it is tied to the embedding (saved once, as it)."""
        norm = self.weights.materialize(self._module(self.arch.final_norm), self.arch.final_norm)
        self._write(self.arch.final_norm, norm)
        drop_weights(norm)
        if not getattr(self.model.config, "tie_word_embeddings", False):
            self._write_rows(f"{self.arch.head}.weight")
        self.model.tie_weights()  # materializing gave a tied head its own Parameter


@torch.no_grad()
def streamed_logits(model: nn.Module, weights, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``input_ids`` (batch, seq) read from ``weights`` one block at a time: the torch
    reference of a model that is never whole in memory. ``model`` is its skeleton (meta
    parameters, prunekit.weights.empty_model); it is left as it was."""
    return StreamedLogits(model, weights, [input_ids]).logits_of(input_ids)


class StreamedLogits:
    """A window -> next-token logits function (prunekit.evaluation.measure_qualities) over a model
    that is never whole in memory: one pass reads each block once and takes every group of windows
    through it (groups of any length: the selection tokens, each evaluation text, a probe; ``batch``
    windows at a time, to bound the block's intermediate tensors), keeping only the last hidden
    states (50 MB for 16 x 512 tokens of a 1.5B model); a window's logits are the final norm and
    the head, read in row blocks, when it is asked for. ``model`` is left as it was."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, weights, groups: list[torch.Tensor], batch: int = 4):
        from prunekit.pruning.engine import capture_block_inputs, run_block

        self.blocks = StreamedBlocks(model, weights, writer=None)
        self.rows = {tuple(w.tolist()): (g, i) for g, ids in enumerate(groups) for i, w in enumerate(ids)}
        self.blocks.open_embedding(torch.cat([ids.flatten() for ids in groups]))
        batches = [capture_block_inputs(model, ids, batch) for ids in groups]
        self.blocks.close_embedding()
        model.tie_weights()  # the embedding's own Parameter came and went: a tied head follows it again
        hidden = [[h for h, _ in group] for group in batches]
        for index, kind in enumerate(architecture_for(model.config).layer_types(model.config)):
            block = self.blocks.load(index)
            hidden = [[run_block(block, h, by_type[kind]) for h, (_, by_type) in zip(states, group)]
                      for states, group in zip(hidden, batches)]
            drop_weights(decoder_layers(model)[index])
            return_freed_memory()
        self.hidden = [torch.cat(states) for states in hidden]

    @torch.no_grad()
    def logits_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of every position of ``ids`` (rows of one group), e.g. a short probe at once."""
        group, first = self.rows[tuple(ids[0].tolist())]
        try:
            return self.blocks.logits(self.hidden[group][first:first + ids.shape[0]])
        finally:
            drop_weights(self.blocks.model.get_submodule(self.blocks.arch.final_norm))

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        return self.logits_of(window[None])[0, :-1]

    @torch.no_grad()
    def head_input(self, group: int) -> torch.Tensor:
        """The final norm's output over a group's windows: what the head multiplies."""
        name = self.blocks.arch.final_norm
        norm = self.blocks.weights.materialize(self.blocks.model.get_submodule(name), name)
        try:
            return norm(self.hidden[group])
        finally:
            drop_weights(norm)
