"""Calibration samples: N sequences of L tokens from a text file, a dataset, or the model itself."""

from __future__ import annotations

import torch

from prunekit.errors import UserInputError
from prunekit.textsources import read_text


def calibration_ids(source: str, tokenizer, n_samples: int, seqlen: int, seed: int,
                    model=None, progress: bool = True, held_out: int = 0, own: int = 0) -> torch.Tensor:
    """A seeded (n_samples + own, seqlen) tensor of token ids. The last ``held_out`` samples of a
    text come from its last part (its share of the samples), the others from the rest: held-out
    windows then share no passage with the fitted ones, as text a model meets later would not
    (windows drawn from the same articles made a refit look 2x better than it was on other text:
    docs/results.md). A text too short to split so is sampled as one. Self-generated samples are
    independent of each other already. ``own`` more samples written by the model itself are
    shuffled in among a text's fitted ones (mix_own_text); the held-out tail stays the text's."""
    if n_samples < 1 or seqlen < 2:
        raise UserInputError(f"calibration needs at least 1 sample of 2 tokens, got {n_samples} x {seqlen}")
    if source == "self":
        if model is None:
            raise ValueError("self-calibration needs the model")
        return self_generated_ids(model, tokenizer, n_samples, seqlen, seed, progress)
    ids = tokenizer(read_text(source, "calibration"), return_tensors="pt",
                    add_special_tokens=False).input_ids[0]
    cut = ids.numel() * (n_samples - held_out) // n_samples
    if 0 < held_out < n_samples and cut // seqlen >= n_samples - held_out and (ids.numel() - cut) // seqlen >= held_out:
        windows = torch.cat([sample_windows(ids[:cut], n_samples - held_out, seqlen, seed, source),
                             sample_windows(ids[cut:], held_out, seqlen, seed, source)])
    else:
        windows = sample_windows(ids, n_samples, seqlen, seed, source)
    if not own:
        return windows
    if model is None:
        raise ValueError("mixing in the model's own text needs the model")
    own_ids = self_generated_ids(own_text_writer(model), tokenizer, own, seqlen, seed, progress)
    return mix_own_text(windows, own_ids, held_out, seed)


def own_text_writer(model):
    """The model that writes the samples mixed into a text: its blocks in bfloat16 and its head in
    float32 (prunekit.weights.whole_model), as a streamed run must hold it, so an in-memory and a
    streamed run mix in the same text and prune to the same masks; a float32 model is re-read so
    (its bfloat16 copy is half its size), one already in bfloat16 writes as it is. Sampling 32 x
    512 tokens took 105 s in float32 on SmolLM2-135M here, 84 s in bfloat16 with the one-token
    attention of prunekit.decode_attention (115 s without it)."""
    if next(model.parameters()).dtype == torch.bfloat16:
        return model
    from prunekit.weights import ModuleWeights, whole_model

    return whole_model(model.config, ModuleWeights(model))


def mix_own_text(windows: torch.Tensor, own: torch.Tensor, held_out: int, seed: int) -> torch.Tensor:
    """The model's own samples shuffled (seeded) in among the text's fitted windows, the text's
    ``held_out`` tail kept last. Why: a refit on one domain's inputs fits that domain's input
    correlations; text the model writes from nothing spans what it was trained on, and a quarter
    of it in the Gram took ADMM 50%'s perplexity on Python's documentation from 27.7 to 22.9
    with WikiText-2 calibration, where Wanda's mask alone moved 27.7 → 27.5 (docs/results.md)."""
    fitted = torch.cat([windows[: windows.shape[0] - held_out], own])
    order = torch.randperm(fitted.shape[0], generator=torch.Generator().manual_seed(seed))
    return torch.cat([fitted[order], windows[windows.shape[0] - held_out:]])


def sample_windows(ids: torch.Tensor, n_samples: int, seqlen: int, seed: int, source: str = "text") -> torch.Tensor:
    """Non-overlapping windows chosen at random (seeded), so no token is counted twice."""
    available = ids.numel() // seqlen
    if available < n_samples:
        raise UserInputError(f"calibration text {source} has {ids.numel()} tokens, too short for "
                             f"{n_samples} x {seqlen}: pass more text or lower --calib-samples/--calib-seqlen")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randperm(available, generator=generator)[:n_samples] * seqlen
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


@torch.no_grad()
def self_generated_ids(model, tokenizer, n_samples: int, seqlen: int, seed: int,
                       progress: bool = True, batch_size: int = 64) -> torch.Tensor:
    """Self-calibration (Williams et al. 2024): sample text from the model itself (temperature 1,
    seeded), starting at the beginning-of-sequence token, for users with no in-domain data.

    A plain sampling loop over the KV cache: `generate()` spends seconds per step on its logits
    processors here, and this keeps the seed's effect obvious. Each token is drawn by inverting the
    cumulative distribution at a seeded uniform (sample_tokens); the profile's 64 samples go as
    one batch, since a CPU's matrix products run faster on more rows. The cache is preallocated
    (preallocated_cache): growing it by concatenation copied it whole at every step. A bfloat16
    writer's one-token attention skips torch's slow CPU kernel (prunekit.decode_attention)."""
    from tqdm import tqdm

    from prunekit.decode_attention import writing_attention

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(seed)
    samples = []
    bar = tqdm(total=n_samples * (seqlen - 1), desc="self-calibration", unit="tok", disable=not progress,
               leave=False)
    with writing_attention(model):
        for first in range(0, n_samples, batch_size):
            count = min(batch_size, n_samples - first)
            ids = torch.full((count, 1), start, dtype=torch.long)
            cache = preallocated_cache(model.config, seqlen)
            out = model(ids, cache=cache, use_cache=True)
            for _ in range(seqlen - 1):
                token = sample_tokens(out.logits[:, -1], generator)
                ids = torch.cat([ids, token], dim=1)
                out = model(token, cache=cache, use_cache=True)
                bar.update(count)
            samples.append(ids)
    bar.close()
    return torch.cat(samples)


def preallocated_cache(config, capacity: int):
    """transformers' DynamicCache for ``config`` whose full-attention layers write into buffers of
    ``capacity`` positions and hand attention a view of the filled part (no copy), instead of
    concatenating the whole cache at each step (20% of a 64-row decode step of the default model
    at 140 positions in torch's profiler; the main job's self-calibration went from 149 to 142 s,
    docs/results.md). Sliding-window layers keep their own class (they trim the cache themselves)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            self.key_buffer = key_states.new_empty(*key_states.shape[:2], capacity, key_states.shape[3])
            self.value_buffer = value_states.new_empty(*value_states.shape[:2], capacity, value_states.shape[3])
            self.keys, self.values = self.key_buffer[:, :, :0], self.value_buffer[:, :, :0]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start = self.keys.shape[-2]
            end = start + key_states.shape[-2]
            self.key_buffer[:, :, start:end] = key_states
            self.value_buffer[:, :, start:end] = value_states
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def sample_tokens(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits`` (rows, vocabulary), drawn at temperature 1: the first index
    whose cumulative probability exceeds a seeded uniform. The same distribution as
    torch.multinomial, which takes ~110 ms a step for 64 rows of a 49k vocabulary here (3 ms so)."""
    cumulative = torch.cumsum(torch.softmax(logits.float(), dim=-1), dim=-1)
    uniform = torch.rand(logits.shape[0], 1, generator=generator) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, uniform, right=True).clamp_(max=logits.shape[-1] - 1)
