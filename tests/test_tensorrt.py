"""a100/h100-tensorrt-sparse: 2:4 kept through ONNX export and INT8 QDQ; build script; estimate."""

import json
import tempfile
from pathlib import Path

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
    # the shipped model is dense: its latency rows say so, with no "pruned 2:4" row repeating them
    assert [v["name"] for v in outcome.variants] == ["dense fp16 batch 1", "dense fp16 batch 8"]
    from prunekit.report import plan_words
    dense_report = {"method": "none", "pattern": "none", "sparsity": 0.0, "precision": "fp16"}
    assert plan_words(dense_report) == "dense (no pruning chosen), precision fp16"


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


def _tiny_folder(tmp_path, tokenizer, family="llama"):
    from conftest import make_tiny

    folder = tmp_path / f"tiny-{family}"
    make_tiny(family).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "eval.txt").write_text(CORPUS[::-1])
    return folder


def test_streamed_qdq_is_the_in_memory_qdq_and_rounds_only_the_projections(tmp_path, tokenizer, sparse_onnx):
    """The QDQ file a streamed deploy writes (activation ranges from torch block by block) is the one
    the in-memory deploy writes: the same int8 codes, the same scales, the same logits. Its pairs
    sit on the projections' inputs and weights only (one per distinct input: q/k/v, o, gate/up,
    down per block, and the head), the 2:4 pattern kept in the codes; ONNX Runtime's
    quantize_static, which also rounds every MatMul's output (the logits included), moves the
    logits further from the float model's."""
    import onnx

    from prunekit.checkpoint import save_checkpoint
    from prunekit.exporters.onnx import OnnxDecoder
    from prunekit.exporters.onnx_streamed import save_streamed, streamed_graph
    from prunekit.exporters.qdq_streamed import as_qdq, linear_input_ranges
    from prunekit.models import open_streamed
    from prunekit.targets.tensorrt_sparse import export_for_tensorrt

    path, ids, folder = sparse_onnx
    loaded = LoadedModel(make_tiny_llama(), tokenizer, "tiny")
    prune(loaded, "wanda", 0.5, "2:4", calib_ids=ids, progress=False)
    resident, fp32, _ = export_for_tensorrt(loaded.model, tmp_path / "resident", ids[0], True, list(ids[:4]))
    save_checkpoint(loaded.model, tokenizer, tmp_path / "pruned", {"prunekit_manifest": 1})
    opened = open_streamed(tmp_path / "pruned")
    graph = streamed_graph(opened.model, opened.weights, fused=False)
    as_qdq(graph, linear_input_ranges(opened.model, opened.weights, ids[:4]))
    streamed = save_streamed(graph, tmp_path / "streamed" / "model.onnx")

    ours, theirs = (onnx.load(str(p)).graph for p in (streamed, resident))
    assert [n.op_type for n in ours.node] == [n.op_type for n in theirs.node]
    ours_init, theirs_init = ({i.name: onnx.numpy_helper.to_array(i) for i in g.initializer} for g in (ours, theirs))
    assert ours_init.keys() == theirs_init.keys()
    for name, value in ours_init.items():
        np.testing.assert_allclose(value, theirs_init[name], rtol=1e-5, atol=0, err_msg=name)
    assert sum(n.op_type == "QuantizeLinear" for n in ours.node) == 2 * 4 + 1
    codes = gemm_weights(streamed)
    assert len(codes) == 15 and all(c.dtype == np.int8 for c in codes.values()) and nm_report(codes)["passed"]

    window = ids[5].numpy()[None].astype(np.int64)
    reference = quantize_int8(path, folder / "qdq-ort" / "model.onnx", "qdq", calibration=list(ids[:4]))
    logits = {name: runner.step(window, runner.empty_cache())[0]
              for name, runner in (("float", OnnxDecoder(fp32)), ("ours", OnnxDecoder(streamed)),
                                   ("resident", OnnxDecoder(resident)), ("ort", OnnxDecoder(reference)))}
    np.testing.assert_allclose(logits["ours"], logits["resident"], atol=1e-5)
    error = {name: float(np.abs(logits[name] - logits["float"]).max()) for name in ("ours", "ort")}
    assert error["ours"] < error["ort"], error


def test_cache_inputs_read_from_the_graph_match_the_session(sparse_onnx):
    from prunekit.exporters.onnx import OnnxDecoder
    from prunekit.exporters.tensorrt import cache_inputs

    path, _, _ = sparse_onnx
    runner = OnnxDecoder(path)
    names, dims = cache_inputs(path)
    assert names == runner.past_names
    assert dims == {i.name: (i.shape[1], i.shape[3]) for i in runner.session.get_inputs() if i.name in names}


def test_rounded_weights_stream_the_model_rounded_copy_holds(tmp_path, tokenizer):
    from prunekit.models import open_streamed
    from prunekit.pruning.blocks import StreamedLogits
    from prunekit.weight_rounding import rounded_copy
    from prunekit.weights import RoundedWeights

    folder = _tiny_folder(tmp_path, tokenizer, "qwen2")  # untied head, q/k/v biases
    opened = open_streamed(folder)
    ids = torch.arange(3, 30)[None]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    for precision in ("fp16", "int8"):
        streamed = StreamedLogits(opened.model, RoundedWeights(opened.weights, precision), [ids])
        with torch.no_grad():
            expected = rounded_copy(model, precision)(ids).logits[0, :-1]
        assert torch.allclose(streamed(ids[0]), expected, atol=1e-4), precision


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_streamed_tensorrt_deploy_ships_like_the_in_memory_one(tmp_path, tokenizer, precision):
    """--stream to a100-tensorrt-sparse: ADMM 2:4 pruned into a folder, the float ONNX and the INT8
    QDQ written a tensor at a time, the 2:4 check passing on both files, the same mask and nearly
    the same quality as the in-memory deploy (QDQ: activation ranges from torch, not ONNX Runtime)."""
    from prunekit.report import validate_report

    folder = _tiny_folder(tmp_path, tokenizer)
    calib = tmp_path / "calib.txt"
    calib.write_text(CORPUS * 4)
    reports = {}
    for mode in ("streamed", "resident"):
        out = tmp_path / mode
        code = deploy_main(["--target", "a100-tensorrt-sparse", "--model", str(folder), "--out", str(out),
                            "--calib", str(calib), "--calib-samples", "8", "--calib-seqlen", "16",
                            "--eval", str(tmp_path / "eval.txt"), "--eval-seqlen", "16", "--eval-windows", "2",
                            "--sparsity", "0.5", "--precision", precision, "--max-ppl-increase", "500", "--quiet",
                            *(["--stream"] if mode == "streamed" else [])])
        assert code == 0, mode
        reports[mode] = json.loads((out / "report.json").read_text())
    streamed, resident = reports["streamed"], reports["resident"]
    validate_report(streamed)
    assert streamed["resources"]["memory"]["streamed"] and streamed["mask_hash"] == resident["mask_hash"]
    checks = streamed["export"]["checks"]
    assert checks["onnx"]["passed"] and checks["shipped"]["streamed"]
    assert checks["nm_after_export"]["passed"] and checks["nm_after_export"]["checked"] == 14
    assert (precision == "int8") == ("nm_after_int8" in checks)
    assert precision == "fp16" or checks["nm_after_int8"]["passed"]
    assert [v["name"] for v in streamed["variants"]] == [v["name"] for v in resident["variants"]]
    for ours, theirs in zip(streamed["variants"], resident["variants"]):
        assert ours["bytes"] == theirs["bytes"] and ours["decode_ms"] == pytest.approx(theirs["decode_ms"])
    candidate = {r: {c["name"]: c for c in reports[r]["search"]["candidates"]} for r in reports}
    name = f"pruned 0.5 {precision}"
    tolerance = 1e-3 if precision == "fp16" else 2.0  # percent of perplexity
    assert candidate["streamed"][name]["ppl_increase"] == pytest.approx(
        candidate["resident"][name]["ppl_increase"], abs=tolerance)
    assert streamed["quality"][0]["perplexity"] == pytest.approx(resident["quality"][0]["perplexity"],
                                                                 rel=1e-4 if precision == "fp16" else 0.02)
    script = (tmp_path / "streamed" / "build_engine.sh").read_text()
    assert script == (tmp_path / "resident" / "build_engine.sh").read_text()
    assert not list(tmp_path.glob(".streamed.partial-*"))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_qdq_per_family_rounds_each_projection_input_once(family):
    """Every family's TensorRT INT8 file: one QuantizeLinear/DequantizeLinear pair per distinct
    projection input (q/k/v, o, gate/up, down per block, and the head) and per-channel int8 weights
    behind DequantizeLinear; its next tokens mostly the float file's."""
    import onnx

    from conftest import make_tiny
    from prunekit.exporters.onnx import OnnxDecoder
    from prunekit.targets.tensorrt_sparse import export_for_tensorrt

    model = make_tiny(family)
    ids = torch.randint(3, 300, (6, 24), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        qdq, fp32, check = export_for_tensorrt(model, Path(folder), ids[0], True, list(ids[:4]))
        assert check["passed"]
        graph = onnx.load(str(qdq), load_external_data=False).graph
        assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == 4 * model.config.num_hidden_layers + 1
        assert len(gemm_weights(qdq)) == 7 * model.config.num_hidden_layers + 1
        window = ids[5].numpy()[None].astype(np.int64)
        float_logits, int8_logits = (runner.step(window, runner.empty_cache())[0]
                                     for runner in (OnnxDecoder(fp32), OnnxDecoder(qdq)))
    assert (float_logits.argmax(-1) == int8_logits.argmax(-1)).mean() >= 0.75
