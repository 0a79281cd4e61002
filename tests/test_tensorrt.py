"""a100/h100-tensorrt-sparse: 2:4 kept through ONNX export and INT8 QDQ; build script; estimate."""

import json

import numpy as np
import pytest
import torch

from prunekit.cli import deploy_main
from prunekit.exporters.onnx import export_onnx, quantize_int8
from prunekit.exporters.onnx_sparsity import gemm_weights, nm_report
from prunekit.exporters.tensorrt import tensorrt_available
from prunekit.models import LoadedModel
from prunekit.pruning.run import prune

from conftest import CORPUS, make_tiny_llama


@pytest.fixture(scope="module")
def sparse_onnx(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("trt")
    loaded = LoadedModel(make_tiny_llama(), tokenizer, "tiny")
    ids = torch.randint(3, 300, (16, 32), generator=torch.Generator().manual_seed(0))
    prune(loaded, "wanda", 0.5, "2:4", calib_ids=ids, progress=False)
    path = export_onnx(loaded.model, folder / "fp32" / "model.onnx", fused=False)
    return path, ids, folder


def test_pattern_survives_export_and_qdq(sparse_onnx):
    path, ids, folder = sparse_onnx
    report = nm_report(gemm_weights(path))
    assert report["passed"] and report["checked"] == 14
    qdq = quantize_int8(path, folder / "qdq" / "model.onnx", "qdq", calibration=list(ids[:4]))
    after = nm_report(gemm_weights(qdq))
    assert after["passed"] and after["checked"] == 14


def test_a_broken_group_fails_and_names_the_tensor(sparse_onnx):
    path, _, _ = sparse_onnx
    weights = gemm_weights(path)
    broken = weights["layers.1.mlp.up_proj"].copy()
    broken[5, 0:4] = 1.0  # four non-zeros in one group of four
    weights["layers.1.mlp.up_proj"] = broken
    report = nm_report(weights)
    assert not report["passed"] and report["failing"] == ["layers.1.mlp.up_proj"]
    assert report["layers"]["layers.1.mlp.up_proj"]["bad_groups"] == 1


def test_dense_export_fails_the_check(tmp_path):
    report = nm_report(gemm_weights(export_onnx(make_tiny_llama(), tmp_path / "model.onnx", fused=False)))
    assert not report["passed"] and len(report["failing"]) == 14


def test_deploy_a100_writes_onnx_script_and_estimate(tmp_path, tokenizer):
    folder = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "eval.txt").write_text(CORPUS[::-1])
    out = tmp_path / "out"
    code = deploy_main(["--target", "a100-tensorrt-sparse", "--model", str(folder), "--out", str(out),
                        "--calib-samples", "4", "--calib-seqlen", "16", "--eval", str(tmp_path / "eval.txt"),
                        "--eval-seqlen", "16", "--eval-windows", "2", "--sparsity", "0.5", "--precision", "fp16",
                        "--quiet"])
    assert code in (0, 3)  # the fixed plan; a random tiny model may lose more than the profile's budget
    report = json.loads((out / "report.json").read_text())
    checks = report["export"]["checks"]
    assert checks["nm_after_export"]["passed"] and checks["nm_after_export"]["checked"] == 14
    assert report["latency"]["basis"] == "estimated" and "batch 1" in report["latency"]["why"]
    assert report["pruning"]["check"]["nm_ok"] is True
    script = (out / "build_engine.sh").read_text()
    assert "--sparsity=enable" in script and "--fp16" in script and "past_key_values.0.key" in script
    assert (out / "onnx" / "model.onnx").is_file()
    names = [v["name"] for v in report["variants"]]
    assert names == ["dense fp16 batch 1", "pruned 2:4 fp16 batch 1", "dense fp16 batch 8", "pruned 2:4 fp16 batch 8"]
    assert all(np.isfinite(v["decode_ms"]) for v in report["variants"])
    assert [c["name"] for c in report["search"]["candidates"]] == ["dense fp16", "pruned 0.5 fp16"]
    assert all(c["latency_basis"] == "estimated" and c["size_basis"] == "computed"
               for c in report["search"]["candidates"])
    available, _ = tensorrt_available()
    assert available or (checks["engine"]["built"] is False and "build_engine.sh" in checks["engine"]["reason"])


def test_a_dense_choice_ships_without_a_pattern_check(tmp_path):
    """When the search ships the dense model (no pruned amount fit the budget), there is no 2:4 to
    check: the export is written, not refused as a broken pattern."""
    from prunekit.plan import make_plan
    from prunekit.profile import load_profile
    from prunekit.targets import ExportContext
    from prunekit.targets.tensorrt_sparse import build

    profile = load_profile("a100-tensorrt-sparse")
    plan = make_plan(profile)
    plan.sparsity, plan.precision = 0.0, "fp16"  # what deploy writes back when dense is chosen
    ids = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    (tmp_path / "stage").mkdir()
    outcome = build(ExportContext(profile=profile, plan=plan, model=make_tiny_llama(), stage=tmp_path / "stage",
                                  probe_tokens=ids[0], calib_tokens=ids, quiet=True))
    assert outcome.status == "written" and "nm_after_export" not in outcome.checks
    assert (tmp_path / "stage" / "onnx" / "model.onnx").is_file()



def test_int8_candidates_are_judged_on_the_qdq_onnx_tensorrt_builds_from(tmp_path):
    """Rounding only the weights in torch leaves out what INT8 QDQ costs (the activations): the
    search judges a TensorRT INT8 candidate on the file the back end ships, in ONNX Runtime."""
    from prunekit.evaluation import measure_quality
    from prunekit.exporters.onnx import OnnxDecoder, onnx_logits
    from prunekit.profile import load_profile
    from prunekit.targets import candidate_builder
    from prunekit.targets.tensorrt_sparse import export_for_tensorrt

    ids = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    model = make_tiny_llama()
    builder = candidate_builder(load_profile("a100-tensorrt-sparse"), tmp_path, ids[0], quiet=True,
                                calibration=list(ids))
    fp16, int8 = builder.build(model, 0.0, ("fp16", "int8"), ids[:2], model)
    assert "QDQ" in int8.quality_by and "torch" in fp16.quality_by
    assert not list(tmp_path.glob("judge-*"))  # the judged files are gone
    shipped, _, _ = export_for_tensorrt(model, tmp_path / "ship", ids[0], True, list(ids))
    expected = measure_quality(onnx_logits(OnnxDecoder(shipped)), ids[:2], model)
    assert int8.ppl_increase == pytest.approx(expected.increase_pct, abs=1e-6)
