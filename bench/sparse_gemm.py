"""Dense vs 2:4 semi-structured sparse GEMMs at the default model's own shapes, on a CUDA GPU
(PyTorch's cuSPARSELt/CUTLASS kernels): the evidence for the profiles' sparse_gemm_speedup.

    python bench/sparse_gemm.py [--tokens 1,8,128,2048] [--out bench/results/sparse_gemm.json]

Needs an A100/H100-class GPU (sm80+); on a machine without one it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# (out_features, in_features) of SmolLM2-135M's projections and lm_head
SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576), "gate/up_proj": (1536, 576),
          "down_proj": (576, 1536), "lm_head": (49152, 576)}


def two_four(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest of every 4 consecutive inputs."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
    return (groups * keep).reshape_as(weight)


def time_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,8,128,2048", help="rows of the activation matrix (decode..prefill)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/sparse_gemm.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA GPU: this benchmark times sparse tensor cores (run it on an A100/H100)", file=sys.stderr)
        return 2
    from torch.sparse import to_sparse_semi_structured

    torch.manual_seed(0)
    rows = []
    device = torch.cuda.get_device_name(0)
    for name, (out_features, in_features) in SHAPES.items():
        weight = two_four(torch.randn(out_features, in_features, device="cuda", dtype=torch.float16))
        sparse = to_sparse_semi_structured(weight)
        for tokens in (int(t) for t in args.tokens.split(",")):
            # semi-structured kernels want the dense operand's rows padded to a multiple of 8
            x = torch.randn(max(tokens, 8), in_features, device="cuda", dtype=torch.float16)
            dense_ms = time_ms(lambda: torch.nn.functional.linear(x, weight))
            sparse_ms = time_ms(lambda: torch.nn.functional.linear(x, sparse))
            assert torch.allclose(torch.nn.functional.linear(x, weight), torch.nn.functional.linear(x, sparse),
                                  atol=1e-1, rtol=1e-2)
            rows.append({"gemm": name, "tokens": tokens, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                         "speedup": dense_ms / sparse_ms})
    print(f"GPU: {device}, fp16, torch {torch.__version__}")
    print("| GEMM | tokens | dense ms | 2:4 ms | speed-up |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['gemm']} | {r['tokens']} | {r['dense_ms']:.4f} | {r['sparse_ms']:.4f} | {r['speedup']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"gpu": device, "torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
