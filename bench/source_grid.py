"""int4-source against INT8 on a model too large to load: the registry's Qwen2.5-Coder-1.5B (Q4_K_M:
its Q4_K tensors on a 4-bit grid, its Q6_K ones not), both written by the streamed exporter
(prunekit.exporters.onnx_streamed), one tensor at a time.

    python bench/fetch_models.py                     # the GGUF files, into ~/.cache/prunekit/models
    python bench/source_grid.py [--model qwen2.5-coder-1.5b] [--windows 2] [--seqlen 512]

Rows: INT8 (every MatMul at 8 bits) and int4-source (the Q4_K tensors with their own integers, the
rest at 8 bits): how many MatMuls kept a grid, file size, write time, prefill of a 128-token prompt
and decode ms per token (both timed side by side in one process, prunekit.exporters.latency), and
perplexity, KL and top-1 against the float model on WikiText-2 test windows, the float logits
computed a decoder block at a time from the GGUF (prunekit.pruning.blocks.streamed_logits). Peak
RSS is the bench process's (VmHWM; the timing process reports its own). Run it alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_models import MODELS, cache_dir  # noqa: E402
from protocol import EVAL_FILE  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b", help="smollm2-135m, a registry key of "
                        "bench/fetch_models.py, or a GGUF path")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("bench/results/source-grid.json"))
    args = parser.parse_args()

    import torch

    from prunekit.evaluation import eval_windows, measure_qualities
    from prunekit.exporters.latency import measure_in_subprocess, peak_rss_gb
    from prunekit.exporters.onnx import OnnxDecoder, onnx_bytes, onnx_logits
    from prunekit.exporters.onnx_streamed import as_int4_source, as_matmul_nbits, save_streamed, streamed_graph
    from prunekit.models import default_gguf_path, open_streamed
    from prunekit.pruning.blocks import streamed_logits
    from prunekit.threads import use_usable_cores

    use_usable_cores()
    began = time.perf_counter()
    path = (Path(args.model) if args.model.endswith(".gguf") else default_gguf_path() if args.model == "smollm2-135m"
            else cache_dir(None) / MODELS[args.model].file_name)
    loaded = open_streamed(str(path))
    windows = eval_windows(loaded.tokenizer, EVAL_FILE.read_text(encoding="utf-8"), args.seqlen, args.windows)
    rows = []
    with tempfile.TemporaryDirectory(prefix="prunekit-bench-") as scratch:
        artifacts = {}
        for precision in ("int8", "int4-source"):
            start = time.perf_counter()
            graph = streamed_graph(loaded.model, loaded.weights)
            matmuls = sum(node.op_type == "MatMul" for node in graph.graph)
            kept = as_int4_source(graph) if precision == "int4-source" else as_matmul_nbits(graph, bits=8) or 0
            artifacts[precision] = save_streamed(graph, Path(scratch) / precision / "model.onnx")
            rows.append({"precision": precision, "matmuls": matmuls, "on_source_grid": kept,
                         "bytes": onnx_bytes(artifacts[precision]),
                         "write_seconds": round(time.perf_counter() - start, 1)})
            print(f"{precision}: written in {rows[-1]['write_seconds']} s", file=sys.stderr, flush=True)
        for row, timing in zip(rows, measure_in_subprocess(list(artifacts.values()))):
            row.update(decode_ms=timing["decode_ms"], prefill_ms=timing["prefill_ms"], latency=timing)
        start = time.perf_counter()
        with torch.no_grad():
            reference = streamed_logits(loaded.model, loaded.weights, windows)[:, :-1]
        dense = {tuple(w.tolist()): logits for w, logits in zip(windows, reference)}
        reference_seconds = time.perf_counter() - start
        sessions = {p: onnx_logits(OnnxDecoder(a)) for p, a in artifacts.items()}
        quality = measure_qualities(sessions, windows, lambda w: dense[tuple(w.tolist())].float())
        for row in rows:
            q = quality[row["precision"]]
            row.update(ppl=q.perplexity, dense_ppl=q.dense_perplexity, ppl_change_pct=q.increase_pct,
                       kl=q.kl, top1=q.top1)
    result = {"model": path.name, "windows": f"{len(windows)} x {args.seqlen} tokens of {EVAL_FILE.name}",
              "reference_seconds": round(reference_seconds, 1), "wall_seconds": round(time.perf_counter() - began, 1),
              "peak_rss_gb": round(peak_rss_gb(), 3), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| precision | MatMuls on a source grid | size MB | write s | prefill 128 ms | decode ms/token | "
          "ppl change | KL | top-1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['on_source_grid']} of {r['matmuls']} | {r['bytes'] / 1e6:.0f} | "
              f"{r['write_seconds']:.0f} | {r['prefill_ms']:.0f} | {r['decode_ms']:.1f} | "
              f"{r['ppl_change_pct']:+.2f}% | {r['kl']:.4f} | {r['top1']:.3f} |")
    print(f"wall {result['wall_seconds']} s, peak RSS {result['peak_rss_gb']} GB", file=sys.stderr)


if __name__ == "__main__":
    main()
