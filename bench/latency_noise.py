"""How far this host lets one decode timing move: the same ONNX artifacts timed round-robin for many
rounds in one process (as a deploy times its candidates, prunekit.exporters.latency), and for
windows of consecutive rounds as long as a deploy's measurement, how far apart each window's
estimate lands. Run it alone.

    python bench/latency_noise.py A/model.onnx B/model.onnx ... [--rounds 120] [--windows 4 8 12 20] \
        [--out docs/results/latency-noise.json]
    python bench/latency_noise.py --series docs/results/latency-noise.json   # the table again, from a run's rounds

A window's estimate is the median, the lower quartile, the minimum or the mean of its rounds (each
round's figure is the median of its decode steps). Printed per estimate, over the disjoint windows
of the run: max / min − 1 (what two deploys measuring that many rounds, minutes apart, could
disagree by on this host, whatever prunekit's artifacts are), and the share of pairs of windows
more than 10% apart (how often two such deploys would).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np

from prunekit.exporters.latency import peak_rss_gb, round_robin
from prunekit.exporters.ort_session import OnnxDecoder
from prunekit.threads import usable_cores

ESTIMATES = {"median": statistics.median, "lower quartile": lambda v: float(np.quantile(v, 0.25)),
             "minimum": min, "mean": statistics.mean}


def series(paths: list[Path], rounds: int) -> list[list[float]]:
    """Per round, per artifact: the median decode step in ms, timed as a deploy times its candidates
    (prunekit.exporters.latency.round_robin: one warm-up round first, not kept)."""
    _, decode = round_robin([OnnxDecoder(path, threads=usable_cores()) for path in paths], rounds)
    return [[1000 * per_artifact[r] for per_artifact in decode] for r in range(rounds)]


def spreads(rows: list[list[float]], window: int) -> list[dict]:
    """Per artifact and estimate, over disjoint windows of ``window`` rounds: max / min − 1 of the
    estimate (``spread``) and the share of pairs of windows more than 10% apart (``pairs_over_10pct``)."""
    windows = [rows[i:i + window] for i in range(0, len(rows) - window + 1, window)]
    out = []
    for column in range(len(rows[0])):
        estimates = {name: [f([r[column] for r in w]) for w in windows] for name, f in ESTIMATES.items()}
        pairs = {name: [abs(a - b) / min(a, b) > 0.1 for a, b in itertools.combinations(v, 2)]
                 for name, v in estimates.items()}
        out.append({"spread": {name: round(max(v) / min(v) - 1, 3) for name, v in estimates.items()},
                    "pairs_over_10pct": {name: round(sum(p) / len(p), 3) for name, p in pairs.items()}})
    return out


def table(models: list[str], rows: list[list[float]], windows: list[int]) -> tuple[dict, str]:
    by_window = {w: spreads(rows, w) for w in windows if len(rows) >= 2 * w}
    lines = ["| artifact | rounds per window | windows | " + " | ".join(f"{n}: spread / pairs > 10%" for n in ESTIMATES)
             + " |", "|---|---|---|" + "---|" * len(ESTIMATES)]
    for w, per_model in by_window.items():
        for model, result in zip(models, per_model):
            lines.append(f"| {model} | {w} | {len(rows) // w} | " + " | ".join(
                f"{100 * result['spread'][n]:.0f}% / {100 * result['pairs_over_10pct'][n]:.0f}%" for n in ESTIMATES)
                         + " |")
    return by_window, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="*")
    parser.add_argument("--series", type=Path, help="a JSON this bench wrote: its rounds, analysed again")
    parser.add_argument("--rounds", type=int, default=120)
    parser.add_argument("--windows", type=int, nargs="+", default=[4, 8, 12, 20])
    parser.add_argument("--out", type=Path, default=Path("bench/results/latency-noise.json"))
    args = parser.parse_args()
    if args.series:
        saved = json.loads(args.series.read_text())
        models, rows, wall, peak = saved["models"], saved["rounds_ms"], saved["wall_seconds"], saved["peak_rss_gb"]
    elif args.models:
        start = time.perf_counter()
        models, rows = [str(p) for p in args.models], series(args.models, args.rounds)
        wall, peak = round(time.perf_counter() - start, 1), peak_rss_gb()
    else:
        parser.error("name the ONNX files to time, or --series FILE")
    by_window, text = table(models, rows, args.windows)
    print(text)
    print(f"{len(rows)} rounds in {wall:.0f} s, peak RSS {peak:.2f} GB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"models": models, "rounds_ms": rows, "wall_seconds": wall, "peak_rss_gb": peak,
                                    "by_window": {str(w): r for w, r in by_window.items()}, "table": text},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
