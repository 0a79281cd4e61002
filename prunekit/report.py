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


def plan_words(report: dict) -> str:
    """What shipped, in words: a search that chose the dense model names no method or pattern."""
    if report["method"] == "none":
        return f"dense (no pruning chosen), precision {report['precision']}"
    return f"{report['method']} {report['pattern']}, sparsity {report['sparsity']:g}, precision {report['precision']}"


def _fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


def markdown(report: dict, plot_name: str) -> str:
    params = report["parameters"]
    lines = [f"# prunekit report: {report['target']}", "",
             f"- model: {report['model']}",
             f"- plan: {plan_words(report)}",
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
        change = (_pct(100 * (q['perplexity'] / q['dense_perplexity'] - 1))
                  if q["dense_perplexity"] else "-")
        lines.append(f"| {q['language']} ({q['source']}) | {model} | {q.get('runtime', 'torch')} "
                     f"| {q['windows']} x {q['tokens'] // max(q['windows'], 1) + 1} "
                     f"| {_fmt(q['dense_perplexity'])} | {_fmt(q['perplexity'])} | {change} "
                     f"| {_fmt(q['kl'], '.4f')} | {_fmt(q['top1'], '.3f')} |")
    lines += _search_lines(report.get("search"))
    variants = report.get("variants", [])
    if variants:
        basis = report["latency"]["basis"] if report["latency"] else "n/a"
        lines += ["", f"## Artifacts built for the shipped candidate (latency {basis})", "",
                  "| variant | size MB | prefill ms | decode ms/token |", "|---|---|---|---|"]
        for v in variants:
            lines.append(f"| {v['name']} | {_fmt(v.get('bytes') and v['bytes'] / 1e6, '.1f')} "
                         f"| {_fmt(v.get('prefill_ms'), '.1f')} | {_fmt(v.get('decode_ms'), '.2f')} |")
    lines += ["", "## Artifacts", "", "| file | bytes |", "|---|---|"]
    lines += [f"| {a['path']} | {a['bytes']:,} |" for a in report["artifacts"]]
    resources = report.get("resources") or {}
    lines += ["", "## Stage timings (s)", "", " · ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()),
              "", f"Wall time {_fmt(resources.get('wall_seconds'), '.0f')} s, peak RSS "
                  f"{_fmt(resources.get('peak_rss_gb'), '.2f')} GB (this process; latency runs in their own)."
                  + _memory_line(resources.get("memory")),
              "", f"![quality and size]({plot_name})", ""]
    return "\n".join(lines)


def _memory_line(memory: dict | None) -> str:
    if not memory or not memory.get("streamed"):
        return ""
    return (f" Streamed, one decoder block in memory (float32 weights {memory['float32_gb']} GB, budget "
            f"{memory['budget_gb']} GB): {memory['reason'].split(': ', 1)[-1]}; the artifacts were judged in ONNX "
            f"Runtime processes of their own.")


def _search_lines(search: dict | None) -> list[str]:
    """The Pareto table: every candidate, its quality on the selection tokens, latency and size."""
    if not search:
        return []
    selection = search["selection"]
    limits = ", ".join(f"{k} {v:g} ({search['budget']['sources'].get(k, '?')})"
                       for k, v in search["budget"].items() if k != "sources" and v is not None)
    lines = ["", "## Candidates", "", f"Budget: {limits or 'none'}. Judged on {search['selected_on']}.",
             f"Chosen: {selection['reason']}.", "",
             "| candidate | status | ppl change (95% upper bound) | KL | top-1 | decode ms/token | prefill ms "
             "| size MB | within budget |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in search["candidates"]:
        mark = " **(shipped)**" if c["name"] == selection["chosen"] else ""
        basis = {"measured": "", "estimated": " (est.)"}.get(c.get("latency_basis"), "")
        size_basis = " (computed)" if c.get("size_basis") == "computed" else ""
        status = c["status"] if c["status"] != "skipped" else f"skipped: {c['why']}"
        fits = "yes" if c["within_budget"] else ("no: " + "; ".join(c["misses"]) if c["misses"] else "-")
        lines.append(f"| {c['name']}{mark} | {status} | {_ppl_cell(c)} | {_fmt(c['kl'], '.4f')} "
                     f"| {_fmt(c['top1'], '.3f')} | {_fmt(c['decode_ms'], '.2f')}{basis} "
                     f"| {_fmt(c['prefill_ms'], '.0f')} | {_fmt(c['bytes'] and c['bytes'] / 1e6, '.1f')}{size_basis} "
                     f"| {fits} |")
    if search.get("int4_quantizers"):
        lines += ["", f"4-bit quantizers compared on the first amount's selection tokens at "
                      f"{search['int4_quantizers'][0].get('precision', 'int4')} (least perplexity increase quantizes "
                      f"every amount and 4-bit precision): " + ", ".join(
                          f"{q['quantizer']} {_pct(q['ppl_increase'])} KL {q['kl']:.4f}"
                          for q in search["int4_quantizers"])]
    return lines


def _ppl_cell(candidate: dict) -> str:
    value, upper = candidate["ppl_increase"], candidate.get("ppl_increase_upper")
    if value is None:
        return "-"
    return _pct(value) + (f" (≤ {_pct(upper)})" if upper is not None else "")


def _pct(value: float) -> str:
    """A signed percentage to one decimal; a value that rounds to zero prints +0.0%, never -0.0%."""
    return f"{value if round(value, 1) != 0 else 0.0:+.1f}%"


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
    axes[0].bar([x + 0.2 for x in xs], pruned, 0.4, label="shipped")
    axes[0].set_xticks(list(xs), names)
    axes[0].set_ylabel("perplexity (measured)")
    axes[0].legend()
    search = report.get("search") or {}
    built = [c for c in search.get("candidates", []) if c["status"] == "built" and c["decode_ms"] is not None]
    if built:
        _pareto(axes[1], built, search)
    else:
        p = report["parameters"]
        axes[1].bar(["dense", "pruned"], [p["before"] / 1e6, p["after"] / 1e6], color=["C0", "C1"])
        axes[1].set_ylabel("parameters (M)")
    fig.suptitle(f"{report['target']}: {plan_words(report)}")
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)


def _pareto(ax, built: list[dict], search: dict) -> None:
    """Quality loss against decode latency, marker area by artifact size, the budget as a line,
    the shipped candidate ringed."""
    chosen = search["selection"]["chosen"]
    largest = max(c["bytes"] or 1 for c in built)
    for c in built:
        colour = "C2" if c["within_budget"] else "C3"
        ax.scatter(c["decode_ms"], c["ppl_increase"], s=20 + 280 * (c["bytes"] or 0) / largest, color=colour,
                   alpha=0.6, edgecolors="black" if c["name"] == chosen else "none", linewidths=2)
        ax.annotate(c["name"], (c["decode_ms"], c["ppl_increase"]), fontsize=7)
        if c.get("ppl_increase_upper") is not None:  # what the budget judged: the upper bound
            ax.vlines(c["decode_ms"], c["ppl_increase"], c["ppl_increase_upper"], color=colour, linewidth=1)
    limit = search["budget"].get("max_ppl_increase")
    if limit is not None:
        ax.axhline(limit, color="C3", linestyle="--", linewidth=1, label=f"budget +{limit:g}%")
        ax.legend(fontsize=7)
    basis = built[0].get("latency_basis") or "measured"
    ax.set_xlabel(f"decode ms/token ({basis}); marker area = size")
    ax.set_ylabel("perplexity change % (selection tokens)")
