import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from prunekit.checkpoint import save_checkpoint
from prunekit.errors import UserInputError
from prunekit.models import LoadedModel, load_model
from prunekit.pruning.engine import InputStats
from prunekit.pruning.fasp import FaspPruner, Refit, column_scores, kept_width
from prunekit.pruning import restoration
from prunekit.pruning.restoration import restore_columns
from prunekit.pruning.run import prune
from prunekit.pruning.structure import set_value_head_dim, shrink_linear

from conftest import make_tiny_llama

SMALL = {"channel_multiple": 8, "value_multiple": 2}


def test_kept_width_rounds_to_the_multiple():
    assert kept_width(1536, 0.3, 32) == 1088
    assert kept_width(1536, 0.2, 64) == 1216
    assert kept_width(64, 0.3, 8) == 48
    assert kept_width(64, 0.3, 4) == 44 and kept_width(64, 0.3, 4, up=True) == 48
    assert kept_width(64, 0.2, 4, up=True) == 52 and kept_width(64, 0.25, 4, up=True) == 48  # exact stays
    assert kept_width(96, 0.0, 32) == 96
    assert kept_width(96, 0.995, 32) == 0  # less than one channel left: refused upstream


def test_column_scores_use_activations():
    W = torch.tensor([[0.01, 1.0], [0.01, 1.0]])
    assert column_scores(W, torch.tensor([1000.0, 1.0])).argmax() == 0  # small weight, huge input


def test_restoration_refits_and_never_loses_on_held_out():
    torch.manual_seed(0)
    mix = torch.randn(16, 16)
    X, Xh = torch.randn(2000, 16) @ mix, torch.randn(500, 16) @ mix
    W = torch.randn(8, 16)
    keep = torch.arange(10)
    new, info = restore_columns(W, keep, X.T @ X, Xh, (1e-3, 1e-2))
    err = lambda w: ((Xh[:, keep] @ w.T - Xh @ W.T) ** 2).sum()  # noqa: E731
    assert info["lambda"] is not None and err(new) < 0.5 * err(W[:, keep])
    # a tolerance trades a little held-out gain for a refit closer to the cut (a larger λ)
    grid = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    sharp, sharp_info = restore_columns(W, keep, X.T @ X, Xh, grid)
    soft, soft_info = restore_columns(W, keep, X.T @ X, Xh, grid, tolerance=0.3)
    assert soft_info["lambda"] >= sharp_info["lambda"]
    gain = err(W[:, keep]) - err(sharp)
    assert err(soft) <= err(sharp) + 0.3 * gain + 1e-6
    assert (soft - W[:, keep]).norm() <= (sharp - W[:, keep]).norm()
    # λ is picked on the held-out tokens, then the refit uses them too
    G, Gh = X.T @ X, Xh.T @ Xh
    pooled = (G + Gh).double()
    lam = sharp_info["lambda"]
    ridge = lam * torch.diag(pooled[keep][:, keep]).mean()
    expected = torch.linalg.solve(pooled[keep][:, keep] + ridge * torch.eye(10, dtype=torch.float64),
                                  (W.double() @ pooled[:, keep] + ridge * W.double()[:, keep]).T).T
    assert torch.allclose(sharp.double(), expected, atol=1e-4)
    # with too few fit tokens the refit overfits, and the held-out check keeps the plain cut
    few = X[:9]
    new, info = restore_columns(W, keep, few.T @ few, Xh, (1e-6,))
    assert err(new) <= err(W[:, keep]) + 1e-3


@pytest.mark.parametrize("panel", [3, 4, 64])
def test_refit_is_the_pooled_ridge_solve_panel_by_panel(monkeypatch, panel):
    # W G[:,S] and the held-out fold are built a panel of kept columns at a time, the fold on G[S,S]'s
    # lower triangle only (what the final Cholesky reads): the refit is the pooled ridge solve,
    # with panels that divide the kept width, that do not, and one wider than it.
    monkeypatch.setattr(restoration, "KEEP_PANEL", panel)
    torch.manual_seed(2)
    mix = torch.randn(20, 20)
    X, Xh = torch.randn(300, 20) @ mix, torch.randn(200, 20) @ mix
    W, keep = torch.randn(5, 20), torch.tensor([0, 2, 3, 5, 7, 8, 11, 12, 13, 16, 17, 19])
    new, info = restore_columns(W, keep, X.T @ X, Xh, (1e-2,))
    pooled = (X.T @ X + Xh.T @ Xh).double()
    ridge = 1e-2 * torch.diag(pooled[keep][:, keep]).mean()
    expected = torch.linalg.solve(pooled[keep][:, keep] + ridge * torch.eye(len(keep), dtype=torch.float64),
                                  (W.double() @ pooled[:, keep] + ridge * W.double()[:, keep]).T).T
    assert info["lambda"] == 1e-2 and torch.allclose(new.double(), expected, rtol=1e-4, atol=1e-4)


def test_lambda_search_walks_downhill_from_the_previous_choice():
    # The held-out error is unimodal in λ: starting anywhere on the grid, the walk finds the λ a
    # scan of the whole grid finds, and started at it, it factorizes three times, not ten.
    torch.manual_seed(1)
    mix = torch.randn(24, 24)
    X, Xh = torch.randn(40, 24) @ mix, torch.randn(100, 24) @ mix  # few fit tokens: overfits at small λ
    W, keep, grid = torch.randn(6, 24), torch.arange(0, 24, 2), FaspPruner.lambdas
    errors = {}
    for lam in grid:
        _, info = restore_columns(W, keep, X.T @ X, Xh, (lam,))
        errors[lam] = info["heldout_error_vs_cut"]
    scanned = min(grid, key=errors.get)
    assert grid[0] < scanned < grid[-1]  # an interior optimum: the walk has to find it
    for start in (None, grid[0], scanned, grid[-1]):
        _, info = restore_columns(W, keep, X.T @ X, Xh, grid, start=start)
        assert info["lambda"] == scanned
        if start == scanned:
            assert info["lambdas_tried"] == 3


def test_centered_refit_does_not_rebuild_a_removed_channels_mean():
    # The removed channel shares only its calibration mean with the kept one: a refit on XᵀX
    # rebuilds that mean from the kept channel (wrong on text with other means); o_proj's does not.
    torch.manual_seed(0)
    stats = InputStats(2, want_gram=True, held_tokens=500)
    for held_out in (False,) * 7 + (True,):
        stats.add(torch.randn(500, 2) * 0.1 + 5.0, 0 if held_out else None)
    consumer = nn.Linear(2, 1, bias=False)
    consumer.weight.data = torch.tensor([[1.0, 1.0]])
    keep = torch.tensor([0])
    pruner = FaspPruner(0.5)
    # A refit frees the statistics it read (their only reader): each refit gets its own copy.
    centered, _ = pruner._refit(consumer, keep, copy.deepcopy(stats), FaspPruner.ATTENTION_REFIT)
    plain, _ = pruner._refit(consumer, keep, stats, Refit())
    assert abs(centered.item() - 1.0) < 0.05  # ≈ the cut: no covariance to fit
    assert plain.item() > 1.5  # toward 2: the kept channel stands in for the removed one's mean


def test_centered_refit_keeps_the_cuts_output_mean():
    # A covariance does not see the output mean: unconstrained, the centered refit moves W'μ_S
    # away from the cut's; held at the cut's, it still fits the variation better than the cut.
    torch.manual_seed(0)
    stats = InputStats(6, want_gram=True, held_tokens=400)
    mix, offset = torch.randn(6, 6), torch.tensor([3.0, -2.0, 1.0, 4.0, 0.5, -1.0])
    for held_out in (False,) * 7 + (True,):
        stats.add(torch.randn(400, 6) @ mix + offset, 0 if held_out else None)
    consumer = nn.Linear(6, 3, bias=False)
    torch.nn.init.normal_(consumer.weight)
    keep = torch.tensor([0, 2, 3, 5])
    mu, cut = stats.mean[keep].float(), consumer.weight.data[:, keep]
    centered = stats.held_rows - stats.mean.float()
    C = centered.T @ centered
    held, _ = FaspPruner(0.5)._refit(consumer, keep, copy.deepcopy(stats), Refit(centered=True, hold_mean=True))
    free, _ = FaspPruner(0.5)._refit(consumer, keep, stats, Refit(centered=True))
    assert torch.allclose(held @ mu, cut @ mu, atol=1e-4)
    assert (free @ mu - cut @ mu).abs().max() > 0.1
    full = consumer.weight.data

    def heldout_error(w):  # ‖w X_S − W X‖² about the mean, on the held-out tokens
        return float((full @ C @ full.T).trace() - 2 * (w @ C[keep] @ full.T).trace()
                     + (w @ C[keep][:, keep] @ w.T).trace())
    assert heldout_error(held) < heldout_error(cut)


@pytest.mark.parametrize("granularity", ["channels", "heads"])
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5])
def test_fasp_shapes_generate_and_reload(tokenizer, calib_ids, tmp_path, granularity, sparsity):
    loaded = LoadedModel(make_tiny_llama(), tokenizer, "tiny")
    before = loaded.num_parameters()
    result = prune(loaded, "fasp", sparsity, "structured", calib_ids=calib_ids, progress=False,
                   granularity=granularity, **SMALL)
    model = result.model
    assert result.parameters_after < before
    assert model.config.intermediate_size == result.details["widths"]["intermediate"]
    out = model.generate(calib_ids[:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
    save_checkpoint(model, tokenizer, tmp_path / "m", result.manifest("tiny"))
    reloaded = load_model(str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(reloaded.model(calib_ids[:2]).logits, model(calib_ids[:2]).logits)
    assert reloaded.num_parameters() == result.parameters_after
    if granularity == "heads" or "structure" not in result.details:
        # a stock config describes it: plain transformers reloads it too
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
        with torch.no_grad():
            assert torch.equal(plain(calib_ids[:2]).logits, model(calib_ids[:2]).logits)


def test_value_channels_follow_gqa_groups(tokenizer, calib_ids):
    loaded = LoadedModel(make_tiny_llama(), tokenizer, "tiny")
    result = prune(loaded, "fasp", 0.5, "structured", calib_ids=calib_ids, progress=False, **SMALL)
    attention = result.model.model.layers[0].self_attn
    assert attention.v_head_dim == 4
    assert attention.v_proj.out_features == 3 * 4 and attention.o_proj.in_features == 9 * 4
    assert "structure" in result.details


def test_narrow_value_heads_compute_what_zeroed_value_channels_do(calib_ids):
    """The value-width attention (values padded for torch's fused kernel) against the stock model
    whose removed value channels are zeroed: same logits, with and without the KV cache."""
    zeroed = make_tiny_llama()
    narrow = copy.deepcopy(zeroed)
    keep = torch.tensor([0, 2, 3, 5, 6, 7])  # of each 8-wide head
    v_rows = (keep + torch.arange(3).unsqueeze(1) * 8).reshape(-1)
    o_cols = (keep + torch.arange(9).unsqueeze(1) * 8).reshape(-1)
    for layer in zeroed.model.layers:
        dropped = torch.ones(24, dtype=torch.bool)
        dropped[v_rows] = False
        layer.self_attn.v_proj.weight.data[dropped] = 0
    for layer in narrow.model.layers:
        attention = layer.self_attn
        attention.v_proj = shrink_linear(attention.v_proj, rows=v_rows)
        attention.o_proj = shrink_linear(attention.o_proj, cols=o_cols)
        set_value_head_dim(attention, len(keep))
    ids = calib_ids[:2, :16]
    with torch.no_grad():
        assert torch.allclose(narrow(ids).logits, zeroed(ids).logits, atol=1e-5)
    assert torch.equal(narrow.generate(ids[:1, :4], max_new_tokens=6, do_sample=False),
                       zeroed.generate(ids[:1, :4], max_new_tokens=6, do_sample=False))


def test_restoration_is_no_worse_than_the_cut(tokenizer, calib_ids):
    ids = torch.randint(3, 300, (32, 32), generator=torch.Generator().manual_seed(5))
    heldout = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(9))
    losses, kept = {}, {}
    for restore in (False, True):
        loaded = LoadedModel(make_tiny_llama(), tokenizer, "tiny")
        result = prune(loaded, "fasp", 0.3, "structured", calib_ids=ids, progress=False, restore=restore,
                       **SMALL)
        kept[restore] = result.mask_hash
        with torch.no_grad():
            losses[restore] = loaded.model(heldout, labels=heldout).loss.item()
    assert losses[True] <= losses[False] * 1.02
    assert kept[True] == kept[False]  # the ablation removes the same channels: only the refit differs


def test_refuses_impossible_requests_before_work(tokenizer):
    loaded = LoadedModel(make_tiny_llama(), tokenizer, "tiny")
    never = torch.zeros(0, 4, dtype=torch.long)  # would fail if any work started
    with pytest.raises(UserInputError, match="every MLP channel"):
        prune(loaded, "fasp", 0.999, "structured", calib_ids=never)
    with pytest.raises(UserInputError, match="all 3 key/value heads"):
        prune(loaded, "fasp", 0.9, "structured", calib_ids=never, granularity="heads", channel_multiple=1)
    mha = make_tiny_llama()
    mha.config.num_key_value_heads = 1
    with pytest.raises(UserInputError, match="all 9 query heads"):  # one kv head: query heads are cut
        prune(LoadedModel(mha, tokenizer, "t"), "fasp", 0.95, "structured", calib_ids=never, granularity="heads",
              channel_multiple=1)
    with pytest.raises(UserInputError, match="granularity"):
        prune(loaded, "fasp", 0.3, "structured", calib_ids=never, granularity="rows")


def test_same_seed_same_structure(tokenizer, calib_ids):
    hashes = {prune(LoadedModel(make_tiny_llama(), tokenizer, "t"), "fasp", 0.3, "structured",
                    calib_ids=calib_ids, progress=False, **SMALL).mask_hash for _ in range(2)}
    assert len(hashes) == 1
