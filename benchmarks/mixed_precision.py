"""Mixed precision on EfficientNet-Lite0 under npu-int4: ILP vs uniform int4 vs greedy, sqnr vs hessian.

Run:  OMP_NUM_THREADS=1 python benchmarks/mixed_precision.py [--heldout 256] [--out benchmarks/mixed_precision.md]

Calibration: 64 crops (qcompiler.sample_data, split "calib"); measurement: held-out crops (split
"heldout", disjoint by construction). For weight budgets of 100/75/60/50 % of the int8 weight
memory (every group at the spec default, w8), the model compiled with the ILP's allocation
(sensitivity "sqnr" and "hessian"), with the greedy Pareto-front search of Pandey & Nagel (2023,
phase 2) over the same sqnr sensitivities, and uniform int4 (every group that may take w4 at
w4) are compared on top-1 agreement with the float model and output SQNR. Timings: the whole
budgeted compile, the ILP alone on 1000 groups x 4 candidates, sensitivity time vs group count.
"""
from __future__ import annotations

import argparse
import bisect
import math
import random
import sys
import time
from pathlib import Path

import torch

from qcompiler import BudgetError, qcompile
from qcompiler.mixed_precision import MixedPrecisionSession, _logits, output_sqnr_db
from qcompiler.passes.allocate_bits import AllocationProblem, BitTie, CostTable, solve_allocation
from qcompiler.passes.sensitivity import hessian_sensitivity, sqnr_sensitivity
from qcompiler.sample_data import sample_crops
from qcompiler.zoo import efficientnet_lite0

FRACTIONS = (1.0, 0.75, 0.7, 0.6, 0.5)

# Import every pass now: a long run must not pick up half-edited sources later.
for _name in __import__("qcompiler.pass_manager", fromlist=["BUILTIN_PASSES"]).BUILTIN_PASSES:
    __import__(f"qcompiler.passes.{_name}")
import qcompiler.artifact  # noqa: E402,F401
import qcompiler.report  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------
# Baselines over the same sensitivities
# ---------------------------------------------------------------------------------------------

def greedy_front(problem: AllocationProblem, metric: str) -> list[tuple[float, float, dict[int, str]]]:
    """Pandey & Nagel (2023) phase 2: from the widest plan, repeatedly lower the one group whose
    next narrower candidate costs the least sensitivity per unit of `metric` saved; every step is
    a point (cost, total sensitivity, plan) of the front. Moves that break a spec tie are skipped."""
    free = problem.candidates
    def by_bits(g):
        return sorted(free[g], key=lambda c: -problem.bits[g][c])
    choice = {g: by_bits(g)[0] for g in free}
    cost, sens = problem.cost(metric, choice), problem.objective(choice)
    front = [(cost, sens, dict(choice))]
    while True:
        best = None
        for g in free:
            order = by_bits(g)
            i = order.index(choice[g])
            if i + 1 >= len(order):
                continue
            trial = {**choice, g: order[i + 1]}
            if not problem.feasible_ties(trial):
                continue
            saved = cost - problem.cost(metric, trial)
            if saved <= 0:
                continue
            ratio = (problem.objective(trial) - sens) / saved
            if best is None or ratio < best[0]:
                best = (ratio, trial)
        if best is None:
            return front
        choice = best[1]
        cost, sens = problem.cost(metric, choice), problem.objective(choice)
        front.append((cost, sens, dict(choice)))


def greedy_for_budget(front: list[tuple[float, float, dict[int, str]]], budget: float) -> dict[int, str] | None:
    """The first (least sensitive) point of the front within budget: binary search on the costs,
    which decrease along the front."""
    costs = [-c for c, _, _ in front]           # increasing
    i = bisect.bisect_left(costs, -budget)
    return front[i][2] if i < len(front) else None


def uniform_lowest(problem: AllocationProblem) -> dict[int, str]:
    """Every group with a choice at its narrowest candidate."""
    return {g: min(c, key=lambda x: problem.bits[g][x]) for g, c in problem.candidates.items()}


# ---------------------------------------------------------------------------------------------
# Timings
# ---------------------------------------------------------------------------------------------

def synthetic_problem(n: int, k: int, seed: int = 0) -> AllocationProblem:
    rng = random.Random(seed)
    widths = (2, 4, 6, 8)[-k:]
    cands, bits, sens, mem, bops = {}, {}, {}, {}, {}
    for g in range(n):
        names = tuple(f"w{b}" for b in widths)
        cands[g], bits[g] = names, {c: int(c[1:]) for c in names}
        size, macs = rng.randint(1000, 500_000), rng.randint(10**5, 10**8)
        sens[g] = {c: size * 1e-9 * 4.0 ** -bits[g][c] * rng.uniform(0.5, 2) for c in names}
        mem[(g,)] = {(c,): size * bits[g][c] / 8 for c in names}
        bops[(g,)] = {(c,): macs * bits[g][c] * 8 for c in names}
    return AllocationProblem(candidates=cands, bits=bits, sensitivity=sens,
                             costs={"weight_memory": CostTable(0.0, mem), "bops": CostTable(0.0, bops)},
                             defaults={g: f"w{widths[-1]}" for g in cands}, ties=())


def ilp_timing() -> list[str]:
    rows = ["| problem | budgets | status | solve s (incl. model build) |", "|---|---|---|---|"]
    p = synthetic_problem(1000, 4)
    default = {g: p.defaults[g] for g in p.candidates}
    for budgets in ({"weight_memory": 0.55}, {"weight_memory": 0.6, "bops": 0.7}):
        absolute = {m: f * p.cost(m, default) for m, f in budgets.items()}
        r = solve_allocation(p, absolute)
        rows.append(f"| 1000 groups x 4 candidates | {budgets} | {r.status} | {r.seconds:.2f} |")
    return rows


def sensitivity_scaling(session: MixedPrecisionSession, batches, counts=(8, 16, 32)) -> list[str]:
    groups = [g for g in session.ctx.groups if g.id in session.table.measured]
    rows = ["| groups measured | sqnr s | hessian s |", "|---|---|---|"]
    for s in session.run.gm.modules():
        if hasattr(s, "enabled"):
            s.enabled = False
    for k in [c for c in counts if c < len(groups)] + [len(groups)]:
        t = time.perf_counter()
        sqnr_sensitivity(session.run.gm, groups[:k], session.ctx.observers, batches, progress=False)
        t_sqnr = time.perf_counter() - t
        t = time.perf_counter()
        hessian_sensitivity(session.run.gm, groups[:k], session.ctx.observers, batches, progress=False)
        rows.append(f"| {k} | {t_sqnr:.1f} | {time.perf_counter() - t:.1f} |")
    for s in session.run.gm.modules():
        if hasattr(s, "enabled"):
            s.enabled = True
    return rows


def timings(model, calib, calib_batches, out: str, say, session: MixedPrecisionSession | None = None) -> int:
    """ILP alone, sensitivity time vs groups, the whole budgeted compile; appended to `out`."""
    say("timings")
    lines = ["", "## ILP alone (synthetic)", ""] + ilp_timing()
    if session is None:
        session = MixedPrecisionSession(model, calib[:1], target="npu-int4", calib_data=[(calib[:16],)],
                                        progress=False)
    lines += ["", "## Sensitivity time vs groups measured (16 calibration crops, 1 thread)", ""]
    lines += sensitivity_scaling(session, [(calib[:16],)])
    torch.set_num_threads(2)
    t = time.perf_counter()
    compiled = qcompile(model, calib[:1], target="npu-int4", calib_data=calib_batches,
                        budget={"weight_memory": 0.7}, progress=False)
    total = time.perf_counter() - t
    lines += ["", "## Whole budgeted compile (2 threads, machine shared with other jobs)", "",
              f"qcompile(EfficientNet-Lite0, target='npu-int4', {len(torch.cat(calib_batches))} crops, "
              f"budget={{'weight_memory': 0.7}}): {total:.1f} s", "", "| pass | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in compiled.timings.items()]
    with open(out, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--heldout", type=int, default=256)
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".md")))
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--target", default="npu-int4", help="a built-in target or a .toml spec")
    ap.add_argument("--methods", default="sqnr,hessian")
    ap.add_argument("--timing-only", action="store_true", help="only the timings, appended to --out")
    args = ap.parse_args(argv)
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    torch.set_num_threads(1)
    model = efficientnet_lite0().eval()
    calib = sample_crops(args.calib, seed=0, split="calib")
    heldout = sample_crops(args.heldout, seed=0, split="heldout")
    calib_batches = list(calib.split(32))
    eval_batches = [(b,) for b in heldout.split(32)]
    ref = _logits(model, eval_batches)

    def measure(compiled) -> tuple[float, float]:
        out = _logits(compiled, eval_batches)
        return float((out.argmax(1) == ref.argmax(1)).float().mean()), output_sqnr_db(ref, out)

    if args.timing_only:
        return timings(model, calib, calib_batches, args.out, say)
    sessions, rows, notes = {}, [], []
    methods = args.methods.split(",")
    for method in methods:
        say(f"calibration + {method} sensitivity")
        sessions[method] = MixedPrecisionSession(model, calib[:1], target=args.target, calib_data=calib_batches,
                                                 sensitivity=method, progress=False)
        say(f"  {sessions[method].table.seconds:.1f} s, {len(sessions[method].table.measured)} groups")
    s = sessions["sqnr"]
    p = s.problem
    default = {g: p.defaults[g] for g in p.candidates}
    int8_mem = p.cost("weight_memory", default)
    groups = {g.id: g for g in s.ctx.groups}
    fixed8 = [g for g in s.ctx.groups if g.kind == "weight" and len(g.candidates) == 1]
    notes.append(f"int8 weight memory (every group at its spec default): {int8_mem / 2**20:.3f} MiB; "
                 f"{len(p.candidates)} weight groups may take w4; {len(fixed8)} weight groups must stay w8 by spec"
                 + (f" ({sum(1 for g in fixed8 if g.op_kind == 'depthwise_conv')} depthwise convs: `depthwise_conv` "
                    "accepts only w8; the first conv and the classifier: `min_bits` 8 at the first and last layer)."
                    if fixed8 else "."))

    uni = uniform_lowest(p)
    uni_mem = p.cost("weight_memory", uni)
    say("uniform int4")
    c = s.compile(uni)
    top1, sqnr = measure(c)
    rows.append(("uniform int4 (all w4 the spec allows)", uni_mem / int8_mem, c.weight_memory_bytes, top1, sqnr, p.objective(uni)))
    say("int8")
    c = s.compile(default)
    top1, sqnr = measure(c)
    rows.append(("uniform int8 (spec default)", 1.0, c.weight_memory_bytes, top1, sqnr, p.objective(default)))

    front = greedy_front(p, "weight_memory")
    smallest = None
    for frac in FRACTIONS:
        budget = frac * int8_mem
        for method in methods:
            sess = sessions[method]
            label = f"ILP {method} @ {frac:.0%}"
            try:
                r = sess.solve({"weight_memory": budget})
            except BudgetError as exc:
                smallest = exc.smallest["weight_memory"]
                notes.append(f"{frac:.0%} of int8 is infeasible under {s.spec.name}: {exc}")
                r = sess.solve({"weight_memory": smallest})
                label += f" (infeasible; at the smallest feasible {smallest / int8_mem:.1%})"
            say(label)
            c = sess.compile(r.choice)
            top1, sqnr = measure(c)
            rows.append((label, c.weight_memory_bytes / int8_mem, c.weight_memory_bytes, top1, sqnr,
                         p.objective(r.choice)))
            if method == "sqnr":
                notes.append(f"{label}: CP-SAT {r.status}, {r.seconds:.3f} s, "
                             f"{sum(1 for g, v in r.choice.items() if groups[g].formats[v].bits == 4)} of "
                             f"{len(r.choice)} groups at w4")
        g_choice = greedy_for_budget(front, budget if smallest is None or frac * int8_mem >= smallest else smallest)
        if g_choice is not None:
            say(f"greedy @ {frac:.0%}")
            c = s.compile(g_choice)
            top1, sqnr = measure(c)
            rows.append((f"greedy (Pandey & Nagel) @ {frac:.0%}", c.weight_memory_bytes / int8_mem,
                         c.weight_memory_bytes, top1, sqnr, p.objective(g_choice)))
        else:
            rows.append((f"greedy (Pandey & Nagel) @ {frac:.0%}", math.nan, math.nan, math.nan, math.nan, math.nan))

    lines = [f"# Mixed precision on EfficientNet-Lite0 under {s.spec.name}", "",
             f"Pretrained EfficientNet-Lite0, {args.calib} calibration crops, {args.heldout} held-out crops "
             "(qcompiler.sample_data, disjoint splits). Top-1 agreement and output SQNR against the float model "
             "on the held-out crops. Predicted = total sqnr sensitivity of the plan (relative output noise power). "
             "Produced by `benchmarks/mixed_precision.py`.", "",
             "| model | weight memory (% of int8) | weight memory (KiB) | top-1 agreement | output SQNR dB | predicted noise |",
             "|---|---|---|---|---|---|"]
    for label, frac, mem, top1, sqnr, pred in rows:
        lines.append(f"| {label} | {frac:.1%} | {mem / 1024:,.1f} | {top1:.1%} | {sqnr:.2f} | {pred:.3g} |")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Sensitivity", "",
              "- " + "; ".join(f"{m}: {sessions[m].table.seconds:.1f} s" for m in methods) + " "
              f"({len(s.table.measured)} groups x 2 candidates, {s.table.samples} samples, 1 thread)"]
    Path(args.out).write_text("\n".join(lines) + "\n")
    if not args.skip_timing:
        timings(model, calib, calib_batches, args.out, say, session=s)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
