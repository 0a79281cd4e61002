"""coreml-iphone13: package inspection, the estimate's arithmetic, the Linux prediction skip."""

import builtins
import platform

import pytest
import torch

from prunekit.errors import MissingExtraError
from prunekit.estimate import ModelCost, estimate_latency, model_cost, roofline
from prunekit.exporters.decoder import StatefulDecoder
from prunekit.exporters.coreml import (check_package, convert_coreml, inspect_package, predict_check,
                                       quantize_int8, reference_check)

from conftest import make_tiny_llama


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coreml")
    model = make_tiny_llama()
    fp16 = convert_coreml(model, max_length=64)
    fp16.save(str(folder / "fp16.mlpackage"))
    quantize_int8(fp16).save(str(folder / "int8.mlpackage"))
    return model, folder


def test_package_spec(packages):
    model, folder = packages
    info = inspect_package(folder / "int8.mlpackage")
    assert info["specification_version"] == 9  # iOS 18
    assert info["inputs"]["input_ids"]["dtype"] == "INT32"
    assert info["inputs"]["input_ids"]["ranges"] == [(1, 1), (1, 63)]
    assert info["inputs"]["causal_mask"]["ranges"][2:] == [(1, 63), (1, 63)]
    assert set(info["outputs"]) == {"logits"}
    assert len(info["states"]) == 4 and info["states"]["key_cache_0"]["shape"] == [1, 3, 64, 8]
    assert info["int8_weight_tensors"] >= 8  # weights under 2048 values stay fp16
    assert check_package(info, expected_states=4, int8=True)["passed"]
    fp16 = inspect_package(folder / "fp16.mlpackage")
    assert fp16["int8_weight_tensors"] == 0 and check_package(fp16, 4, int8=False)["passed"]
    assert not check_package(fp16, 4, int8=True)["passed"]


@pytest.mark.parametrize("precision,ops", [("int4", "quantized_weight_tensors"),
                                           ("palette4", "palettized_weight_tensors")])
def test_four_bit_packages_pass_the_package_checks(packages, precision, ops):
    from prunekit.exporters.coreml import quantize_weights
    from prunekit.weight_rounding import round_tensor

    model, folder = packages
    path = folder / f"{precision}.mlpackage"
    quantize_weights(convert_coreml(model, max_length=64), precision).save(str(path))
    info = inspect_package(path)
    assert info[ops] >= 1  # tiny model: int4 needs whole blocks of 32 inputs, palette4 10,000 values
    assert check_package(info, 4, precision=precision)["passed"]
    assert not check_package(info, 4, precision="fp16")["passed"]
    # the torch emulation of the package's weights keeps at most 16 values per group of 32 rows
    # (palette) or 15 levels per block of 32 (int4)
    weight = model.model.embed_tokens.weight if precision == "palette4" else model.model.layers[0].mlp.down_proj.weight
    rounded = round_tensor(weight, precision)
    if precision == "palette4":
        assert all(group.unique().numel() <= 16 for group in rounded.reshape(-1, 32, rounded.shape[1]))
        assert rounded.unique().numel() > 16  # one palette per group, not per tensor
    else:
        assert all(block.unique().numel() <= 15 for block in rounded.reshape(-1, 32))


def test_reference_check_compares_the_converted_source(packages):
    model, _ = packages
    tokens = torch.randint(3, 300, (24,), generator=torch.Generator().manual_seed(0))
    checks = reference_check(model, tokens, 64)
    assert checks["passed"], checks
    assert checks["through_cache"] == 12 and checks["max_abs_logit_diff"] > 0  # fp16 cache: not bit-exact


class _DecodePositionOffByOne(StatefulDecoder):
    def decode(self, input_ids, past_len, mask, update_cache):
        return super().decode(input_ids, past_len - 1 if input_ids.shape[1] == 1 else past_len, mask, update_cache)


class _CacheSlotOffByOne(StatefulDecoder):
    def forward(self, input_ids, mask):
        end = mask.shape[-1]
        past_len = end - input_ids.shape[1]

        def update(i, k, v):
            key, value = getattr(self, f"key_cache_{i}"), getattr(self, f"value_cache_{i}")
            key[:, :, past_len + 1:end + 1] = k.to(key.dtype)
            value[:, :, past_len + 1:end + 1] = v.to(value.dtype)
            return key[:, :, :end].to(k.dtype), value[:, :, :end].to(v.dtype)

        return self.decode(input_ids, past_len, mask, update)


@pytest.mark.parametrize("bug", ["no causal mask", "decode position", "cache slot"])
def test_reference_check_catches_a_broken_wrapper(monkeypatch, bug):
    import prunekit.exporters.coreml as coreml

    model = make_tiny_llama()
    tokens = torch.randint(3, 300, (24,), generator=torch.Generator().manual_seed(0))
    if bug == "no causal mask":
        monkeypatch.setattr(coreml, "causal_mask", lambda seq, past, dtype: torch.zeros(seq, past + seq, dtype=dtype))
    else:
        monkeypatch.setattr(coreml, "StatefulDecoder",
                            _DecodePositionOffByOne if bug == "decode position" else _CacheSlotOffByOne)
    checks = reference_check(model, tokens, 64)
    assert not checks["passed"], checks


@pytest.mark.skipif(platform.system() == "Darwin", reason="on macOS the prediction runs")
def test_prediction_is_skipped_clearly_on_linux(packages):
    model, folder = packages
    result = predict_check(folder / "int8.mlpackage", model, torch.randint(3, 300, (8,)))
    assert result["status"] == "skipped" and "only on macOS" in result["reason"]


def test_roofline_by_hand():
    # 2 GFLOP on 1 TFLOP/s = 2 ms compute; 100 MB at 50 GB/s = 2 ms memory -> ties go to compute
    r = roofline(2e9, 100e6, 1.0, 50.0)
    assert r["compute_ms"] == pytest.approx(2.0) and r["memory_ms"] == pytest.approx(2.0)
    assert r["ms"] == pytest.approx(2.0)


def test_estimate_by_hand():
    cost = ModelCost(linear_flops_per_token=2e8, attention_flops_per_context_token=1e4, kv_values_per_token=1000)
    est = estimate_latency(cost, weight_bytes=100_000_000, peak_tflops=10.0, bandwidth_gbs=50.0,
                           prompt_tokens=100, decode_context=200)
    # decode: bytes = 1e8 + 200 * 1000 * 2 = 100.4 MB -> 2.008 ms; FLOPs 2e8 + 2e6 -> 0.0202 ms
    assert est["decode"]["bound"] == "memory" and est["decode_ms"] == pytest.approx(2.008)
    # prefill: FLOPs = 100 * (2e8 + 1e4 * 50.5) = 2.00505e10 -> 2.00505 ms; bytes 100.2 MB -> 2.004 ms
    assert est["prefill"]["bound"] == "compute" and est["prefill_ms"] == pytest.approx(2.00505)
    sparse = estimate_latency(cost, 100_000_000, 10.0, 50.0, 100, 200, gemm_speedup=2.0)
    assert sparse["prefill"]["bound"] == "memory" and sparse["decode_ms"] == pytest.approx(2.008)


def test_model_cost_counts_pruned_shapes():
    model = make_tiny_llama()
    cost = model_cost(model)
    linear = 2 * 2 * (72 * 72 + 2 * 72 * 24 + 72 * 72 + 3 * 72 * 96) + 2 * 320 * 72
    assert cost.linear_flops_per_token == linear
    assert cost.kv_values_per_token == 2 * 3 * (8 + 8)


def test_missing_coremltools_names_the_extra(monkeypatch):
    import prunekit.exporters.coreml as coreml

    real_import = builtins.__import__

    def no_coremltools(name, *args, **kwargs):
        if name.startswith("coremltools"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_coremltools)
    with pytest.raises(MissingExtraError) as info:
        coreml._coremltools()
    assert "pip install 'prunekit[coreml]'" in str(info.value)


def test_palette_lut_is_coremltools_kmeans1d():
    import numpy as np
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    from prunekit.weight_rounding import palette_lut

    values = (np.random.default_rng(0).standard_normal((32, 400)) ** 3).astype(np.float16)  # 12,800 values
    lut, indices = palette_lut(values)
    reference_lut, reference_indices = _get_kmeans_lookup_table_and_weight(4, values, force_kmeans1d=True)
    assert np.array_equal(lut, reference_lut.astype(np.float16))
    assert np.array_equal(indices, np.asarray(reference_indices).reshape(-1))


def test_deploy_judges_a_package_it_cannot_run_on_the_weights_it_ships():
    """Core ML predicts only on macOS: the shipped quality (what the gate judges) is torch on the
    INT8 weights the package holds, not on the float model."""
    import copy

    from prunekit.evaluation import EvalText, measure_quality
    from prunekit.pipeline import Evaluation, _quality, quality_gate
    from prunekit.plan import Budget
    from prunekit.targets import ExportOutcome
    from prunekit.weight_rounding import rounded_copy

    dense = make_tiny_llama()
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    windows = [torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(1))]
    evaluation = Evaluation((EvalText("default", "x"),), 16, 2)
    shipped, torch_rows = _quality(pruned, dense, ExportOutcome("written"), evaluation, windows, True, "int8")
    assert shipped[0].runtime.startswith("torch, on the int8 weights")
    assert shipped[0].perplexity == pytest.approx(measure_quality(rounded_copy(pruned, "int8"), windows[0]).perplexity)
    assert torch_rows[0].perplexity != shipped[0].perplexity
    assert quality_gate(shipped, Budget(max_ppl_increase=1000))["judged"] == "shipped weights in torch"
    shipped, torch_rows = _quality(dense, dense, ExportOutcome("written"), evaluation, windows, True, "int8")
    assert torch_rows == [] and shipped[0].kl > 0  # the dense model shipped in INT8: only the INT8 row
