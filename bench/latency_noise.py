"""How far this host lets one decode timing move: the same ONNX artifacts timed round-robin for many
rounds in one process (as a deploy times its candidates, prunekit.exporters.latency), and for
windows of consecutive rounds as long as a deploy's measurement, how far apart each window's
estimate lands. Run it alone.

    python bench/latency_noise.py A/model.onnx B/model.onnx ... [--rounds 120] [--windows 4 8 12 20] \
        [--out docs/results/latency-noise.json]

A window's estimate is the median, the lower quartile, the minimum or the mean of its rounds (each
round's figure is the median of its decode steps). The spread printed is max / min − 1 over the
disjoint windows of the run: what two deploys measuring that many rounds, minutes apart, could
disagree by on this host, whatever prunekit's artifacts are.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from prunekit.exporters.latency import peak_rss_gb, timed_round
from prunekit.exporters.ort_session import OnnxDecoder
from prunekit.threads import usable_cores

ESTIMATES = {"median": statistics.median, "lower quartile": lambda v: float(np.quantile(v, 0.25)),
             "minimum": min, "mean": statistics.mean}


def series(paths: list[Path], rounds: int, prompt_tokens: int = 128, decode_tokens: int = 32) -> list[list[float]]:
    """Per round, per artifact: the median decode step in ms (one warm-up round first, not kept)."""
    runners = [OnnxDecoder(path, threads=usable_cores()) for path in paths]
    vocab = runners[0].session.get_outputs()[0].shape[-1]
    prompt = np.random.default_rng(0).integers(3, vocab, size=(1, prompt_tokens))
    rows = []
    for index in range(rounds + 1):
        row = [1000 * statistics.median(timed_round(runner, prompt, decode_tokens)[1]) for runner in runners]
        if index:
            rows.append(row)
    return rows


def spreads(rows: list[list[float]], window: int) -> list[dict]:
    """Per artifact and estimate: max / min − 1 of the estimate over disjoint windows of ``window`` rounds."""
    windows = [rows[i:i + window] for i in range(0, len(rows) - window + 1, window)]
    out = []
    for column in range(len(rows[0])):
        estimates = {name: [f([r[column] for r in w]) for w in windows] for name, f in ESTIMATES.items()}
        out.append({name: round(max(v) / min(v) - 1, 3) for name, v in estimates.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=120)
    parser.add_argument("--windows", type=int, nargs="+", default=[4, 8, 12, 20])
    parser.add_argument("--out", type=Path, default=Path("bench/results/latency-noise.json"))
    args = parser.parse_args()
    start = time.perf_counter()
    rows = series(args.models, args.rounds)
    wall = time.perf_counter() - start
    table = {w: spreads(rows, w) for w in args.windows}
    lines = ["| artifact | rounds per window | windows | " + " | ".join(ESTIMATES) + " |",
             "|---|---|---|" + "---|" * len(ESTIMATES)]
    for w, per_model in table.items():
        for path, spread in zip(args.models, per_model):
            lines.append(f"| {path} | {w} | {len(rows) // w} | "
                         + " | ".join(f"{100 * spread[name]:.0f}%" for name in ESTIMATES) + " |")
    print("\n".join(lines))
    print(f"{len(rows)} rounds in {wall:.0f} s, peak RSS {peak_rss_gb():.2f} GB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"models": [str(p) for p in args.models], "rounds_ms": rows,
                                    "wall_seconds": round(wall, 1), "peak_rss_gb": peak_rss_gb(),
                                    "spread": {str(w): s for w, s in table.items()}, "table": "\n".join(lines)},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
