"""ONNX export with a KV cache (torch.onnx, dynamo exporter), verification against PyTorch, and
INT8 through ONNX Runtime's quantizers."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from prunekit.errors import MissingExtraError
from prunekit.exporters.decoder import FlatCacheDecoder, kv_names
from prunekit.exporters.ort_session import OnnxDecoder  # noqa: F401  (re-exported)

# fp32 ONNX Runtime vs PyTorch on the same tokens: kernels sum in another order, so logits of a
# 30-layer model differ by ~1e-4; 1e-3 absolute still catches any real change of the math.
LOGITS_TOLERANCE = 1e-3
INT8_FLAVOURS = ("weight-only", "dynamic", "qdq")
FUSED_OPSET, PLAIN_OPSET = 23, 20  # 23: first opset with Attention and RMSNormalization


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise MissingExtraError("onnx/onnxruntime", "onnx") from None


def export_onnx(model: torch.nn.Module, path: Path, fused: bool = True) -> Path:
    """Write ``path`` (+ ``path.data``): inputs input_ids and past_key_values.{i}.key/value, outputs
    logits and present.{i}.key/value; one graph serves prefill (empty past) and decode.

    ``fused`` (for ONNX Runtime) writes opset 23 with fused projections, RMSNormalization and
    Attention; off, opset 20 primitives with one MatMul per projection (what TensorRT's parser
    reads, and what the 2:4 check names tensor by tensor). The export holds the model and its
    stacked projections; prunekit.exporters.onnx_streamed writes the same graph a tensor at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    trace_decoder(FlatCacheDecoder(model, fused=fused).eval(), fused, path)
    return path


def trace_decoder(decoder: FlatCacheDecoder, fused: bool, path: Path | None = None, optimize: bool = True):
    """torch.onnx's dynamo export of ``decoder`` with dynamic batch, sequence and cache lengths;
    written to ``path`` when given. Returns the ONNXProgram."""
    _require_onnx()
    from torch.export import Dim

    past_names, present_names = kv_names(len(decoder.layers))
    batch, seq = Dim("batch", min=1, max=256), Dim("sequence", min=1, max=8192)
    past_len = Dim("past_sequence", min=0, max=8192)
    example = (torch.zeros(1, 4, dtype=torch.long), *decoder.empty_cache(1, 3))
    shapes = ({0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in past_names))
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):  # per-initializer INFO lines drown progress
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))  # never lower (--quiet)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.onnx.export(decoder, example, None if path is None else str(path),
                                 input_names=["input_ids", *past_names], output_names=["logits", *present_names],
                                 dynamic_shapes=shapes, opset_version=FUSED_OPSET if fused else PLAIN_OPSET,
                                 dynamo=True, external_data=True, optimize=optimize, verbose=False)


def onnx_logits(runner: OnnxDecoder):
    """A window -> next-token logits function over an ONNX decoder (empty cache), for the same
    quality arithmetic as the torch model's (prunekit.evaluation.measure_qualities)."""
    def logits(window: torch.Tensor) -> torch.Tensor:
        out, _ = runner.step(window.numpy()[None], runner.empty_cache())
        return torch.from_numpy(out[0, :-1]).float()
    return logits


def export_verified(model: torch.nn.Module, path: Path, probe: torch.Tensor, fused: bool = True) -> tuple[Path, dict]:
    """Export, then refuse to go on if ONNX Runtime does not reproduce PyTorch (see verify_export)."""
    export_onnx(model, path, fused)
    return path, require_verified(path, model, probe)


def require_verified(path: Path, model: torch.nn.Module, probe: torch.Tensor) -> dict:
    """``verify_export``'s checks of the file at ``path``; PrunekitError if they do not pass."""
    from prunekit.errors import PrunekitError

    checks = verify_export(path, model, probe)
    if not checks["passed"]:
        raise PrunekitError(f"the ONNX export does not match PyTorch: {checks} (a prunekit bug, please report)")
    return checks


def verify_export(path: Path, model: torch.nn.Module, tokens: torch.Tensor, new_tokens: int = 8,
                  tolerance: float = LOGITS_TOLERANCE) -> dict:
    """ORT logits vs PyTorch on the same tokens, KV-cache I/O present, greedy tokens identical."""
    runner = OnnxDecoder(path)
    checks = {"kv_cache_io": runner.has_kv_cache}
    logits, _ = runner.step(tokens.numpy()[None], runner.empty_cache())
    with torch.no_grad():
        reference = model(tokens[None], use_cache=False).logits.numpy()
    checks["max_abs_logit_diff"] = float(np.abs(logits - reference).max())
    checks["logits_within_tolerance"] = checks["max_abs_logit_diff"] <= tolerance
    checks["tolerance"] = tolerance
    with torch.no_grad():
        torch_tokens = model.generate(tokens[None, :8], attention_mask=torch.ones(1, 8, dtype=torch.long),
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=0)[0, 8:].tolist()
    checks["greedy_tokens_identical"] = runner.greedy(tokens.numpy()[None, :8], new_tokens) == torch_tokens
    checks["passed"] = checks["kv_cache_io"] and checks["logits_within_tolerance"] and checks["greedy_tokens_identical"]
    return checks


def quantize_int8(src: Path, dst: Path, flavour: str = "weight-only", exclude: list[str] | None = None,
                  calibration: list[torch.Tensor] | None = None, accuracy_level: int = 4) -> Path:
    """INT8 with ONNX Runtime. weight-only: MatMulNBits (8-bit, block 32), nearly lossless on this
    model family, its activations rounded to int8 inside the kernel (``accuracy_level`` 4, the
    fast path; 0 keeps them in float, which the tests use to match torch exactly; measured here,
    its decode is 19x slower); dynamic: W8A8 MatMulInteger (activation outliers into down_proj
    cost quality, so down_proj and lm_head are kept in fp32 unless ``exclude`` says otherwise);
    qdq: static QDQ."""
    _require_onnx()
    import onnx

    dst.parent.mkdir(parents=True, exist_ok=True)
    if flavour == "weight-only":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=8, block_size=32, is_symmetric=True,
                                         accuracy_level=accuracy_level, nodes_to_exclude=exclude or [])
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)
        return dst
    if flavour == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        model = onnx.load(str(src))
        if exclude is None:
            exclude = [n.name for n in model.graph.node if n.op_type == "MatMul"
                       and (_scope_has(n, ("down_proj",)) or "logits" in n.output)]
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         nodes_to_exclude=exclude, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
        return dst
    if flavour == "qdq":
        return quantize_qdq(src, dst, calibration or [])
    raise ValueError(f"unknown INT8 flavour {flavour}: use one of {', '.join(INT8_FLAVOURS)}")


def quantize_int4(src: Path, dst: Path, block_size: int = 32, eight_bit: tuple[str, ...] = ()) -> Path:
    """4-bit block-wise weights as ONNX Runtime's MatMulNBits (lm_head included), symmetric
    round-to-nearest: integer levels with no zero point, the layout of its fastest CPU kernel;
    accuracy_level 4 (int8 activations in the kernel) is set on every node. ``eight_bit`` keeps some
    MatMuls at 8 bits (MatMulNBits too): "logits" names the output head, any other word a module in
    the node's scope (e.g. "down_proj"). Better grids come from preparing the weights first
    (prunekit.activation_scaling). ONNX Runtime's HQQ is not used: its float zero points send
    MatMulNBits to a general kernel 10x slower than fp32 here, and the asymmetric grid measured
    worse than the symmetric one (docs/toolchain.md)."""
    _require_onnx()
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    dst.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src))
    keep = [n.name for n in model.graph.node if n.op_type == "MatMul"
            and (set(eight_bit) & set(n.output) or _scope_has(n, eight_bit))]
    for bits, exclude in ((4, keep), (8, [])) if keep else ((4, []),):
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                         accuracy_level=4, nodes_to_exclude=exclude)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantizer.process()
        model = quantizer.model.model
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", 4))
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)
    return dst


def quantize_int4_source(src: Path, dst: Path, accuracy_level: int = 4) -> Path | None:
    """int4-source from a float ONNX file: every MatMul whose weight lies on a 4-bit grid (a weight
    from a Q4 GGUF, or a projection a pruning left untouched) as 4-bit MatMulNBits with exactly
    those integers, plus its blocks' offsets; every other MatMul at 8 bits
    (prunekit.exporters.onnx_streamed.as_int4_source, over the file's weights read one at a time).
    None, with nothing written, when no weight is on a grid: the candidate would be INT8 under
    another name."""
    _require_onnx()
    import onnx_ir as ir

    from prunekit.exporters.onnx_streamed import as_int4_source, save_streamed

    model = ir.load(str(src))
    for value in model.graph.initializers.values():  # read when written, as a streamed graph's weights are
        stored = value.const_value
        value.const_value = ir.LazyTensor(lambda stored=stored: stored, dtype=stored.dtype, shape=stored.shape,
                                          name=value.name)
    if not as_int4_source(model, accuracy_level):
        return None
    return save_streamed(model, dst)


def quantize_qdq(src: Path, dst: Path, calibration: list[torch.Tensor]) -> Path:
    """Static INT8 as explicit QuantizeLinear/DequantizeLinear pairs: per-channel symmetric weights,
    symmetric activations calibrated on ``calibration`` token windows (what TensorRT needs to build
    INT8 with no calibrator of its own)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    runner = OnnxDecoder(src)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"input_ids": w.numpy()[None].astype(np.int64),
                                **dict(zip(runner.past_names, runner.empty_cache()))} for w in calibration])

        def get_next(self):
            return next(self.feeds, None)

    if not calibration:
        raise ValueError("static QDQ needs calibration windows")
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    use_external_data_format=True,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True})
    return dst


def _scope_has(node, words) -> bool:
    scope = " ".join(p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes")
    return any(w in scope for w in words)


def onnx_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))
