"""Streamed pruning (one decoder block in memory): the same masks, weights and logits as pruning
the model in memory, for every family, from a safetensors folder; the GGUF source on the default."""

from __future__ import annotations

import json

import pytest
import torch

from prunekit.checkpoint import ShardWriter, probe_ids, probe_mismatch, probe_record
from prunekit.models import load_model, open_streamed
from prunekit.pruning.engine import add_upper_gram, symmetrize_
from prunekit.pruning.run import prune
from tests.conftest import FAMILIES, make_tiny

METHODS = [("wanda", "2:4", 0.5, {}), ("sparsegpt", "unstructured", 0.5, {}),
           ("fasp", "structured", 0.3, {"channel_multiple": 8}),
           ("admm", "unstructured", 0.5, {"outlier_spread": 0.1})]  # + the dense pass before pruning


def test_symmetrize_in_place_matches_the_full_gram():
    x = torch.randn(50, 300, dtype=torch.float64)
    upper = torch.zeros(300, 300, dtype=torch.float64)
    add_upper_gram(upper, x, panel=64)
    torch.testing.assert_close(symmetrize_(upper, panel=64), x.T @ x)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,pattern,sparsity,options", METHODS, ids=[m[0] for m in METHODS])
def test_streamed_prune_equals_in_memory_prune(family, method, pattern, sparsity, options, tokenizer,
                                               calib_ids, tmp_path):
    source = tmp_path / "dense"
    make_tiny(family, layers=3).save_pretrained(source)
    tokenizer.save_pretrained(source)

    resident = prune(load_model(source), method, sparsity, pattern, calib_ids=calib_ids, progress=False, **options)
    streamed_model = open_streamed(source)
    assert all(p.is_meta for p in streamed_model.model.parameters())
    writer = ShardWriter(tmp_path / "pruned")
    streamed = prune(streamed_model, method, sparsity, pattern, calib_ids=calib_ids, progress=False,
                     writer=writer, probe=probe_ids(tokenizer), **options)
    manifest = {**streamed.manifest(str(source)), "probe": probe_record(tokenizer, streamed.probe_logits)}
    writer.finish(streamed.model, tokenizer, manifest)

    assert streamed.mask_hash == resident.mask_hash
    assert streamed.check == resident.check
    assert streamed.parameters_after == resident.parameters_after
    assert all(p.is_meta for p in streamed.model.parameters())  # nothing of the model stayed resident
    reloaded = load_model(tmp_path / "pruned")
    assert probe_mismatch(reloaded.model, tokenizer, manifest["probe"]) < 1e-5
    ids = calib_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(ids).logits, resident.model(ids).logits, rtol=1e-4, atol=1e-4)
    index = json.loads((tmp_path / "pruned" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(reloaded.model.state_dict()) - (
        {"lm_head.weight"} if reloaded.model.config.tie_word_embeddings else set())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_streamed_pass_leaves_the_skeleton_traceable(family, tokenizer, calib_ids, tmp_path):
    """A pass over the blocks (the dense logits a streamed deploy takes first) drops each block's
    weights after use but keeps the skeleton's buffers: Gemma 3's embedding scale is one, not in
    the checkpoint, and a trace after the pass failed on it as a meta tensor."""
    from prunekit.exporters.onnx_streamed import streamed_graph
    from prunekit.pruning.blocks import StreamedLogits

    source = tmp_path / "dense"
    make_tiny(family, layers=2).save_pretrained(source)
    tokenizer.save_pretrained(source)
    opened = open_streamed(source)
    buffers = {name: b.clone() for name, b in opened.model.named_buffers()}
    StreamedLogits(opened.model, opened.weights, [calib_ids[:2]]).logits_of(calib_ids[:1])
    assert all(p.is_meta for p in opened.model.parameters())  # the pass kept no weight
    for name, buffer in opened.model.named_buffers():
        assert not buffer.is_meta and torch.equal(buffer, buffers[name]), name
    for fused in (True, False):  # cpu-onnx's trace, TensorRT's
        assert streamed_graph(opened.model, opened.weights, fused=fused) is not None


def test_streamed_source_refuses_a_checkpoint_missing_a_block(tokenizer, calib_ids, tmp_path):
    from safetensors.torch import load_file, save_file

    from prunekit.errors import UserInputError

    source = tmp_path / "dense"
    make_tiny("qwen2", layers=2).save_pretrained(source)
    tokenizer.save_pretrained(source)
    weights = load_file(source / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.1.mlp.down")},
              source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserInputError, match="lacks model.layers.1.mlp.down_proj.weight"):
        prune(open_streamed(source), "wanda", 0.5, "unstructured", calib_ids=calib_ids, progress=False,
              writer=ShardWriter(tmp_path / "out"))


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_model_in_bfloat16_writes_like_the_float32_model(family, tokenizer, tmp_path):
    """The model a streamed deploy reads whole to write its own calibration text: blocks in bfloat16,
    head in float32 (tied or not), its next-token distributions those of the float32 model."""
    from prunekit.weights import whole_model

    dense = make_tiny(family, layers=2)
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    opened = open_streamed(tmp_path / "dense")
    writer = whole_model(opened.model.config, opened.weights)
    assert writer.lm_head.weight.dtype == torch.float32 and writer.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(writer.lm_head.weight, dense.lm_head.weight)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        written, reference = writer(ids).logits, dense(ids).logits
    assert written.dtype == torch.float32
    assert (written.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9  # random weights: near ties
    kl = torch.nn.functional.kl_div(written.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    assert kl < 1e-3


def test_self_calibration_memory_refuses_a_budget_it_cannot_fit():
    """A streamed deploy with no --calib: the model writing its text in bfloat16 is estimated from
    the config (Qwen2.5-Coder-1.5B's shape here, on the meta device) and refused past the budget."""
    from transformers import Qwen2Config

    from prunekit.deploy_memory import deploy_memory
    from prunekit.errors import UserInputError
    from prunekit.pipeline import Calibration
    from prunekit.profile import load_profile
    from prunekit.weights import empty_model

    config = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
    skeleton, profile = empty_model(config), load_profile("cpu-onnx")
    calibration = Calibration("self", 64, 256, 0)
    with pytest.raises(UserInputError, match="writing its own calibration text needs about 5.2 GB"):
        deploy_memory(skeleton, profile, "fasp", calibration, max_memory=int(5e9))
    memory = deploy_memory(skeleton, profile, "fasp", calibration, max_memory=int(9e9))
    assert memory.streamed and 4.5e9 < memory.self_calibration_bytes < 5.5e9
    assert deploy_memory(skeleton, profile, "fasp", Calibration("pydoc", 64, 256, 0),
                         max_memory=int(9e9)).self_calibration_bytes == 0
    # admm's own samples mixed into a text: the same step, for those samples, refused with its own way out
    mixed = Calibration("pydoc", 64, 256, 0, own=16)
    trt = load_profile("a100-tensorrt-sparse")
    with pytest.raises(UserInputError, match="pass --calib-own 0"):
        deploy_memory(skeleton, trt, "admm", mixed, max_memory=int(4e9))
    writing = deploy_memory(skeleton, trt, "admm", mixed, max_memory=int(9e9)).self_calibration_bytes
    assert 4e9 < writing < memory.self_calibration_bytes  # 16 samples' cache and logits, not 64's


@pytest.mark.e2e
def test_gguf_source_reads_the_tensors_transformers_loads():
    """Every tensor of the embedded default, read one at a time, equals transformers' whole-file load
    (LLaMA's q/k permutation included)."""
    streamed, loaded = open_streamed(None), load_model(None)
    state = loaded.model.state_dict()
    for name, tensor in state.items():
        assert torch.equal(streamed.weights.get(name), tensor), name
