"""Quality, measured: perplexity on held-out text and, against the dense model, the mean KL
divergence of next-token distributions and top-1 agreement."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from prunekit.errors import UserInputError
from prunekit.textsources import read_text


@dataclass
class EvalText:
    """One evaluation text, tagged by language (several tags report separately)."""

    language: str
    source: str


def parse_eval_spec(spec: str) -> EvalText:
    """'[LANG=]SRC': 'sw=swahili.txt' or 'wikitext2' (language 'default')."""
    if "=" in spec:
        language, source = spec.split("=", 1)
        if not language or not source:
            raise UserInputError(f"--eval {spec}: use LANG=SOURCE, e.g. en=wiki.test.raw")
        return EvalText(language, source)
    return EvalText("default", spec)


def eval_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of seqlen tokens from the start of the text (first K, or all)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise UserInputError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: count * seqlen].reshape(count, seqlen)


@dataclass
class Quality:
    language: str
    source: str
    windows: int
    tokens: int
    perplexity: float
    dense_perplexity: float | None = None
    kl: float | None = None
    top1: float | None = None
    runtime: str = "torch"  # what computed the logits: the torch model, or the shipped artifact's runtime

    @property
    def increase_pct(self) -> float | None:
        return None if not self.dense_perplexity else 100 * (self.perplexity / self.dense_perplexity - 1)

    def as_dict(self) -> dict:
        return asdict(self)


Logits = Callable[[torch.Tensor], torch.Tensor]  # a (seq,) window -> (seq - 1, vocab) next-token logits


def torch_logits(model) -> Logits:
    @torch.no_grad()
    def logits(window: torch.Tensor) -> torch.Tensor:
        return model(window.unsqueeze(0), use_cache=False).logits[0, :-1].float()
    return logits


def _as_logits(model_or_fn) -> Logits:
    return model_or_fn if not isinstance(model_or_fn, torch.nn.Module) else torch_logits(model_or_fn)


@torch.no_grad()
def measure_qualities(candidates: dict[str, Logits], windows: torch.Tensor, dense=None,
                      language: str = "default", source: str = "", progress: bool = False,
                      runtimes: dict[str, str] | None = None) -> dict[str, Quality]:
    """Perplexity of each candidate (a torch model, or any window -> logits function such as an
    ONNX Runtime session); with ``dense`` given, also the dense perplexity, KL(dense ‖ candidate)
    and top-1 agreement. One pass: each window's dense log-probabilities serve every candidate,
    and no logits pile up across windows. The one NLL/KL arithmetic for every runtime."""
    from tqdm import tqdm

    fns = {name: _as_logits(c) for name, c in candidates.items()}
    dense_fn = None if dense is None else _as_logits(dense)
    sums = {name: [0.0, 0.0, 0.0] for name in fns}  # nll, kl, agreeing tokens
    dense_nll, tokens = 0.0, 0
    for window in tqdm(windows, desc=f"evaluating {language}", unit="window", disable=not progress, leave=False):
        targets = window[1:, None]
        dense_logp = None if dense_fn is None else F.log_softmax(dense_fn(window), -1)
        if dense_logp is not None:
            dense_nll -= dense_logp.gather(1, targets).sum().item()
        for name, fn in fns.items():
            logp = F.log_softmax(fn(window), -1)
            sums[name][0] -= logp.gather(1, targets).sum().item()
            if dense_logp is not None:
                sums[name][1] += (dense_logp.exp() * (dense_logp - logp)).sum().item()
                sums[name][2] += (dense_logp.argmax(-1) == logp.argmax(-1)).sum().item()
        tokens += targets.numel()
    out = {}
    for name, (nll, kl, agree) in sums.items():
        q = Quality(language, source, len(windows), tokens, math.exp(nll / tokens),
                    runtime=(runtimes or {}).get(name, "torch"))
        if dense_fn is not None:
            q.dense_perplexity, q.kl, q.top1 = math.exp(dense_nll / tokens), kl / tokens, agree / tokens
        out[name] = q
    return out


def measure_quality(model, windows: torch.Tensor, dense=None, language: str = "default",
                    source: str = "", progress: bool = False) -> Quality:
    """``measure_qualities`` for one candidate."""
    return measure_qualities({"model": model}, windows, dense, language, source, progress)["model"]


def text_windows(tokenizer, spec: EvalText, seqlen: int, max_windows: int | None) -> torch.Tensor:
    return eval_windows(tokenizer, read_text(spec.source, "evaluation"), seqlen, max_windows)


def evaluate_texts(model, tokenizer, specs: list[EvalText], seqlen: int, max_windows: int | None,
                   dense=None, progress: bool = False, windows: list[torch.Tensor] | None = None) -> list[Quality]:
    """``windows`` (one tensor per spec) skips reading and tokenizing the texts again."""
    windows = windows or [text_windows(tokenizer, spec, seqlen, max_windows) for spec in specs]
    return [measure_quality(model, w, dense, spec.language, spec.source, progress)
            for spec, w in zip(specs, windows)]
