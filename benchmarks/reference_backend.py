"""Reference backend vs simulation: output codes, top-1 agreement, and simulation speed.

For resnet18, mobilenet_v2, googlenet (random weights, seed 0) and EfficientNet-Lite0 (ImageNet
weights) under npu-int8, npu-int4, dsp-fixed-point and cpu-x86-int8: compile on calibration
crops, run the simulation (`compiled(x)`) and the reference backend
(`compiled.lower("reference").codes(x)`) on held-out crops (disjoint from calibration), and
count output codes that match exactly, the largest code difference and top-1 agreement. Also
counts the kernels whose requantization factor the target represents exactly.

Speed: EfficientNet-Lite0 at 224x224 under npu-int8, the fake-quant simulation before
model_requant (the graph of the stage just before it) against after it, 2 threads: the two
alternate in every round, and each round's ratio is one sample; the table gives the median and
the min-max spread over rounds.

    python benchmarks/reference_backend.py [--calib 32] [--heldout 33] [--quick] [--out FILE]
"""
from __future__ import annotations

import sys
import time

import torch
import torchvision

import qcompiler
from qcompiler.exact import KernelRequantize
from qcompiler.backends.reference import IntegerKernel
from qcompiler.requant import is_exact
from common import SPLIT_NOTE, emit, header, load_split, out_path, parser, pipeline, spread
from qcompiler.stats import agreement_interval
from qcompiler.zoo import efficientnet_lite0

TARGETS = ("npu-int8", "npu-int4", "dsp-fixed-point", "cpu-x86-int8")
MODELS = ("resnet18", "mobilenet_v2", "googlenet", "efficientnet_lite0")


def make_model(name: str) -> torch.nn.Module:
    if name == "efficientnet_lite0":
        return efficientnet_lite0()
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    return getattr(torchvision.models, name)(**kwargs).eval()


def output_quantizer(compiled):
    out = next(n for n in compiled.simulated.graph.nodes if n.op == "output").args[0]
    return compiled.simulated.get_submodule(out.target)


def exact_factors(compiled) -> tuple[int, int]:
    """(kernels whose requant factor is exactly representable, exact kernels)."""
    exact = total = 0
    for m in compiled.simulated.modules():
        if isinstance(m, KernelRequantize):
            total += 1
            real = m.acc_scale / m.params.scale.double().reshape(())
            exact += is_exact(real, m.multiplier, m.shift, m.mode)
    return exact, total


def compare(compiled, heldout: torch.Tensor, photos, batch: int = 8) -> dict:
    ref = compiled.lower("reference")
    q = output_quantizer(compiled)
    same = total = 0
    max_diff = 0
    hits: list[bool] = []
    with torch.no_grad():
        for i in range(0, len(heldout), batch):
            x = heldout[i:i + batch]
            y_sim = compiled(x)
            c_sim = q.fmt.quantize(y_sim, q.params)
            c_ref = ref.codes(x)
            same += int((c_sim == c_ref).sum())
            total += c_sim.numel()
            max_diff = max(max_diff, int((c_sim - c_ref).abs().max()))
            hits += (ref(x).argmax(1) == y_sim.argmax(1)).tolist()
    n_int = sum(isinstance(m, IntegerKernel) for m in ref.modules())
    top1 = (f"{100 * sum(hits) / len(hits):.1f} %" if len(set(photos)) < 2
            else str(agreement_interval(hits, list(photos))))
    return {"match": same / total, "max_diff": max_diff, "top1": top1, "int_kernels": n_int}


def round_times(fns, x, rounds: int) -> list[list[float]]:
    """Wall time of each function in every round; the functions alternate within a round so
    that machine load hits all alike."""
    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for fn in fns:
            fn(x)
        for _ in range(rounds):
            for fn, ts in zip(fns, times):
                t = time.perf_counter()
                fn(x)
                ts.append(time.perf_counter() - t)
    return times


def stage_before(compiled, stage: str) -> str:
    """The name of the stage that ran just before `stage` in this compile."""
    stages = compiled.stages
    if stage not in stages or stages.index(stage) == 0:
        raise SystemExit(f"the pipeline {stages} has no stage before {stage!r} to compare with")
    return stages[stages.index(stage) - 1]


def speed_rows(before, after, x: torch.Tensor, rounds: int) -> str:
    t_before, t_after = round_times([before, after], x, rounds)
    ratios = [a / b for a, b in zip(t_after, t_before)]
    return (f"| {len(x)} | {spread([1000 * t for t in t_before], ' ms', 1)} | "
            f"{spread([1000 * t for t in t_after], ' ms', 1)} | {spread(ratios, 'x')} |")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--heldout", type=int, default=33)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--speed-rounds", type=int, default=15)
    args = ap.parse_args(argv)
    if args.quick:
        args.calib, args.heldout, args.speed_rounds = 4, 4, 3
        args.models, args.targets = "efficientnet_lite0", "npu-int8"
    torch.set_num_threads(1)
    calib = load_split("calib", args.calib)
    heldout = load_split("heldout", args.heldout)
    calib_batches = list(calib.crops.split(8))
    rows = []
    speed: list[str] = []
    for name in args.models.split(","):
        model = make_model(name)
        for target in args.targets.split(","):
            start = time.perf_counter()
            compiled = qcompiler.qcompile(model, calib.crops[:2], target=target, calib_data=calib_batches,
                                          passes=pipeline(args.quick), progress=False)
            seconds = time.perf_counter() - start
            res = compare(compiled, heldout.crops, heldout.photos)
            exact, total = exact_factors(compiled)
            rows.append((name, target, res, exact, total, seconds))
            print(name, target, res, f"{exact}/{total} exact factors", f"{seconds:.0f}s compile",
                  file=sys.stderr, flush=True)
            if name == "efficientnet_lite0" and target == "npu-int8":
                torch.set_num_threads(2)
                before = compiled.graph(stage_before(compiled, "model_requant"))
                speed = [speed_rows(before, compiled.simulated, heldout.crops[:b], args.speed_rounds)
                         for b in (1, min(8, len(heldout.crops)))]
                torch.set_num_threads(1)
    lines = [
        header("Reference backend vs simulation", __file__, argv, notes=[
            f"Calibration: {calib.describe}; evaluation: {heldout.describe}, 224x224. resnet18, "
            "mobilenet_v2 and googlenet have random weights (seed 0); EfficientNet-Lite0 has its "
            "ImageNet weights. One intra-op thread for the compiles.", "", SPLIT_NOTE]),
        "Codes: the simulation's output codes (its float output encoded by the output quantizer) "
        "against `compiled.lower(\"reference\").codes(x)`. Top-1: argmax of the reference's "
        "dequantized output against the simulation's. Integer kernels: conv and linear kernels. "
        "Exact factors: requantizers whose factor `s_in * s_w / s_out` the target's multiplier "
        "represents exactly (the rest are rounded to the spec's multiplier, which simulation and "
        "reference both use).",
        "",
        "| model | target | codes identical | max code diff | top-1 agreement | integer kernels | exact factors | compile |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, target, res, exact, total, seconds in rows:
        lines.append(f"| {name} | {target} | {100 * res['match']:.3f} % | {res['max_diff']} | "
                     f"{res['top1']} | {res['int_kernels']} | {exact}/{total} | {seconds:.0f} s |")
    if speed:
        lines += [
            "",
            "## Simulation speed (EfficientNet-Lite0, npu-int8, 224x224, 2 threads)",
            "",
            f"The fake-quant graph before `model_requant` against the final simulation (exact integer "
            f"kernels), the same compiled model; {args.speed_rounds} rounds, the two alternating in each "
            "round. Median (min-max) over rounds; the ratio is computed per round.",
            "",
            "| batch | before model_requant | after (exact kernels) | ratio after / before |",
            "|---:|---:|---:|---:|",
            *speed,
        ]
    emit("\n".join(lines) + "\n", out_path(__file__, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
