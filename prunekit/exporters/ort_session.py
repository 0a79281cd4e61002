"""ONNX Runtime session over an exported decoder and its KV cache. No torch here: the latency
process imports only this and ONNX Runtime, so its start-up and memory are the runtime's."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _require_onnx():
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        from prunekit.errors import MissingExtraError

        raise MissingExtraError("onnx/onnxruntime", "onnx") from None


class OnnxDecoder:
    """Runs an exported decoder in ONNX Runtime with its KV cache."""

    def __init__(self, path: Path, threads: int | None = None):
        _require_onnx()
        import onnxruntime as ort

        from prunekit.threads import usable_cores

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or usable_cores()  # ORT's own default counts the machine's cores
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]

    @property
    def has_kv_cache(self) -> bool:
        """The graph takes a past key/value for every present it returns: what decode needs."""
        return bool(self.past_names) and len(self.past_names) == len(self.present_names)

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=np.float32)
                for i in (self.inputs[n] for n in self.past_names)]

    def step(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": ids.astype(np.int64), **dict(zip(self.past_names, past))}
        logits, *present = self.session.run(None, feed)
        return logits, present

    def greedy(self, prompt: np.ndarray, new_tokens: int) -> list[int]:
        logits, past = self.step(prompt, self.empty_cache(prompt.shape[0]))
        tokens = []
        for _ in range(new_tokens):
            token = int(logits[0, -1].argmax())
            tokens.append(token)
            logits, past = self.step(np.array([[token]]), past)
        return tokens
