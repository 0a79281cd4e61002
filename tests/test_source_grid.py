"""int4-source: weights already on a 4-bit grid (a Q4 GGUF's) ship with their own integers, exactly."""

import numpy as np
import pytest
import torch

from prunekit.source_grid import BLOCK, fit_grid


def _q4(rows: int, inputs: int, seed: int, levels: int = 16, symmetric: bool = False) -> np.ndarray:
    """Weights as GGUF's 4-bit blocks dequantize: float16 step and low per block of 32, step * q + low."""
    rng = np.random.default_rng(seed)
    shape = (rows, inputs // BLOCK, 1)
    step = rng.uniform(1e-3, 2e-2, shape).astype(np.float16).astype(np.float32)
    low = -8 * step if symmetric else rng.uniform(-0.2, 0.05, shape).astype(np.float16).astype(np.float32)
    q = rng.integers(0, levels, (rows, inputs // BLOCK, BLOCK))
    return (step * q + low).reshape(rows, inputs).astype(np.float32)


def snap_to_q4_1(model: torch.nn.Module) -> torch.nn.Module:
    """Every projection and the head of ``model`` rounded as llama.cpp's Q4_1 does (step = span / 15 in float16,
    low = the block's minimum): a tiny stand-in for a model loaded from a Q4_1 GGUF."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.reshape(module.out_features, -1, BLOCK)
                low = w.amin(-1, keepdim=True).half().float()
                step = ((w.amax(-1, keepdim=True) - low) / 15).half().float()
                q = ((w - low) / step.clamp_min(1e-8)).round().clamp(0, 15)  # a zero row: step 0, q 0
                module.weight.copy_((step * q + low).reshape_as(module.weight))
    return model


@pytest.mark.parametrize("levels,symmetric", [(16, False), (16, True), (11, False), (3, False)])
def test_grids_are_recovered_exactly(levels, symmetric):
    """Q4_1 (any low), Q4_0 (low = -8 step), and K-quant blocks that use fewer of the 16 levels."""
    weight = _q4(48, 4 * BLOCK, seed=levels, levels=levels, symmetric=symmetric)
    grid = fit_grid(weight)
    assert grid is not None and grid.codes.max() <= 15
    assert np.abs(grid.weight() - weight).max() <= 1e-6 * np.abs(weight).max()
    unpacked = np.stack([grid.packed() & 15, grid.packed() >> 4], -1).reshape(grid.codes.shape)
    assert np.array_equal(unpacked, grid.codes)  # the even input in the low nibble, as MatMulNBits reads


def test_weights_off_a_grid_are_turned_down():
    rng = np.random.default_rng(0)
    assert fit_grid(rng.normal(size=(64, 4 * BLOCK)).astype(np.float32)) is None
    weight = _q4(200, 4 * BLOCK, seed=1)
    weight[150, 70] += 1e-3  # one value of one block past the probe leaves its level
    assert fit_grid(weight) is None
    assert fit_grid(_q4(8, 4 * BLOCK, seed=2)[:, :100]) is None  # inputs that are not whole blocks
    weight = _q4(8, 4 * BLOCK, seed=2)
    weight[1, 5] = np.nan
    assert fit_grid(weight) is None
    constant = _q4(8, 4 * BLOCK, seed=3)
    constant[2, :BLOCK] = 0.25  # a constant block is on every grid
    assert np.array_equal(fit_grid(constant).weight(), constant)


def _matmuls(tmp_path, weights: dict):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, previous = [], [], "x"
    for name, weight in weights.items():
        nodes.append(helper.make_node("MatMul", [previous, name], [f"{name}_out"], name=f"mm_{name}"))
        inits.append(numpy_helper.from_array(weight.T.copy(), name))
        previous = f"{name}_out"
    width = next(iter(weights.values())).shape[1]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, width])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, None)], inits)
    path = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_onnx_runtime_computes_with_the_source_integers(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from prunekit.exporters.onnx import quantize_int4_source

    on_grid, off_grid = _q4(96, 2 * BLOCK, seed=4), np.random.default_rng(5).normal(size=(40, 96)).astype(np.float32)
    src = _matmuls(tmp_path, {"a": on_grid, "b": off_grid})
    path = quantize_int4_source(src, tmp_path / "int4-source" / "model.onnx", accuracy_level=0)
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits")
            for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"}
    assert bits["mm_a_Q4"] == 4 and 8 in bits.values() and len(bits) == 2  # the offsets' MatMul stays float
    x = np.random.default_rng(6).normal(size=(1, 5, 2 * BLOCK)).astype(np.float32)
    hidden = x @ on_grid.T
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - hidden @ off_grid.T).max() < 2e-2 * np.abs(hidden @ off_grid.T).max()  # b at 8 bits
    only_a = quantize_int4_source(_matmuls(tmp_path, {"a": on_grid}), tmp_path / "a" / "model.onnx", accuracy_level=0)
    got_a = ort.InferenceSession(str(only_a), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got_a - hidden).max() < 1e-5 * np.abs(hidden).max()  # the 4-bit grid itself: exact
    assert quantize_int4_source(_matmuls(tmp_path, {"b": off_grid}), tmp_path / "none" / "model.onnx") is None


def test_a_q4_model_exports_with_no_second_rounding(tokenizer, tmp_path):
    """A tiny Qwen3 (widths of whole blocks) rounded as Q4_1: the int4-source file's logits are the
    float model's (kernel in float, accuracy level 0), where round-to-nearest 4-bit moves them."""
    pytest.importorskip("onnxruntime")
    from conftest import make_tiny
    from prunekit.exporters.onnx import OnnxDecoder, export_onnx, quantize_int4, quantize_int4_source

    model = snap_to_q4_1(make_tiny("qwen3"))
    fp32 = export_onnx(model, tmp_path / "fp32" / "model.onnx")
    ids = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits.numpy()
    runner = OnnxDecoder(quantize_int4_source(fp32, tmp_path / "src" / "model.onnx", accuracy_level=0))
    source_diff = np.abs(runner.step(ids.numpy(), runner.empty_cache())[0] - reference).max()
    rtn = OnnxDecoder(quantize_int4(fp32, tmp_path / "rtn" / "model.onnx"))
    rtn_diff = np.abs(rtn.step(ids.numpy(), rtn.empty_cache())[0] - reference).max()
    assert source_diff < 2e-3 < rtn_diff


def test_export_ships_int4_source_only_from_a_4_bit_source(tokenizer, tmp_path, capsys):
    """`prunekit export --precision int4-source` (streamed): written from a Q4-rounded folder, the
    same logits as the quantizer of a float file gives on the loaded model's export; from float
    weights one error line (there is nothing to keep) and exit 2, with nothing left behind."""
    import onnx

    from conftest import make_tiny
    from prunekit.cli import main

    for name, model in (("q4", snap_to_q4_1(make_tiny("qwen3"))), ("float", make_tiny("qwen3"))):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    out = tmp_path / "exported"
    assert main(["export", "--target", "cpu-onnx", "--model", str(tmp_path / "q4"), "--out", str(out),
                 "--precision", "int4-source", "--quiet"]) == 0
    graph = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False).graph
    assert {next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"} == {4}
    from prunekit.exporters.onnx import OnnxDecoder, export_onnx, quantize_int4_source
    from prunekit.models import load_model

    resident = quantize_int4_source(export_onnx(load_model(str(tmp_path / "q4")).model, tmp_path / "r" / "model.onnx"),
                                    tmp_path / "r4" / "model.onnx")
    ids = np.arange(3, 23)[None]
    streamed, loaded = OnnxDecoder(out / "onnx" / "model.onnx"), OnnxDecoder(resident)
    assert np.abs(streamed.step(ids, streamed.empty_cache())[0] - loaded.step(ids, loaded.empty_cache())[0]).max() < 1e-4
    capsys.readouterr()
    assert main(["export", "--target", "cpu-onnx", "--model", str(tmp_path / "float"), "--out",
                 str(tmp_path / "never"), "--precision", "int4-source", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no weight lies on a 4-bit grid" in err[0]
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never*"))
