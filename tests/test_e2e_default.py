"""End to end on the embedded default model (SmolLM2-135M-Instruct), with small calibration."""

import json
from pathlib import Path

import pytest
import torch

from prunekit.cli import deploy_main, main
from prunekit.models import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
CALIB, EVAL = DATA / "wiki.valid.tokens", DATA / "wiki.test.raw"

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not CALIB.is_file(), reason="../shared/data/wikitext-2 is not beside the repo")]


def test_deploy_cpu_onnx_on_the_default_model(tmp_path):
    out = tmp_path / "deploy"
    code = deploy_main(["--target", "cpu-onnx", "--out", str(out), "--calib", str(CALIB),
                        "--calib-samples", "8", "--calib-seqlen", "128", "--eval", f"en={EVAL}",
                        "--eval-seqlen", "256", "--eval-windows", "2", "--sparsity", "0.3", "--precision", "int8",
                        "--max-ppl-increase", "1000", "--quiet"])  # the fixed plan; the default budget would exit 3
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"].startswith("SmolLM2-135M-Instruct")
    assert report["method"] == "fasp" and report["precision"] == "int8"
    assert report["export"]["checks"]["export 0.3"]["passed"]
    assert report["parameters"]["after"] < 0.85 * report["parameters"]["before"]
    dense, int8 = report["search"]["candidates"]  # the fixed plan beside the dense fp32 model
    assert (dense["name"], int8["name"]) == ("dense fp32", "pruned 0.3 int8")
    assert int8["bytes"] < 0.5 * dense["bytes"] and int8["decode_ms"] > 0
    q = report["quality"][0]
    assert q["language"] == "en" and q["dense_perplexity"] < q["perplexity"] < 20 * q["dense_perplexity"]
    # the saved folder reloads: GQA with 9 query heads over 3 kv heads and narrower value heads
    reloaded = load_model(str(out / "model"))
    assert reloaded.model.model.layers[0].self_attn.v_head_dim == 48  # 64 · 0.7 rounded up to a multiple of 4
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345]])
    out_ids = reloaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out_ids.shape == (1, 10)
    # The Core ML wrapper (fp16 KV cache) passes its check on the real pruned model, with room to spare:
    # an absolute 0.05 logit tolerance used to refuse such models at random (issue #19).
    from prunekit.exporters.coreml import reference_check

    probe = torch.tensor(reloaded.tokenizer(EVAL.read_text()[:2000]).input_ids[:32])
    checks = reference_check(reloaded.model, probe)
    assert checks["passed"] and checks["max_abs_logit_diff"] < 0.5 * checks["allowed"], checks


def test_prune_wanda_2_4_and_reload_on_the_default_model(tmp_path, capsys):
    out = tmp_path / "w24"
    assert main(["prune", "--method", "wanda", "--pattern", "2:4", "--calib", str(CALIB), "--calib-samples", "4",
                 "--calib-seqlen", "64", "--out", str(out), "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["check"]["nm_ok"] is True and summary["check"]["overall_sparsity"] == 0.5
    reloaded = load_model(str(out))
    weight = reloaded.model.model.layers[5].mlp.down_proj.weight
    assert ((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
