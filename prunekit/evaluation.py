"""Quality, measured: perplexity on held-out text and, against the dense model, the mean KL
divergence of next-token distributions and top-1 agreement."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

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

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def _logits(model, window: torch.Tensor) -> torch.Tensor:
    return model(window.unsqueeze(0), use_cache=False).logits[0, :-1].float()


@torch.no_grad()
def measure_quality(model, windows: torch.Tensor, dense=None, language: str = "default",
                    source: str = "", progress: bool = False) -> Quality:
    """Perplexity of ``model``; with ``dense`` given, also the dense perplexity, KL(dense ‖ model)
    and top-1 agreement, window by window so no logits pile up."""
    from tqdm import tqdm

    nll = dense_nll = kl = agree = 0.0
    tokens = 0
    for window in tqdm(windows, desc=f"evaluating {language}", unit="window", disable=not progress, leave=False):
        targets = window[1:]
        logp = F.log_softmax(_logits(model, window), -1)
        nll += -logp.gather(1, targets[:, None]).sum().item()
        tokens += targets.numel()
        if dense is not None:
            dense_logp = F.log_softmax(_logits(dense, window), -1)
            dense_nll += -dense_logp.gather(1, targets[:, None]).sum().item()
            kl += (dense_logp.exp() * (dense_logp - logp)).sum().item()
            agree += (dense_logp.argmax(-1) == logp.argmax(-1)).sum().item()
    quality = Quality(language, source, len(windows), tokens, math.exp(nll / tokens))
    if dense is not None:
        quality.dense_perplexity = math.exp(dense_nll / tokens)
        quality.kl = kl / tokens
        quality.top1 = agree / tokens
    return quality


def text_windows(tokenizer, spec: EvalText, seqlen: int, max_windows: int | None) -> torch.Tensor:
    return eval_windows(tokenizer, read_text(spec.source, "evaluation"), seqlen, max_windows)


def evaluate_texts(model, tokenizer, specs: list[EvalText], seqlen: int, max_windows: int | None,
                   dense=None, progress: bool = False, windows: list[torch.Tensor] | None = None) -> list[Quality]:
    """``windows`` (one tensor per spec) skips reading and tokenizing the texts again."""
    windows = windows or [text_windows(tokenizer, spec, seqlen, max_windows) for spec in specs]
    return [measure_quality(model, w, dense, spec.language, spec.source, progress)
            for spec, w in zip(specs, windows)]
