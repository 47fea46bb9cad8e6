"""qcompile(effort=...): what each setting runs, checked on a trained digits model."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from trained_models import deterministic_torch, train_digits  # noqa: E402

import qcompiler  # noqa: E402
from qcompiler.adaround import AdaRoundConfig  # noqa: E402
from qcompiler.errors import QCompileError  # noqa: E402
from qcompiler.options import EFFORT_SETTINGS, CompileOptions  # noqa: E402

SPEC = str(Path(__file__).parent.parent / "benchmarks" / "npu-w248.toml")  # 2-, 4-, 8-bit weights, default 8


@pytest.fixture(scope="module")
def digits():
    return train_digits()


def _compile(model, calib, **kw):
    with deterministic_torch():
        return qcompiler.qcompile(model, calib[:1], target=SPEC, calib_data=list(calib.split(64)), progress=False,
                                  **kw)


@pytest.fixture
def adaround_steps(monkeypatch) -> list[tuple[int, int]]:
    """(weight bits, Adam iterations actually run) of every kernel the compiles in the test
    round, in order. The iterations are counted from the gradient's evaluations, one per step."""
    from qcompiler import adaround

    seen: list[tuple[int, int]] = []
    real = adaround.adaround_weight

    class Counting:
        def __init__(self, moments):
            self.moments, self.calls = moments, 0

        def __getattr__(self, name):
            return getattr(self.moments, name)

        def gradient(self, d):
            self.calls += 1
            return self.moments.gradient(d)

    def spy(w, fmt, params, moments, cfg):
        counting = Counting(moments)
        out = real(w, fmt, params, counting, cfg)
        seen.append((fmt.bits, counting.calls))
        return out

    monkeypatch.setattr(adaround, "adaround_weight", spy)
    return seen


def _input_scale(compiled) -> float:
    placeholder = next(n.name for n in compiled.graph("capture").graph.nodes if n.op == "placeholder")
    group = next(g for g in compiled.plan.groups if g.kind == "activation" and placeholder in g.tensors)
    return float(group.params.scale)


def _notes(compiled, stage: str) -> list[str]:
    return compiled._run.ctx.notes.get(stage, [])


def test_an_unknown_effort_is_refused_with_the_choices(digits):
    with pytest.raises(QCompileError, match="effort='quick'.*fast, default, best"):
        _compile(digits.model, digits.calib, effort="quick")
    with pytest.raises(QCompileError, match="fast, default, best"):
        CompileOptions(effort="")


def test_default_effort_is_the_pipeline_as_it_was():
    assert EFFORT_SETTINGS["default"].adaround == AdaRoundConfig()
    assert EFFORT_SETTINGS["default"].calibration_samples is None
    assert CompileOptions().effort == "default"


def test_a_budgeted_compile_measures_sensitivity_on_as_many_samples_as_its_effort_says(digits):
    budget = {"weight_memory": 0.55}
    counts = {effort: _compile(digits.model, digits.calib, effort=effort, budget=budget)._run.ctx.sensitivity.samples
              for effort in ("fast", "default", "best")}
    assert len(digits.calib) > 16
    assert counts == {"fast": 16, "default": 16, "best": len(digits.calib)}


def test_fast_calibrates_on_the_first_64_samples_and_rounds_over_fewer(digits):
    # Samples past the 64th are blown up tenfold: only a compile that calibrates on them widens
    # the input's range.
    calib = digits.calib.clone()
    assert len(calib) > 64
    calib[64:] *= 10
    fast, default = _compile(digits.model, calib, effort="fast"), _compile(digits.model, calib)
    head_only = _compile(digits.model, calib[:64], effort="fast")
    assert _input_scale(fast) == pytest.approx(_input_scale(head_only), rel=1e-6)
    assert _input_scale(default) > 5 * _input_scale(fast)
    fast_note = " ".join(_notes(fast, "optimize_rounding"))
    default_note = " ".join(_notes(default, "optimize_rounding"))
    fast_samples = EFFORT_SETTINGS["fast"].adaround.max_samples
    assert f"over {fast_samples} samples" in fast_note
    assert f"over {min(len(calib), AdaRoundConfig().max_samples)} samples" in default_note


def test_each_effort_runs_its_schedule_on_narrow_and_wide_kernels(digits, adaround_steps):
    # A budget below 8 bits everywhere leaves some kernels at 8 bits and puts others below.
    seen = adaround_steps
    runs = {}
    for effort in ("fast", "default", "best"):
        seen.clear()
        _compile(digits.model, digits.calib[:64], effort=effort, budget={"weight_memory": 0.6}, plan_check=False)
        assert {bits >= 8 for bits, _ in seen} == {True, False}, effort
        cfg = EFFORT_SETTINGS[effort].adaround
        assert all(steps == cfg.schedule(bits)[0] for bits, steps in seen), (effort, seen)
        runs[effort] = {bits >= 8: steps for bits, steps in seen}
    assert runs["fast"][False] < runs["default"][False] < runs["best"][False]
    assert runs["fast"][True] == runs["default"][True] < runs["best"][True]


def test_the_adaround_schedule_depends_on_the_weight_width():
    cfg = AdaRoundConfig()
    assert cfg.schedule(8) == (cfg.wide_steps, cfg.wide_lr) == (100, 2e-2)
    assert cfg.schedule(16) == cfg.schedule(8)
    assert cfg.schedule(4) == cfg.schedule(7) == (cfg.steps, cfg.lr) == (300, 1e-2)
    assert AdaRoundConfig(wide_bits=None).schedule(8) == (300, 1e-2)
    with pytest.raises(QCompileError, match="wide_steps"):
        AdaRoundConfig(wide_steps=0)


def test_fast_skips_the_plan_check_unless_asked(digits):
    budget = {"weight_memory": 0.55}
    fast = _compile(digits.model, digits.calib, effort="fast", budget=budget)
    asked = _compile(digits.model, digits.calib, effort="fast", budget=budget, plan_check=True)
    default = _compile(digits.model, digits.calib, budget=budget)
    assert "plan check" not in fast.report().totals["bit allocation"]
    assert "plan check" in asked.report().totals["bit allocation"]
    assert "plan check" in default.report().totals["bit allocation"]
    for compiled in (fast, asked):
        assert compiled.weight_memory_bytes <= 0.55 * _compile(digits.model, digits.calib[:64]).weight_memory_bytes


def test_the_same_effort_gives_the_same_model(digits):
    a, b = (_compile(digits.model, digits.calib, effort="fast") for _ in range(2))
    x = digits.heldout[:32]
    assert torch.equal(a(x), b(x))


def test_pareto_compiles_every_plan_at_the_given_effort(digits, adaround_steps):
    seen = adaround_steps
    with deterministic_torch():
        result = qcompiler.pareto(digits.model, digits.calib[:1], target=SPEC, calib_data=list(digits.calib.split(64)),
                                  budgets=[1.0, 0.6], progress=False, effort="fast")
    assert [p.status for p in result.points] == ["OPTIMAL", "OPTIMAL"]
    fast = EFFORT_SETTINGS["fast"].adaround
    assert any(bits < 8 for bits, _ in seen)   # narrow kernels, where fast and default differ
    assert all(steps == fast.schedule(bits)[0] for bits, steps in seen), seen
    with pytest.raises(QCompileError, match="fast, default, best"):
        qcompiler.pareto(digits.model, digits.calib[:1], target=SPEC, calib_data=[digits.calib], budgets=[1.0],
                         progress=False, effort="quick")
