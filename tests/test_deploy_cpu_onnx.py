"""deploy --target cpu-onnx end to end on a tiny model folder (seconds, not minutes)."""

import json

import pytest
import torch

from prunekit.cli import deploy_main
from prunekit.errors import QualityGateFailed
from prunekit.exporters.onnx import OnnxDecoder, export_onnx, verify_export
from prunekit.pipeline import deploy
from prunekit.report import validate_report
from prunekit.search import LATENCY_RESOLUTION

from conftest import CORPUS, make_tiny_llama


@pytest.fixture()
def tiny_folder(tmp_path, tokenizer):
    folder = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "eval.txt").write_text(CORPUS[::-1])
    return folder


def _args(folder, out, *extra):
    return ["--target", "cpu-onnx", "--model", str(folder), "--out", str(out), "--calib-samples", "4",
            "--calib-seqlen", "16", "--eval", f"en={folder.parent / 'eval.txt'}", "--eval-seqlen", "16",
            "--eval-windows", "2", "--quiet", *extra]


def test_budgeted_deploy_ships_the_fastest_candidate_within_budget(tiny_folder, tmp_path):
    out = tmp_path / "out"
    assert deploy_main(_args(tiny_folder, out, "--max-ppl-increase", "50")) == 0
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    search = report["search"]
    assert search["budget"]["sources"] == {"max_ppl_increase": "flag --max-ppl-increase"}
    assert "held-out calibration samples" in search["selected_on"]
    built = [c for c in search["candidates"] if c["status"] == "built"]
    assert {(c["amount"], c["precision"]) for c in built} >= {(0.0, "fp32"), (0.0, "int8"), (0.0, "int4"),
                                                              (0.0, "int4-mixed")}
    assert all(c["decode_ms"] > 0 and c["prefill_ms"] > 0 and c["bytes"] > 0 and c["latency_basis"] == "measured"
               for c in built)
    fits = [c for c in built if c["within_budget"]]
    chosen = next(c for c in built if c["name"] == search["selection"]["chosen"])
    # the fastest within budget, or one within the host's latency spread of it that drifts less
    fastest = min(c["decode_ms"] for c in fits)
    tied = [c for c in fits if c["decode_ms"] <= fastest * (1 + LATENCY_RESOLUTION)]
    assert chosen["within_budget"] and chosen["kl"] == min(c["kl"] for c in tied)
    assert (report["sparsity"], report["precision"]) == (chosen["amount"], chosen["precision"])
    assert {q["quantizer"] for q in search["int4_quantizers"]} == {"rtn-symmetric", "activation-aware"}
    checks = report["export"]["checks"]
    for precision in ("int4", "int4-mixed"):  # one trace of the amount, written with prepared weights
        assert checks[f"export 0 {precision}"]["from"] == "the trace of export 0"
        assert checks[f"export 0 {precision}"]["passed"]
    # FASP at 0.1 keeps all 96 channels at a multiple of 32: that amount is skipped and says why
    assert any(c["status"] == "skipped" and "keeps all" in c["why"] for c in search["candidates"])
    assert report["export"]["status"] == "written" and report["export"]["checks"]["shipped"]["kv_cache_io"]
    assert report["latency"]["basis"] == "measured" and report["gate"]["status"] == "passed"
    assert report["quality"][0]["runtime"].startswith("onnxruntime")
    assert (out / "onnx" / "model.onnx").is_file() and (out / "model" / "prunekit.json").is_file()
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Candidates" in (out / "report.md").read_text()
    runner = OnnxDecoder(out / "onnx" / "model.onnx")
    assert any(n.startswith("past_key_values.0.") for n in runner.past_names)
    assert not list(tmp_path.glob(".out.partial-*"))


def test_no_flags_apply_the_profiles_budget():
    from prunekit.plan import Budget, make_plan
    from prunekit.profile import load_profile

    profile = load_profile("cpu-onnx")
    plan = make_plan(profile, budget=Budget.resolve(profile))
    assert plan.budget.limits == {"max_ppl_increase": 10.0}
    assert dict(plan.budget.sources) == {"max_ppl_increase": "profile cpu-onnx"}


def test_nothing_within_budget_ships_the_closest_and_exits_3(tiny_folder, tmp_path):
    out = tmp_path / "closest"
    assert deploy_main(_args(tiny_folder, out, "--sparsity", "0.5", "--max-latency-ms", "0.001")) == 3
    report = json.loads((out / "report.json").read_text())
    assert not report["search"]["selection"]["fits"]
    assert "no candidate is within budget" in report["search"]["selection"]["reason"]
    assert report["gate"]["status"] == "failed" and "decode" in report["gate"]["reason"]
    assert (out / "onnx" / "model.onnx").is_file() and (out / "report.md").is_file()


def test_existing_output_and_force(tiny_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert deploy_main(_args(tiny_folder, out, "--no-int8")) == 2
    assert (out / "mine.txt").read_text() == "keep me"
    assert deploy_main(_args(tiny_folder, out, "--no-int8", "--force")) == 0
    assert not (out / "mine.txt").exists() and (out / "report.json").exists()


def test_quality_gate_exits_3_and_still_writes(tiny_folder, tmp_path):
    out = tmp_path / "gated"
    assert deploy_main(_args(tiny_folder, out, "--no-int8", "--max-kl", "0", "--sparsity", "0.5")) == 3
    report = json.loads((out / "report.json").read_text())
    assert report["gate"]["status"] == "failed" and "KL" in report["gate"]["reason"]
    assert report["search"]["selection"]["reason"].startswith("the fixed plan")
    assert [c["name"] for c in report["search"]["candidates"]] == ["dense fp32", "pruned 0.5 fp32"]
    assert (out / "onnx" / "model.onnx").is_file()
    with pytest.raises(QualityGateFailed):
        deploy("cpu-onnx", model=str(tiny_folder), out=tmp_path / "g2", calib_samples=4, calib_seqlen=16,
               evals=[str(tiny_folder.parent / "eval.txt")], eval_seqlen=16, eval_windows=2, precision="fp32",
               max_kl=0.0, sparsity=0.5, quiet=True)


class _Shipped:
    def __init__(self, decode_ms):
        self.decode_ms, self.size_mb = decode_ms, 1.0


def test_quality_gate_rules():
    from prunekit.evaluation import Quality
    from prunekit.pipeline import quality_gate
    from prunekit.plan import Budget

    q = [Quality("en", "a", 1, 10, perplexity=12.0, dense_perplexity=10.0, kl=0.2, top1=0.9),
         Quality("sw", "b", 1, 10, perplexity=30.0, dense_perplexity=10.0, kl=0.9, top1=0.5)]
    assert quality_gate(q, Budget())["status"] == "not set"
    assert quality_gate(q[:1], Budget(25))["status"] == "passed"
    failed = quality_gate(q, Budget(25))
    assert quality_gate(q[:1], Budget(25, max_latency_ms=5), _Shipped(6.0))["reason"] == "decode 6 ms > 5 ms"
    assert failed["status"] == "failed" and "sw: perplexity +200.0% > 25%" == failed["reason"]
    assert quality_gate(q, Budget(max_kl=0.5))["reason"] == "sw: KL 0.9000 > 0.5"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_budget_refuses_values_that_would_switch_the_gate_off(bad):
    from prunekit.errors import UserInputError
    from prunekit.plan import Budget

    with pytest.raises(UserInputError, match="finite number >= 0"):
        Budget(max_ppl_increase=bad)
    with pytest.raises(UserInputError, match="finite number >= 0"):
        Budget(max_kl=bad)


def test_failed_run_leaves_nothing_behind(tiny_folder, tmp_path, monkeypatch):
    import prunekit.targets.cpu_onnx

    def broken(*a, **k):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(prunekit.targets.cpu_onnx, "require_verified", broken)
    assert deploy_main(_args(tiny_folder, tmp_path / "never")) == 1
    assert not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_export_matches_pytorch_and_generates_the_same_tokens(tmp_path):
    model = make_tiny_llama()
    path = export_onnx(model, tmp_path / "m" / "model.onnx")
    tokens = torch.randint(3, 300, (24,), generator=torch.Generator().manual_seed(2))
    checks = verify_export(path, model, tokens, new_tokens=10)
    assert checks["passed"] and checks["kv_cache_io"] and checks["greedy_tokens_identical"]
    assert checks["max_abs_logit_diff"] < 1e-4


def test_tolerance_check_catches_changed_math(tmp_path):
    model = make_tiny_llama()
    path = export_onnx(model, tmp_path / "m" / "model.onnx")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # PyTorch now differs from the file
    checks = verify_export(path, model, torch.randint(3, 300, (16,)))
    assert not checks["logits_within_tolerance"] and not checks["passed"]


def test_export_command_turns_a_folder_into_onnx(tiny_folder, tmp_path, capsys):
    from prunekit.cli import main

    out = tmp_path / "exported"
    assert main(["export", "--target", "cpu-onnx", "--model", str(tiny_folder), "--out", str(out),
                 "--no-int8"]) == 0
    assert (out / "onnx" / "model.onnx").is_file()
    assert "written" in capsys.readouterr().out
    assert main(["export", "--target", "cpu-onnx", "--model", str(tmp_path / "nope"), "--out", str(out)]) == 2


def test_eval_command_reports_each_language(tiny_folder, tmp_path, capsys):
    from prunekit.cli import main

    (tmp_path / "sw.txt").write_text("zq xv kj wq pz vv qq jj kk zz " * 40)
    assert main(["eval", "--model", str(tiny_folder), "--dense", str(tiny_folder), "--eval",
                 f"en={tiny_folder.parent / 'eval.txt'}", "--eval", f"sw={tmp_path / 'sw.txt'}",
                 "--eval-seqlen", "16", "--eval-windows", "2", "--json", "--quiet"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["language"] for r in results] == ["en", "sw"]
    assert all(r["kl"] == pytest.approx(0, abs=1e-6) and r["top1"] == 1.0 for r in results)


@pytest.mark.parametrize("fused", [True, False])
def test_pruned_shapes_export_in_both_graph_styles(tokenizer, calib_ids, tmp_path, fused):
    """Narrower value heads and MLP (FASP) through the fused opset-23 graph and the plain one."""
    import onnx

    from prunekit.models import LoadedModel
    from prunekit.pruning.run import prune

    loaded = LoadedModel(make_tiny_llama(), tokenizer, "tiny")
    model = prune(loaded, "fasp", 0.5, "structured", calib_ids=calib_ids, progress=False,
                  channel_multiple=8, value_multiple=2).model
    assert model.model.layers[0].self_attn.v_head_dim < model.config.head_dim
    path = export_onnx(model, tmp_path / "m" / "model.onnx", fused=fused)
    checks = verify_export(path, model, calib_ids[0], new_tokens=6)
    assert checks["passed"], checks
    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert ({"Attention", "RMSNormalization"} <= ops) == fused


def test_streamed_deploy_judges_and_ships_like_the_in_memory_one(tiny_folder, tmp_path):
    """--stream: one decoder block in memory, every artifact written a tensor at a time and judged
    in ONNX Runtime processes of their own. The dense candidates are the same files' quality as the
    in-memory deploy's (same weights, same quantizer), the shipped model folder reloads, and the
    report says it was streamed."""
    calib = tmp_path / "calib.txt"
    calib.write_text(CORPUS * 4)
    extra = ("--calib", str(calib), "--max-ppl-increase", "50", "--precision", "int8", "--sparsity", "0.5")
    assert deploy_main(_args(tiny_folder, tmp_path / "streamed", "--stream", *extra)) == 0
    assert deploy_main(_args(tiny_folder, tmp_path / "resident", *extra)) == 0
    streamed, resident = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("streamed", "resident"))
    validate_report(streamed)
    assert streamed["resources"]["memory"]["streamed"] and not resident["resources"]["memory"]["streamed"]
    assert streamed["mask_hash"] == resident["mask_hash"]
    by_name = {name: {c["name"]: c for c in report["search"]["candidates"]} for name, report in
               (("streamed", streamed), ("resident", resident))}
    for name, candidate in by_name["streamed"].items():
        assert candidate["status"] == "built"
        assert candidate["ppl_increase"] == pytest.approx(by_name["resident"][name]["ppl_increase"], abs=1e-3)
    checks = streamed["export"]["checks"]
    assert checks["export 0"]["passed"] and checks["export 0.5"]["passed"] and checks["shipped"]["streamed"]
    assert streamed["quality"][0]["runtime"].startswith("onnxruntime")
    for key in ("perplexity", "dense_perplexity", "kl", "top1"):
        assert streamed["quality"][0][key] == pytest.approx(resident["quality"][0][key], rel=1e-4, abs=1e-6)
    assert streamed["quality_pruned_torch"][0]["perplexity"] == pytest.approx(
        resident["quality_pruned_torch"][0]["perplexity"], rel=1e-4)
    assert streamed["parameters"] == resident["parameters"]
    assert "Streamed, one decoder block in memory" in (tmp_path / "streamed" / "report.md").read_text()
    from prunekit.models import load_model

    shipped = load_model(str(tmp_path / "streamed" / "model")).model
    assert sum(p.numel() for p in shipped.parameters()) == streamed["parameters"]["after"]
    assert not list(tmp_path.glob(".streamed.partial-*"))


def test_streamed_deploy_refusals_come_before_any_work(tiny_folder, tmp_path, capsys):
    args = _args(tiny_folder, tmp_path / "b", "--stream", "--calib", "pydoc")
    args[1] = "coreml-iphone13"
    assert deploy_main(args) == 2
    assert "deploy streamed only to cpu-onnx" in capsys.readouterr().err
    assert deploy_main(_args(tiny_folder, tmp_path / "c", "--stream", "--calib", "pydoc", "--max-memory", "100MB")) == 2
    assert "raise --max-memory" in capsys.readouterr().err
    assert deploy_main(_args(tiny_folder, tmp_path / "c", "--stream", "--calib", "pydoc", "--int8-flavour", "qdq")) == 2
    assert "--int8-flavour qdq quantizes a whole model" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_streamed_deploy_without_calib_lets_the_model_write_its_text(tiny_folder, tmp_path):
    """No --calib, streamed: the model is read whole in bfloat16 for the text it writes, then freed;
    the same seed writes the same text (same mask hash twice), and the report says self."""
    extra = ("--stream", "--max-ppl-increase", "50", "--precision", "int8", "--sparsity", "0.5")
    hashes = []
    for name in ("a", "b"):
        assert deploy_main(_args(tiny_folder, tmp_path / name, *extra)) == 0
        report = json.loads((tmp_path / name / "report.json").read_text())
        validate_report(report)
        assert report["calibration"]["source"] == "self" and report["resources"]["memory"]["streamed"]
        assert report["resources"]["memory"]["self_calibration_estimate_gb"] > 0
        hashes.append(report["mask_hash"])
    assert hashes[0] == hashes[1]


def test_latency_groups_hold_at_most_the_limit(tmp_path):
    from prunekit.targets.cpu_onnx_streamed import latency_groups, session_bytes

    paths = []
    for name, size in (("fp32", 7_000), ("int8", 2_500), ("int4", 1_500), ("big", 9_000)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"x" * 10)
        (tmp_path / name / "model.onnx.data").write_bytes(b"x" * size)
        paths.append(tmp_path / name / "model.onnx")
    overhead = session_bytes(paths[0]) - 7_010
    limit = 2 * overhead + 7_010  # fp32 alone, or int8 and int4 together
    assert latency_groups(paths, limit) == [[0], [1, 2], [3]]  # 'big' is over the limit: alone
    assert latency_groups(paths, 10**12) == [[0, 1, 2, 3]]


def test_streamed_deploy_of_the_dense_model_copies_it_block_by_block(tiny_folder, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(CORPUS * 4)
    out = tmp_path / "dense"
    assert deploy_main(_args(tiny_folder, out, "--stream", "--calib", str(calib), "--sparsity", "0",
                             "--precision", "int8")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["search"]["selection"]["chosen"] == "dense int8" and report["quality_pruned_torch"] == []
    from prunekit.models import load_model

    original, copied = load_model(str(tiny_folder)).model, load_model(str(out / "model")).model
    ids = torch.arange(3, 19)[None]
    assert torch.equal(original(ids).logits, copied(ids).logits)
