"""How the 4-bit roundings compare on the default model, in torch emulation of ONNX Runtime's
MatMulNBits grids (exact for the 4-bit rows: tests/test_gptq.py checks GPTQ's weights survive
ONNX Runtime's quantizer unchanged).

    python bench/int4_rounding.py [--fit-windows 64] [--fit-seqlen 256] [--eval-windows 8]

Rows: symmetric round-to-nearest on every projection; GPTQ alone (no channel scaling); the
preparation deploy uses (prunekit.activation_scaling: channel scaling, then GPTQ) with every
projection at 4 bits, and int4-mixed (the head and down_proj at 8 bits, emulated as 8-bit
symmetric blocks of 32). Fitted on WikiText-2 validation windows (by default deploy's 64 x 256:
prunekit.targets.cpu_onnx.INT4_FIT_TOKENS), judged on the protocol's WikiText-2 test windows of
1024 against the dense model. Prints a table and writes JSON. Run it alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from prunekit.activation_scaling import int4_round, prepare_int4_pair
from prunekit.calibration import calibration_ids
from prunekit.evaluation import eval_windows, measure_qualities
from prunekit.exporters.latency import peak_rss_gb
from prunekit.gptq import BLOCK, gptq_int4
from prunekit.models import load_model
from prunekit.targets.cpu_onnx import INT4_FIT_TOKENS, eight_bit_names
from prunekit.threads import use_usable_cores

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import CALIB_FILE, EVAL_FILE, EVAL_SEQLEN, SEED  # noqa: E402


def int8_round(weight: torch.Tensor) -> torch.Tensor:
    """MatMulNBits 8-bit symmetric per block of 32 inputs (levels -128..127, peak at -128)."""
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // BLOCK, BLOCK)
    peak = torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True))
    scale = torch.where(peak == 0, torch.ones_like(peak), peak / -128)
    return ((blocks / scale).round().clamp(-128, 127) * scale).reshape(rows, cols)


@torch.no_grad()
def rounded(model: nn.Module, eight_bit: tuple[str, ...] = (), gptq_windows: torch.Tensor | None = None) -> nn.Module:
    """``model``'s projections rounded in place: 8-bit blocks for ``eight_bit``, GPTQ on the
    inputs of ``gptq_windows`` or else round-to-nearest for the rest (weights already on the grid
    stay where they are)."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    grams: dict[nn.Module, torch.Tensor] = {}

    def add_gram(linear, inputs, _output):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        grams[linear] = grams.get(linear, 0) + x.T @ x

    if gptq_windows is not None:
        hooks = [m.register_forward_hook(add_gram) for _, m in linears]
        for window in gptq_windows:
            model(window[None])
        for hook in hooks:
            hook.remove()
    for name, linear in linears:
        if name.rsplit(".", 1)[-1] in eight_bit:
            linear.weight.copy_(int8_round(linear.weight))
        elif linear in grams:
            linear.weight.copy_(gptq_int4(linear.weight, grams[linear]))
        else:
            linear.weight.copy_(int4_round(linear.weight))
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit-windows", type=int, help="default: as deploy, INT4_FIT_TOKENS / --fit-seqlen")
    parser.add_argument("--fit-seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/int4-rounding.json"))
    args = parser.parse_args()
    use_usable_cores()
    args.fit_windows = args.fit_windows or INT4_FIT_TOKENS // args.fit_seqlen
    began = time.perf_counter()
    loaded = load_model(None)
    dense = loaded.model
    untied = copy.deepcopy(dense)
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone(), requires_grad=False)
    fit = calibration_ids(str(CALIB_FILE), loaded.tokenizer, args.fit_windows, args.fit_seqlen, SEED, progress=False)
    test = eval_windows(loaded.tokenizer, EVAL_FILE.read_text(), EVAL_SEQLEN, args.eval_windows)
    start = time.perf_counter()
    four, mixed = prepare_int4_pair(dense, fit, eight_bit=eight_bit_names(dense, "int4-mixed")[0])
    prepare_s = time.perf_counter() - start
    rows = {"int4 round-to-nearest": rounded(copy.deepcopy(untied)),
            "int4 GPTQ, no scaling": rounded(copy.deepcopy(untied), gptq_windows=fit),
            "int4 scaled + GPTQ (deploy)": rounded(four),
            "int4-mixed scaled + GPTQ (deploy)": rounded(mixed, eight_bit=eight_bit_names(dense, "int4-mixed")[0])}
    qualities = measure_qualities(rows, test, dense)
    out = {"command": "python " + " ".join(sys.argv), "fit": f"{args.fit_windows} x {args.fit_seqlen} WikiText-2 validation",
           "judged_on": f"{len(test)} x {EVAL_SEQLEN} WikiText-2 test", "prepare_seconds": round(prepare_s, 1),
           "dense_perplexity": round(next(iter(qualities.values())).dense_perplexity, 3),
           "rows": [{"rounding": name, "perplexity": round(q.perplexity, 3), "increase_pct": round(q.increase_pct, 2),
                     "increase_upper_pct": q.increase_upper_pct and round(q.increase_upper_pct, 2),
                     "kl": round(q.kl, 4), "top1": round(q.top1, 4)} for name, q in qualities.items()],
           "wall_seconds": round(time.perf_counter() - began, 1), "peak_rss_gb": peak_rss_gb()}
    print(f"dense perplexity {out['dense_perplexity']} on {out['judged_on']}; preparation {prepare_s:.0f} s")
    print("| rounding | perplexity | change | KL | top-1 |\n|---|---|---|---|---|")
    for row in out["rows"]:
        print(f"| {row['rounding']} | {row['perplexity']:.2f} | +{row['increase_pct']:.1f}% | {row['kl']:.4f} | {row['top1']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
