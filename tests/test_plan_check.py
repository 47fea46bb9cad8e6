"""The plan check: a budgeted compile never returns a plan worse than the widest uniform plan that
fits the budget (on its validation data), and the uniform plan it compares with is the right one."""
from __future__ import annotations

from dataclasses import replace
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from trained_models import deterministic_torch, run, train_digits  # noqa: E402

import qcompiler  # noqa: E402
from qcompiler.allocation import AllocationProblem, BitTie, CostTable  # noqa: E402
from qcompiler.plan_check import output_sqnr_db, widest_uniform_plan  # noqa: E402

BITS = {"w2": 2, "w4": 4, "w8": 8}


def _problem(ties=()) -> AllocationProblem:
    # Two free weight groups of 10 and 30 elements (memory = elements * bits / 8), one fixed
    # 8-bit activation group, 100 bytes of biases.
    sizes = {0: 10, 1: 30}
    return AllocationProblem(
        candidates={g: ("w2", "w4", "w8") for g in sizes},
        bits={0: dict(BITS), 1: dict(BITS), 2: {"a8": 8}},
        sensitivity={g: {"w2": 1.0, "w4": 0.1, "w8": 0.0} for g in sizes},
        costs={"weight_memory": CostTable(constant=100.0, factors={
            (g,): {(f,): n * b / 8 for f, b in BITS.items()} for g, n in sizes.items()})},
        defaults={0: "w8", 1: "w8"}, ties=tuple(ties))


def test_widest_uniform_plan_is_the_most_bits_that_fit():
    p = _problem()
    # w8 costs 140, w4 120, w2 110.
    assert widest_uniform_plan(p, {"weight_memory": 140.0}) == ("w8", {0: "w8", 1: "w8"})
    assert widest_uniform_plan(p, {"weight_memory": 139.0}) == ("w4", {0: "w4", 1: "w4"})
    assert widest_uniform_plan(p, {"weight_memory": 119.9}) == ("w2", {0: "w2", 1: "w2"})
    assert widest_uniform_plan(p, {"weight_memory": 109.0}) is None


def test_widest_uniform_plan_obeys_the_targets_couplings():
    # Group 0 must have as many bits as the fixed 8-bit group 2: only uniform w8 is allowed.
    p = _problem([BitTie("equal_bits", (0, 2))])
    assert widest_uniform_plan(p, {"weight_memory": 139.0}) is None
    assert widest_uniform_plan(p, {"weight_memory": 140.0}) == ("w8", {0: "w8", 1: "w8"})


@pytest.fixture(scope="module")
def digits():
    return train_digits()


SPEC = str(Path(__file__).parent.parent / "benchmarks" / "npu-w248.toml")  # 2-, 4-, 8-bit weights, default 8


def _compile(trained, budget=0.55, **kw):
    with deterministic_torch():
        return qcompiler.qcompile(trained.model, trained.calib[:1], target=SPEC,
                                  calib_data=list(trained.calib.split(64)), progress=False,
                                  budget={"weight_memory": budget}, **kw)


def _weight_formats(compiled) -> dict[int, str]:
    return {g.id: g.format_name for g in compiled.plan.groups if g.format_name.startswith("w")}


def test_the_programs_plan_is_kept_when_it_is_better(digits):
    # Measured: at 55 % of the int8 memory the program mixes w4 and w8 (28.8 dB on the
    # calibration digits) and beats uniform w4 (25.9 dB); the check returns the same model.
    ref = run(digits.model, digits.calib)
    checked, unchecked = _compile(digits), _compile(digits, plan_check=False)
    line = checked.report().totals["bit allocation"]
    assert "plan check: the program's plan kept" in line and "uniform w4" in line
    assert _weight_formats(checked) == _weight_formats(unchecked)
    assert len(set(_weight_formats(checked).values())) == 2
    assert output_sqnr_db(ref, run(checked, digits.calib)) == output_sqnr_db(ref, run(unchecked, digits.calib))


def test_a_misled_program_loses_to_the_uniform_plan_and_the_check_catches_it(digits, monkeypatch):
    # Sensitivities upside down (2-bit looks free, 8-bit costly): the program's plan puts 2-bit
    # weights where they hurt. The check must return uniform w4, which fits and is better.
    from qcompiler.passes import sensitivity as pass_module

    real = pass_module.measure_sensitivity

    def upside_down(*args, **kwargs):
        table = real(*args, **kwargs)
        return replace(table, values={g: {c: (1 + BITS[c]) ** 3 / 1000 if c in BITS else v
                                          for c, v in cands.items()} for g, cands in table.values.items()})

    monkeypatch.setattr(pass_module, "measure_sensitivity", upside_down)
    ref, held = run(digits.model, digits.calib), run(digits.model, digits.heldout)
    checked, unchecked = _compile(digits), _compile(digits, plan_check=False)
    assert "w2" in _weight_formats(unchecked).values()
    assert set(_weight_formats(checked).values()) == {"w4"}
    assert "plan check: uniform w4 kept" in checked.report().totals["bit allocation"]
    assert output_sqnr_db(ref, run(checked, digits.calib)) > output_sqnr_db(ref, run(unchecked, digits.calib))
    # It holds on digits neither plan was compared on, too.
    assert output_sqnr_db(held, run(checked, digits.heldout)) > output_sqnr_db(held, run(unchecked, digits.heldout))
    with deterministic_torch():
        default = qcompiler.qcompile(digits.model, digits.calib[:1], target=SPEC,
                                     calib_data=list(digits.calib.split(64)), progress=False)
    assert checked.weight_memory_bytes <= 0.55 * default.weight_memory_bytes
