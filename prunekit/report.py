"""The deploy report: ``report.json`` for pipelines (versioned schema) and ``report.md`` + a PNG plot
for people. Latency always carries its basis: measured here, or estimated from the profile."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

SCHEMA = "prunekit.report/1"
REQUIRED_KEYS = ("schema", "target", "model", "plan", "method", "pattern", "sparsity", "precision",
                 "parameters", "artifacts", "quality", "latency", "hardware", "timings", "versions",
                 "export", "gate")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for package in ("prunekit", "torch", "transformers", "onnx", "onnxruntime", "coremltools"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def hardware() -> dict:
    import torch

    return {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def artifact_list(folder: Path) -> list[dict]:
    return [{"path": str(p.relative_to(folder)), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file()]


def validate_report(report: dict) -> None:
    """Raise ValueError naming the first missing or malformed field (tests and pipelines use it)."""
    for key in REQUIRED_KEYS:
        if key not in report:
            raise ValueError(f"report is missing '{key}'")
    if report["schema"] != SCHEMA:
        raise ValueError(f"report schema is {report['schema']!r}, expected {SCHEMA!r}")
    latency = report["latency"]
    if latency is not None and latency.get("basis") not in ("measured", "estimated"):
        raise ValueError("latency.basis must be 'measured' or 'estimated'")
    for q in report["quality"]:
        for key in ("language", "source", "perplexity", "dense_perplexity", "kl", "top1"):
            if key not in q:
                raise ValueError(f"quality entry is missing '{key}'")


def write_report(report: dict, folder: Path) -> list[Path]:
    validate_report(report)
    folder = Path(folder)
    json_path = folder / "report.json"
    json_path.write_text(json.dumps(report, indent=2, sort_keys=False, allow_nan=False) + "\n")
    plot_path = folder / "report.png"
    _plot(report, plot_path)
    md_path = folder / "report.md"
    md_path.write_text(markdown(report, plot_path.name))
    return [json_path, md_path, plot_path]


def _fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


def markdown(report: dict, plot_name: str) -> str:
    params = report["parameters"]
    lines = [f"# prunekit report: {report['target']}", "",
             f"- model: {report['model']}",
             f"- plan: {report['method']} {report['pattern']}, sparsity {report['sparsity']:g}, "
             f"precision {report['precision']}",
             f"- parameters: {params['before']:,} -> {params['after']:,} "
             f"({100 * (1 - params['after'] / params['before']):.1f}% fewer)",
             f"- export: {report['export']['status']}" + (f" ({report['export']['reason']})"
                                                         if report['export'].get('reason') else ""),
             f"- quality gate: {report['gate']['status']}" + (f" ({report['gate']['reason']})"
                                                              if report['gate'].get('reason') else ""),
             ""]
    for warning in report["plan"].get("warnings", []):
        lines.append(f"> warning: {warning}")
    lines += ["", "## Quality (measured)", "",
              "| text | model | computed by | windows x tokens | dense ppl | ppl | change | KL | top-1 |",
              "|---|---|---|---|---|---|---|---|---|"]
    rows = [("shipped", q) for q in report["quality"]]
    if report["quality"] and report["quality"][0].get("runtime", "torch") != "torch":  # else the same rows
        rows += [("pruned, before export", q) for q in report.get("quality_pruned_torch", [])]
    for model, q in rows:
        change = (f"{100 * (q['perplexity'] / q['dense_perplexity'] - 1):+.1f}%"
                  if q["dense_perplexity"] else "-")
        lines.append(f"| {q['language']} ({q['source']}) | {model} | {q.get('runtime', 'torch')} "
                     f"| {q['windows']} x {q['tokens'] // max(q['windows'], 1) + 1} "
                     f"| {_fmt(q['dense_perplexity'])} | {_fmt(q['perplexity'])} | {change} "
                     f"| {_fmt(q['kl'], '.4f')} | {_fmt(q['top1'], '.3f')} |")
    variants = report.get("variants", [])
    if variants:
        basis = report["latency"]["basis"] if report["latency"] else "n/a"
        lines += ["", f"## Variants (latency {basis})", "",
                  "| variant | size MB | prefill ms | decode ms/token | tokens/s |", "|---|---|---|---|---|"]
        for v in variants:
            lines.append(f"| {v['name']} | {_fmt(v.get('bytes') and v['bytes'] / 1e6, '.1f')} "
                         f"| {_fmt(v.get('prefill_ms'), '.1f')} | {_fmt(v.get('decode_ms'), '.2f')} "
                         f"| {_fmt(v.get('tokens_per_s'), '.1f')} |")
    lines += ["", "## Artifacts", "", "| file | bytes |", "|---|---|"]
    lines += [f"| {a['path']} | {a['bytes']:,} |" for a in report["artifacts"]]
    resources = report.get("resources") or {}
    lines += ["", "## Stage timings (s)", "", " · ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()),
              "", f"Wall time {_fmt(resources.get('wall_seconds'), '.0f')} s, peak RSS "
                  f"{_fmt(resources.get('peak_rss_gb'), '.2f')} GB (this process; latency runs in their own).",
              "", f"![quality and size]({plot_name})", ""]
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    names = [q["language"] for q in report["quality"]]
    dense = [q["dense_perplexity"] or 0 for q in report["quality"]]
    pruned = [q["perplexity"] for q in report["quality"]]
    xs = range(len(names))
    axes[0].bar([x - 0.2 for x in xs], dense, 0.4, label="dense")
    axes[0].bar([x + 0.2 for x in xs], pruned, 0.4, label="pruned")
    axes[0].set_xticks(list(xs), names)
    axes[0].set_ylabel("perplexity (measured)")
    axes[0].legend()
    variants = report.get("variants") or []
    if variants and all(v.get("decode_ms") for v in variants):
        for v in variants:
            axes[1].scatter(v["decode_ms"], v["perplexity"] if v.get("perplexity") else 0, s=max(v["bytes"] / 4e6, 10))
            axes[1].annotate(v["name"], (v["decode_ms"], v.get("perplexity") or 0))
        axes[1].set_xlabel(f"decode ms/token ({report['latency']['basis']})")
        axes[1].set_ylabel("perplexity")
    else:
        p = report["parameters"]
        axes[1].bar(["dense", "pruned"], [p["before"] / 1e6, p["after"] / 1e6], color=["C0", "C1"])
        axes[1].set_ylabel("parameters (M)")
    fig.suptitle(f"{report['target']}: {report['method']} {report['pattern']} {report['sparsity']:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)
