import json
import subprocess
import sys

import pytest

from prunekit.cli import deploy_main, main


def run(*args):
    return subprocess.run([sys.executable, "-m", "prunekit", *args], capture_output=True, text=True)


def test_unknown_target_exits_2_with_one_line_listing_targets(capsys):
    assert deploy_main(["--target", "nonsense"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "cpu-onnx" in err[0] and "coreml-iphone13" in err[0] and "a100-tensorrt-sparse" in err[0]


def test_usage_errors_exit_2():
    proc = run("deploy", "--target", "cpu-onnx", "--sparsity", "1.5")
    assert proc.returncode == 2 and "out of range" in proc.stderr
    assert run("frobnicate").returncode == 2


def test_every_command_has_help_with_examples():
    for command in ([], ["deploy"], ["plan"], ["prune"], ["eval"], ["export"], ["profiles"]):
        proc = run(*command, "--help")
        assert proc.returncode == 0, command
        assert "examples:" in proc.stdout, command


def test_plan_json(capsys):
    assert main(["plan", "--target", "a100-tensorrt-sparse", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["method"] == "admm" and plan["pattern"] == "2:4" and plan["latency_basis"] == "estimated"


def test_plan_override_warns(capsys):
    assert main(["plan", "--target", "cpu-onnx", "--pattern", "2:4"]) == 0
    assert "no sparse tensor cores" in capsys.readouterr().err


def test_profiles_list_and_show(capsys):
    assert main(["profiles", "list"]) == 0
    assert "coreml-iphone13" in capsys.readouterr().out
    assert main(["profiles", "show", "cpu-onnx", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runtime"] == "onnxruntime"
    assert main(["profiles", "show", "nope"]) == 2


def test_bad_pattern_and_missing_model_exit_2(capsys, tmp_path):
    assert main(["plan", "--target", "cpu-onnx", "--pattern", "3:2"]) == 2
    assert main(["prune", "--method", "wanda", "--model", str(tmp_path / "none"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert deploy_main(["--target", "cpu-onnx", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"


def test_unexpected_failure_exits_1(monkeypatch, capsys):
    import prunekit.pipeline

    def boom(*a, **k):
        raise RuntimeError("kaput")

    monkeypatch.setattr(prunekit.pipeline, "deploy", boom)
    assert deploy_main(["--target", "cpu-onnx"]) == 1
    assert "unexpected failure: RuntimeError: kaput" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--calib-samples", "--calib-seqlen"])
def test_nonpositive_counts_rejected(flag):
    assert run("deploy", "--target", "cpu-onnx", flag, "0").returncode == 2
