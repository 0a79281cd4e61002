"""Calibration samples: N sequences of L tokens from a text file, a dataset, or the model itself."""

from __future__ import annotations

import torch

from prunekit.errors import UserInputError
from prunekit.textsources import read_text


def calibration_ids(source: str, tokenizer, n_samples: int, seqlen: int, seed: int,
                    model=None, progress: bool = True) -> torch.Tensor:
    """A seeded (n_samples, seqlen) tensor of token ids."""
    if n_samples < 1 or seqlen < 2:
        raise UserInputError(f"calibration needs at least 1 sample of 2 tokens, got {n_samples} x {seqlen}")
    if source == "self":
        if model is None:
            raise ValueError("self-calibration needs the model")
        return self_generated_ids(model, tokenizer, n_samples, seqlen, seed, progress)
    ids = tokenizer(read_text(source, "calibration"), return_tensors="pt",
                    add_special_tokens=False).input_ids[0]
    return sample_windows(ids, n_samples, seqlen, seed, source)


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
                       progress: bool = True, batch_size: int = 32) -> torch.Tensor:
    """Self-calibration (Williams et al. 2024): sample text from the model itself, starting at the
    beginning-of-sequence token, for users with no in-domain data."""
    from tqdm import tqdm

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    samples = []
    for first in tqdm(range(0, n_samples, batch_size), desc="self-calibration", unit="batch",
                      disable=not progress, leave=False):
        count = min(batch_size, n_samples - first)
        prompt = torch.full((count, 1), start, dtype=torch.long)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                             top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=seqlen - 1,
                             min_new_tokens=seqlen - 1, pad_token_id=start)
        samples.append(out[:, :seqlen])
    return torch.cat(samples)
