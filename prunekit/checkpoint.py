"""Saving a pruned model as a Hugging Face folder that `from_pretrained` (or `load_model`) reloads:
all at once from a model in memory, or shard by shard as a streamed prune finishes each block."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from prunekit.models import MANIFEST

INDEX = "model.safetensors.index.json"


def save_checkpoint(model, tokenizer, folder: Path, manifest: dict) -> list[Path]:
    """safetensors + config + tokenizer, and ``prunekit.json`` saying how the model was pruned."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    return _finish_folder(tokenizer, folder, manifest)


def _finish_folder(tokenizer, folder: Path, manifest: dict) -> list[Path]:
    tokenizer.save_pretrained(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return sorted(p for p in folder.iterdir() if p.is_file())


class ShardWriter:
    """Writes tensors to numbered safetensors shards as they are finished (one decoder block, the
    embedding, the head), then the index that makes the shards one checkpoint for transformers."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._shards = 0

    def _next_file(self) -> str:
        self._shards += 1
        return f"model-{self._shards:05d}.safetensors"

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        name = self._next_file()
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(self.folder / name),
                  metadata={"format": "pt"})
        for key, tensor in tensors.items():
            self.weight_map[key] = name
            self.total_bytes += tensor.numel() * tensor.element_size()

    def write_rows(self, name: str, shape: tuple[int, ...], blocks) -> None:
        """One float32 tensor given as (first row, rows) blocks, written as they come: safetensors
        can only save a tensor that is whole in memory, and a 150k-token embedding is 1 GB. The
        file is the safetensors layout itself: header length, JSON header, raw little-endian data."""
        count = 4 * math.prod(shape)
        header = json.dumps({"__metadata__": {"format": "pt"},
                             name: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, count]}}).encode()
        header += b" " * (-len(header) % 8)
        file = self._next_file()
        written = 0
        with open(self.folder / file, "wb") as out:
            out.write(len(header).to_bytes(8, "little") + header)
            for start, block in blocks:
                assert start * 4 * math.prod(shape[1:]) == written, "row blocks out of order"
                data = block.to(torch.float32).contiguous().numpy()
                out.write(data.tobytes())
                written += data.nbytes
        if written != count:
            raise RuntimeError(f"{name}: wrote {written} of {count} bytes (a prunekit bug, please report)")
        self.weight_map[name] = file
        self.total_bytes += count

    def finish(self, model, tokenizer, manifest: dict) -> list[Path]:
        """The index, the (pruned) config, generation config, tokenizer and prunekit.json."""
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        model.config.save_pretrained(self.folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(self.folder)
        return _finish_folder(tokenizer, self.folder, manifest)


PROBE_TEXT = "def mean(values):\n    return sum(values) / len(values)\n\nThe river flows north through the old town"
PROBE_TOP = 8


def probe_ids(tokenizer) -> torch.Tensor:
    """A fixed short prompt whose logits are recorded at prune time (``probe_record``), so a
    reloaded folder can be checked against the model as it was pruned (``probe_mismatch``)."""
    return tokenizer(PROBE_TEXT, return_tensors="pt", add_special_tokens=False).input_ids[:, :32]


def probe_record(tokenizer, logits: torch.Tensor | None) -> dict | None:
    """The probe's top logits per position (ids and values), small enough for prunekit.json."""
    if logits is None:
        return None
    values, ids = logits[0].float().topk(PROBE_TOP, dim=-1)
    return {"text": PROBE_TEXT, "tokens": int(logits.shape[1]), "top_ids": ids.tolist(),
            "top_logits": [[round(v, 5) for v in row] for row in values.tolist()]}


def probe_mismatch(model, tokenizer, record: dict) -> float:
    """Largest difference between ``model``'s logits on the probe and the recorded ones, relative
    to the largest recorded logit: ~1e-6 when the folder holds what was pruned."""
    ids = tokenizer(record["text"], return_tensors="pt", add_special_tokens=False).input_ids[:, :record["tokens"]]
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0].float()
    recorded = torch.tensor(record["top_logits"])
    got = logits.gather(1, torch.tensor(record["top_ids"]))
    return float((got - recorded).abs().max() / recorded.abs().max().clamp(min=1e-6))
