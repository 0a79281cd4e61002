"""Activation-aware INT4 preparation: the grid is ONNX Runtime's, scaling keeps the function,
and the prepared weights round better than the plain ones."""

import copy

import numpy as np
import pytest
import torch

from prunekit import activation_scaling
from prunekit.activation_scaling import int4_round, prepare_int4


def _model(seed=0):
    """A tiny LLaMA whose widths are whole 32-input blocks, with a few loud activation channels."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] = 12.0  # outlier channels, as real models have
            layer.post_attention_layernorm.weight[4:8] = 12.0
    return model


def _windows(seed=1):
    return torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(seed))


def test_int4_round_is_onnx_runtimes_grid(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from prunekit.exporters.onnx import quantize_int4

    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))  # (out, in), torch's layout
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 48])],
                              [numpy_helper.from_array(weight.T.contiguous().numpy(), "w")])
    src = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    dst = quantize_int4(src, tmp_path / "int4" / "model.onnx")
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    dequantized = session.run(None, {"x": np.eye(64, dtype=np.float32)})[0].T  # identity rows: exact in int8
    assert np.allclose(dequantized, int4_round(weight).numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(dequantized, weight.numpy(), atol=1e-3)


def test_scaling_alone_computes_the_same_function(monkeypatch):
    model, windows = _model(), _windows()
    monkeypatch.setattr(activation_scaling, "gptq_int4", lambda weight, gram: weight)  # scaling, no rounding
    prepared = prepare_int4(model, windows)
    with torch.no_grad():
        assert torch.allclose(prepared(windows).logits, model(windows).logits, atol=1e-4)
    scaled = prepared.model.layers[0].input_layernorm.weight
    assert not torch.allclose(scaled, model.model.layers[0].input_layernorm.weight)  # the scale did move
    assert torch.equal(prepared.model.embed_tokens.weight, model.model.embed_tokens.weight)  # lm_head untied


def test_prepared_weights_round_closer_to_the_dense_model():
    model, fit, held = _model(), _windows(1), _windows(2)  # judged on tokens it was not prepared on

    def rounded(m):
        with torch.no_grad():
            for linear in m.modules():
                if isinstance(linear, torch.nn.Linear):
                    linear.weight.copy_(int4_round(linear.weight))
        return m

    with torch.no_grad():
        dense = model(held).logits
        plain = rounded(copy.deepcopy(model))(held).logits
        prepared = rounded(prepare_int4(model, fit))(held).logits
    assert (prepared - dense).pow(2).mean() < 0.8 * (plain - dense).pow(2).mean()


def test_projections_kept_at_8_bits_are_not_rounded():
    model, windows = _model(), _windows()
    kept = prepare_int4(model, windows, eight_bit=("o_proj",))  # o_proj has no producer: rounding only
    rounded = prepare_int4(model, windows)
    for layer, dense in zip(kept.model.layers, model.model.layers):
        assert torch.equal(layer.self_attn.o_proj.weight, dense.self_attn.o_proj.weight)
        assert torch.equal(int4_round(layer.self_attn.q_proj.weight), layer.self_attn.q_proj.weight)  # on the grid
    assert any(not torch.equal(c.self_attn.o_proj.weight, d.self_attn.o_proj.weight)
               for c, d in zip(rounded.model.layers, model.model.layers))


def test_mixed_int4_keeps_the_named_matmuls_at_8_bits(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from prunekit.exporters.onnx import quantize_int4

    weights = [numpy_helper.from_array(np.random.default_rng(i).standard_normal((64, 64)).astype(np.float32), f"w{i}")
               for i in range(2)]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w0"], ["hidden"], name="body"),
                               helper.make_node("MatMul", ["hidden", "w1"], ["logits"], name="head")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 64])], weights)
    src = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    for eight_bit, head_bits in (((), 4), (("logits",), 8)):
        out = onnx.load(str(quantize_int4(src, tmp_path / f"q{head_bits}" / "model.onnx", eight_bit=eight_bit)))
        bits = {n.output[0]: next(a.i for a in n.attribute if a.name == "bits") for n in out.graph.node
                if n.op_type == "MatMulNBits"}
        assert bits == {"hidden": 4, "logits": head_bits}


def test_one_preparation_serves_int4_and_int4_mixed():
    from prunekit.activation_scaling import prepare_int4_pair

    model, windows = _model(), _windows()
    four, mixed = prepare_int4_pair(model, windows, eight_bit=("o_proj",))
    alone = prepare_int4(model, windows, eight_bit=("o_proj",))
    for (name, a), (_, b), (_, c) in zip(four.named_parameters(), mixed.named_parameters(), alone.named_parameters()):
        assert torch.equal(b, c), name  # the mixed copy is what prepare_int4 makes for it
        assert torch.equal(a, b) != name.endswith("o_proj.weight"), name  # only o_proj differs


def test_a_rebound_trace_writes_the_prepared_weights(tmp_path):
    """The dense model's streamed trace, rebound to its 4-bit preparation, is that model's export;
    a weight the optimizer folded (Gemma's 1 + w norm scales; equal scales merged into one) refuses
    to change under a rebind."""
    pytest.importorskip("onnxruntime")
    from prunekit.activation_scaling import prepare_int4_pair
    from prunekit.exporters.onnx import OnnxDecoder, export_onnx
    from prunekit.exporters.onnx_streamed import rebind, save_streamed, streamed_graph
    from prunekit.weights import ModuleWeights
    from tests.conftest import make_tiny

    model, windows = _model(), _windows()
    with torch.no_grad():  # norm scales unlike each other, as trained ones are: equal ones are merged
        for name, weight in model.named_parameters():
            if name.endswith("layernorm.weight"):
                weight.mul_(torch.empty_like(weight).uniform_(0.8, 1.2))
    four, mixed = prepare_int4_pair(model, windows, eight_bit=("lm_head", "down_proj"))
    graph = streamed_graph(model, ModuleWeights(model))
    dense = save_streamed(graph, tmp_path / "dense" / "model.onnx")
    rebind(graph, ModuleWeights(mixed))
    rebound = save_streamed(graph, tmp_path / "mixed" / "model.onnx")
    full = export_onnx(mixed, tmp_path / "full" / "model.onnx")

    def logits(path):
        runner = OnnxDecoder(path)
        return runner.step(windows[:1].numpy(), runner.empty_cache())[0]

    results = [logits(p) for p in (rebound, full, dense)]
    assert np.allclose(results[0], results[1], atol=1e-5) and not np.allclose(results[0], results[2], atol=1e-3)
    gemma = make_tiny("gemma3")
    graph = streamed_graph(gemma, ModuleWeights(gemma))
    changed = copy.deepcopy(gemma)
    with torch.no_grad():
        changed.model.layers[0].input_layernorm.weight.add_(0.5)
    with pytest.raises(LookupError):
        rebind(graph, ModuleWeights(changed))
    rebind(graph, ModuleWeights(copy.deepcopy(gemma)))  # equal weights rebind