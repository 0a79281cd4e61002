"""Every supported family (tiny random-weight configs from conftest) through the export decoder,
every method with save and reload, and every target's export and check."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from prunekit.arch import architecture_for
from prunekit.checkpoint import save_checkpoint
from prunekit.exporters.decoder import FlatCacheDecoder
from prunekit.models import LoadedModel, load_model
from prunekit.pruning.run import prune

from conftest import FAMILIES, WINDOW, make_tiny

PROMPT = 2 * WINDOW + 4  # longer than the sliding window


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed))


def _through_cache(decoder: FlatCacheDecoder, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    out = decoder(ids[None, :prefill], *decoder.empty_cache())
    steps, past = [out[0]], out[1:]
    for t in range(prefill, ids.numel()):
        out = decoder(ids[None, t:t + 1], *past)
        steps.append(out[0])
        past = out[1:]
    return torch.cat(steps, 1)[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fused", [False, True])
def test_export_decoder_matches_transformers_through_the_cache(family, fused):
    model = make_tiny(family)
    ids = _ids(PROMPT)
    with torch.no_grad():
        reference = model(ids[None]).logits[0]
        got = _through_cache(FlatCacheDecoder(model, fused=fused), ids, prefill=WINDOW // 2)
    assert torch.allclose(got, reference, atol=1e-5), float((got - reference).abs().max())


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_windows_are_exported_as_windows(family):
    """The decoder without its windows gives other logits past the window: the check can fail."""
    model = make_tiny(family)
    ids = _ids(PROMPT)
    decoder = FlatCacheDecoder(model)
    decoder.windows = [None] * len(decoder.windows)
    with torch.no_grad():
        reference = model(ids[None]).logits[0]
        got = _through_cache(decoder, ids, prefill=4)
    assert torch.allclose(got[:WINDOW], reference[:WINDOW], atol=1e-5)
    assert not torch.allclose(got[WINDOW:], reference[WINDOW:], atol=1e-3)


METHODS = [
    ("wanda", "unstructured", 0.5, {}),
    ("wanda", "2:4", 0.5, {}),
    ("wanda", "4:8", 0.5, {}),
    ("sparsegpt", "unstructured", 0.5, {}),
    ("admm", "unstructured", 0.5, {}),
    ("admm", "2:4", 0.5, {"permute": True}),
    ("magnitude", "unstructured", 0.5, {}),
    ("fasp", "structured", 0.3, {"granularity": "channels", "channel_multiple": 8, "value_multiple": 2}),
    ("fasp", "structured", 0.5, {"granularity": "heads", "channel_multiple": 8}),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,pattern,sparsity,options", METHODS,
                         ids=[f"{m}-{p}-{o.get('granularity', '')}{'perm' if o.get('permute') else ''}".rstrip("-")
                              for m, p, _, o in METHODS])
def test_every_method_prunes_saves_and_reloads(family, method, pattern, sparsity, options, tokenizer,
                                               calib_ids, tmp_path):
    loaded = LoadedModel(make_tiny(family), tokenizer, f"tiny-{family}")
    before = loaded.num_parameters()
    result = prune(loaded, method, sparsity, pattern, calib_ids=calib_ids, progress=False, **options)
    model = result.model
    if method == "fasp":
        assert result.parameters_after < before
    else:
        assert 0.45 <= result.check["overall_sparsity"] <= 0.55
        assert result.check["nm_ok"] is (None if pattern == "unstructured" else True)
    probe = calib_ids[:2]
    save_checkpoint(model, tokenizer, tmp_path / "m", result.manifest(f"tiny-{family}"))
    with torch.no_grad():
        logits = model(probe).logits
        assert torch.equal(load_model(str(tmp_path / "m")).model(probe).logits, logits)
        if "structure" not in result.details:  # a stock config describes it: plain transformers reloads it
            plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
            assert torch.equal(plain(probe).logits, logits)


def _int8_emulated(model):
    """The model with every projection on ONNX Runtime's symmetric 8-bit grid per block of 32
    inputs (MatMulNBits, bits 8; the signed peak maps to -128; a last partial block is padded
    with zeros): what the INT8 export holds, in torch."""
    import copy

    out = copy.deepcopy(model)
    head = out.get_submodule(architecture_for(out.config).head)
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    with torch.no_grad():
        for module in out.modules():
            if isinstance(module, torch.nn.Linear):
                rows, cols = module.weight.shape
                w = torch.nn.functional.pad(module.weight, (0, -cols % 32)).reshape(rows, -1, 32)
                peak = torch.gather(w, -1, w.abs().argmax(-1, keepdim=True))
                scale = torch.where(peak == 0, torch.ones_like(peak), peak / -128)
                module.weight.copy_(((w / scale).round().clamp(-128, 127) * scale).reshape(rows, -1)[:, :cols])
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_onnx_export_fp32_and_int8_verified_through_the_cache(family, tokenizer, calib_ids, tmp_path):
    from prunekit.exporters.onnx import export_onnx, quantize_int8, verify_export
    from prunekit.exporters.ort_session import OnnxDecoder

    loaded = LoadedModel(make_tiny(family), tokenizer, family)
    model = prune(loaded, "fasp", 0.3, "structured", calib_ids=calib_ids, progress=False,
                  channel_multiple=8, value_multiple=2).model
    fp32 = export_onnx(model, tmp_path / "fp32" / "model.onnx")
    probe = _ids(PROMPT)
    checks = verify_export(fp32, model, probe, new_tokens=PROMPT - 8)
    assert checks["passed"] and checks["kv_cache_io"], checks
    # the INT8 graph with float activations (accuracy level 0) against torch on the same 8-bit
    # weight grid: as tight as fp32, through the cache, greedy tokens included
    exact = quantize_int8(fp32, tmp_path / "int8-float-act" / "model.onnx", accuracy_level=0)
    checks = verify_export(exact, _int8_emulated(model), probe, new_tokens=PROMPT - 8)
    assert checks["passed"], checks
    # the shipped kernel (int8 activations) through its own cache: the logits of one pass
    runner = OnnxDecoder(quantize_int8(fp32, tmp_path / "int8" / "model.onnx"))
    full, _ = runner.step(probe.numpy()[None], runner.empty_cache())
    logits, past = runner.step(probe.numpy()[None, :8], runner.empty_cache())
    steps = [logits]
    for t in range(8, PROMPT):
        logits, past = runner.step(probe.numpy()[None, t:t + 1], past)
        steps.append(logits)
    assert np.abs(np.concatenate(steps, 1) - full).max() < 0.02 * full.std()


@pytest.mark.parametrize("family", FAMILIES)
def test_coreml_package_per_family(family, tokenizer, calib_ids):
    from prunekit.exporters.coreml import check_package, convert_coreml, inspect_package, quantize_int8, reference_check

    loaded = LoadedModel(make_tiny(family), tokenizer, family)
    model = prune(loaded, "fasp", 0.3, "structured", calib_ids=calib_ids, progress=False,
                  channel_multiple=8, value_multiple=2).model
    package = quantize_int8(convert_coreml(model, max_length=64))
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/m.mlpackage"
        package.save(path)
        info = inspect_package(path)
    assert check_package(info, 2 * model.config.num_hidden_layers, int8=True)["passed"]
    checks = reference_check(model, _ids(PROMPT), max_length=64)
    assert checks["passed"], checks


@pytest.mark.parametrize("family", FAMILIES)
def test_tensorrt_onnx_keeps_two_four_per_family(family, tokenizer, calib_ids, tmp_path):
    from prunekit.exporters.onnx import export_onnx
    from prunekit.exporters.onnx_sparsity import gemm_weights, nm_report

    loaded = LoadedModel(make_tiny(family), tokenizer, family)
    prune(loaded, "wanda", 0.5, "2:4", calib_ids=calib_ids, progress=False)
    report = nm_report(gemm_weights(export_onnx(loaded.model, tmp_path / "model.onnx", fused=False)))
    assert report["passed"] and report["checked"] == 7 * loaded.model.config.num_hidden_layers, report


def test_one_adapter_per_family_names_every_module():
    """Each adapter's names exist in its tiny model: nothing outside arch.py needs to know them."""
    for family in FAMILIES:
        model = make_tiny(family)
        arch = architecture_for(model.config)
        layer = model.get_submodule(arch.layers)[0]
        for name in arch.linear_names():
            assert isinstance(layer.get_submodule(name), torch.nn.Linear)
        norms = [arch.input_norm, arch.mlp_norm, arch.attention_out_norm, arch.mlp_out_norm]
        for name in filter(None, norms):
            layer.get_submodule(name)
        for name in arch.qk_norms or ():
            layer.get_submodule(f"{arch.attention}.{name}")
        for name in (arch.embedding, arch.rotary, arch.final_norm, arch.head):
            model.get_submodule(name)
        assert dataclasses.replace(arch).family == family
