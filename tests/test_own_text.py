"""The model's own text mixed into a calibration text (prunekit.calibration.mix_own_text): where
the samples go, that they are seeded, the method defaults, and the prune command end to end,
streamed included."""

import json

import pytest
import torch

from prunekit.calibration import calibration_ids, own_text_writer, self_generated_ids
from prunekit.cli import main
from prunekit.errors import UserInputError
from prunekit.pruning.registry import method

from conftest import make_tiny_llama


def test_own_samples_join_the_fitted_ones_and_the_held_out_tail_stays_text(tiny, text_file):
    text = calibration_ids(str(text_file), tiny.tokenizer, 6, 16, seed=3, held_out=2)
    mixed = calibration_ids(str(text_file), tiny.tokenizer, 6, 16, seed=3, held_out=2, model=tiny.model,
                            progress=False, own=3)
    own = self_generated_ids(own_text_writer(tiny.model), tiny.tokenizer, 3, 16, seed=3, progress=False)
    assert mixed.shape == (9, 16)
    assert torch.equal(mixed[-2:], text[-2:])  # the selection tail: text, last, as without own samples
    fitted = sorted(map(tuple, mixed[:-2].tolist()))
    assert fitted == sorted(map(tuple, torch.cat([text[:-2], own]).tolist()))  # all of both, nothing else
    assert not torch.equal(mixed[:-2], torch.cat([text[:-2], own]))  # shuffled in, not appended
    again = calibration_ids(str(text_file), tiny.tokenizer, 6, 16, seed=3, held_out=2, model=tiny.model,
                            progress=False, own=3)
    assert torch.equal(mixed, again)


def test_own_text_is_written_in_bfloat16_with_a_float32_head(tiny):
    """The same writer in memory as streamed (prunekit.weights.whole_model), close to float32."""
    writer = own_text_writer(tiny.model)
    assert next(writer.parameters()).dtype == torch.bfloat16 and own_text_writer(writer) is writer
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = writer(ids).logits, tiny.model(ids).logits
    assert ours.dtype == torch.float32
    kl = torch.nn.functional.kl_div(ours.log_softmax(-1), theirs.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    assert 0 < kl < 1e-3


def test_method_defaults_and_refusals():
    assert method("admm").own_samples(128, "wiki.valid.tokens") == 32
    assert method("admm").own_samples(64, "wiki.valid.tokens", given=0) == 0
    assert method("wanda").own_samples(128, "wiki.valid.tokens") == 0
    assert method("sparsegpt").own_samples(128, "wiki.valid.tokens", given=5) == 5
    assert method("admm").own_samples(64, "self") == 0  # the model writes all of it already
    with pytest.raises(UserInputError, match="--calib-own"):
        method("admm").own_samples(64, "self", given=4)


@pytest.fixture()
def tiny_folder(tmp_path, tokenizer, text_file):
    folder = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _prune(folder, text, out, *extra):
    return main(["prune", "--model", str(folder), "--calib", str(text), "--calib-samples", "8",
                 "--calib-seqlen", "16", "--out", str(out), "--quiet", *extra])


def test_prune_mixes_the_default_share_streamed_and_records_it(tiny_folder, text_file, tmp_path):
    """A prune with a text streams the model; the own samples are written by the model read whole
    in bfloat16 for that step. The manifest says how many; --calib-own 0 gives another mask."""
    assert _prune(tiny_folder, text_file, tmp_path / "mixed", "--method", "admm", "--pattern", "2:4") == 0
    mixed = json.loads((tmp_path / "mixed" / "prunekit.json").read_text())
    assert mixed["calibration"]["own_samples"] == 2 and mixed["calibration"]["samples"] == 10
    assert _prune(tiny_folder, text_file, tmp_path / "again", "--method", "admm", "--pattern", "2:4") == 0
    assert json.loads((tmp_path / "again" / "prunekit.json").read_text())["mask_hash"] == mixed["mask_hash"]
    assert _prune(tiny_folder, text_file, tmp_path / "text", "--method", "admm", "--pattern", "2:4",
                  "--calib-own", "0") == 0
    alone = json.loads((tmp_path / "text" / "prunekit.json").read_text())
    assert alone["calibration"]["own_samples"] == 0 and alone["calibration"]["samples"] == 8
    assert alone["mask_hash"] != mixed["mask_hash"]


def test_calib_own_without_a_text_or_negative_is_one_line(tiny_folder, tmp_path, capsys):
    assert main(["prune", "--method", "admm", "--model", str(tiny_folder), "--calib-own", "4",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--calib-own" in err[0]
    assert main(["prune", "--method", "admm", "--calib-own", "-1", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_one_token_attention_is_sdpa_with_grouped_heads():
    """The writer's decode attention (prunekit.decode_attention) against transformers' sdpa one,
    float32 (no rounding to hide behind): grouped query heads, a scale given and not, and every
    case it does not handle passed through."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from prunekit.decode_attention import one_token_attention

    generator = torch.Generator().manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    for queries, positions, scaling in ((1, 7, None), (1, 7, 0.3), (5, 5, 0.3)):
        query = torch.randn(2, 6, queries, 8, generator=generator)
        key, value = (torch.randn(2, 2, positions, 8, generator=generator) for _ in range(2))
        ours, _ = one_token_attention(module, query, key, value, None, scaling=scaling)
        theirs, _ = sdpa_attention_forward(module, query, key, value, None, scaling=scaling)
        assert ours.shape == theirs.shape == (2, queries, 6, 8)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_bfloat16_writer_decodes_as_sdpa_and_gives_its_setting_back(family, monkeypatch):
    """A bfloat16 model stepping through its cache with the one-token attention gives sdpa's next
    tokens: Gemma 3's sliding layers past the window (their mask goes to sdpa) included. The shared
    config is restored; a float32 model is left on sdpa."""
    from prunekit import decode_attention
    from prunekit.calibration import preallocated_cache
    from prunekit.decode_attention import NAME, writing_attention

    from conftest import WINDOW, make_tiny

    model = make_tiny(family).to(torch.bfloat16)
    steps = torch.randint(3, 300, (3, WINDOW + 6), generator=torch.Generator().manual_seed(1))

    def decode():
        cache, logits = preallocated_cache(model.config, steps.shape[1]), []
        with torch.no_grad():
            for t in range(steps.shape[1]):
                logits.append(model(steps[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1].float())
        return torch.stack(logits, 1)

    plain = decode()
    calls, grouped = [], decode_attention.grouped_attention
    monkeypatch.setattr(decode_attention, "grouped_attention", lambda *a: calls.append(1) or grouped(*a))
    with writing_attention(model):
        assert model.config._attn_implementation == NAME
        ours = decode()
    assert model.config._attn_implementation == "sdpa"
    kinds = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    full_layers = kinds.count("full_attention")
    assert len(calls) >= full_layers * (steps.shape[1] - 1)  # the one-token path ran, not sdpa's
    assert (ours.argmax(-1) == plain.argmax(-1)).float().mean() > 0.95
    kl = torch.nn.functional.kl_div(ours.log_softmax(-1), plain.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    assert kl < 1e-2
    float32 = make_tiny(family)
    with writing_attention(float32):
        assert float32.config._attn_implementation == "sdpa"
