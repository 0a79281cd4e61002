"""The ADMM reconstruction: pattern kept, layer error below Wanda's and SparseGPT's, the refit's λ
chosen on held-out tokens, and the method on the engine (masks deterministic, 2:4 check)."""

import pytest
import torch

from prunekit.pruning.masks import wanda_mask
from prunekit.pruning.reconstruction import Normalized, admm_prune, masked_refit, output_error, reconstruct
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
