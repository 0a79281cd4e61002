"""Tiny random-weight models built in the tests, one per supported family: LLaMA-shaped with 9
query heads over 3 key/value heads (as in the default model), and Mistral, Qwen2, Qwen3 and Gemma 3
with what sets each family apart (sliding windows, biases, untied heads, q/k norms, one key/value
head, 1 + w norms), small enough to prune in a fraction of a second."""

from __future__ import annotations

import os

import pytest
import torch

from prunekit.threads import usable_cores


@pytest.hookimpl(optionalhook=True)  # a run without pytest-xdist (-p no:xdist) still collects
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject) starts one worker per usable core (affinity and cgroup quota), not
    one per core the machine has."""
    return usable_cores()


def pytest_configure(config):
    """Each pytest-xdist worker runs on cores of its own, one thread per core: torch, ONNX Runtime
    and every subprocess a test starts follow the affinity (prunekit.threads), so two workers never
    share a core and their OpenMP threads never oversubscribe one (10-23x slower when they do,
    measured here). Most of the suite's time is single-threaded tracing, so two workers on two
    cores halve it."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    index, count = int(worker.removeprefix("gw")), int(count)
    if len(cores) >= count:
        os.sched_setaffinity(0, cores[index::count])
    threads = str(usable_cores())
    os.environ["OMP_NUM_THREADS"] = threads
    torch.set_num_threads(int(threads))


def pytest_collection_modifyitems(config, items):
    """The end-to-end tests on the real model (minutes each) start first, so the workers finish
    together instead of one of them ending on the longest test."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)

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


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
WINDOW = 12  # sliding window of the tiny Mistral and Gemma 3: shorter than the test prompts


def make_tiny(family: str, layers: int = 2, seed: int = 0, intermediate: int = 96):
    """A tiny model of ``family``; weights and norms spread so every part of the block matters."""
    import transformers as tf

    if family == "llama":
        return make_tiny_llama(layers, seed, intermediate)
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if family == "mistral":
        config = tf.MistralConfig(**common, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                  sliding_window=WINDOW, tie_word_embeddings=False)
    elif family == "qwen2":  # q/k/v biases, untied head
        config = tf.Qwen2Config(**common, num_attention_heads=8, num_key_value_heads=2,
                                tie_word_embeddings=False)
    elif family == "qwen3":  # per-head q/k RMSNorm, head_dim apart from hidden / heads
        config = tf.Qwen3Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                tie_word_embeddings=True)
    elif family == "gemma3":  # one kv head, sliding and global layers, 1 + w norms, GELU-tanh
        config = tf.Gemma3TextConfig(**common, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                     query_pre_attn_scalar=16, sliding_window=WINDOW,
                                     layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                                     + ["sliding_attention"] * (layers % 2))
    else:
        raise ValueError(family)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(torch.rand(p.shape[1]) * 4 + 0.1)
            else:  # norms and biases
                p.add_(torch.randn_like(p) * 0.3)
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
