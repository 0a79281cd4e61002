"""2:4 on a share of the blocks: the most sensitive blocks kept dense, the rest still 2:4, and the
TensorRT back end checks (and estimates) only the GEMMs that are sparse."""

import copy
import json

import pytest
import torch

from prunekit.cli import deploy_main
from prunekit.estimate import sparse_gemm_weights, sparse_stored_bytes
from prunekit.models import LoadedModel
from prunekit.pruning.checker import check_model
from prunekit.pruning.partial import block_errors, keep_dense_blocks
from prunekit.pruning.run import prune

from conftest import CORPUS, make_tiny_llama


def _every_block(tokenizer, layers=4):
    dense = make_tiny_llama(layers=layers)
    ids = torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    result = prune(LoadedModel(copy.deepcopy(dense), tokenizer, "tiny"), "wanda", 0.5, "2:4", calib_ids=ids,
                   progress=False)
    return dense, result


def test_the_most_sensitive_blocks_are_restored_and_the_rest_stay_2_4(tokenizer):
    dense, full = _every_block(tokenizer)
    errors = block_errors(full)
    assert all(0 < e < 1 for e in errors) and len(set(errors)) == 4
    half = keep_dense_blocks(full, dense, 0.25)
    assert half.details["sparse_blocks"] == sorted(sorted(range(4), key=errors.__getitem__)[:2])
    for index, (layer, original, pruned) in enumerate(zip(half.model.model.layers, dense.model.layers,
                                                          full.model.model.layers)):
        source = pruned if index in half.details["sparse_blocks"] else original
        assert torch.equal(layer.mlp.down_proj.weight, source.mlp.down_proj.weight)
    assert half.check["nm_ok"] is True and abs(half.sparsity - 0.25) < 1e-3
    assert half.mask_hash != full.mask_hash
    assert sparse_gemm_weights(half.model) * 2 == sparse_gemm_weights(full.model)
    sizes = [sparse_stored_bytes(m, "fp16", sparse_gemm_weights(m)) for m in (dense, half.model, full.model)]
    assert sizes[0] > sizes[1] > sizes[2]
    report = check_model(half.model, (2, 4))  # without naming the dense blocks, they fail the check
    assert any(r.nm_ok is False for r in report)


def _half_profile_deploy(tmp_path, tokenizer, *extra, amounts="[0.0, 0.25]"):
    """A tiny 4-block model deployed to an a100 profile whose search is ``amounts`` (by default dense
    or 2:4 on half the blocks) in fp16."""
    from importlib import resources

    folder = tmp_path / "tiny"
    if not folder.is_dir():
        make_tiny_llama(layers=4).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (tmp_path / "eval.txt").write_text(CORPUS[::-1])
    profile = (resources.files("prunekit") / "profiles" / "a100-tensorrt-sparse.toml").read_text()
    profile = profile.replace("amounts = [0.0, 0.125, 0.25, 0.375, 0.5]", f"amounts = {amounts}")
    profile = profile.replace('precisions = ["fp16", "int8"]', 'precisions = ["fp16"]')
    name = "out" + "".join(extra).replace("-", "_") + str(len(amounts))
    (tmp_path / f"{name}.toml").write_text(profile)
    out = tmp_path / name
    code = deploy_main(["--target", str(tmp_path / f"{name}.toml"), "--model", str(folder), "--out", str(out),
                        "--calib-samples", "4", "--calib-seqlen", "16", "--eval", str(tmp_path / "eval.txt"),
                        "--eval-seqlen", "16", "--eval-windows", "2", "--max-ppl-increase", "1000000", "--quiet",
                        *extra])
    assert code == 0
    return out, json.loads((out / "report.json").read_text())


def test_deploy_ships_2_4_on_the_least_sensitive_blocks(tmp_path, tokenizer):
    out, report = _half_profile_deploy(tmp_path, tokenizer)
    assert report["search"]["selection"]["chosen"] == "pruned 0.25 fp16"  # estimated faster than dense
    pruning = report["pruning"]
    assert len(pruning["sparse_blocks"]) == len(pruning["dense_blocks"]) == 2 and pruning["check"]["nm_ok"]
    checks = report["export"]["checks"]["nm_after_export"]
    assert checks["passed"] and checks["checked"] == 14 and checks["kept_dense"] == 14
    manifest = json.loads((out / "model" / "prunekit.json").read_text())
    assert manifest["dense_blocks"] == pruning["dense_blocks"] and manifest["sparsity"] == report["sparsity"]


def test_a_streamed_deploy_ships_the_same_partial_amount_from_one_prune(tmp_path, tokenizer, monkeypatch):
    """Streamed, the partial amount reads the every-block prune's folder with the dense blocks'
    projections from the model's source: the same masks, checks, candidates and shipped weights as
    in memory, and no second prune when the full amount follows."""
    from prunekit.models import load_model

    resident_out, resident = _half_profile_deploy(tmp_path, tokenizer)
    out, streamed = _half_profile_deploy(tmp_path, tokenizer, "--stream")
    assert streamed["resources"]["memory"]["streamed"]
    assert streamed["search"]["selection"]["chosen"] == resident["search"]["selection"]["chosen"] == "pruned 0.25 fp16"
    assert streamed["mask_hash"] == resident["mask_hash"]
    assert streamed["pruning"]["check"] == resident["pruning"]["check"]
    assert streamed["pruning"]["dense_blocks"] == resident["pruning"]["dense_blocks"]
    ours, theirs = (r["export"]["checks"] for r in (streamed, resident))
    assert ours["onnx"]["passed"] and ours["nm_after_export"]["passed"]
    assert (ours["nm_after_export"]["checked"], ours["nm_after_export"]["kept_dense"]) == (14, 14)
    candidates = {r: {c["name"]: c for c in report["search"]["candidates"]}
                  for r, report in (("streamed", streamed), ("resident", resident))}
    assert candidates["streamed"]["pruned 0.25 fp16"]["ppl_increase"] == pytest.approx(
        candidates["resident"]["pruned 0.25 fp16"]["ppl_increase"], abs=1e-3)
    manifest = json.loads((out / "model" / "prunekit.json").read_text())
    assert manifest["dense_blocks"] == streamed["pruning"]["dense_blocks"]
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(load_model(out / "model").model(ids).logits,
                                   load_model(resident_out / "model").model(ids).logits, rtol=1e-4, atol=1e-4)

    import prunekit.search_streamed as search_streamed

    prunes = []
    real = search_streamed.prune_streamed
    monkeypatch.setattr(search_streamed, "prune_streamed", lambda *a, **k: prunes.append(a[2]) or real(*a, **k))
    _, both = _half_profile_deploy(tmp_path, tokenizer, "--stream", amounts="[0.0, 0.25, 0.5]")
    built = [c["name"] for c in both["search"]["candidates"] if c["status"] == "built"]
    assert built == ["dense fp16", "pruned 0.25 fp16", "pruned 0.5 fp16"]
    assert prunes == [0.5]  # one prune of every block serves both amounts
    assert both["search"]["selection"]["chosen"] == "pruned 0.5 fp16" and both["pruning"]["check"]["nm_ok"]
