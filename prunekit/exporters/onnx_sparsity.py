"""Checks that the GEMM weights an engine will see still obey N:M after export and INT8.

ONNX stores a Linear's weight as MatMul input B, shaped (in, out): the N:M groups run along the
input axis, i.e. down B's columns. For QDQ graphs the int8 initializer behind DequantizeLinear is
checked (symmetric quantization maps 0 to 0, so a kept pattern stays visible there)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np


def _scope(node) -> str:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in ast.literal_eval(prop.value) if s]
            return scopes[-2] if len(scopes) > 1 else (scopes[0] if scopes else node.name)
    return node.name


def gemm_weights(path: Path) -> dict[str, np.ndarray]:
    """Constant GEMM weights by module name (e.g. layers.3.mlp.down_proj), as (out, in)."""
    return dict(iter_gemm_weights(path))


def iter_gemm_weights(path: Path):
    """(module name, weight as (out, in)) of each constant GEMM weight, one tensor read from the
    external data at a time: a 1.5B model's file is 7 GB, and the check needs one weight at once."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        source = node.input[1]
        producer = producers.get(source)
        if producer is not None and producer.op_type == "DequantizeLinear":
            source = producer.input[0]
        if source not in inits:
            continue
        array = numpy_helper.to_array(inits[source], base_dir=str(Path(path).parent))
        yield _scope(node), (array.T if node.op_type == "MatMul" else array)


def block_prefixes(blocks) -> tuple[str, ...]:
    """The GEMM name prefixes of decoder ``blocks`` (block indices): ``nm_report``'s ``skip`` for the
    blocks an N:M plan kept dense on purpose (prunekit.pruning.partial)."""
    return tuple(f"layers.{i}." for i in blocks)


def nm_report(weights, n: int = 2, m: int = 4, only=("layers.",), skip=()) -> dict:
    """Per pruned GEMM: groups checked and groups breaking N:M; the names of the failing ones.
    ``weights``: a dict of (out, in) weights by module name, or (name, weight) pairs (e.g.
    ``iter_gemm_weights``). GEMMs under a ``skip`` prefix (blocks kept dense on purpose) are
    counted, not checked."""
    layers, failing, kept_dense = {}, [], 0
    for name, w in (weights.items() if isinstance(weights, dict) else weights):
        if not any(name.startswith(p) for p in only):
            continue
        if any(name.startswith(p) for p in skip):
            kept_dense += 1
            continue
        rows, cols = w.shape
        if cols % m:
            bad = rows * (cols // m + 1)
        else:
            bad = int(((w.reshape(rows, cols // m, m) != 0).sum(-1) > n).sum())
        layers[name] = {"groups": rows * (cols // m), "bad_groups": bad, "weights": rows * cols,
                        "sparsity": round(1.0 - np.count_nonzero(w) / w.size, 4)}
        if bad:
            failing.append(name)
    return {"pattern": f"{n}:{m}", "checked": len(layers), "kept_dense": kept_dense,
            "passed": bool(layers) and not failing, "failing": failing, "layers": layers}


def patterned_weights(report: dict) -> int:
    """The weights of the GEMMs in an ``nm_report`` that hold the pattern with zeros in it: what
    sparse tensor cores store compressed (prunekit.estimate.sparse_gemm_weights, from a file)."""
    return sum(layer["weights"] for layer in report["layers"].values()
               if layer["bad_groups"] == 0 and layer["sparsity"] > 0)
