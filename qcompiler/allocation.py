"""Bit allocation: one format per quantizer group under the target's budgets, as an integer program.

`build_problem` turns a calibrated graph whose groups have sensitivities into an
`AllocationProblem` (plain data: candidates, bits, sensitivities, one cost table per metric,
ties); `solve_allocation` solves it exactly; `parse_budget_value` reads budget values.

The program (exact; solved by HiGHS through OR-Tools MathOpt, or by OR-Tools CP-SAT):
- one boolean x[g, c] per group g with more than one candidate and candidate c; exactly one per g;
- the spec's couplings: equal_bits ties (the bit width of each tied group is equal),
  requires ties (weights of at most k bits force the kernel's inputs to b bits); min_bits has
  already narrowed candidates in `group_quantizers`;
- one linear constraint per budget: the target's cost formula summed over the graph. A node's
  cost depends on the formats of up to three groups (weights, input, output). When it depends on
  one group with a choice it is linear in that group's x. When it depends on several (bops =
  macs * w_bits * a_bits with both weights and inputs free) the product is exact through one
  boolean per combination of their candidates, tied to the x by marginal equalities
  (sum over the other groups' candidates of y = x), so no approximation is made;
- minimise the sum of sensitivities of the chosen (group, candidate) pairs.

With `host_fallback` (qcompile's option, `ctx.options.host_fallback`) and a spec whose
`[unsupported]` action is "host", every weight group gets one more candidate, "float": its kernel
runs on the host in float, costed by `[unsupported.host_cost]`, with no weight error.

Both solvers get the same integer program: a metric is scaled by a power of two and every
coefficient rounded up, the budget down, so a plan the solver accepts always meets the exact budget. Budget
values: a number or a string with a unit (B, KB, KiB, MB, MiB, GB, GiB) is absolute; a number in
(0, 1] or a string "60%" is a fraction of the metric's value with every group at its spec default.
An infeasible budget raises `BudgetError` with the smallest value that metric can reach.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from torch import fx

from .cost import FLOAT_BITS, batch_size, costed_nodes, node_cost
from .errors import BudgetError
from .groups import HOST_FLOAT, QuantizerGroup, Tie
from .quantizers import weight_qparams, weight_axis
from .sensitivity import SensitivityTable
from .targets.spec import TargetSpec

BYTE_UNITS: dict[str, float] = {"b": 1, "kb": 1e3, "kib": 2**10, "mb": 1e6, "mib": 2**20, "gb": 1e9, "gib": 2**30}
_VALUE = re.compile(r"\s*((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z%]*)\s*")
# Integer coefficients of a metric stay below this after scaling (CP-SAT works in int64; HiGHS's
# doubles hold integers exactly up to 2**53).
_INT_RANGE = 2.0 ** 40
DEFAULT_TIME_LIMIT = 60.0

Key = tuple[int, str]  # (group id, candidate name)


# ---------------------------------------------------------------------------------------------
# The problem as data: what the solver sees, independent of any graph
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CostTable:
    """One metric's cost: a constant plus, per set of free groups, a value per joint choice."""

    constant: float
    factors: dict[tuple[int, ...], dict[tuple[str, ...], float]]

    def value(self, choice: Mapping[int, str]) -> float:
        return self.constant + sum(t[tuple(choice[g] for g in gids)] for gids, t in self.factors.items())


@dataclass(frozen=True)
class BitTie:
    """A spec coupling on groups' bit widths; `fixed` gives bits of groups without a choice."""

    kind: str                     # "equal_bits" | "requires"
    groups: tuple[int, ...]
    weight_bits: int | None = None
    activation_bits: int | None = None


@dataclass(frozen=True)
class AllocationProblem:
    candidates: dict[int, tuple[str, ...]]       # free groups only (more than one candidate)
    bits: dict[int, dict[str, int]]              # every group's bits per candidate (fixed: one entry)
    sensitivity: dict[int, dict[str, float]]
    costs: dict[str, CostTable]
    defaults: dict[int, str]
    ties: tuple[BitTie, ...] = ()

    def cost(self, metric: str, choice: Mapping[int, str]) -> float:
        return self.costs[metric].value(choice)

    def objective(self, choice: Mapping[int, str]) -> float:
        return sum(self.sensitivity.get(g, {}).get(c, 0.0) for g, c in choice.items())

    def feasible_ties(self, choice: Mapping[int, str]) -> bool:
        def bits(g: int) -> int:
            b = self.bits[g]
            return b[choice[g]] if g in choice else next(iter(b.values()))
        for t in self.ties:
            if t.kind == "equal_bits" and len({bits(g) for g in t.groups}) > 1:
                return False
            if t.kind == "requires" and bits(t.groups[0]) <= t.weight_bits and \
                    any(bits(g) != t.activation_bits for g in t.groups[1:]):
                return False
        return True


@dataclass(frozen=True)
class AllocationResult:
    choice: dict[int, str]
    status: str
    objective: float
    best_bound: float
    seconds: float
    budgets: dict[str, float]            # absolute budget values
    costs: dict[str, float]              # the chosen plan's cost per budgeted metric
    defaults: dict[str, float]           # the spec-default plan's cost per budgeted metric
    variables: int = 0
    solver: str = "highs"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def summary(self) -> str:
        parts = [f"{self.solver} {self.status}, objective {self.objective:.4g}, {self.seconds:.3f} s, {self.variables} booleans"]
        for m, b in self.budgets.items():
            parts.append(f"{m} {self.costs[m]:,.6g} <= {b:,.6g} ({self.costs[m] / self.defaults[m]:.1%} of default)"
                         if self.defaults.get(m) else f"{m} {self.costs[m]:,.6g} <= {b:,.6g}")
        if "plan_check" in self.extra:
            parts.append(f"plan check: {self.extra['plan_check']}")
        if "quality_search" in self.extra:
            parts.append(f"accuracy target: {self.extra['quality_search'][0]}")
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Budget values
# ---------------------------------------------------------------------------------------------

def read_budget_value(metric: str, value: Any) -> tuple[float, str]:
    """(number, unit) of a budget value: unit "" (a count, or a fraction in (0, 1]), "%" or a byte
    unit in lower case. The one reader of budget syntax, for the API and the command line."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BudgetError(f"budget {metric!r}: {value!r} is not a number or a string such as '1.5 MiB' or '60%'")
    if isinstance(value, str):
        m = _VALUE.fullmatch(value)
        if m is None:
            raise BudgetError(f"budget {metric!r}: cannot read {value!r}; give e.g. '1.5 MiB', '60%', 0.5 or 123456")
        number, unit = float(m.group(1)), m.group(2).lower()
        if unit and unit != "%" and unit not in BYTE_UNITS:
            raise BudgetError(f"budget {metric!r}: unknown unit {m.group(2)!r} in {value!r}; use B, KB, KiB, "
                              "MB, MiB, GB, GiB, % or no unit")
    else:
        number, unit = float(value), ""
    if not math.isfinite(number) or number <= 0:
        raise BudgetError(f"budget {metric!r}: {value!r} must be a positive finite value")
    return number, unit


def parse_budget_value(metric: str, value: Any, default_value: float) -> float:
    """An absolute budget from a number, a fraction (0, 1], "60%" or "1.5 MiB"; fractions and
    percentages are of `default_value` (the metric with every group at the spec default)."""
    number, unit = read_budget_value(metric, value)
    if unit == "%":
        result = number / 100 * default_value
    elif unit:
        result = number * BYTE_UNITS[unit]
    else:
        result = number * default_value if number <= 1 else number
    if not math.isfinite(result) or result <= 0:
        raise BudgetError(f"budget {metric!r}: {value!r} must be a positive finite value")
    return result


# ---------------------------------------------------------------------------------------------
# Building the problem from the graph
# ---------------------------------------------------------------------------------------------

def _scale_count(params: Any) -> int:
    if params is None:
        return 0
    return int(params.codebook.numel() if params.codebook is not None else params.scale.numel())


def build_problem(gm: fx.GraphModule, spec: TargetSpec, groups: Sequence[QuantizerGroup], ties: Sequence[Tie],
                  table: SensitivityTable | None, metrics: list[str], host_fallback: bool = False) -> AllocationProblem:
    """The allocation problem of a calibrated graph: candidates, bits, costs per metric, ties.

    `table` gives the sensitivities (all 0 without one); with `host_fallback` (and a spec whose
    unsupported ops run on the host) every weight group may also choose float on the host.
    """
    host = host_fallback and spec.unsupported.action == "host"
    extra = {g.id: (HOST_FLOAT,) for g in groups if host and g.kind == "weight" and not g.fallback}
    free = {g.id: tuple(g.candidates) + extra.get(g.id, ()) for g in groups
            if not g.fallback and len(g.candidates) + len(extra.get(g.id, ())) > 1}
    bits = {g.id: ({"float": FLOAT_BITS} if g.fallback else {c: g.formats[c].bits for c in g.candidates})
            for g in groups}
    for gid in extra:
        bits[gid][HOST_FLOAT] = FLOAT_BITS
    defaults = {g.id: ("float" if g.fallback else g.default) for g in groups}
    uses_scales = any("w_scales" in spec.cost[m].variables for m in metrics) or any(
        "w_scales" in f.variables for m, f in spec.unsupported.host_cost.items() if m in metrics)
    scales: dict[int, dict[str, int]] = {}
    if uses_scales:
        nodes = {n.name: n for n in gm.graph.nodes}
        for g in groups:
            if g.kind != "weight" or g.fallback:
                continue
            module = gm.get_submodule(nodes[g.owner].target)
            w = gm.get_parameter(g.weights[0])
            scales[g.id] = {c: _scale_count(weight_qparams(g.formats[c], w, weight_axis(module))) for c in g.candidates}

    nodes = {n.name: n for n in gm.graph.nodes}
    batch = batch_size(gm)
    kernels = costed_nodes(gm)
    costs: dict[str, CostTable] = {}
    for metric in metrics:
        constant = 0.0
        factors: dict[tuple[int, ...], dict[tuple[str, ...], float]] = {}
        for n in kernels:
            touched: set[int] = set()

            def probe_bits(gid: int) -> int:
                touched.add(gid)
                return next(iter(bits[gid].values()))

            node_cost(spec, metric, gm, n, nodes, probe_bits, lambda gid: 0, batch)
            gids = tuple(sorted(g for g in touched if g in free))
            wg = n.meta.get("weight_group")
            for combo in itertools.product(*(free[g] for g in gids)):
                pick = dict(zip(gids, combo))

                def bits_of(gid: int) -> int:
                    return bits[gid][pick[gid]] if gid in pick else next(iter(bits[gid].values()))

                def scales_of(gid: int) -> int:
                    s = scales.get(gid)
                    if not s:
                        return 0
                    return s.get(pick[gid], 0) if gid in pick else s[defaults[gid]]

                moved = wg is not None and pick.get(wg) == HOST_FLOAT
                value = node_cost(spec, metric, gm, n, nodes, bits_of, scales_of, batch, on_host=True if moved else None)
                if gids:
                    slot = factors.setdefault(gids, {})
                    slot[combo] = slot.get(combo, 0.0) + value
                else:
                    constant += value
        costs[metric] = CostTable(constant, factors)
    bit_ties = tuple(BitTie(t.kind, tuple(t.groups), t.weight_bits, t.activation_bits) for t in ties)
    # A kernel on the host keeps float weights: no weight error (its activations stay quantized).
    sens = {gid: {c: (table.of(gid, c) if table is not None and c != HOST_FLOAT else 0.0) for c in free[gid]}
            for gid in free}
    return AllocationProblem(candidates=free, bits=bits, sensitivity=sens, costs=costs, defaults=defaults, ties=bit_ties)


def combine_problems(problems: Sequence[AllocationProblem], equal: Sequence[Sequence[tuple[int, int]]] = ()
                     ) -> tuple[AllocationProblem, list[dict[int, int]]]:
    """One program over the groups of several graphs (the parts of a model compiled in parts,
    `qcompiler.partition`): their costs and sensitivities add up. Group g of problem i becomes
    `offset_i + g`; each set in `equal` (pairs (problem index, group id), one tensor quantized
    in several graphs) must take equal bits. Returns the program and, per problem, new id -> its id."""
    metrics = set(problems[0].costs) if problems else set()
    if any(set(p.costs) != metrics for p in problems):
        raise BudgetError("the parts' problems have different cost metrics")
    offsets, owners, start = [], [], 0
    for p in problems:
        offsets.append(start)
        ids = set(p.bits) | set(p.candidates)
        owners.append({start + g: g for g in ids})
        start += max(ids, default=-1) + 1
    candidates, bits, sensitivity, defaults, ties = {}, {}, {}, {}, []
    costs = {m: CostTable(0.0, {}) for m in metrics}
    for p, off in zip(problems, offsets):
        candidates.update({off + g: c for g, c in p.candidates.items()})
        bits.update({off + g: dict(b) for g, b in p.bits.items()})
        sensitivity.update({off + g: dict(v) for g, v in p.sensitivity.items()})
        defaults.update({off + g: d for g, d in p.defaults.items()})
        ties += [BitTie(t.kind, tuple(off + g for g in t.groups), t.weight_bits, t.activation_bits) for t in p.ties]
        for m in metrics:
            table = p.costs[m]
            merged = costs[m]
            factors = dict(merged.factors)
            factors.update({tuple(off + g for g in gids): dict(v) for gids, v in table.factors.items()})
            costs[m] = CostTable(merged.constant + table.constant, factors)
    for pairs in equal:
        groups = tuple(dict.fromkeys(offsets[i] + g for i, g in pairs))
        if len(groups) > 1:
            ties.append(BitTie("equal_bits", groups))
    return AllocationProblem(candidates=candidates, bits=bits, sensitivity=sensitivity, costs=costs,
                             defaults=defaults, ties=tuple(ties)), owners


# ---------------------------------------------------------------------------------------------
# Solving
# ---------------------------------------------------------------------------------------------

SOLVERS = ("highs", "cp-sat")


def _int_scale(table: CostTable) -> float:
    """A power of two that brings the metric's largest possible total near _INT_RANGE."""
    top = abs(table.constant) + sum(max(abs(v) for v in t.values()) for t in table.factors.values())
    if top <= 0:
        return 1.0
    return 2.0 ** math.floor(math.log2(_INT_RANGE / top))


Row = tuple[list[int], list[int], int]  # (variable indices, integer coefficients, right-hand side)


class _Program:
    """The 0-1 program of a problem as plain integer data, handed to either solver.

    Variables are booleans by index: x per (group, candidate), then y per joint choice of a cost
    factor over several free groups. Every coefficient is an integer, so both solvers see the very
    same program and a plan either accepts meets the exact budgets.
    """

    def __init__(self, problem: AllocationProblem, metrics: list[str]):
        self.p = problem
        self.infeasible = False
        self.x: dict[Key, int] = {}
        self.equal: list[Row] = []
        self.less: list[Row] = []
        for g, cands in problem.candidates.items():
            for c in cands:
                self.x[(g, c)] = len(self.x)
            self.equal.append(([self.x[(g, c)] for c in cands], [1] * len(cands), 1))
        self.n = len(self.x)
        self._add_ties()
        self.scale = {m: _int_scale(problem.costs[m]) for m in metrics}
        self.expr = {m: self._cost_expr(m) for m in metrics}

    def new_var(self) -> int:
        self.n += 1
        return self.n - 1

    def bits_is(self, g: int, b: int) -> tuple[list[int], int]:
        """(variables, constant) whose sum is 1 when group g has b bits."""
        if g in self.p.candidates:
            return [self.x[(g, c)] for c in self.p.candidates[g] if self.p.bits[g][c] == b], 0
        return [], int(next(iter(self.p.bits[g].values())) == b)

    def _difference(self, rows: list[Row], left: tuple[list[int], int], right: tuple[list[int], int]) -> None:
        """left - right (== or <=) 0, as a row; a row without variables is checked at once."""
        (lv, lc), (rv, rc) = left, right
        variables, rhs = lv + rv, rc - lc
        if not variables:
            self.infeasible |= (rhs != 0) if rows is self.equal else (rhs < 0)
            return
        rows.append((variables, [1] * len(lv) + [-1] * len(rv), rhs))

    def _add_ties(self) -> None:
        for t in self.p.ties:
            if t.kind == "equal_bits":
                widths = sorted({b for g in t.groups for b in self.p.bits[g].values()})
                first = t.groups[0]
                for g in t.groups[1:]:
                    for b in widths:
                        self._difference(self.equal, self.bits_is(first, b), self.bits_is(g, b))
            elif t.kind == "requires":
                w = t.groups[0]
                low = [b for b in set(self.p.bits[w].values()) if b <= t.weight_bits]
                for g in t.groups[1:]:
                    for b in low:
                        self._difference(self.less, self.bits_is(w, b), self.bits_is(g, t.activation_bits))

    def _cost_expr(self, metric: str) -> tuple[list[int], list[int], int]:
        """(variables, integer coefficients, integer constant) of the scaled metric.

        A factor over several free groups gets one y per joint choice: exactly one y is 1, and
        for each group and candidate the y that pick it sum to its x, so the product is exact.
        """
        table, s = self.p.costs[metric], self.scale[metric]
        variables, coefs = [], []
        const = math.ceil(table.constant * s)
        for gids, values in table.factors.items():
            if len(gids) == 1:
                for (c,), v in values.items():
                    variables.append(self.x[(gids[0], c)])
                    coefs.append(math.ceil(v * s))
                continue
            ys = {combo: self.new_var() for combo in values}
            self.equal.append((list(ys.values()), [1] * len(ys), 1))
            for i, g in enumerate(gids):
                for c in self.p.candidates[g]:
                    picked = [y for combo, y in ys.items() if combo[i] == c]
                    self.equal.append((picked + [self.x[(g, c)]], [1] * len(picked) + [-1], 0))
            for combo, v in values.items():
                variables.append(ys[combo])
                coefs.append(math.ceil(v * s))
        return variables, coefs, const

    def scaled_value(self, metric: str, choice: Mapping[int, str]) -> float:
        """The metric of a plan as the integer program counts it (rounded up), back in its unit."""
        table, s = self.p.costs[metric], self.scale[metric]
        total = math.ceil(table.constant * s)
        for gids, values in table.factors.items():
            total += math.ceil(values[tuple(choice[g] for g in gids)] * s)
        return total / s

    def add_budget(self, metric: str, value: float) -> None:
        variables, coefs, const = self.expr[metric]
        limit = math.floor(value * self.scale[metric])
        if not variables:  # nothing to choose: the metric is what it is
            self.infeasible |= const > limit
            return
        self.less.append((variables, coefs, limit - const))

    def sensitivity_objective(self) -> list[int]:
        """Integer objective coefficients per x: sensitivities scaled so their total is about 1e9
        (finer scales slow the solvers down for no change in plan)."""
        p = self.p
        top = sum(max(v.values(), default=0.0) for v in p.sensitivity.values())
        scale = 1e9 / top if top > 0 else 1.0
        return [int(round(p.sensitivity.get(g, {}).get(c, 0.0) * scale)) for g, c in self.x]

    def cost_objective(self, metric: str) -> dict[int, int]:
        variables, coefs, _ = self.expr[metric]
        objective: dict[int, int] = {}
        for v, c in zip(variables, coefs):
            objective[v] = objective.get(v, 0) + c
        return objective

    def solve(self, objective: Mapping[int, int], time_limit: float, solver: str,
              workers: int = 1) -> tuple[str, dict[int, str]]:
        """(status, choice) with status OPTIMAL, FEASIBLE (time limit), INFEASIBLE or UNKNOWN."""
        if self.infeasible:
            return "INFEASIBLE", {}
        if solver not in SOLVERS:
            raise ValueError(f"unknown allocation solver {solver!r}; use one of {', '.join(SOLVERS)}")
        run = _solve_highs if solver == "highs" else _solve_cp_sat
        status, values = run(self, objective, time_limit, workers)
        choice = {g: c for (g, c), i in self.x.items() if values and values[i]}
        return status, choice


@contextlib.contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """Send file descriptor 1 to the null device for the block. The HiGHS build OR-Tools ships
    prints a debug line from C++ on some branch-and-cut paths, whatever its output options say.
    (Anything else written to stdout during the solve, from any thread, is dropped too.)"""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no real stdout (an embedded interpreter)
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _solve_highs(program: _Program, objective: Mapping[int, int], time_limit: float,
                 workers: int) -> tuple[str, list[bool]]:
    """HiGHS's branch and cut through OR-Tools MathOpt, with zero optimality gap."""
    import datetime

    from ortools.math_opt.python import mathopt
    from ortools.math_opt.solvers import highs_pb2

    model = mathopt.Model()
    x = [model.add_binary_variable() for _ in range(program.n)]
    for variables, coefs, rhs in program.equal:
        model.add_linear_constraint(mathopt.fast_sum(c * x[v] for v, c in zip(variables, coefs)) == rhs)
    for variables, coefs, rhs in program.less:
        model.add_linear_constraint(mathopt.fast_sum(c * x[v] for v, c in zip(variables, coefs)) <= rhs)
    model.minimize(mathopt.fast_sum(c * x[v] for v, c in objective.items() if c))
    params = mathopt.SolveParameters(
        time_limit=datetime.timedelta(seconds=time_limit), relative_gap_tolerance=0.0, absolute_gap_tolerance=0.0,
        highs=highs_pb2.HighsOptionsProto(bool_options={"output_flag": False}))
    with _native_stdout_silenced():
        result = mathopt.solve(model, mathopt.SolverType.HIGHS, params=params)
    reason = mathopt.TerminationReason
    status = {reason.OPTIMAL: "OPTIMAL", reason.FEASIBLE: "FEASIBLE", reason.INFEASIBLE: "INFEASIBLE",
              reason.INFEASIBLE_OR_UNBOUNDED: "INFEASIBLE"}.get(result.termination.reason, "UNKNOWN")
    if status not in ("OPTIMAL", "FEASIBLE") or not result.has_primal_feasible_solution():
        return status, []
    values = result.variable_values()
    return status, [values[v] > 0.5 for v in x]


def _solve_cp_sat(program: _Program, objective: Mapping[int, int], time_limit: float,
                  workers: int, presolve: bool = False) -> tuple[str, list[bool]]:
    """OR-Tools CP-SAT. Its presolve is off by default: on bops products (the y booleans) it
    stalled for the whole time limit where the search alone proves the optimum in a fraction of a
    second (`benchmarks/speed.py` runs it with presolve on as the earlier configuration)."""
    from ortools.sat.python import cp_model

    model = cp_model.CpModel()
    x = [model.new_bool_var(f"b{i}") for i in range(program.n)]
    for variables, coefs, rhs in program.equal:
        model.add(cp_model.LinearExpr.weighted_sum([x[v] for v in variables], coefs) == rhs)
    for variables, coefs, rhs in program.less:
        model.add(cp_model.LinearExpr.weighted_sum([x[v] for v in variables], coefs) <= rhs)
    keys = [v for v, c in objective.items() if c]
    model.minimize(cp_model.LinearExpr.weighted_sum([x[v] for v in keys], [objective[v] for v in keys]))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit
    solver.parameters.num_workers = workers
    solver.parameters.cp_model_presolve = presolve
    status = solver.solve(model)
    name = solver.status_name(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return ("INFEASIBLE" if status == cp_model.INFEASIBLE else name), []
    return name, [solver.boolean_value(v) for v in x]


def minimum_cost(problem: AllocationProblem, metric: str, budgets: Mapping[str, float] | None = None,
                 time_limit: float = DEFAULT_TIME_LIMIT, workers: int = 1, solver: str = "highs") -> float | None:
    """The smallest value `metric` can take under the ties (and the other `budgets`); None if none.

    The value is the metric as the integer program counts it (coefficients rounded up), so a
    budget of exactly this value is feasible.
    """
    others = {m: v for m, v in (budgets or {}).items() if m != metric}
    program = _Program(problem, [metric, *others])
    for m, v in others.items():
        program.add_budget(m, v)
    status, choice = program.solve(program.cost_objective(metric), time_limit, solver, workers)
    if status not in ("OPTIMAL", "FEASIBLE") or len(choice) != len(problem.candidates):
        return None
    return program.scaled_value(metric, choice)


def _meets(problem: AllocationProblem, choice: Mapping[int, str], budgets: Mapping[str, float]) -> bool:
    return (len(choice) == len(problem.candidates) and problem.feasible_ties(choice)
            and all(problem.cost(m, choice) <= b for m, b in budgets.items()))


def solve_allocation(problem: AllocationProblem, budgets: Mapping[str, float],
                     time_limit: float = DEFAULT_TIME_LIMIT, workers: int = 1,
                     solver: str = "highs") -> AllocationResult:
    """Minimise total sensitivity subject to the ties and every (absolute) budget.

    `solver` is "highs" (the default: the fastest exact one measured, `benchmarks/speed.md`) or
    "cp-sat". A plan is checked against the exact budgets and ties before it is returned; should a
    solver's tolerances ever let a violating plan through, the other solver decides.
    """
    metrics = list(budgets)
    for m in metrics:
        if m not in problem.costs:
            raise BudgetError(f"no cost table for budget {m!r}")
    start = time.perf_counter()
    program = _Program(problem, metrics)
    for m, v in budgets.items():
        program.add_budget(m, v)
    objective = dict(enumerate(program.sensitivity_objective()))
    status, choice = program.solve(objective, time_limit, solver, workers)
    if status in ("OPTIMAL", "FEASIBLE") and not _meets(problem, choice, budgets):
        solver = SOLVERS[1 - SOLVERS.index(solver)]
        status, choice = program.solve(objective, time_limit, solver, workers)
    seconds = time.perf_counter() - start
    default_costs = {m: problem.cost(m, {g: problem.defaults[g] for g in problem.candidates}) for m in metrics}
    if status not in ("OPTIMAL", "FEASIBLE"):
        if status in ("INFEASIBLE", "MODEL_INVALID"):
            raise _infeasible(problem, budgets, default_costs, time_limit, workers, solver)
        raise BudgetError(f"the bit-allocation program found no plan within {time_limit:.0f} s (status {status}); "
                          "loosen the budgets or raise the time limit")
    true_objective = problem.objective(choice)
    best_bound = true_objective if status == "OPTIMAL" else float("nan")
    return AllocationResult(choice=choice, status=status, objective=true_objective, best_bound=best_bound,
                            seconds=seconds, budgets=dict(budgets),
                            costs={m: problem.cost(m, choice) for m in metrics}, defaults=default_costs,
                            variables=program.n, solver=solver)


def _infeasible(problem: AllocationProblem, budgets: Mapping[str, float], default_costs: dict[str, float],
                time_limit: float, workers: int, solver: str) -> BudgetError:
    smallest = {m: minimum_cost(problem, m, None, time_limit, workers, solver) for m in budgets}
    lines = []
    for m, v in budgets.items():
        alone = smallest[m]
        if alone is None:
            lines.append(f"{m}: the spec's couplings admit no plan at all")
        elif v < alone:
            share = f" ({alone / default_costs[m]:.1%} of the default {default_costs[m]:,.6g})" if default_costs.get(m) else ""
            lines.append(f"{m} budget {v:,.6g} is below the smallest feasible value {alone:,.6g}{share}")
    if not lines:  # each budget alone is reachable, not all of them together
        for m in budgets:
            joint = minimum_cost(problem, m, budgets, time_limit, workers, solver)
            smallest[m] = joint
            lines.append(f"{m}: with the other budgets, the smallest feasible value is "
                         + (f"{joint:,.6g}" if joint is not None else "none (they conflict)"))
    err = BudgetError("no bit allocation meets the budget(s): " + "; ".join(lines)
                      + ". Raise the budget to at least the smallest feasible value, or drop a budget")
    err.smallest = smallest  # type: ignore[attr-defined]
    return err


# ---------------------------------------------------------------------------------------------
# Budgets of a problem

# ---------------------------------------------------------------------------------------------

def absolute_budgets(problem: AllocationProblem, budget: Mapping[str, Any]) -> dict[str, float]:
    defaults = {g: problem.defaults[g] for g in problem.candidates}
    return {m: parse_budget_value(m, v, problem.cost(m, defaults)) for m, v in budget.items()}


def check_metrics(spec: Any, budget: Mapping[str, Any]) -> None:
    if not isinstance(budget, Mapping) or not budget:
        raise BudgetError(f"budget must be a non-empty dict such as {{'weight_memory': '1.5 MiB'}}, got {budget!r}")
    unknown = [m for m in budget if m not in spec.cost]
    if unknown:
        raise BudgetError(f"budget {unknown[0]!r}: target {spec.name!r} has no cost metric {unknown[0]!r}; "
                          f"its metrics are {', '.join(spec.cost) or 'none'}")
