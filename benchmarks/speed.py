"""Compile speed (issue 17): where the time goes and what each fix buys, measured side by side.

    python benchmarks/speed.py                       # every part, written to benchmarks/speed.md
    python benchmarks/speed.py --parts ilp           # one part
    python benchmarks/speed.py --quick               # smoke run, prints only

Parts:
- peer: the default npu-int8 compile of EfficientNet-Lite0 (real weights) on --calib crops against
  Sony MCT 2.6's 8-bit PTQ of the same model on the same crops (its defaults, in its own virtual
  environment: `peers.py`), alternating in each round, on an idle machine and with a second
  CPU-bound process spinning on one core; each tool's own call is timed, the ratio is taken
  within each round. Both models are measured against float on the held-out crops.
- allocator: what reusing freed buffers (`qcompiler.allocator`) buys: the default npu-int8 compile
  of EfficientNet-Lite0 on --calib crops in a fresh process with glibc's malloc left alone
  (`QCOMPILER_KEEP_MALLOC=1`) and with the compile's thresholds, alternating, --rounds rounds;
  seconds, the process's peak resident memory, and whether the two compiled models agree bit for
  bit on held-out crops.
- ilp: the bit-allocation program on synthetic problems, each solver on the same program
  (`qcompiler.allocation`): 1,000 groups x 4 formats with one and two budgets, and 500 kernels whose
  bops couple a weight and an input group (six y booleans each). Median of --rounds runs with the
  spread, model build included. "cp-sat, presolve on" is the configuration used before this part
  was measured, run here as the baseline.
- threads: the npu-int8 compile of EfficientNet-Lite0 (real weights) on --calib crops, on an idle
  machine and with a second CPU-bound process on the machine, at 1 and 2 threads and at the
  default (`threads=None`: the cores other processes leave free, `qcompiler.threads`).
- budgeted: a budgeted npu-int4 compile of EfficientNet-Lite0 (weight memory at 75 % of the
  default plan) on --budget-calib crops, with the time of each pass; what the passes do not
  account for is the plan check (the uniform plan of the same budget compiled and compared).
- simulation: the compiled npu-int8 EfficientNet-Lite0's forward pass (exact integer kernels and
  requantizers) against the fake-quant graph of the same plan (the stage before `model_requant`),
  at batch 1 and 8, --sim-rounds rounds with the two alternating in each round, 2 threads; and
  the simulation's output codes against `lower("reference")` on held-out crops (bit-exactness).
- effort: `qcompile(effort=...)` on EfficientNet-Lite0: the npu-int8 compile on --calib crops
  and the budgeted npu-int4 compile (weight memory at 75 %) on --budget-calib crops, each effort
  timed over --rounds runs (fewer for the budgeted one) and measured against float on the held-out
  crops. The settings were fixed before this was run, not tuned on these crops.
- ray: `executor="ray"` on a local Ray instance with 2 CPUs against one process with 2 torch
  threads, on EfficientNet-Lite0 under npu-int4 (--budget-calib crops): the sqnr sensitivity of
  every group with a choice (the two alternating, --rounds rounds, values compared for identity),
  `qcompiler.pareto` over four feasible budgets (fewer rounds), and the overhead of one trivial task and of
  shipping the calibrated session to a task.
- scaling: compile time and peak memory against graph size: stacks of residual blocks (conv,
  BatchNorm, ReLU, add; 4 channels at 8x8, so the graph, not the arithmetic, is what grows),
  npu-int8, 8 calibration samples, each size in its own process (its peak resident memory is
  the process's); and torchvision's resnet18 to resnet152 (random weights, 8 samples of
  3x64x64, npu-int8), each in its own process.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import agreement, emit, header, load_split, logits, out_path, parser, spread
from mixed_precision import synthetic_problem
from qcompiler.allocation import (
    SOLVERS, AllocationProblem, BitTie, CostTable, _Program, _solve_cp_sat, solve_allocation,
)
from qcompiler.threads import torch_threads

PARTS = ("peer", "allocator", "ilp", "threads", "budgeted", "simulation", "effort", "ray", "scaling")


def paired_problem(n: int, seed: int = 0) -> AllocationProblem:
    """n kernels, each with a free weight group (2/4/8 bits) and a free input group (4/8 bits);
    bops couple each pair, so every kernel brings six y booleans; some "requires" ties."""
    rng = random.Random(seed)
    cands, bits, sens, mem, bops = {}, {}, {}, {}, {}
    for k in range(n):
        w, a = 2 * k, 2 * k + 1
        cands[w], cands[a] = ("w2", "w4", "w8"), ("a4", "a8")
        bits[w], bits[a] = {"w2": 2, "w4": 4, "w8": 8}, {"a4": 4, "a8": 8}
        size, macs = rng.randint(1000, 500_000), rng.randint(10**5, 10**8)
        sens[w] = {c: size * 1e-9 * 4.0 ** -bits[w][c] * rng.uniform(0.5, 2) for c in cands[w]}
        sens[a] = {c: 1e-3 * 4.0 ** -bits[a][c] * rng.uniform(0.5, 2) for c in cands[a]}
        mem[(w,)] = {(c,): size * bits[w][c] / 8 for c in cands[w]}
        bops[(w, a)] = {(cw, ca): macs * bits[w][cw] * bits[a][ca] for cw in cands[w] for ca in cands[a]}
    ties = tuple(BitTie("requires", (2 * k, 2 * k + 1), 2, 8) for k in range(0, n, 7))
    return AllocationProblem(candidates=cands, bits=bits, sensitivity=sens,
                             costs={"weight_memory": CostTable(0.0, mem), "bops": CostTable(0.0, bops)},
                             defaults={g: cands[g][-1] for g in cands}, ties=ties)


# ---------------------------------------------------------------------------------------------
# ilp
# ---------------------------------------------------------------------------------------------

def _cp_sat_with_presolve(problem: AllocationProblem, budgets: dict[str, float]) -> tuple[str, float, float]:
    """The earlier configuration (CP-SAT, its presolve on), on the very same integer program."""
    start = time.perf_counter()
    program = _Program(problem, list(budgets))
    for m, v in budgets.items():
        program.add_budget(m, v)
    objective = dict(enumerate(program.sensitivity_objective()))
    status, values = _solve_cp_sat(program, objective, 60.0, workers=1, presolve=True)
    choice = {g: c for (g, c), i in program.x.items() if values and values[i]}
    return status, problem.objective(choice) if choice else float("nan"), time.perf_counter() - start


def ilp_part(rounds: int, quick: bool) -> list[str]:
    n_flat, n_paired = (100, 50) if quick else (1000, 500)
    cases = [(f"{n_flat} groups x 4 formats", synthetic_problem(n_flat, 4), {"weight_memory": 0.55}),
             (f"{n_flat} groups x 4 formats", synthetic_problem(n_flat, 4), {"weight_memory": 0.3}),
             (f"{n_flat} groups x 4 formats", synthetic_problem(n_flat, 4), {"weight_memory": 0.6, "bops": 0.7}),
             (f"{n_paired} kernels, bops over weight x input", paired_problem(n_paired), {"bops": 0.4}),
             (f"{n_paired} kernels, bops over weight x input", paired_problem(n_paired),
              {"weight_memory": 0.6, "bops": 0.5})]
    rows = ["| problem | budgets (of the default plan) | solver | status | objective | seconds: median (range, runs) |",
            "|---|---|---|---|---|---|"]
    for label, problem, fractions in cases:
        default = {g: problem.defaults[g] for g in problem.candidates}
        budgets = {m: f * problem.cost(m, default) for m, f in fractions.items()}
        for solver in SOLVERS:
            results = [solve_allocation(problem, budgets, solver=solver) for _ in range(rounds)]
            status = "/".join(sorted({r.status for r in results}))
            rows.append(f"| {label} | {fractions} | {solver} | {status} | {results[0].objective:.6g} | "
                        f"{spread([r.seconds for r in results], ' s', 3)} |")
        old = [_cp_sat_with_presolve(problem, budgets) for _ in range(max(1, rounds // 2))]
        rows.append(f"| {label} | {fractions} | cp-sat, presolve on (before) | "
                    f"{'/'.join(sorted({o[0] for o in old}))} | {old[0][1]:.6g} | "
                    f"{spread([o[2] for o in old], ' s', 3)} |")
    return rows


# ---------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------

def _busy(load: str) -> subprocess.Popen | None:
    """A second process spinning on one core when `load` is "busy" (None when idle)."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
    time.sleep(1.0)  # the second process is up and spinning before anything is timed
    return hog


def _stop(hog: subprocess.Popen | None) -> None:
    if hog is not None:
        hog.kill()
        hog.wait()


def peer_part(calib: int, heldout: int, rounds: dict[str, int]) -> list[str]:
    from peers import run_mct

    from qcompiler import qcompile
    from qcompiler.zoo import efficientnet_lite0

    model = efficientnet_lite0().eval()
    crops = load_split("calib", calib).crops
    held = load_split("heldout", heldout)
    ref = logits(model, held.crops)
    rows = ["| machine | qcompile npu-int8 s | MCT PTQ 8-bit s | ratio (within each round) | "
            "qcompile held-out top-1 / SQNR | MCT held-out top-1 / SQNR |", "|---|---:|---:|---:|---|---|"]
    for load, count in rounds.items():
        ours, theirs, ratios = [], [], []
        hog = _busy(load)
        try:
            for _ in range(count):
                start = time.perf_counter()
                compiled = qcompile(model, crops[:1], target="npu-int8", calib_data=list(crops.split(32)),
                                    progress=False)
                ours.append(time.perf_counter() - start)
                mct = run_mct(calib, heldout)
                theirs.append(mct["seconds"])
                ratios.append(ours[-1] / theirs[-1])
        finally:
            _stop(hog)
        q_ours = agreement(ref, logits(compiled, held.crops), held.photos)
        q_mct = agreement(ref, mct["logits_quant"], held.photos)
        rows.append(f"| {load} | {spread(ours, ' s', 1)} | {spread(theirs, ' s', 1)} | {spread(ratios, '', 2)} | "
                    f"{q_ours.cell()} / {q_ours.sqnr_db:.2f} dB | {q_mct.cell()} / {q_mct.sqnr_db:.2f} dB |")
    return rows


def threads_part(calib: int, rounds: int, counts: list[int | None]) -> list[str]:
    from qcompiler import qcompile
    from qcompiler.zoo import efficientnet_lite0

    model = efficientnet_lite0().eval()
    crops = load_split("calib", calib).crops
    batches = list(crops.split(32))
    rows = ["| machine | threads | compile seconds: median (range, runs) |", "|---|---|---|"]
    for load in ("idle", "busy"):
        hog = _busy(load)
        try:
            for threads in counts:
                times, chosen = [], set()
                for _ in range(rounds):
                    with torch_threads(threads) as n:  # what qcompile will choose (None: sampled now)
                        chosen.add(n)
                    start = time.perf_counter()
                    qcompile(model, crops[:1], target="npu-int8", calib_data=batches, progress=False,
                             threads=threads)
                    times.append(time.perf_counter() - start)
                label = str(threads) if threads is not None else \
                    f"default (chose {'/'.join(map(str, sorted(chosen)))})"
                rows.append(f"| {load} | {label} | {spread(times, ' s', 1)} |")
        finally:
            _stop(hog)
    return rows


def budgeted_part(calib: int, rounds: int) -> list[str]:
    from qcompiler import qcompile
    from qcompiler.zoo import efficientnet_lite0

    model = efficientnet_lite0().eval()
    crops = load_split("calib", calib).crops
    totals, passes = [], {}
    for _ in range(rounds):
        start = time.perf_counter()
        compiled = qcompile(model, crops[:1], target="npu-int4", calib_data=list(crops.split(32)),
                            budget={"weight_memory": 0.75}, progress=False)
        totals.append(time.perf_counter() - start)
        for name, seconds in compiled.timings.items():
            passes.setdefault(name, []).append(seconds)
    rest = [t - sum(v[i] for v in passes.values()) for i, t in enumerate(totals)]
    rows = ["| stage | seconds: median (range, runs) |", "|---|---|"]
    rows += [f"| {name} | {spread(v, ' s', 2)} |" for name, v in passes.items()]
    rows += [f"| plan check and the rest (total minus the passes) | {spread(rest, ' s', 1)} |",
             f"| **total** | **{spread(totals, ' s', 1)}** |"]
    return rows


def simulation_part(calib: int, heldout: int, rounds: int) -> list[str]:
    from reference_backend import compare, speed_rows, stage_before

    from qcompiler import qcompile
    from qcompiler.zoo import efficientnet_lite0

    crops = load_split("calib", calib).crops
    held = load_split("heldout", heldout)
    compiled = qcompile(efficientnet_lite0().eval(), crops[:1], target="npu-int8",
                        calib_data=list(crops.split(32)), progress=False)
    before = compiled.graph(stage_before(compiled, "model_requant"))
    with torch_threads(1):
        exact = compare(compiled, held.crops, held.photos)
    with torch_threads(2):
        rows = [speed_rows(before, compiled.simulated, held.crops[:b], rounds) for b in (1, 8)]
    return ["| batch | fake-quant (before model_requant) | simulation (exact kernels) | ratio |",
            "|---:|---:|---:|---:|", *rows, "",
            f"Bit-exactness on {held.describe}: {100 * exact['match']:.3f} % of output codes identical to "
            f"`lower(\"reference\")`, largest code difference {exact['max_diff']}, "
            f"{exact['int_kernels']} integer kernels."]


def effort_part(calib: int, budget_calib: int, heldout: int, rounds: int) -> list[str]:
    from qcompiler import qcompile
    from qcompiler.options import EFFORTS
    from qcompiler.zoo import efficientnet_lite0

    model = efficientnet_lite0().eval()
    held = load_split("heldout", heldout)
    ref = logits(model, held.crops)
    rows = ["| compile | effort | seconds: median (range, runs) | held-out top-1 agreement | held-out SQNR |",
            "|---|---|---:|---:|---:|"]
    runs = [("npu-int8", None, calib, EFFORTS, rounds),
            ("npu-int4, weight memory 75 %", {"weight_memory": 0.75}, budget_calib, ("fast", "default"),
             max(1, (rounds + 1) // 2))]
    for label, budget, n, efforts, count in runs:
        crops = load_split("calib", n).crops
        target = "npu-int8" if budget is None else "npu-int4"
        for effort in efforts:
            times = []
            for _ in range(count):
                start = time.perf_counter()
                compiled = qcompile(model, crops[:1], target=target, calib_data=list(crops.split(32)), budget=budget,
                                    progress=False, effort=effort)
                times.append(time.perf_counter() - start)
            quality = agreement(ref, logits(compiled, held.crops), held.photos)
            rows.append(f"| {label}, {n} crops | {effort} | {spread(times, ' s', 1)} | {quality.cell()} | "
                        f"{quality.sqnr_db:.2f} dB |")
    return rows


def _nothing(shared: object, item: int) -> int:
    return item


def ray_part(calib: int, rounds: int) -> list[str]:
    import ray

    from qcompiler import pareto
    from qcompiler.executor import dumps, map_tasks
    from qcompiler.mixed_precision import MixedPrecisionSession
    from qcompiler.sensitivity import measure_sensitivity
    from qcompiler.zoo import efficientnet_lite0

    model = efficientnet_lite0().eval()
    crops = load_split("calib", calib).crops
    batches = list(crops.split(32))
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    map_tasks(_nothing, None, [0, 1], "ray")  # both workers up
    started = time.perf_counter() - start
    try:
        session = MixedPrecisionSession(model, crops[:1], target="npu-int4", calib_data=batches, progress=False)
        ctx = session.ctx
        groups = [g for g in ctx.groups if not g.fallback and len(g.candidates) > 1]
        times: dict[str, list[float]] = {"local": [], "ray": []}
        tables: dict[str, list[dict]] = {"local": [], "ray": []}
        for _ in range(rounds):
            for executor in ("local", "ray"):
                with torch_threads(2):
                    begin = time.perf_counter()
                    table = measure_sensitivity(session.run.gm, groups, ctx.observers, ctx.calib_batches, "sqnr",
                                                0, False, executor)
                    times[executor].append(time.perf_counter() - begin)
                tables[executor].append(table.values)
        identical = all(t == tables["local"][0] for t in tables["local"] + tables["ray"])
        ratios = [a / b for a, b in zip(times["local"], times["ray"])]
        trivial = []
        for _ in range(max(5, rounds)):
            begin = time.perf_counter()
            map_tasks(_nothing, None, [0], "ray")
            trivial.append(time.perf_counter() - begin)
        shipped = []
        for _ in range(rounds):
            begin = time.perf_counter()
            map_tasks(_nothing, session, [0], "ray")
            shipped.append(time.perf_counter() - begin)
        size = len(dumps(session, by_value=True)) / 2**20
        def curve(executor: str) -> list[tuple]:
            result = pareto(model, crops[:1], target="npu-int4", calib_data=batches, progress=False,
                            budgets=[0.9, 0.8, 0.75, 0.7], executor=executor)
            return [(p.status, p.choice, p.weight_memory_bytes, p.sqnr_db) for p in result.points]

        curves: dict[str, list[float]] = {"local": [], "ray": []}
        points: dict[str, list] = {"local": [], "ray": []}
        for _ in range(max(1, (rounds + 1) // 2)):
            for executor in ("local", "ray"):
                with torch_threads(2):
                    begin = time.perf_counter()
                    points[executor].append(curve(executor))
                    curves[executor].append(time.perf_counter() - begin)
        # Each Ray task computes on one thread; one process on one thread is the like-for-like reference.
        with torch_threads(1):
            one_thread = curve("local")
        same_plans = all([q[:3] for q in p] == [q[:3] for q in one_thread] for p in points["local"] + points["ray"])
        same_as_one_thread = all(p == one_thread for p in points["ray"])
        gap = max(abs(a[3] - b[3]) for p in points["local"] for a, b in zip(p, points["ray"][0]))
        pareto_ratios = [a / b for a, b in zip(curves["local"], curves["ray"])]
    finally:
        ray.shutdown()
    return ["| work | one process, 2 threads | Ray, 2 workers of 1 thread | speed-up | same result |",
            "|---|---:|---:|---:|---|",
            f"| sqnr sensitivity, {len(groups)} groups, {sum(len(g.candidates) for g in groups)} measurements | "
            f"{spread(times['local'], ' s', 1)} | {spread(times['ray'], ' s', 1)} | {spread(ratios, 'x')} | "
            f"{'yes, every value' if identical else 'NO'} |",
            f"| `pareto`, 4 budgets (calibration, sensitivity, 4 finished compiles) | {spread(curves['local'], ' s', 1)} | "
            f"{spread(curves['ray'], ' s', 1)} | {spread(pareto_ratios, 'x')} | "
            f"plans and memory {'identical' if same_plans else 'DIFFER'}; every point "
            f"{'identical' if same_as_one_thread else 'NOT identical'} to one process on 1 thread; "
            f"SQNR within {gap:.3f} dB of one process on 2 threads |", "",
            f"Overhead: starting the local Ray instance and its two workers {started:.1f} s (once per process); "
            f"one trivial task {spread([t * 1000 for t in trivial], ' ms', 0)}; one task that receives the "
            f"calibrated session ({size:.0f} MiB serialised: graphs, observers, calibration data) "
            f"{spread(shipped, ' s', 2)}."]


ALLOCATOR_CHILD = """
import hashlib, resource, sys, time
sys.path.insert(0, sys.argv[2])
from common import load_split
from qcompiler import qcompile
from qcompiler.zoo import efficientnet_lite0

model = efficientnet_lite0().eval()
crops = load_split("calib", int(sys.argv[1])).crops
start = time.perf_counter()
compiled = qcompile(model, crops[:1], target="npu-int8", calib_data=list(crops.split(32)), progress=False)
seconds = time.perf_counter() - start
out = compiled(load_split("heldout", 8).crops).detach().contiguous()
print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, hashlib.sha256(out.numpy().tobytes()).hexdigest())
"""


def allocator_part(calib: int, rounds: int) -> list[str]:
    runs: dict[str, list[tuple[float, float, str]]] = {"kept": [], "reused": []}
    for _ in range(rounds):
        for mode in runs:
            env = dict(os.environ, QCOMPILER_KEEP_MALLOC="1" if mode == "kept" else "0")
            out = subprocess.run([sys.executable, "-c", ALLOCATOR_CHILD, str(calib), str(Path(__file__).parent)],
                                 capture_output=True, text=True, check=True, env=env)
            seconds, peak, digest = out.stdout.split()
            runs[mode].append((float(seconds), float(peak), digest))
    ratios = [k[0] / r[0] for k, r in zip(runs["kept"], runs["reused"])]
    same = len({d for v in runs.values() for _, _, d in v}) == 1
    labels = {"kept": "glibc's defaults (`QCOMPILER_KEEP_MALLOC=1`)", "reused": "freed buffers reused (default)"}
    rows = ["| malloc | compile seconds | peak resident MiB |", "|---|---:|---:|"]
    rows += [f"| {labels[m]} | {spread([s for s, _, _ in v], ' s', 1)} | {spread([p for _, p, _ in v], '', 0)} |"
             for m, v in runs.items()]
    return rows + ["", f"Speed-up within each round: {spread(ratios, 'x')}. Outputs on 8 held-out crops: "
                       f"{'bit-identical in every run' if same else 'NOT identical'}."]


SCALING_CHILD = """
import resource, sys, time, torch
from torch import nn
from qcompiler import qcompile

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        nn.init.constant_(self.bn.weight, 0.05)  # the residual stream stays finite over thousands of blocks

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))

torch.manual_seed(0)
if sys.argv[1].startswith("resnet"):
    import torchvision
    model = getattr(torchvision.models, sys.argv[1])().eval()
    data = [torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
else:
    model = nn.Sequential(*[Block(4) for _ in range(int(sys.argv[1]))]).eval()
    data = [torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
start = time.perf_counter()
compiled = qcompile(model, data[0], calib_data=data, progress=False)
seconds = time.perf_counter() - start
print(len(compiled.graph("capture").graph.nodes), seconds, sum(compiled.timings.values()),
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def scaling_part(node_counts: list[int], resnets: list[str]) -> list[str]:
    rows = ["| graph | captured nodes | compile s | in the passes s | per 1k nodes s | peak memory MiB |",
            "|---|---:|---:|---:|---:|---:|"]
    runs = [(f"{max(1, count // 4):,} residual blocks", str(max(1, count // 4))) for count in node_counts]  # 4 nodes each
    for label, arg in runs + [(name, name) for name in resnets]:
        out = subprocess.run([sys.executable, "-c", SCALING_CHILD, arg], capture_output=True, text=True, check=True)
        nodes, seconds, in_passes, peak = out.stdout.split()
        rows.append(f"| {label} | {int(nodes):,} | {float(seconds):.1f} | {float(in_passes):.1f} | "
                    f"{float(seconds) / int(nodes) * 1000:.2f} | {float(peak):,.0f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = parser(__file__, "Compile speed: the allocation program's solvers, thread counts under load, a budgeted compile.")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    ap.add_argument("--rounds", type=int, default=5, help="runs per configuration (medians are quoted)")
    ap.add_argument("--calib", type=int, default=256, help="calibration crops for the thread timings")
    ap.add_argument("--budget-calib", type=int, default=64, help="calibration crops for the budgeted compile")
    ap.add_argument("--peer-rounds", type=int, default=3, help="rounds of the MCT comparison, per machine state")
    ap.add_argument("--sim-rounds", type=int, default=15, help="rounds of the simulation timing")
    ap.add_argument("--sizes", default="1000,2000,5000,10000", help="node counts of the synthetic graphs (scaling)")
    ap.add_argument("--resnets", default="resnet18,resnet34,resnet50,resnet101,resnet152",
                    help="torchvision resnets of the scaling part")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part {unknown[0]!r}; the parts are {', '.join(PARTS)}")
    rounds = 2 if args.quick else args.rounds
    out = [header("Compile speed", __file__, argv, passes=None,
                  notes=[f"torch threads available: {torch.get_num_threads()}."])]
    if "peer" in parts:
        calib, held = (16, 8) if args.quick else (args.calib, 300)
        count = {"idle": 1, "busy": 1} if args.quick else {"idle": args.peer_rounds, "busy": args.peer_rounds}
        out += ["## Against Sony MCT, same run", "",
                f"EfficientNet-Lite0 on {calib} calibration crops: `qcompile(target=\"npu-int8\")` with every default "
                "against MCT 2.6.0's `pytorch_post_training_quantization` with its defaults (8-bit per-channel "
                "weights, 8-bit power-of-two activations, its default target platform; `peers.py`), alternating "
                "in each round; \"busy\": a second process spins on one core throughout. Quality: the last round's "
                f"model against float on {held} held-out crops (MCT also quantizes the logits, 8-bit with a "
                "threshold of 8, so some of its top-1 misses are ties at the clipped maximum).", "",
                *peer_part(calib, held, count), ""]
    if "allocator" in parts:
        calib = 16 if args.quick else args.calib
        out += ["## Reusing freed buffers", "",
                f"npu-int8 compile of EfficientNet-Lite0 on {calib} calibration crops, each run in a fresh process, "
                "the two settings alternating; default thread choice.", "",
                *allocator_part(calib, 1 if args.quick else rounds), ""]
    if "ilp" in parts:
        out += ["## The bit-allocation program", "",
                "Each solver gets the same integer program (`qcompiler.allocation._Program`); every status "
                "OPTIMAL is a proof of optimality with zero gap. Seconds include building the model.", "",
                *ilp_part(rounds, args.quick), ""]
    if "threads" in parts:
        calib = 16 if args.quick else args.calib
        out += ["## Threads, idle and under load", "",
                f"npu-int8 compile of EfficientNet-Lite0 on {calib} calibration crops; \"busy\": a second "
                "process spins on one core for the whole measurement.", "",
                *threads_part(calib, 1 if args.quick else max(1, rounds // 2), [1, 2, None]), ""]
    if "budgeted" in parts:
        calib = 16 if args.quick else args.budget_calib
        out += ["## A budgeted npu-int4 compile", "",
                f"EfficientNet-Lite0, npu-int4, `budget={{\"weight_memory\": 0.75}}`, {calib} calibration crops, "
                "default thread choice.", "",
                *budgeted_part(calib, 1 if args.quick else max(1, rounds // 2)), ""]
    if "simulation" in parts:
        calib, held = (8, 8) if args.quick else (64, 33)
        out += ["## Simulation speed", "",
                f"EfficientNet-Lite0, npu-int8 (default pipeline, {calib} calibration crops), 224x224, 2 threads. "
                "Median (min-max, rounds) per batch; the ratio is taken within each round.", "",
                *simulation_part(calib, held, 3 if args.quick else args.sim_rounds), ""]
    if "effort" in parts:
        calib, budget_calib, held = (16, 16, 8) if args.quick else (args.calib, args.budget_calib, 300)
        out += ["## Effort settings", "",
                "`qcompile(effort=...)` (`qcompiler.options.EFFORT_SETTINGS`), default thread choice; the same "
                f"model is measured against float on {held} held-out crops (the last run of each row).", "",
                *effort_part(calib, budget_calib, held, 1 if args.quick else rounds), ""]
    if "ray" in parts:
        calib = 16 if args.quick else args.budget_calib
        out += ["## Ray", "",
                f"EfficientNet-Lite0, npu-int4, {calib} calibration crops; a local Ray instance with 2 CPUs on this "
                "2-core machine. Median (range, rounds); ratios within each round.", "",
                *ray_part(calib, 2 if args.quick else rounds), ""]
    if "scaling" in parts:
        counts = [100, 200] if args.quick else [int(n) for n in args.sizes.split(",") if n]
        resnets = ["resnet18"] if args.quick else [n for n in args.resnets.split(",") if n]
        out += ["## Compile time and memory against graph size", "",
                "Stacked residual blocks (see the script), one run per size; \"in the passes\" is the sum of "
                "the pass timings, the rest is the stage snapshots kept for inspection and the final model.", "",
                *scaling_part(counts, resnets), ""]
    emit("\n".join(out), out_path(__file__, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
