"""Saving a pruned model as a Hugging Face folder that `from_pretrained` (or `load_model`) reloads."""

from __future__ import annotations

import json
from pathlib import Path

from prunekit.models import MANIFEST


def save_checkpoint(model, tokenizer, folder: Path, manifest: dict) -> list[Path]:
    """safetensors + config + tokenizer, and ``prunekit.json`` saying how the model was pruned."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return sorted(p for p in folder.iterdir() if p.is_file())
