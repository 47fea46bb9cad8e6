"""allocate_bits: pick one format per quantizer group under the target's budgets (an integer program).

Before: a calibrated graph whose groups have sensitivities (`sensitivity`). After: the same graph;
`ctx.allocation` maps every group with a choice to its format name and `ctx.allocation_result`
holds the solver's answer (status, objective, solve time, budgets and costs). The program and
its solver are `qcompiler.allocation`. Without a budget the pass changes nothing.
"""
from __future__ import annotations

from torch import fx

from ..allocation import absolute_budgets, build_problem, check_metrics, solve_allocation
from ..context import CompileContext


def allocate_bits(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    budget = ctx.options.budget
    if not budget:
        return gm  # nothing asks for anything but the spec's defaults
    check_metrics(ctx.target, budget)
    problem = build_problem(gm, ctx.target, ctx.groups, ctx.ties, ctx.sensitivity, list(budget),
                            host_fallback=ctx.options.host_fallback)
    result = solve_allocation(problem, absolute_budgets(problem, budget),
                              time_limit=ctx.options.allocation_time_limit)
    ctx.allocation.update(result.choice)
    ctx.allocation_problem, ctx.allocation_result = problem, result
    ctx.note("allocate_bits", result.summary())
    return gm
