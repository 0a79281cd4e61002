"""Peak memory and time of `prunekit deploy` against model size, one run. Run it alone.

    python bench/fetch_models.py
    python bench/deploy_memory.py [--models smollm2-135m qwen2.5-coder-1.5b] [--target cpu-onnx] \
        [--stream] [--self-calibration] [--out docs/results/deploy-memory.json] [-- extra deploy flags]

Each deploy is one subprocess (WikiText-2 validation calibration, or with ``--self-calibration`` no
--calib at all: the profile's default, the model writing its own text; the profile's search and budget),
its process tree's RSS sampled every 0.2 s (bench/deploy_cost.py): the deploy process, its ONNX
Runtime judging processes and its latency processes together. A model whose in-memory deploy would
not fit the machine is deployed streamed (prunekit.deploy_memory); ``--stream`` streams every one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_cost import run_deploy  # noqa: E402
from families import model_path  # noqa: E402
from fetch_models import MODELS, cache_dir  # noqa: E402
from protocol import CALIB_FILE  # noqa: E402


def row(key: str, model: str | None, work: Path, extra: list[str], self_calibration: bool = False,
        target: str = "cpu-onnx") -> dict:
    calib = [] if self_calibration else ["--calib", str(CALIB_FILE)]
    args = ["--target", target, *calib, "--out", str(work / key), *extra]
    run = run_deploy(args + (["--model", model] if model else []))
    report = json.loads((work / key / "report.json").read_text()) if (work / key / "report.json").is_file() else {}
    return {"model": key, "target": target, **run, "memory": report.get("resources", {}).get("memory"),
            "parameters": report.get("parameters"), "quality": report.get("quality"),
            "timings": report.get("timings"), "checks": report.get("export", {}).get("checks")}


def table(rows: list[dict]) -> str:
    lines = ["| model | float32 GB | streamed | peak RSS GB (tree) | deploy VmHWM GB | wall s | shipped | quality (pydoc) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        memory, quality = r["memory"] or {}, (r["quality"] or [{}])[0]
        shift = quality.get("perplexity") and quality.get("dense_perplexity") and \
            f"{100 * (quality['perplexity'] / quality['dense_perplexity'] - 1):+.1f}%"
        shipped = r["shipped"] or f"exit {r['exit_code']}"
        lines.append(f"| {r['model']} | {memory.get('float32_gb')} | {memory.get('streamed')} | {r['tree_peak_rss_gb']} | "
                     f"{r['deploy_vmhwm_gb']} | {r['wall_seconds']:.0f} | {shipped} | {shift or ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    keys = ["smollm2-135m", *MODELS]
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-1.5b"], choices=keys)
    parser.add_argument("--target", default="cpu-onnx", help="the deploy target (default cpu-onnx)")
    parser.add_argument("--stream", action="store_true", help="deploy every model streamed")
    parser.add_argument("--self-calibration", action="store_true",
                        help="no --calib: the profile's default, the model writing its own calibration text")
    parser.add_argument("--out", type=Path, default=Path("docs/results/deploy-memory.json"))
    parser.add_argument("extra", nargs="*", help="more deploy flags, after --")
    args = parser.parse_args()
    cache = cache_dir(None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="prunekit-deploy-memory-") as work:
        for key in args.models:
            rows.append(row(key, model_path(key, cache), Path(work), ["--stream"] * args.stream + args.extra,
                            args.self_calibration, args.target))
            print(table(rows).splitlines()[-1], flush=True)
    calibration = "self (no --calib)" if args.self_calibration else str(CALIB_FILE)
    args.out.write_text(json.dumps({"calibration": calibration, "rows": rows, "table": table(rows)}, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
