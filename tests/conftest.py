"""Tiny LLaMA-shaped models built in the tests: grouped-query attention with 9 query heads over 3
key/value heads (as in the default model), small enough to prune in a fraction of a second."""

from __future__ import annotations

import pytest
import torch

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Pruning removes weights that matter least. "
    "A calibration set shows which inputs carry signal. Structured pruning removes channels; "
    "unstructured pruning zeroes single weights. The model must still speak after pruning. "
) * 40


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")


def make_tiny_llama(layers: int = 2, seed: int = 0, intermediate: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=320, hidden_size=72, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=8, max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    # Random init gives near-uniform activations; widen the spread so scores differ by channel.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.rand(p.shape[1]) * 4 + 0.1)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture()
def tiny(tokenizer):
    from prunekit.models import LoadedModel

    return LoadedModel(make_tiny_llama(), tokenizer, "tiny-llama")


@pytest.fixture()
def calib_ids():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, 300, (16, 32), generator=generator)


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(CORPUS)
    return path
