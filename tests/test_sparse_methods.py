"""Issue 18's parts: the ADMM reconstruction (pattern kept, layer error below Wanda's and SparseGPT's, the
refit's λ chosen on held-out tokens), channel permutation before N:M, per-block sparsity (OWL)."""

import pytest
import torch

from prunekit.pruning.masks import keep_mask, wanda_mask
from prunekit.pruning.reconstruction import SETTLED, Normalized, admm_prune, masked_refit, output_error, reconstruct
from prunekit.pruning.run import prune
from prunekit.pruning.sparsegpt import sparsegpt_prune


def layer_problem(rows=48, inputs=64, tokens=2000, seed=0):
    """Correlated inputs with a few loud channels, as an LLM's are."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(inputs, inputs, generator=g) / inputs ** 0.5 + torch.eye(inputs)
    X = torch.randn(tokens, inputs, generator=g) @ mixing
    X[:, :4] *= 8
    return torch.randn(rows, inputs, generator=g), X


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_admm_keeps_the_pattern_and_beats_wanda_and_sparsegpt(n_m):
    W, X = layer_problem()
    gram = (X.T @ X).double()
    system = Normalized.of(gram)
    solved, mask = admm_prune(system.inward(W), system.gram, 0.5, n_m)
    pruned = system.outward(solved)
    assert torch.equal(pruned != 0, mask) or bool(((pruned != 0) <= mask).all())
    if n_m:
        assert (mask.reshape(W.shape[0], -1, 4).sum(-1) == 2).all()
    else:
        assert (mask.sum(1) == W.shape[1] // 2).all()
    wanda = W * wanda_mask(W, X.pow(2).sum(0).sqrt(), 0.5, n_m)
    sparsegpt, _ = sparsegpt_prune(W, gram, 0.5, n_m)
    error = output_error(pruned.double(), W.double(), gram)
    assert error < 0.9 * output_error(sparsegpt.double(), W.double(), gram)
    assert error < 0.5 * output_error(wanda.double(), W.double(), gram)


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_admm_stops_when_the_mask_settles_never_at_its_first_step(n_m, monkeypatch):
    """The first step starts from the mask's own projection and barely moves it (1e-4 of the
    weights at 50% on the default model): a stop there would ship Wanda's mask. With every step
    counting as settled the ADMM still takes two; at SETTLED it stays within a few percent of
    running until no weight changes side."""
    import prunekit.pruning.reconstruction as reconstruction

    W, X = layer_problem(rows=256, inputs=256, tokens=4000)
    system = Normalized.of((X.T @ X).double())
    dense = system.inward(W)
    gram = system.gram.double()
    projections = []
    monkeypatch.setattr(reconstruction, "keep_mask", lambda *a, **k: projections.append(1) or keep_mask(*a, **k))
    monkeypatch.setattr(reconstruction, "SETTLED", 1.0)
    admm_prune(dense, system.gram, 0.5, n_m)
    assert len(projections) == 3  # the starting mask, then two steps
    errors = {}
    for settled in (SETTLED, 0.0):
        monkeypatch.setattr(reconstruction, "SETTLED", settled)
        solved, _ = admm_prune(dense, system.gram, 0.5, n_m)
        errors[settled] = output_error(solved.double(), dense.double(), gram)
    wanda = dense * wanda_mask(dense, torch.ones(dense.shape[1]), 0.5, n_m)
    assert errors[SETTLED] < 0.6 * output_error(wanda.double(), dense.double(), gram)
    assert errors[SETTLED] < 1.03 * errors[0.0]


def test_masked_refit_solves_the_masked_ridge_exactly():
    W, X = layer_problem(rows=6, inputs=24, tokens=400)
    system = Normalized.of((X.T @ X).double(), dtype=torch.float64)
    dense = system.inward(W.double())
    mask = torch.rand(dense.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    cut, lam = dense * mask, 0.05
    got = masked_refit(system.gram, dense @ system.gram, mask, cut, lam, cut, iterations=60)
    for row in range(dense.shape[0]):
        keep = mask[row]
        G = system.gram[keep][:, keep] + lam * torch.eye(int(keep.sum()), dtype=torch.float64)
        want = torch.linalg.solve(G, system.gram[keep] @ dense[row] + lam * cut[row, keep])
        assert torch.allclose(got[row, keep], want, atol=1e-8)
        assert not got[row, ~keep].any()


def test_refit_never_loses_to_the_cut_on_held_out_tokens():
    """Few fit tokens for many inputs: the plain least squares overfits, and the held-out tokens
    pick a λ that does not (or the cut itself)."""
    W, X = layer_problem(rows=32, inputs=64, tokens=3000, seed=2)
    fit, held = X[:80], X[80:]
    pruned, mask, info = reconstruct(W, (fit.T @ fit).double(), held, 0.5, (2, 4))
    held_gram = (held.T @ held).double()
    cut_error = output_error((W * mask).double(), W.double(), held_gram)
    assert output_error(pruned.double(), W.double(), held_gram) <= cut_error * 1.001
    assert info["lambda"] != 0.0  # the unregularized fit on 80 tokens is not what held out chose
    generous, _, wide = reconstruct(W, (X[:2500].T @ X[:2500]).double(), X[2500:], 0.5, (2, 4))
    assert wide["heldout_error_vs_cut"] < 0.8  # with enough tokens the reconstruction pays


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_admm_method_on_the_engine(tiny, calib_ids, pattern):
    result = prune(tiny, "admm", 0.5, pattern, calib_ids=calib_ids, progress=False)
    check = result.check
    assert abs(check["min_sparsity"] - 0.5) < 0.01 and abs(check["max_sparsity"] - 0.5) < 0.01
    assert check["nm_ok"] is (True if pattern == "2:4" else None)
    assert all("lambda" in block for block in result.layers)


def test_admm_masks_are_deterministic(tokenizer, calib_ids):
    from prunekit.models import LoadedModel

    from conftest import make_tiny_llama

    hashes = {prune(LoadedModel(make_tiny_llama(), tokenizer, "tiny"), "admm", 0.5, "2:4", calib_ids=calib_ids,
                    progress=False).mask_hash for _ in range(2)}
    assert len(hashes) == 1


def test_balanced_order_deals_one_channel_of_each_band_to_every_group():
    from prunekit.pruning.permutation import balanced_order

    importance = torch.arange(16.0)[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    order = balanced_order(importance, 4)
    assert sorted(order.tolist()) == list(range(16))
    ranks = torch.argsort(torch.argsort(-importance))  # rank of each channel, 0 = most important
    for group in order.reshape(4, 4):
        assert sorted((ranks[group] // 4).tolist()) == [0, 1, 2, 3]
    sums = importance[order].reshape(4, 4).sum(1)
    assert sums.max() - sums.min() <= 4


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_permutation_changes_nothing_the_model_computes(family):
    """Reordered MLP and value channels (Qwen2's v bias, Gemma's one key/value head): the same
    logits, and the statistics of the reordered inputs are the reordered statistics."""
    from conftest import make_tiny

    from prunekit.arch import architecture_for, decoder_layers
    from prunekit.pruning.engine import InputStats
    from prunekit.pruning.permutation import permute_block_

    model = make_tiny(family)
    arch = architecture_for(model.config)
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    block = decoder_layers(model)[0]
    names = (f"{arch.mlp}.{arch.down}", f"{arch.attention}.{arch.o}")

    def collect():
        stats = {n: InputStats(block.get_submodule(n).in_features, want_gram=True) for n in names}
        hooks = [block.get_submodule(n).register_forward_pre_hook(lambda _m, a, s=stats[n]: s.add(a[0]))
                 for n in names]
        with torch.no_grad():
            logits = model(ids).logits
        for h in hooks:
            h.remove()
        return stats, logits

    stats, want = collect()
    applied = permute_block_(block, model.config, stats, 4)
    assert set(applied) == {"mlp", "values"} and not torch.equal(applied["mlp"], torch.arange(96))
    fresh, got = collect()
    assert torch.allclose(got, want, atol=1e-4)
    for n in names:
        assert torch.allclose(stats[n].gram, fresh[n].gram, rtol=1e-4, atol=1e-3)
        assert torch.allclose(stats[n].sumsq, fresh[n].sumsq, rtol=1e-5)


def test_permuted_admm_keeps_two_of_four(tiny, calib_ids):
    plain = prune(tiny, "admm", 0.5, "2:4", calib_ids=calib_ids, progress=False).mask_hash
    from prunekit.models import LoadedModel

    from conftest import make_tiny_llama

    loaded = LoadedModel(make_tiny_llama(), tiny.tokenizer, "tiny")
    permuted = prune(loaded, "admm", 0.5, "2:4", calib_ids=calib_ids, progress=False, permute=True)
    assert permuted.check["nm_ok"] is True and permuted.mask_hash != plain


def test_block_sparsities_keep_the_mean_and_spare_outlier_blocks():
    from prunekit.pruning.layer_sparsity import block_sparsities

    shares = [0.01, 0.05, 0.02, 0.03]
    got = block_sparsities(shares, 0.5, 0.08)
    assert abs(sum(got) / len(got) - 0.5) < 1e-9
    assert got.index(min(got)) == 1 and got.index(max(got)) == 0
    assert max(got) - min(got) == pytest.approx(0.16)
    assert block_sparsities([0.02] * 3, 0.5, 0.08) == [0.5] * 3


def test_outlier_spread_prunes_blocks_unevenly_at_the_same_mean(tokenizer, calib_ids):
    from prunekit.models import LoadedModel

    from conftest import make_tiny_llama

    loaded = LoadedModel(make_tiny_llama(layers=4), tokenizer, "tiny")
    result = prune(loaded, "admm", 0.5, "unstructured", calib_ids=calib_ids, progress=False, outlier_spread=0.1)
    per_block = result.details["block_sparsity"]
    assert len(set(per_block)) > 1 and abs(sum(per_block) / 4 - 0.5) < 1e-6
    measured = [sum(b["sparsity"].values()) / len(b["sparsity"]) for b in result.layers]
    assert all(abs(m - s) < 0.02 for m, s in zip(measured, per_block))
    assert abs(result.check["overall_sparsity"] - 0.5) < 0.01


def test_options_that_do_not_fit_the_pattern_are_refused(tiny, calib_ids):
    from prunekit.errors import UserInputError

    with pytest.raises(UserInputError, match="N:M"):
        prune(tiny, "wanda", 0.5, "unstructured", calib_ids=calib_ids, permute=True)
    with pytest.raises(UserInputError, match="unstructured"):
        prune(tiny, "admm", 0.5, "2:4", calib_ids=calib_ids, outlier_spread=0.08)
    with pytest.raises(UserInputError, match="takes no option"):
        prune(tiny, "wanda", 0.5, "2:4", calib_ids=calib_ids, granularity="heads")
