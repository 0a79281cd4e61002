import copy
import math

import pytest
import torch

from prunekit.errors import UserInputError
from prunekit.evaluation import (EvalText, eval_windows, evaluate_texts, increase_upper_bound, measure_quality,
                                 parse_eval_spec)
from prunekit.pruning.run import prune


def test_identical_models_have_zero_kl_and_full_agreement(tiny, calib_ids):
    q = measure_quality(tiny.model, calib_ids[:3], dense=copy.deepcopy(tiny.model))
    assert q.kl == pytest.approx(0, abs=1e-6) and q.top1 == 1.0
    assert q.perplexity == pytest.approx(q.dense_perplexity)


def test_perplexity_matches_the_models_own_loss(tiny, calib_ids):
    window = calib_ids[:1]
    with torch.no_grad():
        loss = tiny.model(window, labels=window).loss.item()
    assert measure_quality(tiny.model, window).perplexity == pytest.approx(math.exp(loss), rel=1e-5)


def test_pruning_shows_in_kl_and_agreement(tiny, calib_ids):
    dense = copy.deepcopy(tiny.model)
    prune(tiny, "magnitude", 0.7, "unstructured", calib_ids=calib_ids, progress=False)
    q = measure_quality(tiny.model, calib_ids[:4], dense=dense)
    assert q.kl > 0.01 and q.top1 < 1.0


def test_the_upper_bound_widens_with_spread_and_narrows_with_windows():
    assert increase_upper_bound([0.05]) is None
    assert increase_upper_bound([0.05] * 8) == pytest.approx(100 * (math.exp(0.05) - 1))
    spread = [0.0, 0.1] * 4  # mean 0.05, s = 0.0535, 8 windows: t(7) = 1.895
    assert increase_upper_bound(spread) == pytest.approx(100 * (math.exp(0.05 + 1.895 * 0.053452 / math.sqrt(8)) - 1),
                                                         rel=1e-4)
    assert increase_upper_bound([0.0, 0.1] * 40) < increase_upper_bound(spread)


def test_the_bound_comes_from_the_windows_of_the_measurement(tiny, calib_ids):
    dense = copy.deepcopy(tiny.model)
    prune(tiny, "magnitude", 0.5, "unstructured", calib_ids=calib_ids, progress=False)
    q = measure_quality(tiny.model, calib_ids[:4], dense=dense)
    assert q.increase_upper_pct > q.increase_pct
    assert measure_quality(tiny.model, calib_ids[:1], dense=dense).increase_upper_pct is None


def test_languages_are_reported_separately(tiny, tmp_path):
    (tmp_path / "en.txt").write_text("the cat sat on the mat and the dog ran " * 30)
    (tmp_path / "xx.txt").write_text("zq xv kj wq pz vv qq jj kk zz " * 30)
    specs = [parse_eval_spec(f"en={tmp_path / 'en.txt'}"), parse_eval_spec(f"xx={tmp_path / 'xx.txt'}")]
    results = evaluate_texts(tiny.model, tiny.tokenizer, specs, 16, 2, dense=copy.deepcopy(tiny.model))
    assert [r.language for r in results] == ["en", "xx"]
    assert results[0].perplexity != results[1].perplexity and all(r.windows == 2 for r in results)


def test_eval_specs_and_windows(tokenizer):
    assert parse_eval_spec("wiki.txt") == EvalText("default", "wiki.txt")
    assert parse_eval_spec("sw=a=b.txt") == EvalText("sw", "a=b.txt")
    with pytest.raises(UserInputError):
        parse_eval_spec("=x")
    assert eval_windows(tokenizer, "hello world " * 50, 8, 3).shape == (3, 8)
    with pytest.raises(UserInputError, match="fewer than one window"):
        eval_windows(tokenizer, "hi", 64)


def test_stored_logits_compute_each_window_once(tmp_path):
    from prunekit.evaluation import StoredLogits

    calls = []

    def logits(window):
        calls.append(window)
        return torch.randn(window.numel() - 1, 7)

    stored = StoredLogits(logits, tmp_path / "dense")
    windows = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(0))
    first = [stored(w) for w in windows]
    again = [stored(w) for w in windows]
    assert len(calls) == 3 and all(torch.equal(a, b) for a, b in zip(first, again))
