"""The ONNX export in the memory of one tensor: the decoder is traced over a twin of the model whose
parameters are fake tensors (shapes, no storage), and each initializer of the graph is computed
from a weight source (prunekit.weights) only while it is written, then dropped. A model that is
not in memory at all (a GGUF file, a pruned folder) exports this way, and a model that is saves
the stacked projections and the untied head that ``export_onnx`` copies (4 GB on a 1.5B model).

The graph is the one ``export_onnx`` writes: the same trace, the transposes of weights folded into
their initializers here (the optimizer would fold them by reading every weight at once), then
torch.onnx's optimizer with the lazily read weights kept out of its constant folding. INT8 is
written the same way: each MatMul's weight goes through ONNX Runtime's own block quantizer as it
is written, as MatMulNBits (what ``quantize_int8``'s weight-only flavour makes of the whole file).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.exporters.decoder import FlatCacheDecoder
from prunekit.exporters.onnx import trace_decoder

BLOCK_SIZE = 32  # inputs per MatMulNBits block, as quantize_int8 writes them
FOLDED_SIZE = 8192  # weights up to this many elements (norm vectors) may be read by constant folding
_BOUND = "prunekit.bound_weights"  # the graph's metadata key for its BoundWeights
_SOURCES = "prunekit.sources"  # a lazy initializer's metadata key for the weight names it reads


class BoundWeights:
    """What a streamed graph's lazy weights read from when it is saved: a source that ``rebind``
    may replace, and the names of the weights the optimizer folded into constants (read while the
    graph was made and no longer an initializer of it), which a new source must leave unchanged."""

    def __init__(self, source):
        self.source, self.read_while_made, self.folded = source, set(), set()

    def read(self, names: list[str], dtype: torch.dtype) -> list[torch.Tensor]:
        if self.read_while_made is not None:
            self.read_while_made.update(names)
        return [self.source.get(name, dtype) for name in names]

    def made(self, graph) -> None:
        """The graph is optimized: what it read and no longer holds was folded."""
        held = {name for value in graph.initializers.values() if _lazy(value)
                for name in value.const_value.meta.get(_SOURCES, ())}
        self.folded, self.read_while_made = self.read_while_made - held, None


def fake_twin(model: nn.Module) -> tuple[nn.Module, dict[int, str]]:
    """A copy of ``model`` whose parameters are fake tensors (shapes and dtypes, no storage; its
    buffers are copied), and the name in ``model`` of each fake parameter, by id. ``model`` may
    itself be a skeleton on the meta device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    named = list(model.named_parameters(remove_duplicate=False))
    with FakeTensorMode(allow_non_fake_inputs=True):
        fakes = {id(p): nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False) for _, p in named}
    twin = copy.deepcopy(model, memo=dict(fakes))  # memo: each parameter becomes its fake, ties kept
    names: dict[int, str] = {}
    for name, p in named:  # a tied parameter by its first name (the embedding's)
        names.setdefault(id(fakes[id(p)]), name)
    return twin, names


def export_onnx_streamed(model: nn.Module, weights, path: Path, fused: bool = True, int8: bool = False) -> Path:
    """Write ``path`` (+ ``path.data``) as ``export_onnx`` does, reading each tensor from ``weights``
    (a prunekit.weights source whose names are ``model``'s) when it is written. ``int8``: the
    projections and the head as 8-bit MatMulNBits (block 32, symmetric, accuracy level 4)."""
    graph = streamed_graph(model, weights, fused)
    if int8:
        as_matmul_nbits(graph, bits=8)
    return save_streamed(graph, path)


def streamed_graph(model: nn.Module, weights, fused: bool = True):
    """The traced and optimized ONNX model (onnx_ir) whose weights are read from ``weights`` only
    when it is saved: one trace serves the fp32 file and, after ``as_matmul_nbits``, the INT8 one."""
    from onnxscript import optimizer
    from onnxscript.rewriter import onnx_fusions

    twin, names = fake_twin(model)
    with next(twin.parameters()).fake_mode:
        decoder = FlatCacheDecoder(twin, fused=fused).eval()
    program = trace_decoder(decoder, fused, optimize=False)
    graph, bound = program.model.graph, BoundWeights(weights)
    _read_lazily(graph, decoder, names, bound)
    _fold_weight_transposes(graph)
    # what torch.onnx's optimize step runs (onnxscript's torch API: optimize_ir, then the ONNX
    # fusions), with the matrices kept out of constant folding (folding reads the values); vectors
    # still fold (Gemma's 1 + w norm scales become initializers, as in the resident export)
    optimizer.optimize_ir(program.model, should_fold=lambda node: False if _reads_matrices(node) else None)
    onnx_fusions.fuse(program.model)
    bound.made(graph)
    program.model.meta[_BOUND] = bound
    return program.model


def rebind(model, weights) -> None:
    """Make the streamed graph ``model`` read ``weights`` when it is next saved: a model of the same
    graph whose weights differ (scaled and clipped for 4 bits, say) is written without a trace of
    its own (about a minute on the default model). LookupError when a weight that the optimizer
    folded into a constant differs in ``weights``: that graph needs a trace of its own."""
    bound = model.meta[_BOUND]
    changed = sorted(name for name in bound.folded
                     if not torch.equal(bound.source.get(name), weights.get(name)))
    if changed:
        raise LookupError(f"{len(changed)} folded weights differ (first {changed[0]})")
    bound.source = weights


def save_streamed(model, path: Path) -> Path:
    """``model`` to ``path`` + ``path.data``, each lazily read weight computed as it is written."""
    import onnx_ir as ir

    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, str(path), external_data=f"{path.name}.data")
    return path


def _read_lazily(graph, decoder: FlatCacheDecoder, names: dict[int, str], bound: BoundWeights) -> None:
    """Every initializer that is a fake parameter becomes a LazyTensor over ``bound``."""
    import onnx_ir as ir

    parts = {id(decoder.get_parameter(name)): sources for name, sources in decoder.built_from.items()}
    for name, value in graph.initializers.items():
        try:
            tensor = decoder.get_parameter(name)
        except AttributeError:
            continue  # a buffer (rotary frequencies): real, and written as traced
        sources = [names[id(p)] for p in parts.get(id(tensor), [tensor])]
        if tensor is decoder.lm_head_weight:  # by the head's own name: a tied source gives the embedding,
            sources = [f"{decoder.arch.head}.weight"]  # one whose head was scaled apart (rebind) the head
        value.const_value = ir.LazyTensor(_reader(bound, sources, tensor.dtype), dtype=value.const_value.dtype,
                                          shape=ir.Shape(tuple(tensor.shape)), name=name)
        value.const_value.meta[_SOURCES] = sources


def _reader(bound: BoundWeights, sources: list[str], dtype: torch.dtype):
    import onnx_ir as ir

    def read():
        tensors = bound.read(sources, dtype)
        return ir.Tensor((tensors[0] if len(tensors) == 1 else torch.cat(tensors)).numpy())
    return read


def _lazy(value):
    import onnx_ir as ir

    return value is not None and value.is_initializer() and isinstance(value.const_value, ir.LazyTensor)


def _reads_matrices(node) -> bool:
    return any(_lazy(value) and value.const_value.size > FOLDED_SIZE for value in node.inputs)


def _fold_weight_transposes(graph) -> None:
    """Transpose(weight) -> a weight read transposed: MatMul then takes it as a constant (what
    ONNX Runtime's weight quantizers need), and nothing reads a weight before it is written."""
    import onnx_ir as ir

    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or not _lazy(node.inputs[0]):
            continue
        source, out = node.inputs[0], node.outputs[0]
        if len(source.uses()) != 1 or out.is_graph_output():
            continue
        lazy = source.const_value
        perm = list(node.attributes.get_ints("perm", range(len(lazy.shape) - 1, -1, -1)))
        shape = ir.Shape([lazy.shape[i] for i in perm])
        folded = ir.LazyTensor(lambda lazy=lazy, perm=perm: ir.Tensor(np.ascontiguousarray(lazy.numpy().transpose(perm))),
                               dtype=lazy.dtype, shape=shape, name=out.name)
        folded.meta[_SOURCES] = lazy.meta.get(_SOURCES, ())
        value = ir.val(None, lazy.dtype, shape, const_value=folded)
        ir.convenience.replace_all_uses_with(out, value)
        name = out.name
        graph.remove(node, safe=True)
        graph.initializers.pop(source.name)
        value.name = folded.name = name
        graph.register_initializer(value)


def _matmul_weight(node):
    """The weight ``node`` multiplies by when it is a MatMul over a lazily read 2-D initializer that
    nothing else reads (what the quantized writers replace), else None."""
    weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) == 2 else None
    if not _lazy(weight) or len(weight.const_value.shape) != 2 or len(weight.uses()) != 1:
        return None
    return weight


def _replace_matmul(graph, node, weight, nodes: list, output, initializers) -> None:
    """``nodes`` in place of the MatMul ``node``, ``output`` (one of theirs) taking the MatMul's
    output name and uses, ``initializers`` in place of ``weight``."""
    import onnx_ir as ir

    graph.insert_after(node, nodes)
    out, name = node.outputs[0], node.outputs[0].name
    ir.convenience.replace_all_uses_with(out, output, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    graph.initializers.pop(weight.name)
    output.name = name
    for value in initializers:
        graph.register_initializer(value)


def as_matmul_nbits(model, bits: int, block_size: int = BLOCK_SIZE, accuracy_level: int = 4,
                    exclude: tuple[str, ...] = ()) -> None:
    """Every MatMul over a weight (but those ``exclude`` names: the node's name, its output's, or a word of its
    torch name scope, as prunekit.exporters.onnx.quantize_int4's ``eight_bit``) as MatMulNBits, its
    weight quantized by ONNX Runtime's block quantizer (the kernel of MatMulNBitsQuantizer) when
    written; its scales follow in the file. int4-mixed is two calls: 4 bits but the excluded, then 8."""
    import onnx_ir as ir
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)

    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level, bits=bits))
    graph = model.graph
    for node in list(graph):
        weight = _matmul_weight(node)
        if weight is None or _named_by(node, exclude):
            continue
        k, n = weight.const_value.shape
        blocks, blob = -(-k // block_size), block_size * bits // 8
        quantized = _QuantizedWeight(quantizer, weight.const_value)
        packed = ir.val(f"{weight.name}_Q{bits}", ir.DataType.UINT8, [n, blocks, blob], const_value=ir.LazyTensor(
            quantized.packed, ir.DataType.UINT8, ir.Shape([n, blocks, blob]), name=f"{weight.name}_Q{bits}"))
        scales = ir.val(f"{weight.name}_scales", weight.dtype, [n, blocks], const_value=ir.LazyTensor(
            quantized.scales, weight.dtype, ir.Shape([n, blocks]), name=f"{weight.name}_scales"))
        replacement = ir.node("MatMulNBits", [node.inputs[0], packed, scales], domain="com.microsoft",
                              attributes={"K": k, "N": n, "bits": bits, "block_size": block_size,
                                          "accuracy_level": accuracy_level},
                              name=f"{node.name}_Q{bits}" if node.name else None)
        _replace_matmul(graph, node, weight, [replacement], replacement.outputs[0], (packed, scales))
    model.opset_imports.setdefault("com.microsoft", 1)


def _named_by(node, words: tuple[str, ...]) -> bool:
    scope = node.metadata_props.get("pkg.torch.onnx.name_scopes", "")
    return node.name in words or any(w in scope or any(w == out.name for out in node.outputs) for w in words)


def as_int4_source(model, accuracy_level: int = 4) -> int:
    """int4-source on a streamed graph (and, through prunekit.exporters.onnx.quantize_int4_source,
    on a float ONNX file): every MatMul whose weight lies on a 4-bit grid (prunekit.source_grid) as
    4-bit MatMulNBits with those integers, plus ReduceSum of its input per block of 32 times the
    blocks' offsets (one sum per input, shared by the projections that read it), each weight read
    once to find its grid and again as it is written; the other MatMuls at 8 bits. Returns how many
    MatMuls kept a grid (0: nothing changed)."""
    import onnx_ir as ir

    from prunekit.source_grid import BLOCK, fit_grid

    graph, block_sums, offset_products = model.graph, {}, set()
    for node in list(graph):
        weight = _matmul_weight(node)
        if weight is None or fit_grid(weight.const_value.numpy().T) is None:
            continue
        (k, n), x, name = weight.const_value.shape, node.inputs[0], weight.name
        if x not in block_sums:
            shape = ir.val(f"{x.name}_blocks", ir.DataType.INT64, [4],
                           const_value=ir.tensor(np.array([0, 0, k // BLOCK, BLOCK], np.int64)))
            axis = ir.val(f"{x.name}_block_axis", ir.DataType.INT64, [1], const_value=ir.tensor(np.array([-1], np.int64)))
            by_block = ir.node("Reshape", [x, shape], name=f"{x.name}_by_block")
            summed = ir.node("ReduceSum", [by_block.outputs[0], axis], attributes={"keepdims": 0},
                             name=f"{x.name}_block_sums")
            graph.insert_before(node, [by_block, summed])
            for value in (shape, axis):
                graph.register_initializer(value)
            block_sums[x] = summed.outputs[0]
        grid = _SourceGrid(weight.const_value)
        blocks = k // BLOCK
        packed, scales, offsets = (
            ir.val(f"{name}_{part}", dtype, dims, const_value=ir.LazyTensor(
                read, dtype, ir.Shape(dims), name=f"{name}_{part}"))
            for part, dtype, dims, read in (("Q4", ir.DataType.UINT8, [n, blocks, BLOCK // 2], grid.packed),
                                            ("scales", ir.DataType.FLOAT, [n, blocks], grid.scales),
                                            ("offsets", ir.DataType.FLOAT, [blocks, n], grid.offsets)))
        product = ir.node("MatMulNBits", [x, packed, scales], domain="com.microsoft",
                          attributes={"K": k, "N": n, "bits": 4, "block_size": BLOCK, "accuracy_level": accuracy_level},
                          name=f"{node.name}_Q4")
        offset = ir.node("MatMul", [block_sums[x], offsets], name=f"{node.name}_offsets")
        total = ir.node("Add", [product.outputs[0], offset.outputs[0]], name=f"{node.name}_add_offsets")
        offset_products.add(offset.name)
        _replace_matmul(graph, node, weight, [product, offset, total], total.outputs[0], (packed, scales, offsets))
    if offset_products:
        as_matmul_nbits(model, bits=8, accuracy_level=accuracy_level, exclude=tuple(offset_products))
    return len(offset_products)


class _SourceGrid:
    """One weight's grid (prunekit.source_grid), found when its first part is written; its steps
    and offsets (1/32 of the weight each) are kept until they are written after the codes."""

    def __init__(self, weight):
        self.weight, self._grid = weight, None

    def _part(self, part: str):
        import onnx_ir as ir

        from prunekit.source_grid import fit_grid

        if self._grid is None:
            self._grid = fit_grid(self.weight.numpy().T)
        grid = self._grid
        if part == "offsets":  # the last part written: the grid is no longer needed
            self._grid = None
            return ir.Tensor(np.ascontiguousarray(grid.offsets.T))
        return ir.Tensor(grid.packed() if part == "packed" else grid.steps)

    def packed(self):
        return self._part("packed")

    def scales(self):
        return self._part("scales")

    def offsets(self):
        return self._part("offsets")


class _QuantizedWeight:
    """One weight's 8-bit blocks and scales from one quantization: the scales, written right after
    the blocks, are kept from it until then (1/32 of the weight)."""

    def __init__(self, quantizer, weight):
        self.quantizer, self.weight, self._scales = quantizer, weight, None

    def packed(self):
        import onnx_ir as ir

        packed, self._scales, _ = self.quantizer.qbits_block_quant(self.weight.numpy())
        return ir.Tensor(packed)

    def scales(self):
        import onnx_ir as ir

        scales = self._scales if self._scales is not None else self.quantizer.qbits_block_quant(self.weight.numpy())[1]
        self._scales = None
        return ir.Tensor(scales)


def check_streamed_logits(path: Path, tokens: torch.Tensor, reference: torch.Tensor,
                          tolerance: float = 1e-3) -> dict:
    """ONNX Runtime's logits of ``path`` on ``tokens`` against ``reference`` (a torch forward of the
    same model, e.g. block by block from its source: prunekit.pruning.blocks.streamed_logits), and
    the last tokens fed one at a time through the KV cache against the same prefill
    (prunekit.exporters.onnx_judge.probe_outputs). Greedy generation in torch, which verify_export
    also compares, would stream the whole model once per token; the cache check covers what it adds."""
    from prunekit.exporters.onnx_judge import probe_outputs
    from prunekit.exporters.ort_session import OnnxDecoder

    runner = OnnxDecoder(path)
    prefill, steps = probe_outputs(runner, tokens.numpy()[None])
    return compare_probe(prefill, steps, reference, runner.has_kv_cache, tolerance)


def compare_probe(prefill: np.ndarray, steps: np.ndarray, reference: torch.Tensor, kv_cache_io: bool,
                  tolerance: float = 1e-3) -> dict:
    """The verification's verdict on an artifact's probe outputs (prefill logits, cached steps);
    raises when they do not match ``reference``: the export is wrong, not the model."""
    diff = float(np.abs(prefill - reference.numpy()).max())
    cache_diff = float(np.abs(steps - prefill[-len(steps):]).max())
    checks = {"kv_cache_io": kv_cache_io,
              "max_abs_logit_diff": diff, "max_abs_cache_diff": cache_diff, "tolerance": tolerance,
              "logits_within_tolerance": diff <= tolerance and cache_diff <= tolerance}
    checks["passed"] = checks["kv_cache_io"] and checks["logits_within_tolerance"]
    if not checks["passed"]:
        raise PrunekitError(f"the streamed ONNX export does not match PyTorch: {checks} (a prunekit bug, please report)")
    return checks
