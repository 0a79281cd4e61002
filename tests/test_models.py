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


@pytest.mark.parametrize("model_type", ["gpt2", "phi3", "mixtral", "qwen2_moe", "t5", "gemma3", "llava"])
def test_unsupported_architecture_is_one_line_naming_the_families(tmp_path, model_type):
    """GPT-2, Phi, mixture-of-experts, encoder-decoder and vision-language configs stop at the
    config, before any weight is read."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(UserInputError, match=f"architecture '{model_type}' is not supported: prunekit "
                                             f"supports Llama .*Mistral, Qwen2/Qwen2.5, Qwen3 and Gemma 3") as info:
        load_model(str(tmp_path))
    assert "\n" not in str(info.value)


def test_unsupported_variant_of_a_family(tmp_path):
    from transformers import Gemma3TextConfig

    Gemma3TextConfig(num_hidden_layers=1, final_logit_softcapping=30.0).save_pretrained(tmp_path)
    with pytest.raises(UserInputError, match="final_logit_softcapping=30.0 are not supported"):
        load_model(str(tmp_path))


def _saved_tiny(folder, tokenizer):
    make_tiny_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_tensors_that_do_not_match_the_config(tmp_path, tokenizer):
    """transformers would fill the mismatched weights at random and only warn."""
    _saved_tiny(tmp_path, tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 64  # the saved MLP is 96 wide
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match="could not load the checkpoint"):  # transformers refuses shapes
        load_model(str(tmp_path))
    config["intermediate_size"], config["num_hidden_layers"] = 96, 3  # a layer with no tensors
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match="missing model.layers.2"):
        load_model(str(tmp_path))


def test_corrupt_checkpoint(tmp_path, tokenizer):
    _saved_tiny(tmp_path, tokenizer)
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
