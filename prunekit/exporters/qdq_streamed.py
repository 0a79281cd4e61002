"""Static INT8 as explicit QuantizeLinear/DequantizeLinear pairs, what TensorRT builds its INT8
engine from, written into a streamed graph (prunekit.exporters.onnx_streamed): for a model in
memory and for one that never is, the same file.

The pairs sit where TensorRT Model Optimizer's INT8 puts them: on each projection's weight
(symmetric int8 per output channel, scale max|w| / 127, computed as the weight is written) and on
its input (symmetric, scale max|x| / 127 over the calibration windows, zero point 0). ONNX Runtime's
``quantize_static`` (prunekit.exporters.onnx.quantize_qdq, cpu-onnx's ``--int8-flavour qdq``) puts
them on every MatMul's inputs and output: the attention products and the logits too, rounded to
255 levels (on a tiny model its logits move 6% of their range from the float model's, these 2.6%:
tests/test_tensorrt.py), and it loads the float file and runs a session with every activation as an output, two
copies of a 7 GB model for the 1.5B. Here the activation ranges come from torch
(``linear_input_ranges``: block by block for a streamed model).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from prunekit.arch import architecture_for

LEVELS = 127  # symmetric int8: [-127, 127], zero at zero (a 2:4 pattern stays visible in the codes)


@torch.no_grad()
def linear_input_ranges(model: nn.Module, weights, windows: torch.Tensor) -> dict[str, float]:
    """The largest magnitude of each linear layer's input over ``windows`` (prefill, one window at
    a time in effect), by module name, the head's included. ``weights``: the source of a skeleton
    ``model``, run in one streamed pass (prunekit.pruning.blocks.StreamedLogits); None for a model
    in memory, run window by window. A hook on every projection records what it is given."""
    head = architecture_for(model.config).head
    ranges: dict[str, float] = {}

    def recorder(name: str):
        def record(module, args):
            ranges[name] = max(ranges.get(name, 0.0), float(args[0].abs().max()))
        return record

    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and (weights is None or name != head)]
    try:
        if weights is None:
            for window in windows:
                model(window[None], use_cache=False)
        else:
            from prunekit.pruning.blocks import StreamedLogits

            streamed = StreamedLogits(model, weights, [torch.stack(list(windows))])
            ranges[head] = float(streamed.head_input(0).abs().max())  # applied in row blocks, not as a module
    finally:
        for handle in handles:
            handle.remove()
    return ranges


def as_qdq(model, input_ranges: dict[str, float]) -> None:
    """Every MatMul over a weight in the streamed graph ``model`` (onnx_ir) reads the weight through
    DequantizeLinear from int8 codes per output channel, computed when written, and its input
    through a QuantizeLinear/DequantizeLinear pair at the scale of ``input_ranges`` (by module
    name; one pair per input, shared by the projections that read it)."""
    import onnx_ir as ir

    from prunekit.exporters.onnx_streamed import _SOURCES, _matmul_weight, _replace_matmul

    graph, pairs = model.graph, {}
    for node in list(graph):
        weight = _matmul_weight(node)
        if weight is None:
            continue
        x = node.inputs[0]
        if x not in pairs:
            module = weight.const_value.meta[_SOURCES][0].removesuffix(".weight")
            scale, zero = (ir.val(f"{x.name}_{part}", dtype, [], const_value=ir.tensor(value))
                           for part, dtype, value in (
                               ("scale", ir.DataType.FLOAT, np.array(_scale(input_ranges[module]), np.float32)),
                               ("zero_point", ir.DataType.INT8, np.array(0, np.int8))))
            quantize = ir.node("QuantizeLinear", [x, scale, zero], name=f"{x.name}_QuantizeLinear")
            dequantize = ir.node("DequantizeLinear", [quantize.outputs[0], scale, zero],
                                 name=f"{x.name}_DequantizeLinear")
            graph.insert_before(node, [quantize, dequantize])
            for value in (scale, zero):
                graph.register_initializer(value)
            pairs[x] = dequantize.outputs[0]
        (k, n), name = weight.const_value.shape, weight.name
        coded = _ChannelCodes(weight.const_value)
        codes = ir.val(f"{name}_quantized", ir.DataType.INT8, [k, n], const_value=ir.LazyTensor(
            coded.codes, ir.DataType.INT8, ir.Shape([k, n]), name=f"{name}_quantized"))
        scales = ir.val(f"{name}_scale", ir.DataType.FLOAT, [n], const_value=ir.LazyTensor(
            coded.scales, ir.DataType.FLOAT, ir.Shape([n]), name=f"{name}_scale"))
        zeros = ir.val(f"{name}_zero_point", ir.DataType.INT8, [n], const_value=ir.tensor(np.zeros(n, np.int8)))
        weight_float = ir.node("DequantizeLinear", [codes, scales, zeros], attributes={"axis": 1},
                               name=f"{name}_DequantizeLinear")
        product = ir.node("MatMul", [pairs[x], weight_float.outputs[0]], name=node.name)
        product.metadata_props.update(node.metadata_props)  # the torch scope names the GEMM in the 2:4 check
        _replace_matmul(graph, node, weight, [weight_float, product], product.outputs[0], (codes, scales, zeros))


def _scale(magnitude: float) -> float:
    return magnitude / LEVELS if magnitude > 0 else 1.0


class _ChannelCodes:
    """One (in, out) weight's int8 codes and per-output-channel scales from one read: the scales,
    written right after the codes, are kept until then (one number per channel)."""

    def __init__(self, weight):
        self.weight, self._scales = weight, None

    def _code(self) -> np.ndarray:
        w = self.weight.numpy()
        amax = np.abs(w).max(axis=0)
        self._scales = np.where(amax > 0, amax / LEVELS, 1.0).astype(np.float32)
        return np.clip(np.rint(w / self._scales), -LEVELS, LEVELS).astype(np.int8)

    def codes(self):
        import onnx_ir as ir

        return ir.Tensor(self._code())

    def scales(self):
        import onnx_ir as ir

        if self._scales is None:
            self._code()
        scales, self._scales = self._scales, None
        return ir.Tensor(scales)
