"""ONNX Runtime latency of dense and pruned models, fp32 and INT8 (weight-only), side by side in
one run on this machine (run it alone: other jobs on the cores distort the ratios).

    python bench/latency.py --pruned PRUNED_FOLDER [--dense MODEL] [--repeats 5] [--plain] [--ppl-windows 40]

Each variant's WikiText-2 perplexity is computed by ONNX Runtime on the fixed protocol's evaluation
windows (protocol.py), so the INT8 files' own quality stands beside their speed.

--plain adds the same variants exported as the plain opset-20 graph (one MatMul per projection,
attention and RMS norm as primitive ops), to show what the fused graph is worth.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from prunekit.evaluation import eval_windows, measure_quality
from prunekit.exporters.latency import measure_in_subprocess
from prunekit.exporters.onnx import OnnxDecoder, export_onnx, onnx_bytes, onnx_logits, quantize_int8
from prunekit.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import EVAL_FILE, EVAL_SEQLEN  # noqa: E402


def export_variants(models: dict, scratch: Path, fused: bool) -> dict[str, Path]:
    """fp32 and weight-only INT8 of each model; names say which graph style they use."""
    style = "" if fused else ", plain graph"
    paths = {}
    for name, model in models.items():
        fp32 = export_onnx(model, scratch / f"{name}-{fused}" / "fp32" / "model.onnx", fused=fused)
        paths[f"{name} fp32{style}"] = fp32
        paths[f"{name} int8{style}"] = quantize_int8(fp32, scratch / f"{name}-{fused}" / "int8" / "model.onnx")
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pruned", required=True, help="folder written by prunekit prune / deploy (model/)")
    parser.add_argument("--dense", default=None, help="dense model (default: the embedded default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plain", action="store_true", help="also measure the plain (unfused) graph")
    parser.add_argument("--ppl-windows", type=int, default=40, help="evaluation windows (0: no perplexity)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/latency.json"))
    args = parser.parse_args()
    dense = load_model(args.dense)
    models = {"dense": dense.model, "pruned": load_model(args.pruned).model}
    windows = (eval_windows(dense.tokenizer, EVAL_FILE.read_text(encoding="utf-8"), EVAL_SEQLEN, args.ppl_windows)
               if args.ppl_windows else None)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        paths = export_variants(models, Path(scratch), fused=True)
        if args.plain:
            paths.update(export_variants(models, Path(scratch), fused=False))
        for name, path in paths.items():
            print(f"measuring {name}", file=sys.stderr, flush=True)
            rows.append({"name": name, "bytes": onnx_bytes(path), **measure_in_subprocess(path, repeats=args.repeats)})
            if windows is not None:
                rows[-1]["wikitext2_ppl"] = measure_quality(onnx_logits(OnnxDecoder(path)), windows).perplexity
    by_name = {r["name"]: r for r in rows}
    print("| variant | MB | prefill 128 ms | decode ms/token (median) | p90 | tokens/s | decode x dense fp32 "
          "| prefill x dense fp32 | peak RSS GB | ppl WikiText-2 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = by_name[r["name"].replace("pruned", "dense").replace("int8", "fp32")]  # same graph style
        r["decode_speedup"], r["prefill_speedup"] = base["decode_ms"] / r["decode_ms"], base["prefill_ms"] / r["prefill_ms"]
        print(f"| {r['name']} | {r['bytes'] / 1e6:.1f} | {r['prefill_ms']:.1f} | {r['decode_ms']:.2f} | {r['decode_p90_ms']:.2f} "
              f"| {r['tokens_per_s']:.1f} | {r['decode_speedup']:.2f} | {r['prefill_speedup']:.2f} | {r['peak_rss_gb']:.2f} "
              f"| {r.get('wikitext2_ppl', float('nan')):.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": rows[0]["threads"], "ppl_windows": args.ppl_windows,
                                    "ppl_seqlen": EVAL_SEQLEN, "rows": rows}, indent=2))
    print(f"\nJSON: {args.out} (threads: {rows[0]['threads']})")


if __name__ == "__main__":
    main()
