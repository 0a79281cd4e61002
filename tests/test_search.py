"""The budgeted plan: budgets and where they come from, the search space, the choice."""

import pytest

from prunekit.errors import UserInputError
from prunekit.plan import Budget, make_plan
from prunekit.profile import load_profile, parse_profile
from prunekit.search import SKIPPED, Candidate, select, selection_split


def _c(amount, precision, ppl, ms, mb, status="built"):
    return Candidate(amount, precision, status=status, ppl_increase=ppl, kl=ppl / 100, decode_ms=ms,
                     bytes=int(mb * 1e6))


GRID = [_c(0, "fp32", 0.0, 30, 540), _c(0, "int8", 1.0, 20, 270), _c(0, "int4", 9.0, 14, 150),
        _c(0.1, "int8", 6.0, 18, 240), _c(0.1, "int4", 15.0, 12, 130), _c(0.2, "int8", 0, 0, 0, SKIPPED)]


def test_fastest_within_budget_wins_and_the_runner_up_is_named():
    choice = select(GRID, Budget(max_ppl_increase=10), "latency")
    assert choice.fits and choice.chosen.name == "dense int4" and choice.runner_up.name == "pruned 0.1 int8"
    assert "runner-up pruned 0.1 int8" in choice.reason
    assert not [c for c in GRID if c.status == SKIPPED][0].within_budget


def test_smallest_within_budget_wins_for_size():
    assert select(GRID, Budget(max_ppl_increase=10), "size").chosen.name == "dense int4"
    assert select(GRID, Budget(max_ppl_increase=5), "size").chosen.name == "dense int8"
    assert select(GRID, Budget(max_ppl_increase=20, max_size_mb=140), "size").chosen.name == "pruned 0.1 int4"


def test_latency_and_size_limits_narrow_the_choice():
    choice = select(GRID, Budget(max_ppl_increase=10, max_latency_ms=19), "size")
    assert choice.chosen.name == "dense int4"
    choice = select(GRID, Budget(max_ppl_increase=2, max_latency_ms=25), "latency")
    assert choice.chosen.name == "dense int8"


def test_nothing_fits_ships_the_closest_and_says_what_it_missed():
    choice = select(GRID, Budget(max_ppl_increase=0.5, max_latency_ms=15), "latency")
    assert not choice.fits
    # overshoot: fp32 1.0 (latency 30 vs 15), int8 1.33 (ppl 1 vs 0.5, latency 20 vs 15), int4 17 (ppl 9 vs 0.5)
    assert choice.chosen.name == "dense fp32"
    choice = select(GRID, Budget(max_latency_ms=10), "latency")
    assert not choice.fits and choice.chosen.name == "pruned 0.1 int4"
    assert "misses it: decode 12 ms > 10 ms" in choice.reason


def test_the_budget_judges_the_upper_bound_of_the_quality_loss():
    bounded = [_c(0, "int8", 1.0, 20, 270), _c(0.1, "int8", 8.8, 15, 150)]
    bounded[0].ppl_increase_upper, bounded[1].ppl_increase_upper = 1.9, 12.4
    choice = select(bounded, Budget(max_ppl_increase=10), "latency")
    assert choice.chosen.name == "dense int8"
    assert bounded[1].misses == ["perplexity up to +12.4% > 10% (95% bound)"]
    bounded[1].ppl_increase_upper = None  # one window: no bound, the estimate is judged
    assert select(bounded, Budget(max_ppl_increase=10), "latency").chosen.name == "pruned 0.1 int8"


def _measured(precision, ppl, upper, kl, ms, basis="measured", mb=1.0):
    return Candidate(0, precision, ppl_increase=ppl, ppl_increase_upper=upper, kl=kl, decode_ms=ms,
                     latency_basis=basis, bytes=int(mb * 1e6))


def test_measured_decode_times_within_the_hosts_spread_are_a_tie_that_quality_breaks():
    # gemma-3-270m's dense candidates at 6969c83: INT4-mixed 2% faster than INT8 at ten times its KL
    gemma = [_measured("int8", 1.45, 3.12, 0.0146, 10.88, mb=973), _measured("int4-mixed", 1.75, 5.97, 0.156, 10.67, mb=935),
             _measured("fp32", 0.0, 0.0, 0.0, 29.24, mb=1744)]
    choice = select(gemma, Budget(max_ppl_increase=10), "latency")
    assert choice.chosen.name == "dense int8" and choice.runner_up.name == "dense int4-mixed"
    assert "within 10% of the fastest" in choice.reason and "KL 0.015 vs KL 0.156" in choice.reason
    # SmolLM2-135M's: INT4-mixed 16% faster than INT8, outside the spread, so the faster ships
    smol = [_measured("int8", 0.94, 1.63, 0.0047, 7.98), _measured("int4-mixed", 5.57, 8.15, 0.0586, 6.74)]
    assert select(smol, Budget(max_ppl_increase=10), "latency").chosen.name == "dense int4-mixed"
    # estimated latencies are the roofline's own order, not a measurement with a spread
    estimated = [_measured("int8", 1.45, 3.12, 0.0146, 10.88, "estimated"),
                 _measured("int4-mixed", 1.75, 5.97, 0.156, 10.67, "estimated")]
    assert select(estimated, Budget(max_ppl_increase=10), "latency").chosen.name == "dense int4-mixed"
    # the size objective orders exact byte counts: no tie
    assert select(gemma, Budget(max_ppl_increase=10), "size").chosen.name == "dense int4-mixed"


def test_budget_from_flags_and_profile():
    cpu = load_profile("cpu-onnx")
    budget = Budget.resolve(cpu, max_kl=0.1)
    assert budget.limits == {"max_ppl_increase": 10.0, "max_kl": 0.1}
    assert dict(budget.sources) == {"max_ppl_increase": "profile cpu-onnx", "max_kl": "flag --max-kl"}
    assert Budget.resolve(cpu, max_ppl_increase=3).max_ppl_increase == 3
    phone = Budget.resolve(load_profile("coreml-iphone13"))
    assert phone.max_size_mb == 1000 and dict(phone.sources)["max_size_mb"] == "profile coreml-iphone13"
    assert Budget().misses(ppl_increase=50) == []
    assert Budget(max_latency_ms=5).misses(latency_ms=6) == ["decode 6 ms > 5 ms"]
    with pytest.raises(UserInputError, match="--max-size-mb"):
        Budget(max_size_mb=float("nan"))


def test_search_space_follows_what_the_user_left_open():
    cpu = load_profile("cpu-onnx")
    plan = make_plan(cpu)
    assert plan.search.amounts == (0.0, 0.1, 0.2, 0.3)
    assert plan.search.precisions == ("fp32", "int8", "int4", "int4-mixed")
    assert plan.search.objective == "latency" and plan.search.size == 16
    assert make_plan(cpu, sparsity=0.2).search.amounts == (0.2,)
    assert make_plan(cpu, precision="int4").search.precisions == ("int4",)
    assert make_plan(cpu, sparsity=0.2, precision="int4").search is None
    assert make_plan(load_profile("coreml-iphone13")).search.objective == "size"
    trt = make_plan(load_profile("a100-tensorrt-sparse"))
    assert trt.search.amounts == (0.0, 0.125, 0.25, 0.375, 0.5) and trt.search.precisions == ("fp16", "int8")
    with pytest.raises(UserInputError, match="does not run on cpu-onnx"):
        make_plan(cpu, precision="palette4")


def test_profile_budget_and_search_tables_are_validated():
    base = {"name": "x", "runtime": {"name": "onnxruntime", "artifact": "onnx", "latency_basis": "measured"},
            "device": {"name": "d", "sparse_tensor_cores": False,
                       "peak_tflops": {"fp32": 1.0, "fp16": 1.0, "int8": 1.0}, "memory_bandwidth_gbs": 1.0,
                       "memory_gb": 1.0, "preferred_channel_multiple": 8},
            "defaults": {"method": "fasp", "pattern": "structured", "sparsity": 0.2, "precision": "int8"}}
    profile = parse_profile(base, "test")
    assert profile.search_amounts == (0.2,) and profile.search_precisions == ("int8",) and profile.budget == {}
    for table, bad, word in (("search", {"precisions": ["palette4"]}, "precisions"),
                             ("search", {"amounts": [0.1, 1.5]}, "amounts"),
                             ("search", {"objective": "speed"}, "objective"),
                             ("budget", {"max_ppl_increase": -1}, "max_ppl_increase"),
                             ("budget", {"max_speed": 1}, "max_speed")):
        with pytest.raises(UserInputError, match=word):
            parse_profile({**base, table: bad}, "test")


def test_selection_tokens_are_held_out_of_the_fit_tokens():
    import torch

    ids = torch.arange(64 * 4).reshape(64, 4)
    fit, held = selection_split(ids)
    assert fit.shape[0] == 56 and held.shape[0] == 8
    assert not set(fit.flatten().tolist()) & set(held.flatten().tolist())
    fit, held = selection_split(ids[:4])
    assert fit.shape[0] == 2 and held.shape[0] == 2


def test_held_out_calibration_windows_come_from_the_end_of_the_text(tmp_path, tokenizer):
    import torch

    from prunekit.calibration import calibration_ids

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i}" for i in range(4000)))
    stream = tokenizer(text.read_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    ids = calibration_ids(str(text), tokenizer, 16, 32, seed=0, held_out=2)
    cut = stream.numel() * 14 // 16
    position = {tuple(stream[i:i + 32].tolist()): i for i in range(stream.numel() - 31)}
    starts = [position[tuple(w.tolist())] for w in ids]
    assert all(s + 32 <= cut for s in starts[:14]) and all(s >= cut for s in starts[14:])
    assert torch.equal(ids, calibration_ids(str(text), tokenizer, 16, 32, seed=0, held_out=2))  # seeded
    short = calibration_ids(str(text), tokenizer, stream.numel() // 32, 32, seed=0, held_out=2)
    assert short.shape[0] == stream.numel() // 32  # too short to split: sampled as one


def test_report_percentages_never_print_minus_zero():
    from prunekit.report import _ppl_cell

    cell = _ppl_cell({"ppl_increase": -0.04, "ppl_increase_upper": -0.01})
    assert cell == "+0.0% (≤ +0.0%)" and _ppl_cell({"ppl_increase": -1.26, "ppl_increase_upper": 2.0}) == "-1.3% (≤ +2.0%)"


class _Built:
    """A builder that builds nothing: every candidate it is handed counts as built."""

    def build(self, model, amount, precisions, windows, reference):
        return [Candidate(amount, p) for p in precisions]


def _explore_fasp(tiny, monkeypatch, budget):
    import torch

    import prunekit.pruning.run
    from prunekit.search import explore

    pruned_on, real = [], prunekit.pruning.run.prune

    def counting(loaded, *args, calib_ids=None, **kwargs):
        pruned_on.append(calib_ids.shape[0])
        return real(loaded, *args, calib_ids=calib_ids, **kwargs)

    monkeypatch.setattr(prunekit.pruning.run, "prune", counting)
    plan = make_plan(load_profile("cpu-onnx"), budget=budget)
    fit = torch.randint(3, 300, (32, 16), generator=torch.Generator().manual_seed(0))
    selection = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    explored = explore(tiny, tiny.model, plan, [(0.34, ("fp32",)), (0.67, ("fp32",))], fit, selection,
                       _Built(), "tokens", progress=False)
    return explored, pruned_on


def test_screen_stops_far_outside_the_budget_on_a_slice_of_the_tokens(tiny, monkeypatch):
    explored, pruned_on = _explore_fasp(tiny, monkeypatch, Budget(max_kl=1e-9))  # any pruning changes KL
    assert pruned_on == [8]  # the slice only: never pruned on all 32 samples, nor the larger amount
    assert all(c.status == SKIPPED and "not pruned on all" in c.why for c in explored.candidates)
    assert explored.screen[0]["fit_samples"] == 8 and explored.screen[0]["misses"]


def test_screen_prunes_on_all_tokens_what_the_slice_does_not_rule_out(tiny, monkeypatch):
    explored, pruned_on = _explore_fasp(tiny, monkeypatch, Budget(max_ppl_increase=1e6))
    assert pruned_on == [8, 32, 8, 32]
    assert [c.status for c in explored.candidates] == ["built", "built"]
    assert [s["fit_samples"] for s in explored.screen] == [8, 32, 8, 32]
    assert explored.pruned[0.34].calibration["samples"] == 32  # what ships is the prune on all of them
