import torch

from prunekit.pruning.checker import nm_violations
from prunekit.pruning.masks import keep_mask, magnitude_mask, wanda_mask
from prunekit.pruning.sparsegpt import sparsegpt_prune


def test_wanda_scores_weight_times_input_norm():
    W = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    x_norm = torch.tensor([10.0, 1.0, 0.1, 1.0])  # scores 10, 2, 0.3, 0.5
    mask = wanda_mask(W, x_norm, 0.5)
    assert mask.tolist() == [[True, True, False, False]]
    # magnitude alone would keep the two largest weights instead
    assert magnitude_mask(W, 0.5).tolist() == [[False, True, True, False]]


def test_wanda_compares_within_rows():
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0], [100.0, 200.0, 300.0, 400.0]])
    mask = wanda_mask(W, torch.ones(4), 0.5)
    assert mask.sum(1).tolist() == [2, 2]


def test_nm_masks_obey_the_pattern():
    torch.manual_seed(0)
    W = torch.randn(16, 32)
    for n, m in ((2, 4), (4, 8), (1, 4)):
        mask = wanda_mask(W, torch.rand(32), 0.0, (n, m))
        assert mask.reshape(16, -1, m).sum(-1).eq(n).all()
        assert nm_violations(W * mask, n, m) == 0


def test_checker_sees_a_broken_group():
    torch.manual_seed(0)
    W = torch.randn(8, 16) * wanda_mask(torch.randn(8, 16), torch.ones(16), 0, (2, 4))
    assert nm_violations(W, 2, 4) == 0
    W[3, 4:8] = 1.0
    assert nm_violations(W, 2, 4) == 1


def test_unstructured_mask_exact_count_and_deterministic():
    scores = torch.rand(8, 64, generator=torch.Generator().manual_seed(1))
    a, b = keep_mask(scores, 0.3), keep_mask(scores.clone(), 0.3)
    assert torch.equal(a, b)
    assert (~a).sum(1).eq(int(64 * 0.3)).all()


def test_sparsegpt_reduces_reconstruction_error_versus_plain_masking():
    torch.manual_seed(0)
    X = torch.randn(512, 32) @ torch.randn(32, 32)  # correlated inputs
    W = torch.randn(16, 32)
    H = X.T @ X
    for n_m in (None, (2, 4)):
        new_w, mask = sparsegpt_prune(W, H, 0.5, n_m)
        assert (new_w[~mask] == 0).all()
        assert abs((~mask).float().mean().item() - 0.5) < 0.01
        plain = W * mask
        err_sparsegpt = ((X @ new_w.T - X @ W.T) ** 2).sum()
        err_plain = ((X @ plain.T - X @ W.T) ** 2).sum()
        assert err_sparsegpt < 0.8 * err_plain
        if n_m:
            assert nm_violations(new_w, 2, 4) == 0
