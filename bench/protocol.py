"""The fixed benchmark protocol every quality figure in the docs comes from.

Calibration: 128 samples x 512 tokens of WikiText-2 validation, seed 0 (a row with "own" adds that
many samples of 512 tokens the model writes itself, as admm does by default). Evaluation: WikiText-2 raw
test, windows of 1024 tokens, the first 40; plus Python's own documentation text (pydoc_data), which
is not WikiText, so a method that only fits the calibration domain shows it. Each row runs in its
own process so its peak RSS is its own.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("PRUNEKIT_DATA", ROOT.parent / "shared" / "data")) / "wikitext-2"
CALIB_FILE = DATA / "wiki.valid.tokens"
EVAL_FILE = DATA / "wiki.test.raw"
CALIB_SAMPLES, CALIB_SEQLEN, SEED = 128, 512, 0
EVAL_SEQLEN, EVAL_WINDOWS, PYDOC_WINDOWS = 1024, 40, 16


@torch.no_grad()
def dense_forward_seconds(model, ids: torch.Tensor, batch: int = 8) -> float:
    """One forward over ``ids`` (batches of ``batch``, last logits only): the yardstick prune
    time is measured against."""
    start = time.perf_counter()
    for b in range(0, ids.shape[0], batch):
        model(ids[b:b + batch], use_cache=False, logits_to_keep=1)
    return time.perf_counter() - start


def run_row(spec: dict) -> dict:
    """Load, calibrate, prune (timed, RSS taken), then evaluate against the dense model."""
    from prunekit.calibration import calibration_ids
    from prunekit.exporters.latency import peak_rss_gb
    from prunekit.evaluation import eval_windows, measure_quality
    from prunekit.models import load_model
    from prunekit.pruning.run import prune
    from prunekit.textsources import pydoc_text

    torch.manual_seed(0)
    loaded = load_model()
    row = dict(spec)
    if spec["method"] == "dense":
        ids = calibration_ids(str(CALIB_FILE), loaded.tokenizer, CALIB_SAMPLES, CALIB_SEQLEN, SEED)
        row["dense_forward_seconds"] = dense_forward_seconds(loaded.model, ids)
        for own in spec.get("own_forwards", ()):  # the yardstick over a row's own-text-mixed calibration tokens
            mixed = calibration_ids(str(CALIB_FILE), loaded.tokenizer, CALIB_SAMPLES, CALIB_SEQLEN, SEED,
                                    model=loaded.model, progress=False, own=own)
            row.setdefault("dense_forward_seconds_own", {})[str(own)] = dense_forward_seconds(loaded.model, mixed)
        row["peak_rss_gb"] = peak_rss_gb()
        dense, model = None, loaded.model
        row["parameters"] = loaded.num_parameters()
    else:
        dense = copy.deepcopy(loaded.model)
        start = time.perf_counter()
        own = spec.get("own", 0)  # the model's own samples mixed in (prunekit.calibration.mix_own_text)
        ids = calibration_ids(str(CALIB_FILE), loaded.tokenizer, CALIB_SAMPLES, CALIB_SEQLEN, SEED,
                              model=loaded.model, progress=False, own=own)
        options = spec.get("options", {})
        pruner = None
        if spec.get("fasp_variant"):
            from fasp_variants import build

            pruner, options = build(spec["fasp_variant"], spec["sparsity"], **options), {}
        result = prune(loaded, spec["method"], spec["sparsity"], spec["pattern"], calib_ids=ids,
                       calib_own=own, progress=False, pruner=pruner, **options)
        row["prune_seconds"] = time.perf_counter() - start  # calibration data included
        row["peak_rss_gb"] = peak_rss_gb()  # the dense copy for evaluation is included: ~0.54 GB
        row["mask_hash"] = result.mask_hash
        row["parameters"] = result.parameters_after
        row["check"] = result.check
        row["details"] = {k: v for k, v in result.details.items() if k != "structure"}
        model = result.model
    texts = {"wikitext2": (EVAL_FILE.read_text(encoding="utf-8"), EVAL_WINDOWS),
             "pydoc": (pydoc_text(), PYDOC_WINDOWS)}
    row["quality"] = {}
    for name, (text, windows) in texts.items():
        q = measure_quality(model, eval_windows(loaded.tokenizer, text, EVAL_SEQLEN, windows), dense, name)
        row["quality"][name] = q.as_dict()
    if spec.get("latency"):
        row["latency"] = onnx_latency(model)
    return row


def onnx_latency(model) -> dict:
    """fp32 ONNX export of the row's model, timed with ONNX Runtime in a separate process."""
    import tempfile

    from prunekit.exporters.latency import measure_in_subprocess
    from prunekit.exporters.onnx import export_onnx, onnx_bytes

    with tempfile.TemporaryDirectory() as scratch:
        path = export_onnx(model, Path(scratch) / "model.onnx")
        return {"bytes": onnx_bytes(path), **measure_in_subprocess(path)}


def run_rows(specs: list[dict], out_json: Path) -> list[dict]:
    """Each row in a fresh process; results accumulate in ``out_json`` as they finish.

    Rows already in ``out_json`` under other names are kept, so a long table can be filled in
    over several runs; a row run again replaces its old result.
    """
    out_json.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out_json.read_text())["rows"] if out_json.exists() else []
    for spec in specs:
        proc = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"row {spec} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows = [r for r in rows if r["name"] != row["name"]] + [row]
        print(f"done: {spec}", file=sys.stderr, flush=True)
        meta = {"protocol": {"calib": str(CALIB_FILE.name), "calib_samples": CALIB_SAMPLES,
                             "calib_seqlen": CALIB_SEQLEN, "seed": SEED, "eval": EVAL_FILE.name,
                             "eval_seqlen": EVAL_SEQLEN, "eval_windows": EVAL_WINDOWS,
                             "pydoc_windows": PYDOC_WINDOWS},
                "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__}}
        out_json.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    print(json.dumps(run_row(json.loads(sys.argv[1]))))
