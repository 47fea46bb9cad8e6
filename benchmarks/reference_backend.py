"""Reference backend vs simulation: output codes, top-1 agreement, and simulation speed.

For resnet18, mobilenet_v2, googlenet (random weights, seed 0) and EfficientNet-Lite0 (ImageNet
weights) under npu-int8, npu-int4, dsp-fixed-point and cpu-x86-int8: compile on calibration
crops, run the simulation (`compiled(x)`) and the reference backend
(`compiled.lower("reference").codes(x)`) on held-out crops (disjoint from calibration), and
count output codes that match exactly, the largest code difference and top-1 agreement. Also
counts the kernels whose requantization factor the target represents exactly.

Speed: EfficientNet-Lite0 at 224x224 under npu-int8, the fake-quant simulation before
model_requant (the `correct_bias` stage) against after it, median of repeated runs, 2 threads.

    OMP_NUM_THREADS=1 python benchmarks/reference_backend.py [--calib 32] [--heldout 32] [--out benchmarks/reference_backend.md]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torchvision

import qcompiler
from qcompiler.exact import KernelRequantize
from qcompiler.reference import IntegerKernel
from qcompiler.requant import is_exact
from qcompiler.sample_data import sample_crops
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


def compare(compiled, heldout: torch.Tensor, batch: int = 8) -> dict:
    ref = compiled.lower("reference")
    q = output_quantizer(compiled)
    same = total = agree = 0
    max_diff = 0
    with torch.no_grad():
        for i in range(0, len(heldout), batch):
            x = heldout[i:i + batch]
            y_sim = compiled(x)
            c_sim = q.fmt.quantize(y_sim, q.params)
            c_ref = ref.codes(x)
            same += int((c_sim == c_ref).sum())
            total += c_sim.numel()
            max_diff = max(max_diff, int((c_sim - c_ref).abs().max()))
            agree += int((ref(x).argmax(1) == y_sim.argmax(1)).sum())
    n_int = sum(isinstance(m, IntegerKernel) for m in ref.modules())
    return {"match": same / total, "max_diff": max_diff, "top1": agree / len(heldout), "int_kernels": n_int}


def median_seconds(fns, x, repeats: int) -> list[float]:
    """Median wall time of each function; runs alternate so that machine load hits all alike."""
    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for fn in fns:
            fn(x)
        for _ in range(repeats):
            for fn, ts in zip(fns, times):
                t = time.perf_counter()
                fn(x)
                ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--speed-repeats", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/reference_backend.md")
    args = ap.parse_args()
    calib = sample_crops(args.calib, seed=0, split="calib")
    heldout = sample_crops(args.heldout, seed=0, split="heldout")
    calib_batches = list(calib.split(8))
    rows = []
    speed = None
    for name in args.models.split(","):
        model = make_model(name)
        for target in args.targets.split(","):
            start = time.perf_counter()
            compiled = qcompiler.qcompile(model, calib[:2], target=target, calib_data=calib_batches, progress=False)
            seconds = time.perf_counter() - start
            res = compare(compiled, heldout)
            exact, total = exact_factors(compiled)
            rows.append((name, target, res, exact, total, seconds))
            print(name, target, res, f"{exact}/{total} exact factors", f"{seconds:.0f}s compile", flush=True)
            if name == "efficientnet_lite0" and target == "npu-int8":
                torch.set_num_threads(2)
                before = compiled.graph("correct_bias")
                speed = median_seconds([before, compiled.simulated], heldout[:1], args.speed_repeats)
                speed_b8 = median_seconds([before, compiled.simulated], heldout[:8], args.speed_repeats)
                torch.set_num_threads(1)
                print("speed", speed, speed_b8, flush=True)
    lines = [
        "# Reference backend vs simulation",
        "",
        "Reproduce: `OMP_NUM_THREADS=1 python benchmarks/reference_backend.py "
        f"--calib {args.calib} --heldout {args.heldout}`. torch {torch.__version__}, "
        f"{platform.machine()}. Calibration: {args.calib} crops `sample_crops(..., split=\"calib\")`; "
        f"evaluation: {args.heldout} held-out crops (`split=\"heldout\"`, disjoint), 224x224. "
        "resnet18, mobilenet_v2 and googlenet have random weights (seed 0); EfficientNet-Lite0 has "
        "its ImageNet weights.",
        "",
        "Codes: the simulation's output codes (its float output encoded by the output quantizer) "
        "against `compiled.lower(\"reference\").codes(x)`. Top-1: argmax of the reference's "
        "dequantized output against the simulation's. Exact factors: kernels whose "
        "requantization factor `s_in * s_w / s_out` the target's multiplier represents exactly "
        "(the rest are rounded to the spec's multiplier, which simulation and reference both use).",
        "",
        "| model | target | codes identical | max code diff | top-1 agreement | integer kernels | exact factors | compile |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, target, res, exact, total, seconds in rows:
        lines.append(f"| {name} | {target} | {100 * res['match']:.3f} % | {res['max_diff']} | "
                     f"{100 * res['top1']:.1f} % | {res['int_kernels']} | {exact}/{total} | {seconds:.0f} s |")
    if speed is not None:
        lines += [
            "",
            "## Simulation speed (EfficientNet-Lite0, npu-int8, 224x224, 2 threads, median of "
            f"{args.speed_repeats})",
            "",
            "| batch | fake-quant before model_requant | after (exact kernels) | ratio |",
            "|---:|---:|---:|---:|",
            f"| 1 | {1000 * speed[0]:.1f} ms | {1000 * speed[1]:.1f} ms | {speed[1] / speed[0]:.2f}x |",
            f"| 8 | {1000 * speed_b8[0]:.1f} ms | {1000 * speed_b8[1]:.1f} ms | {speed_b8[1] / speed_b8[0]:.2f}x |",
            "",
            "Runs of the two models alternate, so machine load (other jobs share the two cores) "
            "affects both alike; the ratio is the figure to read, absolute times vary with load.",
        ]
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
