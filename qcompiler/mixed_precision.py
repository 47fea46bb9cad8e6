"""The accuracy-cost Pareto curve: one sensitivity run, many budgets.

`pareto()` runs the pipeline up to `sensitivity` once, then for every budget solves the bit
allocation, converts a copy of the calibrated graph with that plan, runs the passes after
`convert`, and measures the result: weight memory, BOPs, the predicted sensitivity (the ILP's
objective) and, on evaluation data (the calibration data if none is given), output SQNR against
float and top-1 agreement. `MixedPrecisionSession` exposes the same steps for benchmarks that
compare other allocations (uniform bit widths, greedy search) on equal terms. Both run the
pipeline through the pass manager: once up to `sensitivity`, then a fork of that run per plan.
With `executor="ray"` the sensitivity shards and the plans' compiles run as Ray tasks
(`qcompiler.executor`); the points are the same as in one process.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .allocation import absolute_budgets, build_problem, check_metrics, solve_allocation
from .api import pipeline, resume, start_run
from .calibration import calibration_batches
from .compiled import CompiledModel
from .errors import BudgetError
from .executor import map_tasks
from .options import CompileOptions
from .plan_check import logits as _logits, output_sqnr_db


@dataclass(frozen=True)
class ParetoPoint:
    budget: dict[str, Any]
    weight_memory_bytes: float
    bops: float
    predicted: float            # total sensitivity of the plan (relative output noise power)
    sqnr_db: float              # measured output SQNR against float
    top1_agreement: float       # NaN without eval data
    status: str
    solve_seconds: float
    choice: dict[int, str] = field(default_factory=dict, compare=False)


@dataclass
class ParetoResult:
    points: list[ParetoPoint]
    sensitivity_seconds: float
    default_weight_memory_bytes: float
    default_bops: float
    evaluated_on: str

    def to_markdown(self) -> str:
        lines = ["| budget | weight memory (KiB) | % of default | BOPs (G) | predicted noise | output SQNR dB | top-1 agreement | status |",
                 "|---|---|---|---|---|---|---|---|"]
        for p in self.points:
            b = ", ".join(f"{k}={v}" for k, v in p.budget.items())
            top1 = "" if math.isnan(p.top1_agreement) else f"{p.top1_agreement:.1%}"
            lines.append(f"| {b} | {p.weight_memory_bytes / 1024:,.1f} | {p.weight_memory_bytes / self.default_weight_memory_bytes:.1%} | "
                         f"{p.bops / 1e9:,.3f} | {p.predicted:.3g} | {p.sqnr_db:.2f} | {top1} | {p.status} |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str) -> str:
        """Weight memory against output SQNR (and top-1 agreement if measured), as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [p for p in self.points if p.status in ("OPTIMAL", "FEASIBLE")]
        mem = [p.weight_memory_bytes / 2**20 for p in ok]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(mem, [p.sqnr_db for p in ok], "o-", color="tab:blue", label="output SQNR (dB)")
        ax.set_xlabel("weight memory (MiB)")
        ax.set_ylabel("output SQNR vs float (dB)", color="tab:blue")
        if ok and not all(math.isnan(p.top1_agreement) for p in ok):
            ax2 = ax.twinx()
            ax2.plot(mem, [100 * p.top1_agreement for p in ok], "s--", color="tab:red", label="top-1 agreement (%)")
            ax2.set_ylabel("top-1 agreement with float (%)", color="tab:red")
        ax.set_title(f"mixed precision Pareto curve ({self.evaluated_on})")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


class MixedPrecisionSession:
    """A model calibrated and measured once; any number of allocations converted from it."""

    def __init__(self, model: nn.Module, example_inputs: Any, *, target: Any, calib_data: Any,
                 sensitivity: str | None = None, observer: Any = None, progress: bool = True, seed: int = 0,
                 passes: Sequence[Any] | None = None, executor: str = "local", effort: str = "default"):
        options = CompileOptions(observer=observer, progress=progress, seed=seed, executor=executor, effort=effort,
                                 **({"sensitivity": sensitivity} if sensitivity is not None else {}))
        self.manager = pipeline(passes, budget=True)
        self.run = start_run(self.manager, model, example_inputs, target, calib_data, options, stop="sensitivity")
        self.ctx = self.run.ctx
        self.spec = self.ctx.target
        self.head_seconds = self.run.seconds
        self.table = self.ctx.sensitivity
        self.float_graph = self.run.float_graph
        self.problem = self.with_metrics([m for m in ("weight_memory", "bops") if m in self.spec.cost])

    def with_metrics(self, metrics: Sequence[str]) -> Any:
        ctx = self.ctx
        return build_problem(self.run.gm, ctx.target, ctx.groups, ctx.ties, ctx.sensitivity, list(metrics),
                             host_fallback=ctx.options.host_fallback)

    def compile(self, choice: Mapping[int, str]) -> CompiledModel:
        """The simulated model with `choice` (group id -> format) and the defaults elsewhere."""
        fork = self.run.fork()
        fork.ctx.allocation = dict(choice)
        return CompiledModel.from_run(resume(self.manager, run=fork, start="convert"))

    def solve(self, budget: Mapping[str, Any]) -> Any:
        check_metrics(self.spec, budget)
        problem = self.problem if all(m in self.problem.costs for m in budget) else self.with_metrics(budget)
        return solve_allocation(problem, absolute_budgets(problem, budget))


def pareto(model: nn.Module, example_inputs: Any, *, target: Any, calib_data: Any,
           budgets: Sequence[Any], eval_data: Any = None, metric: str = "weight_memory",
           sensitivity: str | None = None, progress: bool = True, seed: int = 0,
           executor: str = "local", effort: str = "default") -> ParetoResult:
    """Solve the bit allocation for every budget from one sensitivity run, and measure each plan.

    budgets: values of `metric` (fractions of the spec-default model such as 0.6, "60%", or
        absolute values such as "1.5 MiB"), or dicts of several metrics.
    eval_data: batches (tensors or tuples) to measure output SQNR and top-1 agreement with
        float on; the calibration data (SQNR only) if None.
    executor: "local" or "ray": run the sensitivity shards and each budget's compile as Ray tasks
        (`qcompiler.executor`); the result is the same.
    effort: as in `qcompile` (calibration samples and AdaRound of every plan's compile).
    """
    if not budgets:
        raise BudgetError("pareto needs at least one budget, e.g. budgets=[1.0, 0.75, 0.6, 0.5]")
    session = MixedPrecisionSession(model, example_inputs, target=target, calib_data=calib_data,
                                    sensitivity=sensitivity, progress=progress, seed=seed, executor=executor,
                                    effort=effort)
    if eval_data is None:
        batches, where = session.ctx.calib_batches, "calibration data"
    else:
        names = [n.target for n in session.run.gm.graph.nodes if n.op == "placeholder"]
        batches = calibration_batches(eval_data, session.ctx.example_inputs, names)
        where = "held-out data"
    ref = _logits(model.eval(), batches)
    default = {g: session.problem.defaults[g] for g in session.problem.candidates}
    solved: list[tuple[dict[str, Any], Any]] = []
    for b in budgets:
        budget = dict(b) if isinstance(b, Mapping) else {metric: b}
        try:
            solved.append((budget, session.solve(budget)))
        except BudgetError:
            solved.append((budget, None))
    choices = [result.choice for _, result in solved if result is not None]
    measured = iter(map_tasks(_measure_plan, (session, batches, ref, eval_data is not None), choices, executor))
    points = []
    for budget, result in solved:
        if result is None:
            points.append(ParetoPoint(budget, math.nan, math.nan, math.nan, math.nan, math.nan, "INFEASIBLE", 0.0))
            continue
        memory, bops, sqnr, top1 = next(measured)
        points.append(ParetoPoint(
            budget=budget, weight_memory_bytes=memory, bops=bops, predicted=result.objective, sqnr_db=sqnr,
            top1_agreement=top1, status=result.status, solve_seconds=result.seconds, choice=dict(result.choice)))
    return ParetoResult(points=points, sensitivity_seconds=session.table.seconds,
                        default_weight_memory_bytes=session.problem.cost("weight_memory", default)
                        if "weight_memory" in session.problem.costs else math.nan,
                        default_bops=session.problem.cost("bops", default) if "bops" in session.problem.costs else math.nan,
                        evaluated_on=where)


def _measure_plan(shared: tuple, choice: Mapping[int, str]) -> tuple[float, float, float, float]:
    """(weight memory, BOPs, output SQNR, top-1 agreement) of the session's model with `choice`."""
    session, batches, ref, labelled = shared
    compiled = session.compile(choice)
    out = _logits(compiled, batches)
    top1 = float((out.argmax(1) == ref.argmax(1)).float().mean()) if labelled else math.nan
    bops = float(compiled.cost("bops")) if "bops" in session.spec.cost else math.nan
    return float(compiled.weight_memory_bytes), bops, output_sqnr_db(ref, out), top1
