"""Time every pass of the pipeline on resnet50 and vit_b_16, and capture against model depth.

Run: python benchmarks/pipeline_timing.py  (random weights; about two minutes on 2 cores).
Prints Markdown tables; the figures in benchmarks/pipeline_timing.md come from this script.
"""
from __future__ import annotations

import time
import warnings

import torch
import torchvision

import qcompiler
from qcompiler.api import DEFAULT_PASSES
from qcompiler.pass_manager import PassManager


def pass_table(name: str, batches: int = 2, batch_size: int = 4) -> str:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, 224, 224)
    calib = [torch.randn(batch_size, 3, 224, 224) for _ in range(batches)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = PassManager(list(DEFAULT_PASSES)).run(model, x, target=qcompiler.load_target("npu-int8"),
                                                     calib_data=calib, progress=False)
    lines = [f"### {name} ({sum(p.numel() for p in model.parameters()):,} parameters), target npu-int8, "
             f"{batches * batch_size} calibration images", "", "| pass | seconds | nodes before → after |", "|---|---:|---|"]
    for stage in run.stages:
        before, after = run.node_counts[stage]
        lines.append(f"| {stage} | {run.timings[stage]:.3f} | {before} → {after} |")
    lines.append(f"| **total** | **{sum(run.timings.values()):.2f}** | |")
    return "\n".join(lines)


def capture_scaling(repeats: int = 3) -> str:
    lines = ["| model | graph nodes | capture seconds (median of 3) | seconds per 100 nodes |", "|---|---:|---:|---:|"]
    x = torch.randn(1, 3, 224, 224)
    for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        model = getattr(torchvision.models, name)().eval()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            gm = qcompiler.capture(model, x)
            times.append(time.perf_counter() - start)
        t = sorted(times)[len(times) // 2]
        n = len(gm.graph.nodes)
        lines.append(f"| {name} | {n} | {t:.2f} | {100 * t / n:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(pass_table("resnet50"), "\n")
    print(pass_table("vit_b_16"), "\n")
    print("### capture against depth\n")
    print(capture_scaling())
