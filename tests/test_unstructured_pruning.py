import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunekit.checkpoint import save_checkpoint
from prunekit.errors import UserInputError
from prunekit.models import LoadedModel, load_model
from prunekit.pruning.engine import InputStats, capture_block_inputs
from prunekit.pruning.masks import wanda_mask
from prunekit.pruning.run import prune

from conftest import make_tiny_llama


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("wanda", "2:4"), ("wanda", "4:8"),
                                            ("sparsegpt", "unstructured"), ("sparsegpt", "2:4"),
                                            ("magnitude", "unstructured")])
def test_methods_reach_the_requested_sparsity(tiny, calib_ids, method, pattern):
    result = prune(tiny, method, 0.5, pattern, calib_ids=calib_ids, progress=False)
    check = result.check
    assert check["linear_layers"] == 14
    assert abs(check["min_sparsity"] - 0.5) < 0.01 and abs(check["max_sparsity"] - 0.5) < 0.01
    assert check["nm_ok"] is (None if pattern == "unstructured" else True)
    # embeddings and lm_head stay dense
    assert (tiny.model.model.embed_tokens.weight != 0).float().mean() > 0.99
    out = tiny.model.generate(calib_ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_same_seed_same_masks(tokenizer, text_file):
    hashes = []
    for _ in range(2):
        loaded = LoadedModel(make_tiny_llama(), tokenizer, "tiny")
        hashes.append(prune(loaded, "wanda", 0.5, "unstructured", calib=str(text_file), calib_samples=4,
                            calib_seqlen=32, seed=3, progress=False).mask_hash)
    other = prune(LoadedModel(make_tiny_llama(), tokenizer, "tiny"), "wanda", 0.5, "unstructured",
                  calib=str(text_file), calib_samples=4, calib_seqlen=32, seed=4, progress=False).mask_hash
    assert hashes[0] == hashes[1] and hashes[0] != other


def test_input_stats_gram_is_xtx_split_into_fit_and_held_out():
    torch.manual_seed(0)
    fit, held = torch.randn(3, 40, 300) + 2, torch.randn(2, 40, 300) - 1  # 300: panels of 256 and 44
    stats = InputStats(300, want_gram=True, held_tokens=100)
    for batch in fit:
        stats.add(batch)
    stats.add(held, held_at=20)  # rows 20..99; rows 0..19 belong to another process
    X, Xh = fit.reshape(-1, 300).double(), held.reshape(-1, 300).double()
    assert torch.allclose(stats.gram, X.T @ X, atol=1e-3)
    assert torch.equal(stats.held_rows[20:], held.reshape(-1, 300)) and not stats.held_rows[:20].any()
    assert torch.allclose(stats.sumsq, (X * X).sum(0) + (Xh * Xh).sum(0), atol=1e-3)
    # centered on the mean of every token, fit and held out alike
    mu = torch.cat([X, Xh]).mean(0)
    assert torch.allclose(stats.mean, mu, atol=1e-6)
    assert torch.allclose(stats.covariance, (X - mu).T @ (X - mu), atol=1e-3)
    assert InputStats(300, want_gram=False).gram is None


def test_wanda_uses_layerwise_pruned_inputs(tiny, calib_ids):
    """Block 1 is scored on the outputs of the already-pruned block 0, not the dense ones."""
    dense = copy.deepcopy(tiny.model)
    prune(tiny, "wanda", 0.5, "unstructured", calib_ids=calib_ids, progress=False)
    inputs = capture_block_inputs(dense, calib_ids, 8)

    def block1_q_mask(block0):
        with torch.no_grad():
            h1 = torch.cat([block0(h, **kw["full_attention"]) for h, kw in inputs])
            x = dense.model.layers[1].input_layernorm(h1).reshape(-1, 72)
        return wanda_mask(dense.model.layers[1].self_attn.q_proj.weight, x.pow(2).sum(0).sqrt(), 0.5)

    got = tiny.model.model.layers[1].self_attn.q_proj.weight != 0
    assert torch.equal(got, block1_q_mask(tiny.model.model.layers[0]))
    assert not torch.equal(got, block1_q_mask(dense.model.layers[0]))


def test_save_and_reload_gives_identical_logits(tiny, calib_ids, tmp_path):
    result = prune(tiny, "sparsegpt", 0.5, "2:4", calib_ids=calib_ids, progress=False)
    save_checkpoint(result.model, tiny.tokenizer, tmp_path / "m", result.manifest("tiny"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ours = load_model(str(tmp_path / "m"))
    with torch.no_grad():
        want = result.model(calib_ids[:2]).logits
        assert torch.equal(plain(calib_ids[:2]).logits, want)
        assert torch.equal(ours.model(calib_ids[:2]).logits, want)
    assert ours.manifest["mask_hash"] == result.mask_hash


def test_bad_inputs(tiny, text_file, tmp_path):
    with pytest.raises(UserInputError, match="out of range"):
        prune(tiny, "wanda", 1.0, "unstructured", calib_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(UserInputError, match="N < M"):
        prune(tiny, "wanda", 0.5, "4:2", calib_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(UserInputError, match="does not exist"):
        prune(tiny, "wanda", 0.5, "unstructured", calib=str(tmp_path / "missing.txt"))
    with pytest.raises(UserInputError, match="too short"):
        prune(tiny, "wanda", 0.5, "unstructured", calib=str(text_file), calib_samples=1000, calib_seqlen=512)


def test_self_calibration_is_seeded(tiny):
    from prunekit.calibration import calibration_ids

    a = calibration_ids("self", tiny.tokenizer, 2, 8, seed=1, model=tiny.model, progress=False)
    b = calibration_ids("self", tiny.tokenizer, 2, 8, seed=1, model=tiny.model, progress=False)
    assert a.shape == (2, 8) and torch.equal(a, b)
    assert (a[:, 0] == tiny.tokenizer.bos_token_id).all()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_preallocated_cache_matches_a_growing_one(family):
    """The preallocated cache hands attention the same keys and values as transformers' own
    (Gemma 3's sliding layers, with a window shorter than the text, keep their class): the same
    logits at every step, so the same samples."""
    from transformers.cache_utils import DynamicCache

    from prunekit.calibration import preallocated_cache
    from tests.conftest import WINDOW, make_tiny

    model = make_tiny(family)
    ids = torch.randint(3, 300, (3, 2 * WINDOW), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        caches = [DynamicCache(config=model.config), preallocated_cache(model.config, ids.shape[1])]
        for position in range(ids.shape[1]):
            a, b = (model(ids[:, position:position + 1], cache=c, use_cache=True).logits for c in caches)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_self_calibration_samples_at_temperature_one():
    """Inverse-CDF sampling draws each token with its softmax probability; never one of probability 0."""
    from prunekit.calibration import sample_tokens

    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.log().expand(20000, 4)
    tokens = sample_tokens(logits, torch.Generator().manual_seed(0)).flatten()
    share = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    assert share[3] == 0 and torch.allclose(share, probs, atol=0.015)
