"""ONNX Runtime latency of dense fp32, pruned fp32 and pruned INT8 (weight-only), side by side in
one run on this machine (run it alone: other jobs on the cores distort the ratios).

    python bench/latency.py --pruned PRUNED_FOLDER [--dense MODEL] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from prunekit.exporters.latency import measure_in_subprocess
from prunekit.exporters.onnx import export_onnx, onnx_bytes, quantize_int8
from prunekit.models import load_model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pruned", required=True, help="folder written by prunekit prune / deploy (model/)")
    parser.add_argument("--dense", default=None, help="dense model (default: the embedded default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/latency.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        paths = {"dense fp32": export_onnx(load_model(args.dense).model, scratch / "dense" / "model.onnx"),
                 "pruned fp32": export_onnx(load_model(args.pruned).model, scratch / "pruned" / "model.onnx")}
        paths["pruned int8 (weight-only)"] = quantize_int8(paths["pruned fp32"], scratch / "int8" / "model.onnx")
        for name, path in paths.items():
            print(f"measuring {name}", file=sys.stderr, flush=True)
            rows.append({"name": name, "bytes": onnx_bytes(path), **measure_in_subprocess(path, repeats=args.repeats)})
    base = rows[0]
    print("| variant | MB | prefill 128 ms | decode ms/token (median) | p90 | tokens/s | decode x dense | prefill x dense | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['bytes'] / 1e6:.1f} | {r['prefill_ms']:.1f} | {r['decode_ms']:.2f} | {r['decode_p90_ms']:.2f} "
              f"| {r['tokens_per_s']:.1f} | {base['decode_ms'] / r['decode_ms']:.2f} | {base['prefill_ms'] / r['prefill_ms']:.2f} "
              f"| {r['peak_rss_gb']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": base["threads"], "rows": rows}, indent=2))
    print(f"\nJSON: {args.out} (threads: {base['threads']})")


if __name__ == "__main__":
    main()
