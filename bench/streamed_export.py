"""Peak memory and time of the streamed ONNX export (prunekit.exporters.onnx_streamed) against the
export of a loaded model, on models that are never loaded whole. Run it alone.

    python bench/fetch_models.py
    python bench/streamed_export.py [--models smollm2-135m qwen2.5-coder-1.5b] [--resident smollm2-135m] \
        [--out docs/results/streamed-export.json]

Each stage is its own process, its tree's RSS sampled every 0.2 s (bench/deploy_cost.py):
``fp32`` and ``int8`` write the fused ONNX graph from the model's GGUF a tensor at a time (INT8:
8-bit MatMulNBits quantized as written); ``reference`` computes the probe prompt's logits in torch
one decoder block at a time (prunekit.pruning.blocks.streamed_logits); ``verify`` runs the fp32
file in ONNX Runtime against that reference and through its KV cache; ``int8-agreement`` compares
the INT8 file's logits with the reference. ``resident`` (models named by --resident) is the export
of the loaded model (``export_onnx``), for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_cost import run_sampled  # noqa: E402
from families import model_path  # noqa: E402
from fetch_models import MODELS, cache_dir  # noqa: E402

STAGE = """
import json, sys, time
from pathlib import Path
import numpy as np
import torch
from prunekit.checkpoint import probe_ids
from prunekit.exporters.latency import peak_rss_gb
from prunekit.models import load_model, open_streamed
from prunekit.threads import use_usable_cores

stage, model, work = sys.argv[1], (sys.argv[2] or None), Path(sys.argv[3])
use_usable_cores()
start = time.perf_counter()
result = {}
if stage == "resident":
    from prunekit.exporters.onnx import export_onnx
    export_onnx(load_model(model).model, work / "resident" / "model.onnx")
else:
    opened = open_streamed(model)
    ids = probe_ids(opened.tokenizer)[0]
    if stage in ("fp32", "int8"):
        from prunekit.exporters.onnx_streamed import export_onnx_streamed
        export_onnx_streamed(opened.model, opened.weights, work / stage / "model.onnx", int8=stage == "int8")
    elif stage == "reference":
        from prunekit.pruning.blocks import streamed_logits
        torch.save(streamed_logits(opened.model, opened.weights, ids[None])[0], work / "reference.pt")
    elif stage == "verify":
        from prunekit.exporters.onnx_streamed import check_streamed_logits
        result = check_streamed_logits(work / "fp32" / "model.onnx", ids, torch.load(work / "reference.pt"))
    elif stage == "int8-agreement":
        from prunekit.exporters.ort_session import OnnxDecoder
        runner = OnnxDecoder(work / "int8" / "model.onnx")
        logits = torch.from_numpy(runner.step(ids.numpy()[None], runner.empty_cache())[0][0])
        reference = torch.load(work / "reference.pt")
        kl = torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                        reduction="batchmean")
        result = {"kl": float(kl), "top1": float((logits.argmax(-1) == reference.argmax(-1)).float().mean())}
result.update(seconds=round(time.perf_counter() - start, 1), vmhwm_gb=round(peak_rss_gb(), 3))
print(json.dumps(result))
"""

STAGES = ("fp32", "int8", "reference", "verify", "int8-agreement")


def stage_row(key: str, stage: str, model: str | None, work: Path) -> dict:
    run = run_sampled([sys.executable, "-c", STAGE, stage, model or "", str(work)])
    row = {"model": key, "stage": stage, "exit_code": run["exit_code"], "wall_seconds": run["wall_seconds"],
           "tree_peak_rss_gb": run["tree_peak_rss_gb"]}
    if run["exit_code"] == 0:
        row.update(json.loads(run["stdout"].strip().splitlines()[-1]))
        files = list((work / stage).glob("model.onnx*")) if stage in ("fp32", "int8", "resident") else []
        if files:
            row["artifact_mb"] = round(sum(f.stat().st_size for f in files) / 1e6, 1)
    else:
        row["stderr_tail"] = run["stderr"][-800:]
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | stage | wall s | peak RSS GB (tree) | artifact MB | result |", "|---|---|---|---|---|---|"]
    for r in rows:
        result = ("passed" if r.get("passed") else "") if r["stage"] == "verify" else (
            f"KL {r['kl']:.4f}, top-1 {r['top1']:.3f}" if "kl" in r else "")
        result = result if r["exit_code"] == 0 else f"exit {r['exit_code']}"
        lines.append(f"| {r['model']} | {r['stage']} | {r['wall_seconds']} | {r['tree_peak_rss_gb']} | "
                     f"{r.get('artifact_mb', '')} | {result} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    keys = ["smollm2-135m", *MODELS]
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-1.5b"], choices=keys)
    parser.add_argument("--resident", nargs="*", default=["smollm2-135m"], choices=keys)
    parser.add_argument("--out", type=Path, default=Path("docs/results/streamed-export.json"))
    args = parser.parse_args()
    rows = []
    for key in args.models:
        model = model_path(key, cache_dir(None))
        with tempfile.TemporaryDirectory(prefix=f"streamed-export-{key}-") as work:
            stages = (("resident",) if key in args.resident else ()) + STAGES
            for stage in stages:
                rows.append(stage_row(key, stage, model, Path(work)))
                if rows[-1]["exit_code"]:
                    break
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
