import pytest

from prunekit.errors import UserInputError
from prunekit.pattern import Pattern
from prunekit.plan import make_plan
from prunekit.profile import load_profile


@pytest.mark.parametrize("target,method,pattern,sparsity,precision,basis", [
    ("cpu-onnx", "fasp", "structured", 0.3, "int8", "measured"),
    ("coreml-iphone13", "fasp", "structured", 0.35, "int8", "estimated"),
    ("a100-tensorrt-sparse", "admm", "2:4", 0.5, "fp16", "estimated"),
    ("h100-tensorrt-sparse", "admm", "2:4", 0.5, "fp16", "estimated"),
])
def test_default_plans(target, method, pattern, sparsity, precision, basis):
    plan = make_plan(load_profile(target))
    assert (plan.method, str(plan.pattern), plan.sparsity, plan.precision, plan.latency_basis) == (
        method, pattern, sparsity, precision, basis)
    assert plan.warnings == []
    assert any("sparse tensor cores" in r for r in plan.reasons)


def test_nm_override_on_cpu_warns_and_switches_to_wanda():
    plan = make_plan(load_profile("cpu-onnx"), pattern="2:4")
    assert plan.method == "wanda" and plan.sparsity == 0.5
    assert len(plan.warnings) == 1 and "no sparse tensor cores" in plan.warnings[0]


def test_unstructured_override_on_phone_warns():
    plan = make_plan(load_profile("coreml-iphone13"), method="wanda")
    assert str(plan.pattern) == "unstructured"
    assert "will not run faster" in plan.warnings[0]


def test_gpu_overrides():
    a100 = load_profile("a100-tensorrt-sparse")
    assert "only the 2:4 pattern" in make_plan(a100, pattern="4:8").warnings[0]
    fasp = make_plan(a100, method="fasp", sparsity=0.2)
    assert fasp.pattern.structured and fasp.sparsity == 0.2 and fasp.warnings == []
    assert make_plan(a100, precision="int8").precision == "int8"
    assert make_plan(load_profile("cpu-onnx"), precision="fp32").precision == "fp32"
    assert make_plan(load_profile("coreml-iphone13"), precision="palette4").precision == "palette4"


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "fasp", "pattern": "2:4"}, "removes whole channels"),
    ({"method": "wanda", "pattern": "structured"}, "zeroes single weights"),
    ({"pattern": "2:4", "sparsity": 0.3}, "fixes the sparsity at 0.5"),
    ({"sparsity": 1.0}, "out of range"),
    ({"sparsity": -0.1}, "out of range"),
    ({"pattern": "4:2"}, "N < M"),
    ({"pattern": "two:four"}, "not valid"),
    ({"method": "obs"}, "unknown method"),
])
def test_bad_overrides(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        make_plan(load_profile("cpu-onnx"), **kwargs)


def test_parse_pattern():
    assert Pattern.parse("2:4").n_m == (2, 4) and Pattern.parse("4:8").n_m == (4, 8)
    assert Pattern.parse("unstructured") == Pattern("unstructured")
    assert str(Pattern.parse("02:04")) == "2:4" and Pattern.parse("02:04") == Pattern.parse("2:4")
    with pytest.raises(UserInputError, match="not valid"):
        Pattern.parse("")


def test_padded_2_4_is_the_2_4_pattern_on_a_gpu_profile():
    plan = make_plan(load_profile("a100-tensorrt-sparse"), pattern="02:04")
    assert str(plan.pattern) == "2:4" and plan.warnings == []


def test_plan_for_folder_follows_the_manifest():
    from prunekit.plan import plan_for_folder

    cpu, a100 = load_profile("cpu-onnx"), load_profile("a100-tensorrt-sparse")
    w24 = {"method": "wanda", "pattern": "2:4", "sparsity": 0.5}
    plan = plan_for_folder(a100, w24, "int8")
    assert (plan.method, str(plan.pattern), plan.precision) == ("wanda", "2:4", "int8")
    assert "make nothing faster" in plan_for_folder(cpu, w24).warnings[0]
    assert plan_for_folder(cpu, {"method": "fasp", "pattern": "structured", "sparsity": 0.3}).warnings == []
    for manifest, what in [(None, "unpruned"), ({"method": "wanda", "pattern": "4:8", "sparsity": 0.5}, "wanda 4:8")]:
        with pytest.raises(UserInputError, match=f"runs 2:4 sparse weights, but this folder is {what}"):
            plan_for_folder(a100, manifest)
    with pytest.raises(UserInputError, match="bad field"):
        plan_for_folder(cpu, {"method": "fasp"})
