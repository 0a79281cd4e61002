"""Layer by layer: how much of a projection's output each sparse method loses on tokens it never saw.

    python bench/layer_error.py [--layers 3,15,27] [--fit 32] [--out FILE]

The dense default model reads WikiText-2 validation windows of 512 tokens (seed 0): ``--fit`` of
them are the calibration (their last eighth held out, as the ADMM pruner holds them, to choose its
refit's λ), and 8 windows from the end of the text, apart from the others, are the test. For each
chosen layer and projection group (q/k/v, o, gate/up, down), on the dense inputs:

- Wanda's mask, weights cut (the score alone);
- SparseGPT (mask and update column by column through the inverse Hessian);
- ADMM (prunekit.pruning.reconstruction.reconstruct: the mask and weights solved together, then the
  refit toward the cut with λ chosen on the held-out eighth);
- at 2:4, ADMM after the balanced channel order (prunekit.pruning.permutation.balanced_order) of the
  inputs it applies to: down_proj's (the MLP channels) and o_proj's within each key/value head's
  value channels.

Each figure is ‖(W − W₀)X‖² / ‖W₀X‖² over the test tokens: the share of the layer's output energy
the pruned weights get wrong (lower is better). Every layer starts from the same dense inputs, so
this isolates the solver from error carried in from earlier layers (bench/quality.py measures the
whole model). Run it alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from prunekit.arch import architecture_for, attention_shape, decoder_layers
from prunekit.calibration import calibration_ids
from prunekit.exporters.latency import peak_rss_gb
from prunekit.models import load_model
from prunekit.pruning.masks import wanda_mask
from prunekit.pruning.permutation import balanced_order, column_importance, value_orders
from prunekit.pruning.reconstruction import output_error, reconstruct
from prunekit.pruning.sparsegpt import sparsegpt_prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import CALIB_FILE, SEED  # noqa: E402

TEST_WINDOWS, SEQLEN, SELECTION_SHARE = 8, 512, 0.125
PATTERNS = {"2:4": (2, 4), "50%": None}


def projection_groups(model, layer: int) -> dict[str, list[str]]:
    """Group name -> the module names (within the block) that read one input."""
    a = architecture_for(model.config)
    return {"q/k/v": [f"{a.attention}.{getattr(a, r)}" for r in ("q", "k", "v")],
            "o": [f"{a.attention}.{a.o}"],
            "gate/up": [f"{a.mlp}.{a.gate}", f"{a.mlp}.{a.up}"],
            "down": [f"{a.mlp}.{a.down}"]}


@torch.no_grad()
def captured_inputs(model, layers: list[int], ids: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Every token's input to the first module of each group, (layer, group) -> tokens x features."""
    blocks = decoder_layers(model)
    seen, hooks = {}, []
    for layer in layers:
        for group, names in projection_groups(model, layer).items():
            key = (layer, group)
            seen[key] = []
            hooks.append(blocks[layer].get_submodule(names[0]).register_forward_pre_hook(
                lambda _m, args, key=key: seen[key].append(args[0].reshape(-1, args[0].shape[-1]).float())))
    try:
        for start in range(0, ids.shape[0], 8):
            model(ids[start:start + 8], use_cache=False, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    return {key: torch.cat(rows) for key, rows in seen.items()}


def permutation(model, group: str, weight: torch.Tensor, sumsq: torch.Tensor) -> torch.Tensor | None:
    """The input order the permute option applies to this group (None: its inputs are not free)."""
    if group == "down":
        return balanced_order(column_importance(weight, sumsq), 4)
    if group == "o":  # value channels, dealt within each key/value head (every query head reads them)
        heads, kv_heads, _ = attention_shape(model.config)
        return value_orders(column_importance(weight, sumsq), heads, kv_heads, 4)[1]
    return None


def errors_of(weight: torch.Tensor, fit: torch.Tensor, selection: torch.Tensor, test_gram: torch.Tensor,
              n_m, order: torch.Tensor | None) -> dict[str, float]:
    """Each method's share of the test output energy lost, on ``weight`` (rows x inputs)."""
    gram = fit.T.double() @ fit.double()
    base = output_error(torch.zeros_like(weight), weight, test_gram)
    norm = fit.pow(2).sum(0).sqrt()
    out = {"wanda": output_error(weight * wanda_mask(weight, norm, 0.5, n_m), weight, test_gram) / base}
    start = time.perf_counter()
    sparse, _ = sparsegpt_prune(weight, gram, 0.5, n_m)
    out["sparsegpt"], out["sparsegpt_seconds"] = output_error(sparse.float(), weight, test_gram) / base, \
        time.perf_counter() - start
    start = time.perf_counter()
    solved, _, info = reconstruct(weight, gram.float(), selection, 0.5, n_m)
    out["admm"], out["admm_seconds"] = output_error(solved, weight, test_gram) / base, time.perf_counter() - start
    out["admm_lambda"] = info["lambda"]
    if order is not None:
        permuted, _, _ = reconstruct(weight[:, order], gram.float()[order][:, order], selection[:, order], 0.5, n_m)
        out["admm_permuted"] = output_error(permuted, weight[:, order], test_gram[order][:, order]) / base
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="3,15,27")
    parser.add_argument("--fit", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--out", type=Path, default=Path("bench/results/layer-error.json"))
    args = parser.parse_args()
    began = time.perf_counter()
    torch.manual_seed(0)
    loaded = load_model()
    model = loaded.model
    layers = [int(x) for x in args.layers.split(",")]
    ids = calibration_ids(str(CALIB_FILE), loaded.tokenizer, args.fit + TEST_WINDOWS, SEQLEN, SEED,
                          held_out=TEST_WINDOWS)
    inputs = captured_inputs(model, layers, ids)
    fit_tokens = args.fit * SEQLEN
    selection_start = fit_tokens - int(fit_tokens * SELECTION_SHARE)
    blocks = decoder_layers(model)
    rows = []
    for (layer, group), x in inputs.items():
        fit, selection, test = x[:selection_start], x[selection_start:fit_tokens], x[fit_tokens:]
        test_gram = test.T.double() @ test.double()
        names = projection_groups(model, layer)[group]
        weight = torch.cat([blocks[layer].get_submodule(n).weight.detach().float() for n in names])
        for pattern, n_m in PATTERNS.items():
            order = permutation(model, group, weight, x[:fit_tokens].pow(2).sum(0)) if n_m else None
            row = {"layer": layer, "group": group, "pattern": pattern,
                   **errors_of(weight, fit, selection, test_gram.float(), n_m, order)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"protocol": f"default model, dense inputs; fit {args.fit} x {SEQLEN} WikiText-2 validation tokens "
                          f"(the last {SELECTION_SHARE:g} held out to choose ADMM's λ), test {TEST_WINDOWS} x "
                          f"{SEQLEN} from the end of the text, apart; figures: ‖(W − W₀)X‖² / ‖W₀X‖² on the test",
              "rows": rows, "wall_seconds": round(time.perf_counter() - began, 1), "peak_rss_gb": round(peak_rss_gb(), 3)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| layer | inputs of | pattern | Wanda (cut) | SparseGPT | ADMM | ADMM, permuted | ADMM λ |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        permuted = f"{r['admm_permuted']:.4f}" if "admm_permuted" in r else "-"
        lines.append(f"| {r['layer']} | {r['group']} | {r['pattern']} | {r['wanda']:.4f} | {r['sparsegpt']:.4f} | "
                     f"{r['admm']:.4f} | {permuted} | {r['admm_lambda']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
