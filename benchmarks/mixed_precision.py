"""Mixed precision on EfficientNet-Lite0: ILP vs uniform int4 vs greedy, sqnr vs hessian sensitivity.

    python benchmarks/mixed_precision.py                       # npu-int4, budgets 100/75/70/60/50 %
    python benchmarks/mixed_precision.py --fractions 0.75 --skip-timing --out benchmarks/mixed_precision_75.md
    python benchmarks/mixed_precision.py --target benchmarks/npu-int4-dw4.toml --methods sqnr \
        --out benchmarks/mixed_precision_dw4.md
    python benchmarks/mixed_precision.py --quick               # smoke run, prints only

Calibration: crops of the "calib" split; measurement: crops of the "heldout" split (disjoint by
construction). For weight budgets given as fractions of the int8 weight memory (every group at
the spec default, w8), the model compiled with the ILP's allocation (each --methods
sensitivity), with the greedy Pareto-front search of Pandey & Nagel (2023, phase 2) over the
same sqnr sensitivities (when sqnr is among the methods), and uniform int4 (every group that
may take w4 at w4) are compared on top-1 agreement with the float model (with a 95 % interval
clustered by photo) and output SQNR. Timings (unless --skip-timing): the ILP alone on 1000
groups x 4 candidates, sensitivity time vs group count, the whole budgeted compile, each the
median and spread of --timing-rounds rounds.
"""
from __future__ import annotations

import bisect
import random
import sys
import time

import torch

from qcompiler import BudgetError, qcompile
from qcompiler.mixed_precision import MixedPrecisionSession, _logits
from qcompiler.allocation import AllocationProblem, BitTie, CostTable, solve_allocation
from qcompiler.sensitivity import hessian_sensitivity, sqnr_sensitivity
from qcompiler.zoo import efficientnet_lite0

from common import SPLIT_NOTE, agreement, emit, header, load_split, out_path, parser, pipeline, spread

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


def ilp_timing(rounds: int) -> list[str]:
    rows = ["| problem | budgets | status | solve s (incl. model build) |", "|---|---|---|---|"]
    p = synthetic_problem(1000, 4)
    default = {g: p.defaults[g] for g in p.candidates}
    for budgets in ({"weight_memory": 0.55}, {"weight_memory": 0.6, "bops": 0.7}):
        absolute = {m: f * p.cost(m, default) for m, f in budgets.items()}
        results = [solve_allocation(p, absolute) for _ in range(rounds)]
        status = "/".join(sorted({r.status for r in results}))
        rows.append(f"| 1000 groups x 4 candidates | {budgets} | {status} | {spread([r.seconds for r in results])} |")
    return rows


def sensitivity_scaling(session: MixedPrecisionSession, batches, rounds: int, counts=(8, 16, 32)) -> list[str]:
    groups = [g for g in session.ctx.groups if g.id in session.table.measured]
    rows = ["| groups measured | sqnr s | hessian s |", "|---|---|---|"]
    for s in session.run.gm.modules():
        if hasattr(s, "enabled"):
            s.enabled = False
    for k in [c for c in counts if c < len(groups)] + [len(groups)]:
        t_sqnr, t_hessian = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            sqnr_sensitivity(session.run.gm, groups[:k], session.ctx.observers, batches, progress=False)
            t_sqnr.append(time.perf_counter() - t)
            t = time.perf_counter()
            hessian_sensitivity(session.run.gm, groups[:k], session.ctx.observers, batches, progress=False)
            t_hessian.append(time.perf_counter() - t)
        rows.append(f"| {k} | {spread(t_sqnr, digits=1)} | {spread(t_hessian, digits=1)} |")
    for s in session.run.gm.modules():
        if hasattr(s, "enabled"):
            s.enabled = True
    return rows


def timings(model, calib, calib_batches, target: str, say, rounds: int, quick: bool,
            session: MixedPrecisionSession | None = None) -> list[str]:
    """ILP alone, sensitivity time vs groups, the whole budgeted compile: median (min-max) of rounds."""
    say("timings")
    lines = ["", f"## ILP alone (synthetic), median (min-max) of {rounds} rounds", ""] + ilp_timing(rounds)
    if quick:
        return lines + ["", "(--quick: sensitivity scaling and the whole budgeted compile are not timed.)"]
    if session is None:
        session = MixedPrecisionSession(model, calib[:1], target=target, calib_data=[(calib[:16],)],
                                        progress=False)
    lines += ["", f"## Sensitivity time vs groups measured (16 calibration crops, 1 thread, {rounds} rounds)", "",
              "Each row measures the first k groups with a choice (every candidate format each).", ""]
    lines += sensitivity_scaling(session, [(calib[:16],)], rounds)
    torch.set_num_threads(2)
    totals, per_pass = [], {}
    for _ in range(rounds):
        t = time.perf_counter()
        compiled = qcompile(model, calib[:1], target=target, calib_data=calib_batches,
                            budget={"weight_memory": 0.7}, progress=False)
        totals.append(time.perf_counter() - t)
        for k, v in compiled.timings.items():
            per_pass.setdefault(k, []).append(v)
    torch.set_num_threads(1)
    lines += ["", f"## Whole budgeted compile (2 threads, {rounds} rounds)", "",
              f"qcompile(EfficientNet-Lite0, target={target!r}, {len(torch.cat(calib_batches))} crops, "
              f"budget={{'weight_memory': 0.7}}): {spread(totals, ' s', 1)}", "",
              "| pass | seconds: median (min-max) |", "|---|---|"]
    lines += [f"| {k} | {spread(v)} |" for k, v in per_pass.items()]
    return lines


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--heldout", type=int, default=256)
    ap.add_argument("--target", default="npu-int4", help="a built-in target or a .toml spec")
    ap.add_argument("--methods", default="sqnr,hessian", help="sensitivity methods for the ILP")
    ap.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS),
                    help="weight budgets as fractions of the int8 weight memory")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--timing-rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if args.quick:
        args.calib, args.heldout, args.fractions, args.timing_rounds = 8, 22, "0.75", 1
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    fractions = [float(f) for f in args.fractions.split(",")]
    methods = args.methods.split(",")

    torch.set_num_threads(1)
    model = efficientnet_lite0().eval()
    calib = load_split("calib", args.calib)
    heldout = load_split("heldout", args.heldout)
    calib_batches = list(calib.crops.split(32))
    eval_batches = [(b,) for b in heldout.crops.split(32)]
    ref = _logits(model, eval_batches)

    def measure(compiled):
        return agreement(ref, _logits(compiled, eval_batches), heldout.photos)

    sessions, rows, notes = {}, [], []
    for method in methods:
        say(f"calibration + {method} sensitivity")
        sessions[method] = MixedPrecisionSession(model, calib.crops[:1], target=args.target,
                                                 calib_data=calib_batches, sensitivity=method, progress=False,
                                                 passes=pipeline(args.quick))
        say(f"  {sessions[method].table.seconds:.1f} s, {len(sessions[method].table.measured)} groups")
    # Greedy walks the sqnr sensitivities (Pandey & Nagel's own measure).
    s = sessions.get("sqnr") or sessions[methods[0]]
    p = s.problem
    default = {g: p.defaults[g] for g in p.candidates}
    int8_mem = p.cost("weight_memory", default)
    groups = {g.id: g for g in s.ctx.groups}
    fixed8 = [g for g in s.ctx.groups if g.kind == "weight" and len(g.candidates) == 1]
    notes.append(f"int8 weight memory (every group at its spec default): {int8_mem / 2**20:.3f} MiB; "
                 f"{len(p.candidates)} weight groups may take w4; {len(fixed8)} weight groups must stay w8 by spec"
                 + (f" ({sum(1 for g in fixed8 if g.op_kind == 'depthwise_conv')} of them depthwise convs)."
                    if fixed8 else "."))

    uni = uniform_lowest(p)
    uni_mem = p.cost("weight_memory", uni)
    say("uniform int4")
    c = s.compile(uni)
    rows.append(("uniform int4 (all w4 the spec allows)", uni_mem / int8_mem, c.weight_memory_bytes, measure(c),
                 p.objective(uni)))
    say("int8")
    c = s.compile(default)
    rows.append(("uniform int8 (spec default)", 1.0, c.weight_memory_bytes, measure(c), p.objective(default)))

    front = greedy_front(p, "weight_memory") if "sqnr" in sessions else None
    smallest = None
    for frac in fractions:
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
            rows.append((label, c.weight_memory_bytes / int8_mem, c.weight_memory_bytes, measure(c),
                         p.objective(r.choice)))
            notes.append(f"{label}: {r.solver} {r.status}, {r.seconds:.3f} s, "
                         f"{sum(1 for g, v in r.choice.items() if groups[g].formats[v].bits == 4)} of "
                         f"{len(r.choice)} groups at w4")
        if front is None:
            continue
        g_choice = greedy_for_budget(front, budget if smallest is None or budget >= smallest else smallest)
        if g_choice is not None:
            say(f"greedy @ {frac:.0%}")
            c = s.compile(g_choice)
            rows.append((f"greedy (Pandey & Nagel) @ {frac:.0%}", c.weight_memory_bytes / int8_mem,
                         c.weight_memory_bytes, measure(c), p.objective(g_choice)))

    lines = [header(f"Mixed precision on EfficientNet-Lite0 under {s.spec.name}", __file__, argv, notes=[
        f"Pretrained EfficientNet-Lite0; calibration: {calib.describe}; measured on {heldout.describe}."
        + (" AdaRound cut to 2 steps (--quick)." if args.quick else "") +
        " Top-1 agreement and output SQNR against the float model. Predicted = total sensitivity of the "
        f"plan under {'sqnr' if 'sqnr' in sessions else methods[0]} (relative output noise power).",
        "", SPLIT_NOTE]),
        "| model | weight memory (% of int8) | weight memory (KiB) | top-1 agreement [95 % CI] | output SQNR dB "
        "| predicted noise |",
        "|---|---|---|---|---|---|"]
    for label, frac, mem, res, pred in rows:
        lines.append(f"| {label} | {frac:.1%} | {mem / 1024:,.1f} | {res.cell()} | {res.sqnr_db:.2f} | {pred:.3g} |")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Sensitivity", "",
              "- " + "; ".join(f"{m}: {sessions[m].table.seconds:.1f} s" for m in methods) + " "
              f"({len(s.table.measured)} groups with a choice, {s.table.samples} samples, 1 thread, one run each)"]
    if not args.skip_timing:
        lines += timings(model, calib.crops, calib_batches, args.target, say, args.timing_rounds, args.quick,
                         session=s)
    emit("\n".join(lines) + "\n", out_path(__file__, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
