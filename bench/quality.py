"""Quality benchmark of the unstructured methods on the fixed protocol (see protocol.py).

    python bench/quality.py [--rows wanda-50,wanda-2:4] [--out bench/results/quality.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import run_rows  # noqa: E402

ROWS = {
    "dense": {"method": "dense", "own_forwards": [32]},
    "magnitude-50": {"method": "magnitude", "pattern": "unstructured", "sparsity": 0.5},
    "wanda-50": {"method": "wanda", "pattern": "unstructured", "sparsity": 0.5},
    "wanda-4:8": {"method": "wanda", "pattern": "4:8", "sparsity": 0.5},
    "wanda-2:4": {"method": "wanda", "pattern": "2:4", "sparsity": 0.5},
    "sparsegpt-50": {"method": "sparsegpt", "pattern": "unstructured", "sparsity": 0.5},
    "sparsegpt-2:4": {"method": "sparsegpt", "pattern": "2:4", "sparsity": 0.5},
    # admm as its registry entry runs it: a quarter more samples written by the model (own 32)
    "admm-50": {"method": "admm", "pattern": "unstructured", "sparsity": 0.5, "own": 32},
    "admm-2:4": {"method": "admm", "pattern": "2:4", "sparsity": 0.5, "own": 32},
    # ablations: the WikiText-2 text alone (--calib-own 0), per-block sparsity, channel permutation
    "admm-50-text": {"method": "admm", "pattern": "unstructured", "sparsity": 0.5},
    "admm-2:4-text": {"method": "admm", "pattern": "2:4", "sparsity": 0.5},
    "admm-50-owl": {"method": "admm", "pattern": "unstructured", "sparsity": 0.5, "options": {"outlier_spread": 0.08}},
    "admm-2:4-perm": {"method": "admm", "pattern": "2:4", "sparsity": 0.5, "options": {"permute": True}},
    "admm-50-own16": {"method": "admm", "pattern": "unstructured", "sparsity": 0.5, "own": 16},  # a smaller share
    "wanda-50-own": {"method": "wanda", "pattern": "unstructured", "sparsity": 0.5, "own": 32},
}


def table(rows: list[dict]) -> str:
    dense = next((r for r in rows if r["method"] == "dense"), None)
    base = dense["dense_forward_seconds"] if dense else None
    own_bases = dense.get("dense_forward_seconds_own", {}) if dense else {}
    lines = ["| row | ppl wikitext2 | KL | top-1 | ppl pydoc | KL pydoc | prune s | x dense fwd (text) "
             "| x dense fwd (all calibration tokens) | peak RSS GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w, p = r["quality"]["wikitext2"], r["quality"]["pydoc"]
        secs = r.get("prune_seconds")
        ratio = f"{secs / base:.2f}" if secs and base else "-"
        # against a forward over every token the row calibrated on, the model's own ones included
        own_base = own_bases.get(str(r["own"])) if r.get("own") else base
        ratio_all = f"{secs / own_base:.2f}" if secs and own_base else "-"
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {r['name']} | {w['perplexity']:.2f} | {fmt(w['kl'], '.3f')} | {fmt(w['top1'], '.3f')} "
                     f"| {p['perplexity']:.2f} | {fmt(p['kl'], '.3f')} | {fmt(secs, '.0f')} | {ratio} | {ratio_all} "
                     f"| {r['peak_rss_gb']:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--out", type=Path, default=Path("bench/results/quality.json"))
    args = parser.parse_args()
    specs = [{"name": n, **ROWS[n]} for n in args.rows.split(",")]
    rows = run_rows(specs, args.out)
    print(table(rows))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
