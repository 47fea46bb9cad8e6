"""The plan check: a budgeted compile keeps the integer program's plan only if it beats the
widest uniform plan that fits the same budget.

The program trades sensitivities measured before the rounding is optimised; after AdaRound or
block reconstruction a uniform plan can recover more than the mix it was judged against (a
uniform 4-bit model beat a mixed 2/4/8-bit one of the same memory). So after `allocate_bits`
the run forks: one fork finishes with the program's plan, the other with the uniform plan (every
group that offers the format takes it, the others keep their default) that uses the most of the
first budget while fitting all of them and the target's couplings. Both are measured by output
SQNR against the float model on validation batches (the calibration batches if none are given),
and the better one is returned; the report says which and by how much.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .allocation import AllocationProblem
from .calibration import sub_batches
from .pass_manager import PassRun

# A plan's cost may exceed its budget by this relative slack (float round-off of the cost sums).
_SLACK = 1e-9
EVAL_BATCH = 8


def logits(model: nn.Module, batches: Sequence[tuple[Any, ...]]) -> torch.Tensor:
    """The model's first output over `batches`, one row per sample (run EVAL_BATCH samples at a
    time: the simulation's element-wise passes then reuse the CPU's cache)."""
    with torch.no_grad():
        outs = []
        for args in sub_batches(list(batches), EVAL_BATCH):
            out = model(*args)
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return torch.cat([o.reshape(o.shape[0], -1).float() for o in outs])


def output_sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach(), out.detach()
    noise = float((out - ref).pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float(ref.pow(2).sum()) / noise)


def widest_uniform_plan(problem: AllocationProblem, budgets: Mapping[str, float]) -> tuple[str, dict[int, str]] | None:
    """(format name, choice) of the uniform plan that fits every budget and coupling and costs
    the most in the first budget's metric; None when no uniform plan fits."""
    first = next(iter(budgets))
    names = sorted({c for cands in problem.candidates.values() for c in cands})
    best: tuple[float, str, dict[int, str]] | None = None
    for name in names:
        choice = {g: name if name in cands else problem.defaults[g] for g, cands in problem.candidates.items()}
        if not problem.feasible_ties(choice):
            continue
        if any(problem.cost(m, choice) > v * (1 + _SLACK) for m, v in budgets.items()):
            continue
        cost = problem.cost(first, choice)
        if best is None or cost > best[0]:
            best = (cost, name, choice)
    return None if best is None else (best[1], best[2])


def check_plan(run: PassRun, finish: Callable[[PassRun], PassRun], model: nn.Module,
               batches: Sequence[tuple[Any, ...]]) -> PassRun:
    """Finish `run` (stopped after `allocate_bits`) with the program's plan and with the widest
    uniform plan that fits; return the finished run whose output is closer to `model`'s."""
    ctx = run.ctx
    result, problem = ctx.allocation_result, ctx.allocation_problem
    if result is None or problem is None:
        return finish(run)  # no budget: nothing was allocated
    uniform = widest_uniform_plan(problem, result.budgets)
    if uniform is None or uniform[1] == result.choice:
        done = finish(run)
        _record(done, result, "no uniform plan fits the budget" if uniform is None else
                f"the program's plan is uniform {uniform[0]}")
        return done
    name, choice = uniform
    ref = logits(model, batches)
    mixed = finish(run.fork())
    mixed_db = output_sqnr_db(ref, logits(mixed.gm, batches))
    fork = run.fork()
    fork.ctx.allocation = dict(choice)
    flat = finish(fork)
    flat_db = output_sqnr_db(ref, logits(flat.gm, batches))
    if flat_db > mixed_db:
        _record(flat, replace(result, choice=dict(choice), objective=problem.objective(choice),
                              costs={m: problem.cost(m, choice) for m in result.budgets}),
                f"uniform {name} kept: output SQNR {flat_db:.2f} dB against the program's plan's {mixed_db:.2f} dB "
                f"on {len(ref)} validation samples")
        return flat
    _record(mixed, result, f"the program's plan kept: output SQNR {mixed_db:.2f} dB against uniform {name}'s "
                           f"{flat_db:.2f} dB on {len(ref)} validation samples")
    return mixed


def _record(run: PassRun, result: Any, message: str) -> None:
    run.ctx.allocation_result = replace(result, extra={**result.extra, "plan_check": message})
    run.ctx.note("allocate_bits", "plan check: " + message)
