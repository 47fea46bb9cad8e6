"""Accuracy-target mode (`qcompile(..., target_quality=...)`): the search over budgets against
brute force on synthetic curves, and on a real compile the returned model meets its target on
the validation data while the cheapest plan does not."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "passes"))
from mp_models import calib_batches, npu_a4_spec, small_net  # noqa: E402

import qcompiler  # noqa: E402
from qcompiler.errors import BudgetError, QCompileError  # noqa: E402
from qcompiler.quality_search import QualityTarget, Step, read_quality_target, search  # noqa: E402


def _curve(costs: list[float], qualities: list[float], target: QualityTarget):
    """A synthetic accuracy-cost curve: under budget b the program picks the dearest plan that
    fits (the most precise one: quality rises with cost)."""
    calls: list[float] = []

    def evaluate(budget: float, how: str) -> Step:
        calls.append(budget)
        i = max(i for i, c in enumerate(costs) if c <= budget) if not math.isinf(budget) else len(costs) - 1
        return Step(budget, costs[i], qualities[i], qualities[i] >= target.value, how)
    return evaluate, calls


@pytest.mark.parametrize("seed", range(12))
def test_search_finds_the_cheapest_passing_plan_within_tolerance(seed):
    g = torch.Generator().manual_seed(seed)
    n = 60
    costs = sorted(set((torch.rand(n, generator=g) * 900 + 100).round().tolist()))
    # Monotone quality with plateaus and jumps, as real curves have.
    steps = torch.rand(len(costs), generator=g).pow(3) * 4
    qualities = torch.cumsum(steps, 0).add(10.0).tolist()
    want = float(torch.rand(1, generator=g)) * (qualities[-1] - qualities[0]) + qualities[0]
    target = QualityTarget("sqnr_db", want, max_evaluations=12, tolerance=0.01)
    evaluate, calls = _curve(costs, qualities, target)
    tried = search(evaluate, costs[0], target)
    assert len(tried) == len(calls) <= target.max_evaluations
    best = min(s.cost for s in tried if s.meets)
    truth = min(c for c, q in zip(costs, qualities) if q >= want)      # brute force
    assert truth <= best <= truth + target.tolerance * costs[-1] + 1e-9
    # Every plan cheaper than the one kept that was tried failed.
    assert all(not s.meets for s in tried if s.cost < best)


def test_search_stops_at_either_end():
    target = QualityTarget("sqnr_db", 30.0)
    evaluate, calls = _curve([1.0, 2.0, 3.0], [10.0, 20.0, 25.0], target)
    assert [s.how for s in search(evaluate, 1.0, target)] == ["most precise"]      # out of reach
    target = QualityTarget("sqnr_db", 5.0)
    evaluate, calls = _curve([1.0, 2.0, 3.0], [10.0, 20.0, 25.0], target)
    tried = search(evaluate, 1.0, target)
    assert [s.how for s in tried] == ["most precise", "cheapest"] and tried[1].meets


def test_interpolation_needs_fewer_plans_than_bisection_on_a_linear_curve():
    costs = [float(c) for c in range(100, 1001)]
    qualities = [c / 10.0 for c in costs]
    target = QualityTarget("sqnr_db", 63.3, max_evaluations=30, tolerance=0.001)
    evaluate, _ = _curve(costs, qualities, target)
    tried = search(evaluate, costs[0], target)
    assert min(s.cost for s in tried if s.meets) == 633.0
    # Bisection alone needs both ends plus log2(900 / 0.9) halvings to pin 633 down to 1.
    assert len(tried) < 2 + math.ceil(math.log2(900 / 0.9))


def test_bad_targets_are_clear_errors():
    with pytest.raises(QCompileError, match="exactly one of sqnr_db, top1_agreement"):
        read_quality_target({"sqnr_db": 20, "top1_agreement": 0.9})
    with pytest.raises(QCompileError, match="unknown key 'psnr'"):
        read_quality_target({"psnr": 20})
    with pytest.raises(QCompileError, match=r"fraction in \(0, 1\]"):
        read_quality_target({"top1_agreement": 95})
    with pytest.raises(QCompileError, match="must be a dict"):
        read_quality_target(25)
    with pytest.raises(BudgetError, match="no cost metric 'energy'"):
        read_quality_target({"sqnr_db": 20, "cost": "energy"}, qcompiler.load_target("npu-int4"))


@pytest.fixture(scope="module")
def a4_spec(tmp_path_factory):
    return npu_a4_spec(tmp_path_factory.mktemp("spec"))


def _validation() -> list[torch.Tensor]:
    return [b.flip(-1) for b in calib_batches(n=8, size=16, batch=4)]


def _sqnr(compiled) -> float:
    with torch.no_grad():
        ref = torch.cat([small_net()(b) for b in _validation()])
        out = torch.cat([compiled(b) for b in _validation()])
    return 10 * math.log10(float(ref.pow(2).sum()) / float((out - ref).pow(2).sum()))


def _compile(spec, **kwargs):
    batches = calib_batches()
    return qcompiler.qcompile(small_net(), batches[0][:1], target=spec, calib_data=batches,
                              validation_data=_validation(), progress=False, **kwargs)


def test_compile_meets_its_target_between_the_cheapest_and_the_most_precise_plan(a4_spec):
    wanted = {"sqnr_db": 45.0, "cost": "bops"}
    compiled = _compile(a4_spec, target_quality=wanted)
    # Measured by hand on the validation data: the returned model meets the target.
    assert _sqnr(compiled) >= 45.0
    # The cheapest plan of all (any target it meets returns it) misses 45 dB: the search had
    # work to do, and what it kept costs more than that plan and less than the most precise.
    cheapest = _compile(a4_spec, target_quality={"sqnr_db": -100.0, "cost": "bops"})
    assert _sqnr(cheapest) < 45.0
    most_precise = _compile(a4_spec, target_quality={"sqnr_db": 48.5, "cost": "bops"})
    assert cheapest.cost("bops") < compiled.cost("bops") < most_precise.cost("bops")
    report = compiled.report()
    steps = report.totals["accuracy-target search"]
    assert "1. most precise" in steps and "2. cheapest" in steps and "(misses the target)" in steps
    assert "accuracy target: sqnr_db >= 45 dB" in report.totals["bit allocation"]
    # Deterministic: the same inputs give the same plan.
    again = _compile(a4_spec, target_quality=wanted)
    assert [g.format_name for g in again.plan.groups] == [g.format_name for g in compiled.plan.groups]


def test_unreachable_target_and_conflicting_settings_are_clear_errors(a4_spec):
    with pytest.raises(BudgetError, match="out of reach: the most precise plan"):
        _compile(a4_spec, target_quality={"sqnr_db": 90.0})
    with pytest.raises(QCompileError, match="either budget= .* or target_quality="):
        _compile(a4_spec, target_quality={"sqnr_db": 30.0}, budget={"weight_memory": 0.8})
