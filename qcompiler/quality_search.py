"""Accuracy-target mode: the cheapest plan whose output quality meets a target.

`qcompile(..., target_quality={"sqnr_db": 25})` asks for the smallest model, by a cost metric of
the target (`"cost"`, weight memory by default), whose output on validation data is at least
that close to float: output SQNR in dB (`"sqnr_db"`) or top-1 agreement with the float model
(`"top1_agreement"`, a fraction). The pipeline runs up to `sensitivity` once; every plan tried
is then solved by the integer program under a budget of the cost metric, finished (convert,
rounding, requantization) on a fork of that run, and measured.

Which budgets are tried follows the binary + interpolation search of the AIMET mixed-precision
algorithm (Pandey, Nagel et al. 2023), which leans on the accuracy-cost curve being monotone:

1. the most precise plan the program can give (no budget): if it misses the target, nothing
   will meet it, and the compile stops with an error that says so;
2. the cheapest plan there is: if it meets the target, it is the answer;
3. between the cheapest budget known to fail and the cheapest plan known to pass, the budget at
   which the straight line between their qualities reaches the target (interpolation), or the
   middle (bisection) when the previous interpolation shrank the interval by less than half;
   each result moves one end. This stops once the interval is narrower than `tolerance` of the
   most precise plan's cost, or after `max_evaluations` plans.

Every plan tried is a step of the report (budget, cost, quality, how it was chosen). The passing
plan of least cost is returned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .allocation import AllocationResult, build_problem, check_metrics, minimum_cost, solve_allocation
from .errors import BudgetError, QCompileError
from .pass_manager import PassRun
from .plan_check import logits, output_sqnr_db

QUALITY_METRICS = ("sqnr_db", "top1_agreement")


@dataclass(frozen=True)
class QualityTarget:
    metric: str                 # one of QUALITY_METRICS
    value: float                # the least acceptable quality
    cost: str = "weight_memory"  # the target's cost metric to minimise
    max_evaluations: int = 8    # plans finished and measured, both ends included
    tolerance: float = 0.01     # stop when the budget interval is this fraction of the top cost

    def describe(self) -> str:
        unit = " dB" if self.metric == "sqnr_db" else ""
        return f"{self.metric} >= {self.value:g}{unit} at the least {self.cost}"


def read_quality_target(value: Any, spec: Any = None) -> QualityTarget:
    """A QualityTarget from the dict a user gives, with errors that say what to write instead."""
    if isinstance(value, QualityTarget):
        target = value
    else:
        if not isinstance(value, Mapping):
            raise QCompileError(f"target_quality must be a dict such as {{'sqnr_db': 25}}, got {type(value).__name__}")
        given = dict(value)
        metrics = [k for k in given if k in QUALITY_METRICS]
        unknown = [k for k in given if k not in (*QUALITY_METRICS, "cost", "max_evaluations", "tolerance")]
        if unknown:
            raise QCompileError(f"target_quality: unknown key {unknown[0]!r}; the keys are one of "
                                f"{', '.join(QUALITY_METRICS)}, and optionally cost, max_evaluations, tolerance")
        if len(metrics) != 1:
            raise QCompileError(f"target_quality needs exactly one of {', '.join(QUALITY_METRICS)}, "
                                f"e.g. {{'sqnr_db': 25}} or {{'top1_agreement': 0.95}}; got {sorted(given)}")
        metric = metrics[0]
        try:
            target = QualityTarget(metric=metric, value=float(given[metric]), cost=str(given.get("cost", "weight_memory")),
                                   max_evaluations=int(given.get("max_evaluations", 8)),
                                   tolerance=float(given.get("tolerance", 0.01)))
        except (TypeError, ValueError) as exc:
            raise QCompileError(f"target_quality: {exc}; give numbers, e.g. {{'{metric}': 25}}") from None
    if not math.isfinite(target.value):
        raise QCompileError(f"target_quality: {target.metric} must be a finite number, got {target.value}")
    if target.metric == "top1_agreement" and not 0.0 < target.value <= 1.0:
        raise QCompileError(f"target_quality: top1_agreement is a fraction in (0, 1], got {target.value}")
    if target.max_evaluations < 2:
        raise QCompileError("target_quality: max_evaluations must be at least 2 (the two ends of the search)")
    if not 0.0 < target.tolerance < 1.0:
        raise QCompileError(f"target_quality: tolerance is a fraction in (0, 1), got {target.tolerance}")
    if spec is not None:
        check_metrics(spec, {target.cost: 1.0})
    return target


def quality(metric: str, ref: torch.Tensor, out: torch.Tensor) -> float:
    """Output SQNR (dB) or top-1 agreement of `out` against the float model's `ref` logits."""
    if metric == "sqnr_db":
        return output_sqnr_db(ref, out)
    if ref.ndim != 2 or ref.shape[1] < 2:
        raise QCompileError("top1_agreement needs class scores (one row of at least two per sample); "
                            "use {'sqnr_db': ...} for other outputs")
    return float((out.argmax(1) == ref.argmax(1)).float().mean())


@dataclass(frozen=True)
class Step:
    budget: float               # the budget of the cost metric the program was given (inf: none)
    cost: float                 # the cost of the plan it returned
    quality: float
    meets: bool
    how: str                    # "most precise", "cheapest", "interpolation" or "bisection"

    def line(self, target: QualityTarget, top_cost: float) -> str:
        unit = " dB" if target.metric == "sqnr_db" else ""
        q = f"{self.quality:.2f}{unit}" if target.metric == "sqnr_db" else f"{self.quality:.1%}"
        budget = "none" if math.isinf(self.budget) else f"{self.budget / top_cost:.1%}"
        return (f"{self.how}: budget {budget}, plan at {self.cost / top_cost:.1%} of the most precise "
                f"{target.cost}, {target.metric} {q} ({'meets' if self.meets else 'misses'} the target)")


def search(evaluate: Callable[[float, str], Step], low: float, target: QualityTarget) -> list[Step]:
    """The budgets tried and what each gave; `evaluate(budget, how)` finishes and measures the
    plan the program picks under `budget` (math.inf: no budget). `low` is the cheapest cost."""
    top = evaluate(math.inf, "most precise")
    steps = [top]
    if not top.meets:
        return steps
    bottom = evaluate(low, "cheapest")
    steps.append(bottom)
    if bottom.meets:
        return steps
    passing, failing = top, bottom          # cheapest plan known to pass, budget known to fail
    fail_budget = bottom.budget
    shrank_enough = True
    while len(steps) < target.max_evaluations and passing.cost - fail_budget > target.tolerance * top.cost:
        gap = passing.cost - fail_budget
        if shrank_enough and passing.quality > failing.quality:
            t = (target.value - failing.quality) / (passing.quality - failing.quality)
            t, how = min(max(t, 0.1), 0.9), "interpolation"
        else:
            t, how = 0.5, "bisection"
        step = evaluate(fail_budget + t * gap, how)
        steps.append(step)
        if step.meets:
            passing = step if step.cost < passing.cost else passing
        else:
            failing, fail_budget = step, max(fail_budget, step.budget)
        shrank_enough = how == "bisection" or passing.cost - fail_budget <= gap / 2
    return steps


def compile_to_quality(run: PassRun, finish: Callable[[PassRun], PassRun], model: nn.Module,
                       batches: Sequence[tuple[Any, ...]], target: QualityTarget) -> PassRun:
    """Finish `run` (stopped after `sensitivity`) with the cheapest plan found that meets `target`."""
    ctx = run.ctx
    problem = build_problem(run.gm, ctx.target, ctx.groups, ctx.ties, ctx.sensitivity, [target.cost],
                            host_fallback=ctx.options.host_fallback)
    if not problem.candidates:
        raise QCompileError(f"target_quality: no quantizer group of this model has a choice of formats under "
                            f"{ctx.target.name}; the target's spec must offer candidates (e.g. int4 and int8 weights)")
    ref = logits(model, batches)
    finished: dict[frozenset, tuple[PassRun, float, AllocationResult]] = {}
    best: list[Any] = []                     # [run, result] of the cheapest passing plan

    def evaluate(budget: float, how: str) -> Step:
        limit = {} if math.isinf(budget) else {target.cost: budget}
        result = solve_allocation(problem, limit, time_limit=ctx.options.allocation_time_limit)
        key = frozenset(result.choice.items())
        if key not in finished:
            fork = run.fork()
            fork.ctx.allocation = dict(result.choice)
            done = finish(fork)
            finished[key] = (done, quality(target.metric, ref, logits(done.gm, batches)), result)
        done, q, _ = finished[key]
        cost = problem.cost(target.cost, result.choice)
        step = Step(budget=budget, cost=cost, quality=q, meets=q >= target.value, how=how)
        if step.meets and (not best or cost < best[2]):
            best[:] = [done, result, cost]
        return step

    low = minimum_cost(problem, target.cost, time_limit=ctx.options.allocation_time_limit)
    if low is None:
        raise BudgetError("target_quality: the spec's couplings admit no plan at all for this model")
    steps = search(evaluate, low, target)
    top_cost = steps[0].cost
    lines = [s.line(target, top_cost) for s in steps]
    if not best:
        raise BudgetError(
            f"target_quality {target.describe()} is out of reach: the most precise plan the target offers "
            f"gives {steps[0].quality:.4g} on {len(ref)} validation samples. Lower the target, or give the "
            "spec wider formats")
    done, result, cost = best
    summary = (f"{target.describe()}: {len(steps)} plans finished and measured on {len(ref)} validation samples; "
               f"kept the plan at {cost / top_cost:.1%} of the most precise plan's {target.cost}")
    done.ctx.allocation_problem = problem
    done.ctx.allocation_result = replace(result, extra={**result.extra, "quality_search": [summary, *lines]})
    done.ctx.note("allocate_bits", summary)
    for line in lines:
        done.ctx.note("allocate_bits", "  " + line)
    return done
