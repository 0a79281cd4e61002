"""How well the deploy's selection tokens predict a pruned model's loss on other text.

    python bench/selection_gap.py [--amount 0.1] [--split disjoint|interleaved] [--out FILE]

Calibration as `deploy --target cpu-onnx --calib wiki.valid.tokens` takes it (64 x 256 WikiText-2
validation windows, seed 0; the last 8 held out for selection: drawn from the end of the text,
apart from the others, as deploy does now, or with ``--split interleaved`` from anywhere, as it did
before), FASP at ``--amount`` with the profile's options on the other 56; then the pruned float model's perplexity change against dense,
in torch, on: the deploy's selection windows; random validation windows of 256 and 1024 tokens;
windows from the last eighth of the validation text; and the first WikiText-2 test windows (the
evaluation text: measured here to size the gap, never used to choose anything). Run it alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from prunekit.calibration import calibration_ids, sample_windows
from prunekit.evaluation import eval_windows, measure_qualities
from prunekit.models import LoadedModel, load_model
from prunekit.plan import make_plan
from prunekit.profile import load_profile
from prunekit.pruning.run import prune
from prunekit.search import selection_count, selection_split
from prunekit.textsources import read_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import CALIB_FILE, EVAL_FILE  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--amount", type=float, default=0.1)
    parser.add_argument("--split", choices=("disjoint", "interleaved"), default="disjoint")
    parser.add_argument("--out", type=Path, default=None, help="default: docs/results/selection-gap-SPLIT.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = load_model()
    tokenizer = dense.tokenizer
    held_out = selection_count(64) if args.split == "disjoint" else 0
    fit, selection = selection_split(calibration_ids(str(CALIB_FILE), tokenizer, 64, 256, seed=0, held_out=held_out))
    plan = make_plan(load_profile("cpu-onnx"), sparsity=args.amount, precision="fp32")
    pruned = prune(LoadedModel(copy.deepcopy(dense.model), tokenizer, "default"), plan.method, args.amount,
                   plan.pattern, calib_ids=fit, progress=False, **plan.pruner_options()).model
    stream = tokenizer(read_text(str(CALIB_FILE), "calibration"), return_tensors="pt",
                       add_special_tokens=False).input_ids[0]
    tail = stream[stream.numel() * 7 // 8:]
    test = EVAL_FILE.read_text(encoding="utf-8")
    sets = {"deploy's selection windows, 8 x 256": selection,
            "validation, random, 32 x 256": sample_windows(stream, 32, 256, 5),
            "validation, random, 8 x 1024": sample_windows(stream, 8, 1024, 5),
            "validation, last eighth, 8 x 256": sample_windows(tail, 8, 256, 1),
            "validation, last eighth, 8 x 1024": sample_windows(tail, 8, 1024, 1),
            "test, first 8 x 1024": eval_windows(tokenizer, test, 1024, 8),
            "test, first 32 x 256": eval_windows(tokenizer, test, 256, 32)}
    rows = []
    for name, windows in sets.items():
        q = measure_qualities({"pruned": pruned}, windows, dense.model)["pruned"]
        rows.append({"windows": name, "ppl_change_pct": q.increase_pct, "kl": q.kl, "top1": q.top1})
        print(f"| {name} | {q.increase_pct:+.1f}% | {q.kl:.4f} |", flush=True)
    out = args.out or Path(f"docs/results/selection-gap-{args.split}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"amount": args.amount, "method": plan.method, "split": args.split, "rows": rows},
                              indent=1) + "\n")


if __name__ == "__main__":
    main()
