"""What a CPU user would pick instead: llama.cpp (llama-cpp-python) running the default model's own
GGUF, beside prunekit's ONNX artifacts, timed in the same process, round-robin, same threads.

    pip install -c constraints.txt -e '.[bench]'     # llama-cpp-python (compiles llama.cpp, minutes)
    # on a CPU with AMX (Sapphire Rapids and later), build without it: llama.cpp 0.3.36's AMX
    # kernel crashed here (docs/toolchain.md):
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON \
      -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" \
      pip install --no-cache-dir --force-reinstall --no-deps -c constraints.txt llama-cpp-python
    python bench/llamacpp.py [--deployed prunekit-out/cpu-onnx] [--rounds 5] [--ppl-windows 40]

Rows: llama.cpp on the GGUF (Q4_1, the file prunekit dequantizes to fp32 as its dense reference),
prunekit's dense fp32, dense INT8, dense int4-source (the GGUF's own Q4_1 integers, prunekit.source_grid),
dense INT4 and INT4-mixed (activation-aware, prepared as deploy prepares them, on 32 x 512 WikiText-2
validation tokens; exported here), and the artifact a deploy shipped (``--deployed``, optional: its onnx/). Each row:
prefill of a 128-token prompt, decode ms per token (median over rounds of the median step), and
perplexity on the protocol's WikiText-2 windows with its change against the dense fp32 model in
torch, all computed here. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from prunekit.evaluation import eval_windows, measure_qualities
from prunekit.exporters.latency import peak_rss_gb, round_robin
from prunekit.activation_scaling import prepare_int4
from prunekit.calibration import calibration_ids
from prunekit.exporters.onnx import (OnnxDecoder, export_onnx, onnx_bytes, onnx_logits, quantize_int4,
                                     quantize_int4_source, quantize_int8)
from prunekit.models import default_gguf_path, load_model
from prunekit.targets.cpu_onnx import INT4_FIT_TOKENS, INT4_PRECISIONS, eight_bit_names
from prunekit.threads import usable_cores, use_usable_cores

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import CALIB_FILE, EVAL_FILE, EVAL_SEQLEN  # noqa: E402


class LlamaCppDecoder:
    """llama.cpp behind the same step() and empty_cache() as OnnxDecoder: the cache is llama.cpp's
    own, so ``past`` only carries the position."""

    def __init__(self, gguf: Path, threads: int, context: int = 2048):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                         n_batch=context, logits_all=True, verbose=False)

    def empty_cache(self, batch: int = 1):
        self.llm.reset()
        return 0

    def step(self, ids: np.ndarray, past: int):
        tokens = [int(t) for t in ids[0]]
        self.llm.eval(tokens)
        scores = np.asarray(self.llm.scores[past:past + len(tokens)])
        return scores[None], past + len(tokens)

    def logits(self, window: torch.Tensor) -> torch.Tensor:
        out, _ = self.step(window.numpy()[None], self.empty_cache())
        return torch.from_numpy(out[0, :-1]).float()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deployed", type=Path, help="a deploy --target cpu-onnx output folder (a row for its artifact)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ppl-windows", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("docs/results/llamacpp.json"))
    args = parser.parse_args()
    use_usable_cores()
    threads = usable_cores()
    began = time.perf_counter()
    dense = load_model(None)
    windows = eval_windows(dense.tokenizer, EVAL_FILE.read_text(encoding="utf-8"), EVAL_SEQLEN, args.ppl_windows)
    report = json.loads((args.deployed / "report.json").read_text()) if args.deployed else None
    gguf = default_gguf_path()
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = export_onnx(dense.model, Path(scratch) / "fp32" / "model.onnx")
        calib = calibration_ids(str(CALIB_FILE), dense.tokenizer, INT4_FIT_TOKENS // 512, 512, seed=0)
        paths = {"prunekit dense fp32": fp32,
                 "prunekit dense int8": quantize_int8(fp32, Path(scratch) / "int8" / "model.onnx"),
                 "prunekit dense int4-source": quantize_int4_source(fp32, Path(scratch) / "int4-source" / "model.onnx")}
        for precision in INT4_PRECISIONS:  # as deploy builds them (prunekit.targets.cpu_onnx)
            torch_names, onnx_names = eight_bit_names(dense.model, precision)
            prepared = export_onnx(prepare_int4(dense.model, calib, eight_bit=torch_names),
                                   Path(scratch) / f"{precision}-prepared" / "model.onnx")
            paths[f"prunekit dense {precision} (activation-aware)"] = quantize_int4(
                prepared, Path(scratch) / precision / "model.onnx", eight_bit=onnx_names)
        if report:
            paths[f"prunekit shipped ({report['search']['selection']['chosen']})"] = args.deployed / "onnx" / "model.onnx"
        runners = {f"llama.cpp {gguf.name}": LlamaCppDecoder(gguf, threads)}
        runners.update({name: OnnxDecoder(path, threads=threads) for name, path in paths.items()})
        sizes = {name: onnx_bytes(path) for name, path in paths.items()}
        sizes[f"llama.cpp {gguf.name}"] = gguf.stat().st_size

        print("perplexity of every row on the protocol's WikiText-2 windows", file=sys.stderr, flush=True)
        fns = {name: (r.logits if isinstance(r, LlamaCppDecoder) else onnx_logits(r)) for name, r in runners.items()}
        quality = measure_qualities(fns, windows, dense.model, "wikitext2", str(EVAL_FILE), progress=True)

        print(f"timing {args.rounds} rounds round-robin (and one to warm up)", file=sys.stderr, flush=True)
        timed = round_robin(list(runners.values()), args.rounds, vocab=dense.model.config.vocab_size)
        prefill, decode = (dict(zip(runners, kind)) for kind in timed)
    rows = []
    for name in runners:
        q = quality[name]
        rows.append({"name": name, "bytes": sizes[name], "prefill_ms": 1000 * statistics.median(prefill[name]),
                     "decode_ms": 1000 * statistics.median(decode[name]),
                     "decode_ms_rounds": [round(1000 * d, 3) for d in decode[name]],
                     "wikitext2_ppl": q.perplexity, "dense_torch_ppl": q.dense_perplexity,
                     "ppl_change_pct": q.increase_pct, "kl": q.kl, "top1": q.top1})
    result = {"threads": threads, "prompt_tokens": 128, "decode_tokens": 32, "rounds": args.rounds,
              "windows": f"{len(windows)} x {EVAL_SEQLEN} tokens of {EVAL_FILE.name}",
              "wall_seconds": round(time.perf_counter() - began, 1), "peak_rss_gb": round(peak_rss_gb(), 3),
              "deployed": args.deployed and str(args.deployed), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| row | size MB | prefill 128 ms | decode ms/token | WikiText-2 ppl | change vs dense |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['bytes'] / 1e6:.0f} | {r['prefill_ms']:.0f} | {r['decode_ms']:.2f} "
              f"| {r['wikitext2_ppl']:.2f} | {r['ppl_change_pct']:+.1f}% |")


if __name__ == "__main__":
    main()
