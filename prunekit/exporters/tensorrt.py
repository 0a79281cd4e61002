"""TensorRT: the build script written beside the ONNX, and the engine build through TensorRT's
Python API where `tensorrt` imports and a CUDA GPU is visible.

`tensorrt` does not install from PyPI on machines that cannot reach NVIDIA's index, so the engine
path follows TensorRT's documented API (Builder, OnnxParser, BuilderFlag.SPARSE_WEIGHTS) and is
untested here; the script and the checks are tested."""

from __future__ import annotations

from pathlib import Path

BUILD_SCRIPT = """#!/usr/bin/env bash
# Build a TensorRT engine from {onnx} on the target GPU ({device}).
# Written by prunekit; needs TensorRT 10 (trtexec on PATH). Sparse weights are enabled: TensorRT
# picks 2:4 sparse tactics for the GEMMs whose weights keep the pattern; --verbose lists them
# ("Layers eligible for sparse math" / "(Sparsity) ... chose sparse tactic").
set -euo pipefail
cd "$(dirname "$0")"
trtexec --onnx={onnx} --saveEngine={engine} {precision} --sparsity=enable \\
  --minShapes={min_shapes} \\
  --optShapes={opt_shapes} \\
  --maxShapes={max_shapes} \\
  --verbose 2>&1 | tee build.log
grep -iE "sparse|sparsity" build.log | tail -20 || true
# Latency, batch 1 and 8 (prefill = 128 new tokens, decode = 1 token over a 128-token cache):
for shapes in "{prefill1}" "{decode1}" "{prefill8}" "{decode8}"; do
  trtexec --loadEngine={engine} --shapes="$shapes" --useCudaGraph 2>&1 | grep -E "GPU Compute Time|Throughput"
done
"""


def shape_spec(past_names: list[str], cache_dims: dict[str, tuple[int, int]], batch: int, new: int, past: int) -> str:
    parts = [f"input_ids:{batch}x{new}"]
    for name in past_names:
        kv, width = cache_dims[name]
        parts.append(f"{name}:{batch}x{kv}x{past}x{width}")
    return ",".join(parts)


def cache_inputs(path: Path) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """The KV-cache inputs of the ONNX file ``path`` and their (kv heads, head width), read from
    the graph alone (not its weights: no session of a 7 GB file to learn a few names)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    past = [i for i in graph.input if i.name.startswith("past_key_values.")]
    dims = {i.name: tuple(i.type.tensor_type.shape.dim[axis].dim_value for axis in (1, 3)) for i in past}
    return [i.name for i in past], dims


def write_build_script(folder: Path, onnx_name: str, past_names: list[str], cache_dims: dict, device: str,
                       int8: bool, max_batch: int = 8, max_length: int = 2048) -> Path:
    spec = lambda b, n, p: shape_spec(past_names, cache_dims, b, n, p)  # noqa: E731
    script = BUILD_SCRIPT.format(
        onnx=onnx_name, engine="model.engine", device=device,
        precision="--fp16 --int8" if int8 else "--fp16",
        min_shapes=spec(1, 1, 0), opt_shapes=spec(1, 1, 128), max_shapes=spec(max_batch, max_length, max_length),
        prefill1=spec(1, 128, 0), decode1=spec(1, 1, 128), prefill8=spec(8, 128, 0), decode8=spec(8, 1, 128))
    path = folder / "build_engine.sh"
    path.write_text(script)
    path.chmod(0o755)
    return path


def tensorrt_available() -> tuple[bool, str]:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "tensorrt is not installed (pip install 'prunekit[tensorrt]' from NVIDIA's index)"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    return True, ""


def build_engine(onnx_path: Path, engine_path: Path, past_names: list[str], cache_dims: dict, int8: bool,
                 max_batch: int = 8, max_length: int = 2048) -> dict:
    """Build with sparse weights enabled; returns what TensorRT reported."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors[:3]}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    profile.set_shape("input_ids", (1, 1), (1, 128), (max_batch, max_length))
    for name in past_names:
        kv, width = cache_dims[name]
        profile.set_shape(name, (1, kv, 0, width), (1, kv, 128, width), (max_batch, kv, max_length, width))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine")
    engine_path.write_bytes(bytes(serialized))
    return {"engine_bytes": engine_path.stat().st_size, "sparse_weights_flag": True,
            "note": "whether sparse tactics were chosen is in TensorRT's verbose build log"}
