"""Time every pass of the default pipeline, and capture against model depth.

    python benchmarks/pipeline_timing.py             # resnet50 and vit_b_16, 3 rounds each
    python benchmarks/pipeline_timing.py --quick     # resnet18, smoke run, prints only

Random weights (seed 0), target npu-int8, random calibration images. Each round is a whole
compile; a pass's cell is its median time over the rounds with the min-max spread.
"""
from __future__ import annotations

import sys
import time
import warnings

import torch
import torchvision

import qcompiler
from qcompiler.pass_manager import PassManager

from common import emit, header, out_path, parser, pipeline, spread


def pass_table(name: str, images: int, rounds: int, passes: list, batch_size: int = 4) -> str:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, 224, 224)
    calib = list(torch.randn(images, 3, 224, 224).split(batch_size))
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = PassManager(passes).run(model, x, target=qcompiler.load_target("npu-int8"),
                                                         calib_data=calib, progress=False)
        for stage in run.stages:
            times.setdefault(stage, []).append(run.timings[stage])
    lines = [f"### {name} ({sum(p.numel() for p in model.parameters()):,} parameters), target npu-int8, "
             f"{images} calibration images, {rounds} rounds", "",
             "| pass | seconds: median (min-max) | nodes before → after |", "|---|---:|---|"]
    for stage in run.stages:
        before, after = run.node_counts[stage]
        lines.append(f"| {stage} | {spread(times[stage], digits=3)} | {before} → {after} |")
    totals = [sum(ts[i] for ts in times.values()) for i in range(rounds)]
    lines.append(f"| **total** | **{spread(totals)}** | |")
    return "\n".join(lines)


def capture_scaling(models: list[str], rounds: int) -> str:
    lines = ["| model | graph nodes | capture seconds: median (min-max) | seconds per 100 nodes (median) |",
             "|---|---:|---:|---:|"]
    x = torch.randn(1, 3, 224, 224)
    for name in models:
        model = getattr(torchvision.models, name)().eval()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            gm = qcompiler.capture(model, x)
            times.append(time.perf_counter() - start)
        n = len(gm.graph.nodes)
        lines.append(f"| {name} | {n} | {spread(times)} | {100 * sorted(times)[len(times) // 2] / n:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,vit_b_16", help="models of the per-pass tables")
    ap.add_argument("--capture-models", default="resnet18,resnet34,resnet50,resnet101,resnet152")
    ap.add_argument("--images", type=int, default=8, help="calibration images")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.capture_models, args.images, args.rounds = "resnet18", "resnet18", 2, 2
    parts = [header("Pipeline timing", __file__, argv, notes=[
        f"torch {torch.get_num_threads()} intra-op threads. Random weights; times include the machine's "
        "other load, so read the spread." + (" AdaRound cut to 2 steps (--quick)." if args.quick else "")])]
    for name in args.models.split(","):
        print(f"timing {name}", file=sys.stderr, flush=True)
        parts += [pass_table(name, args.images, args.rounds, pipeline(args.quick)), ""]
    parts += ["### Capture against depth", "", capture_scaling(args.capture_models.split(","), args.rounds)]
    emit("\n".join(parts) + "\n", out_path(__file__, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
