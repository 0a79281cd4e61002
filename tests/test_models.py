import json

import pytest

from prunekit.errors import UserInputError
from prunekit.models import default_gguf_path, load_model

from conftest import make_tiny_llama


def test_default_model_file_is_located_without_importing_the_package():
    path = default_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_missing_paths(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_model(str(tmp_path / "nothing"))
    with pytest.raises(UserInputError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))


def test_folder_without_config(tmp_path):
    with pytest.raises(UserInputError, match="no config.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(UserInputError, match="architecture 'gpt2' is not supported: prunekit supports llama"):
        load_model(str(tmp_path))


def test_corrupt_checkpoint(tmp_path, tokenizer):
    model = make_tiny_llama()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserInputError, match="corrupt or incomplete"):
        load_model(str(tmp_path))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(UserInputError, match="could not read GGUF file"):
        load_model(str(bad))


def test_offline_hub_id_gives_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError, match="could not fetch 'someone/some-model'"):
        load_model("someone/some-model")


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(UserInputError, match="not .gguf"):
        load_model(str(f))
