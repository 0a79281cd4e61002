"""2:4 on a share of the blocks: the most sensitive blocks kept dense, the rest still 2:4, and the
TensorRT back end checks (and estimates) only the GEMMs that are sparse."""

import copy
import json

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


def test_deploy_ships_2_4_on_the_least_sensitive_blocks(tmp_path, tokenizer):
    from importlib import resources

    folder = tmp_path / "tiny"
    make_tiny_llama(layers=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "eval.txt").write_text(CORPUS[::-1])
    profile = (resources.files("prunekit") / "profiles" / "a100-tensorrt-sparse.toml").read_text()
    profile = profile.replace("amounts = [0.0, 0.125, 0.25, 0.375, 0.5]", "amounts = [0.0, 0.25]")
    profile = profile.replace('precisions = ["fp16", "int8"]', 'precisions = ["fp16"]')
    (tmp_path / "half.toml").write_text(profile)
    out = tmp_path / "out"
    code = deploy_main(["--target", str(tmp_path / "half.toml"), "--model", str(folder), "--out", str(out),
                        "--calib-samples", "4", "--calib-seqlen", "16", "--eval", str(tmp_path / "eval.txt"),
                        "--eval-seqlen", "16", "--eval-windows", "2", "--max-ppl-increase", "1000000", "--quiet"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["search"]["selection"]["chosen"] == "pruned 0.25 fp16"  # estimated faster than dense
    pruning = report["pruning"]
    assert len(pruning["sparse_blocks"]) == len(pruning["dense_blocks"]) == 2 and pruning["check"]["nm_ok"]
    checks = report["export"]["checks"]["nm_after_export"]
    assert checks["passed"] and checks["checked"] == 14 and checks["kept_dense"] == 14
    manifest = json.loads((out / "model" / "prunekit.json").read_text())
    assert manifest["dense_blocks"] == pruning["dense_blocks"] and manifest["sparsity"] == report["sparsity"]
