import pytest

from prunekit.errors import UserInputError
from prunekit.profile import builtin_profile_names, load_profile

GOOD = """
name = "my-board"
[runtime]
name = "onnxruntime"
artifact = "onnx"
latency_basis = "measured"
[device]
name = "board"
sparse_tensor_cores = false
peak_tflops = { fp32 = 1.0, fp16 = 2.0, int8 = 4.0 }
memory_bandwidth_gbs = 10
memory_gb = 4
preferred_channel_multiple = 16
[defaults]
method = "fasp"
pattern = "structured"
sparsity = 0.25
precision = "fp32"
"""


def test_builtin_profiles_load():
    assert builtin_profile_names() == ["a100-tensorrt-sparse", "coreml-iphone13", "cpu-onnx",
                                       "h100-tensorrt-sparse"]
    for name in builtin_profile_names():
        profile = load_profile(name)
        assert profile.name == name
        assert profile.memory_bandwidth_gbs > 0 and profile.preferred_channel_multiple > 0
        assert set(profile.peak_tflops) == {"fp32", "fp16", "int8"}


def test_sparse_profiles_have_sparse_rates():
    for name in ("a100-tensorrt-sparse", "h100-tensorrt-sparse"):
        profile = load_profile(name)
        assert profile.sparse_tensor_cores
        assert profile.sparse_peak_tflops["fp16"] == 2 * profile.peak_tflops["fp16"]


def test_user_profile_file(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(GOOD)
    profile = load_profile(str(path))
    assert profile.name == "my-board" and profile.default_sparsity == 0.25
    assert profile.default_calib == "self"


@pytest.mark.parametrize("old,new,message", [
    ('name = "onnxruntime"', 'name = "tflite"', "runtime.name' is 'tflite'; allowed values: onnxruntime, coreml, tensorrt"),
    ('sparsity = 0.25', 'sparsity = 1.5', "defaults.sparsity' is 1.5; must be in [0, 1)"),
    ('method = "fasp"', 'method = "obs"', "defaults.method' is 'obs'; allowed values: fasp, wanda"),
    ('pattern = "structured"', 'pattern = "4:2"', "defaults.pattern' is '4:2'"),
    ('memory_gb = 4', 'memory_gb = 4\nmemory_gib = 4', "device.memory_gib' is not a known key"),
    ('memory_gb = 4', 'memory_gb = "four"', "device.memory_gb' must be a float"),
    ('peak_tflops = { fp32 = 1.0, fp16 = 2.0, int8 = 4.0 }', 'peak_tflops = { fp32 = 1.0 }', "device.peak_tflops.fp16' is missing"),
    ('sparse_tensor_cores = false', 'sparse_tensor_cores = true', "sparse_peak_tflops' is missing"),
    ('artifact = "onnx"', 'artifact = "mlpackage"', "runtime.artifact' is 'mlpackage'; allowed values: onnx"),
])
def test_broken_profiles_name_the_key(tmp_path, old, new, message):
    path = tmp_path / "bad.toml"
    assert old in GOOD
    path.write_text(GOOD.replace(old, new))
    with pytest.raises(UserInputError) as info:
        load_profile(str(path))
    assert message in str(info.value)


def test_invalid_toml_and_missing_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("name = [unclosed")
    with pytest.raises(UserInputError, match="not valid TOML"):
        load_profile(str(path))
    with pytest.raises(UserInputError, match="does not exist"):
        load_profile(str(tmp_path / "nope.toml"))


def test_unknown_target_lists_valid_ones():
    with pytest.raises(UserInputError) as info:
        load_profile("nonsense")
    assert "cpu-onnx" in str(info.value) and "coreml-iphone13" in str(info.value)
