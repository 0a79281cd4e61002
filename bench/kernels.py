"""The two kernels behind FASP's prune time, timed on this machine: XᵀX of one calibration batch
(full product vs the engine's panels on and above the diagonal) and one block's attention at a
narrowed value width (as is vs padded to the key width). Shapes are the default model's.

    python bench/kernels.py [--out bench/results/kernels.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from prunekit.pruning.engine import add_upper_gram

TOKENS, MLP_WIDTH = 8 * 512, 1536  # one calibration batch; down_proj's input width
BATCH, HEADS, SEQ, HEAD_DIM, VALUE_DIM = 8, 9, 512, 64, 48


def median_seconds(fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/kernels.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(TOKENS, MLP_WIDTH)
    full = torch.zeros(MLP_WIDTH, MLP_WIDTH, dtype=torch.float64)
    panels = torch.zeros_like(full)
    q, k = torch.randn(BATCH, HEADS, SEQ, HEAD_DIM), torch.randn(BATCH, HEADS, SEQ, HEAD_DIM)
    v = torch.randn(BATCH, HEADS, SEQ, VALUE_DIM)
    rows = {
        "gram_full_ms": median_seconds(lambda: full.add_((x.T @ x).double())) * 1e3,
        "gram_panels_ms": median_seconds(lambda: add_upper_gram(panels, x)) * 1e3,
        "attention_narrow_values_ms": median_seconds(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)) * 1e3,
        "attention_padded_values_ms": median_seconds(
            lambda: F.scaled_dot_product_attention(q, k, F.pad(v, (0, HEAD_DIM - VALUE_DIM)),
                                                   is_causal=True)[..., :VALUE_DIM]) * 1e3,
    }
    result = {"shapes": {"gram": [TOKENS, MLP_WIDTH], "attention": [BATCH, HEADS, SEQ, HEAD_DIM, VALUE_DIM]},
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              **{name: round(ms, 2) for name, ms in rows.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("| kernel | as before ms | now ms |\n|---|---|---|")
    print(f"| XᵀX of {TOKENS} x {MLP_WIDTH} | {rows['gram_full_ms']:.1f} | {rows['gram_panels_ms']:.1f} |")
    print(f"| attention, values {VALUE_DIM} of {HEAD_DIM} | {rows['attention_narrow_values_ms']:.1f} "
          f"| {rows['attention_padded_values_ms']:.1f} |")
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
