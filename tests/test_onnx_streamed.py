"""The streamed ONNX export (prunekit.exporters.onnx_streamed): the graph export_onnx writes, each
weight read from its source once, while it is written; INT8 byte for byte what ONNX Runtime's
quantizer makes of the whole file; a pruned folder exported without loading it."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from prunekit.exporters.onnx import OnnxDecoder, export_onnx, quantize_int8
from prunekit.exporters.onnx_streamed import check_streamed_logits, export_onnx_streamed, fake_twin
from prunekit.weights import ModuleWeights
from tests.conftest import FAMILIES, make_tiny


class CountingWeights(ModuleWeights):
    """Counts reads per name: a weight read more than once was held or read outside the write."""

    def __init__(self, model):
        super().__init__(model)
        self.reads = Counter()

    def get(self, name, dtype=torch.float32):
        self.reads[name] += 1
        return super().get(name, dtype)


@pytest.fixture()
def tiny_folder(tmp_path, tokenizer):
    folder = tmp_path / "tiny"
    make_tiny("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _ops(path):
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _logits(path, ids):
    runner = OnnxDecoder(path)
    return runner.step(ids.numpy()[None], runner.empty_cache())[0][0]


def test_fake_twin_has_no_storage_and_keeps_ties():
    model = make_tiny("gemma3")
    twin, names = fake_twin(model)
    params = dict(twin.named_parameters(remove_duplicate=False))
    assert all(type(p.data).__name__ == "FakeTensor" for p in params.values())
    assert params["lm_head.weight"] is params["model.embed_tokens.weight"]
    assert set(names.values()) <= set(dict(model.named_parameters(remove_duplicate=False)))
    assert all(not type(p.data).__name__ == "FakeTensor" for p in model.parameters())  # the model is untouched


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_export_is_the_resident_graph_reading_each_weight_once(family, calib_ids, tmp_path):
    model = make_tiny(family, layers=2)
    resident = export_onnx(model, tmp_path / "resident" / "model.onnx")
    weights = CountingWeights(model)
    streamed = export_onnx_streamed(model, weights, tmp_path / "streamed" / "model.onnx")

    assert _ops(streamed) == _ops(resident)
    ids = calib_ids[0]
    np.testing.assert_allclose(_logits(streamed, ids), _logits(resident, ids), atol=1e-5, rtol=0)
    with torch.no_grad():
        reference = model(ids[None]).logits[0]
    assert check_streamed_logits(streamed, ids, reference)["passed"]
    # every matrix read once (q, k, v for the stacked qkv, and so on; a norm's vector may be read
    # again by the graph passes); the tied head and the embedding are one tensor read twice: the
    # embedding's Gather and the head's own MatMul
    tied = model.config.tie_word_embeddings
    matrices = {name for name, p in model.named_parameters(remove_duplicate=False) if p.dim() == 2}
    assert all(count == 1 for name, count in weights.reads.items() if name in matrices
               and not (tied and name in ("lm_head.weight", "model.embed_tokens.weight")))
    assert set(weights.reads) | {"lm_head.weight", "model.embed_tokens.weight"} >= {
        n for n, _ in model.named_parameters()}


def test_streamed_int8_is_what_ort_makes_of_the_whole_file(calib_ids, tmp_path):
    import onnx
    from onnx import numpy_helper

    model = make_tiny("qwen2", layers=2, intermediate=128)  # biases: MatMulNBits, then Add
    resident = quantize_int8(export_onnx(model, tmp_path / "fp32" / "model.onnx"), tmp_path / "int8" / "model.onnx")
    streamed = export_onnx_streamed(model, ModuleWeights(model), tmp_path / "streamed" / "model.onnx", int8=True)

    assert _ops(streamed) == _ops(resident)
    assert _ops(streamed)["MatMulNBits"] == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and the head

    def quantized(path):
        graph = onnx.load(str(path)).graph
        arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
        return [([arrays[i] for i in n.input[1:]], {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})
                for n in nodes]

    for (ours, our_attrs), (theirs, their_attrs) in zip(quantized(streamed), quantized(resident), strict=True):
        assert our_attrs == their_attrs
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(_logits(streamed, calib_ids[0]), _logits(resident, calib_ids[0]))


def test_a_pruned_folder_exports_without_loading_it(tokenizer, calib_ids, tmp_path):
    from prunekit.checkpoint import ShardWriter, probe_ids, probe_record
    from prunekit.models import load_model, open_streamed
    from prunekit.pruning.blocks import streamed_logits
    from prunekit.pruning.run import prune

    source = tmp_path / "dense"
    make_tiny("qwen2", layers=3).save_pretrained(source)
    tokenizer.save_pretrained(source)
    opened = open_streamed(source)
    writer = ShardWriter(tmp_path / "pruned")
    result = prune(opened, "fasp", 0.3, "structured", calib_ids=calib_ids, progress=False, writer=writer,
                   probe=probe_ids(tokenizer), channel_multiple=8)
    writer.finish(result.model, tokenizer, {**result.manifest(str(source)),
                                            "probe": probe_record(tokenizer, result.probe_logits)})

    pruned = open_streamed(tmp_path / "pruned")
    path = export_onnx_streamed(pruned.model, pruned.weights, tmp_path / "onnx" / "model.onnx")
    ids = calib_ids[0]
    reference = streamed_logits(pruned.model, pruned.weights, ids[None])[0]
    assert all(p.is_meta for p in pruned.model.parameters())  # the reference left the skeleton empty
    assert check_streamed_logits(path, ids, reference)["passed"]
    with torch.no_grad():
        loaded = load_model(tmp_path / "pruned").model(ids[None]).logits[0]
    torch.testing.assert_close(reference, loaded, rtol=1e-5, atol=1e-5)


def test_export_command_writes_int8_without_loading_the_folder(tiny_folder, tmp_path, monkeypatch):
    import onnx

    import prunekit.pipeline
    from prunekit.cli import main

    def refuse(*_args, **_kwargs):
        raise AssertionError("the folder was loaded whole")

    monkeypatch.setattr(prunekit.pipeline, "_load", refuse)
    out = tmp_path / "exported"
    assert main(["export", "--target", "cpu-onnx", "--model", str(tiny_folder), "--out", str(out), "--quiet"]) == 0
    ops = Counter(n.op_type for n in onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False).graph.node)
    assert ops["MatMulNBits"] > 0 and ops["MatMul"] == 0
