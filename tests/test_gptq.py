"""GPTQ rounding lands on ONNX Runtime's own 4-bit grid and reproduces a layer's outputs better
than round-to-nearest on inputs it was not fitted on."""

import numpy as np
import pytest
import torch

from prunekit.activation_scaling import int4_round
from prunekit.gptq import gptq_int4


def _inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Inputs with a few loud channels and correlated ones, as a projection's inputs are."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=torch.Generator().manual_seed(99)) * 0.3 + torch.eye(width)
    loud = torch.ones(width)
    loud[:3] = 8.0
    return (torch.randn(tokens, width, generator=generator) @ mix) * loud


def test_onnx_runtime_keeps_the_rounded_weights_exactly(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from prunekit.exporters.onnx import quantize_int4

    width = 80  # two whole blocks and a partial one, which ONNX Runtime pads with zeros
    weight = torch.randn(24, width, generator=torch.Generator().manual_seed(0))
    weight[3] = 0.0  # a row with no peak stays zero (nothing to pin at -8)
    x = _inputs(512, width, 1)
    rounded = gptq_int4(weight, x.T @ x)
    assert torch.equal(rounded[3], torch.zeros(width))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [width, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [width, 24])],
                              [numpy_helper.from_array(rounded.T.contiguous().numpy(), "w")])
    src = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    session = ort.InferenceSession(str(quantize_int4(src, tmp_path / "int4" / "model.onnx")),
                                   providers=["CPUExecutionProvider"])
    dequantized = session.run(None, {"x": np.eye(width, dtype=np.float32)})[0].T
    assert np.allclose(dequantized, rounded.numpy(), rtol=1e-5, atol=1e-6)  # a level apart is ~0.1 here
    assert torch.equal(int4_round(rounded[:, :64]), rounded[:, :64])  # the torch emulation agrees


def test_rounding_error_moves_where_the_inputs_cannot_see_it():
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    fit, held = _inputs(1024, 96, 3), _inputs(1024, 96, 4)
    rounded = gptq_int4(weight, fit.T @ fit)

    def output_error(w):
        return float((held @ (w - weight).T).pow(2).mean())

    assert output_error(rounded) < 0.85 * output_error(int4_round(weight))
    assert torch.equal(rounded, gptq_int4(weight, fit.T @ fit))  # deterministic
