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
    increase_upper_pct: float | None = None  # one-sided 95% upper bound of increase_pct over the windows

    @property
    def increase_pct(self) -> float | None:
        return None if not self.dense_perplexity else 100 * (self.perplexity / self.dense_perplexity - 1)

    def as_dict(self) -> dict:
        return asdict(self)


# Student's t at 0.95, one-sided, by degrees of freedom 1..30 (beyond: 1.645, the normal's); a
# table, because scipy would be a dependency for one quantile.
T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761, 1.753,
       1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699, 1.697)


def increase_upper_bound(window_log_ratios: list[float]) -> float | None:
    """The one-sided 95% upper confidence bound of a perplexity increase, in percent, from each
    window's log perplexity ratio (candidate over dense, equal-length windows): exp(mean + t·s/√n) − 1.
    Why: a handful of selection windows cannot tell +8% from +12%; a candidate is within a quality
    budget only when the windows say so with confidence, so its test-text figure stays within too.
    None with fewer than two windows (no spread to judge)."""
    n = len(window_log_ratios)
    if n < 2:
        return None
    mean = sum(window_log_ratios) / n
    spread = math.sqrt(sum((r - mean) ** 2 for r in window_log_ratios) / (n - 1))
    t = T95[n - 2] if n - 1 <= len(T95) else 1.645
    return 100 * (math.exp(mean + t * spread / math.sqrt(n)) - 1)


Logits = Callable[[torch.Tensor], torch.Tensor]  # a (seq,) window -> (seq - 1, vocab) next-token logits


def torch_logits(model) -> Logits:
    @torch.no_grad()
    def logits(window: torch.Tensor) -> torch.Tensor:
        return model(window.unsqueeze(0), use_cache=False).logits[0, :-1].float()
    return logits


class StoredLogits:
    """A window -> logits function that computes each window's logits once and keeps them in
    ``folder`` (a file per window, named by the window's tokens: prunekit.exporters.onnx_judge
    .window_key): the dense model's logits on the selection tokens serve the screen of every pruned
    amount and every judging pass of a search (each pass was a dense forward over them; 50 MB a
    256-token window of a 49k vocabulary, on disk rather than in memory). With ``model_or_fn``
    None it only reads what another process wrote there (a LookupError for a window it lacks)."""

    def __init__(self, model_or_fn, folder):
        from pathlib import Path

        self.logits = None if model_or_fn is None else _as_logits(model_or_fn)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        import numpy as np

        from prunekit.exporters.onnx_judge import window_key

        path = self.folder / f"{window_key(window.numpy())}.npy"
        if path.is_file():
            return torch.from_numpy(np.load(path))
        if self.logits is None:
            raise LookupError(f"no stored logits for a window in {self.folder} (a prunekit bug, please report)")
        logits = self.logits(window)
        np.save(path, logits.float().numpy())
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
    and no logits pile up across windows. The one NLL/KL arithmetic for every runtime. Against
    ``dense``, each candidate's perplexity increase also gets its upper confidence bound over the
    windows (``increase_upper_bound``)."""
    from tqdm import tqdm

    fns = {name: _as_logits(c) for name, c in candidates.items()}
    dense_fn = None if dense is None else _as_logits(dense)
    sums = {name: [0.0, 0.0, 0.0] for name in fns}  # nll, kl, agreeing tokens
    dense_nll, tokens = 0.0, 0
    ratios = {name: [] for name in fns}  # per window: (candidate NLL - dense NLL) / tokens
    for window in tqdm(windows, desc=f"evaluating {language}", unit="window", disable=not progress, leave=False):
        targets = window[1:, None]
        dense_logp = None if dense_fn is None else F.log_softmax(dense_fn(window), -1)
        window_dense_nll = None if dense_logp is None else -dense_logp.gather(1, targets).sum().item()
        for name, fn in fns.items():
            logp = F.log_softmax(fn(window), -1)
            window_nll = -logp.gather(1, targets).sum().item()
            sums[name][0] += window_nll
            if dense_logp is not None:
                ratios[name].append((window_nll - window_dense_nll) / targets.numel())
                sums[name][1] += (dense_logp.exp() * (dense_logp - logp)).sum().item()
                sums[name][2] += (dense_logp.argmax(-1) == logp.argmax(-1)).sum().item()
        if window_dense_nll is not None:
            dense_nll += window_dense_nll
        tokens += targets.numel()
    out = {}
    for name, (nll, kl, agree) in sums.items():
        q = Quality(language, source, len(windows), tokens, math.exp(nll / tokens),
                    runtime=(runtimes or {}).get(name, "torch"))
        if dense_fn is not None:
            q.dense_perplexity, q.kl, q.top1 = math.exp(dense_nll / tokens), kl / tokens, agree / tokens
            q.increase_upper_pct = increase_upper_bound(ratios[name])
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
