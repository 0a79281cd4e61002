"""What the budgeted search costs, and whether its latency table repeats: budgeted deploy, the fixed
plan it replaces, and the budgeted deploy again, one after another in one run (run it alone).

    python bench/deploy_cost.py [--calib FILE] [--no-repeat] [--out docs/results/deploy-cost.json]

Row 1, ``deploy --target cpu-onnx`` (the README's main job: self-calibration unless ``--calib``,
the profile's budget, searched); row 2, the same with ``--sparsity 0.3 --precision int8`` (the
profile's former fixed plan: one candidate beside the dense model); row 3, row 1 again (left out
with ``--no-repeat``). Same calibration and defaults in all three. Printed: wall
time of each command, the budgeted / fixed ratio (goal: at most 2.5), and per candidate the decode
latency of rows 1 and 3 with their difference (goal: within 10%). Peak memory is the sum of RSS over
the deploy's process tree, sampled every 0.2 s (the deploy times its artifacts in a child process),
beside the deploy process's own VmHWM from its report.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FIXED = ["--sparsity", "0.3", "--precision", "int8"]


def _tree_rss_kb(root: int) -> int:
    """Sum of VmRSS over ``root`` and its descendants, from /proc."""
    parents, rss = {}, {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        pid = int(status.parent.name)
        parents[pid] = int(fields.get("PPid", "0").strip())
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    return sum(rss.get(pid, 0) for pid in tree)


def run_sampled(command: list[str]) -> dict:
    """Run ``command``, sampling its process tree's RSS every 0.2 s: exit code, wall time, peak, output."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    return {"exit_code": proc.returncode, "wall_seconds": round(time.perf_counter() - start, 1),
            "tree_peak_rss_gb": round(peak[0] / 1e6, 3), "stdout": stdout, "stderr": stderr}


def run_deploy(args: list[str]) -> dict:
    """One deploy command, timed, its tree's RSS sampled; returns the wall time, peak and report."""
    run = run_sampled([sys.executable, "-m", "prunekit", "deploy", "--quiet", *args])
    out = Path(args[args.index("--out") + 1])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    return {"command": "prunekit deploy " + " ".join(args), "exit_code": run["exit_code"],
            "wall_seconds": run["wall_seconds"], "tree_peak_rss_gb": run["tree_peak_rss_gb"],
            "deploy_vmhwm_gb": report and report["resources"]["peak_rss_gb"],
            "shipped": report and report["search"]["selection"]["chosen"],
            "candidates": report and [{k: c.get(k) for k in ("name", "status", "ppl_increase", "ppl_increase_upper",
                                                             "decode_ms", "prefill_ms", "bytes", "within_budget",
                                                             "why", "misses")}
                                      for c in report["search"]["candidates"]],
            "screen": report and report["search"].get("screen"),
            "shipped_quality": report and report["quality"], "stages": report and report.get("timings"), "stderr_tail": run["stderr"][-500:] if run["exit_code"] else ""}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=Path, default=None, help="calibration text (default: self-calibration)")
    parser.add_argument("--no-repeat", action="store_true", help="skip the second budgeted run")
    parser.add_argument("--target", default="cpu-onnx")
    parser.add_argument("--out", type=Path, default=Path("docs/results/deploy-cost.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="deploy-cost-") as scratch:
        base = ["--target", args.target, *(["--calib", str(args.calib)] if args.calib else [])]
        runs = [("budgeted", []), ("fixed", FIXED)] + ([] if args.no_repeat else [("budgeted again", [])])
        rows = {}
        for name, extra in runs:
            print(f"running the {name} deploy", flush=True)
            rows[name] = run_deploy([*base, *extra, "--out", str(Path(scratch) / name.replace(" ", "-"))])
            print(f"  {rows[name]['wall_seconds']} s, exit {rows[name]['exit_code']}", flush=True)
    first, again = rows["budgeted"], rows.get("budgeted again", {})
    stability = []
    for a, b in zip(first["candidates"] or [], again.get("candidates") or []):
        if a["decode_ms"] and b["decode_ms"]:
            stability.append({"candidate": a["name"], "decode_ms": [a["decode_ms"], b["decode_ms"]],
                              "difference": abs(a["decode_ms"] - b["decode_ms"]) / min(a["decode_ms"], b["decode_ms"])})
    result = {"rows": rows, "ratio_budgeted_to_fixed": round(first["wall_seconds"] / rows["fixed"]["wall_seconds"], 2),
              "decode_stability": stability}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n| deploy | shipped | wall s | tree peak RSS GB | deploy VmHWM GB |\n|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['shipped']} | {row['wall_seconds']} | {row['tree_peak_rss_gb']} | {row['deploy_vmhwm_gb']} |")
    print(f"\nbudgeted / fixed wall time: {result['ratio_budgeted_to_fixed']}")
    print("\n| candidate | decode ms, run 1 | run 2 | difference |\n|---|---|---|---|")
    for s in stability:
        print(f"| {s['candidate']} | {s['decode_ms'][0]:.2f} | {s['decode_ms'][1]:.2f} | {100 * s['difference']:.1f}% |")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
