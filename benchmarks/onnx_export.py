"""ONNX export benchmark: speed and agreement of `compiled.export_onnx` in ONNX Runtime.

Measured in one run (python benchmarks/onnx_export.py [--out benchmarks/onnx_export.md]):

1. For cpu-x86-int8, on EfficientNet-Lite0 (ImageNet weights) and resnet18 / mobilenet_v2
   (random weights, BatchNorm statistics set from random inputs so activations have a realistic
   spread): latency of our QDQ export vs the float ONNX model (torch.onnx.export of the float
   model) vs ONNX Runtime's own `quantize_static` (QDQ, per-channel int8 weights, uint8
   activations, min-max calibration on the same crops), at batch 1 and 16 with 2 intra-op
   threads, median of repeated runs (the three runtimes interleaved round by round: the machine
   is shared, and interleaving spreads its load over all three alike); which integer kernels
   ONNX Runtime picked; top-1 agreement with the float model on held-out crops.
2. For every built-in target on EfficientNet-Lite0: agreement of the ONNX export run by ONNX
   Runtime with our simulation (top-1, max abs logit error, share of logits within one output
   code).
"""
from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision

import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import qcompiler
from qcompiler.sample_data import sample_crops
from qcompiler.zoo import efficientnet_lite0

SIZE = 224
N_CALIB = 32
N_HELDOUT = 96
THREADS = 2


def random_model(name: str) -> torch.nn.Module:
    """A torchvision model with random weights and BatchNorm statistics of random inputs."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, 3, SIZE, SIZE))
    return model.eval()


def session(path: str, threads: int = 1, optimized: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized:
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, x: torch.Tensor, chunk: int = 16) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + chunk].numpy()})[0] for i in range(0, len(x), chunk)])


def median_ms(sessions: dict[str, ort.InferenceSession], x: np.ndarray, rounds: int, per_round: int = 3) -> dict[str, float]:
    """Median latency of each session, interleaved round by round so that load drift on a
    shared machine hits every runtime alike."""
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(per_round):
                t = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def op_counts(path: str, tmp: Path) -> collections.Counter:
    opt = str(tmp / "optimized.onnx")
    session(path, optimized=opt)
    return collections.Counter(n.op_type for n in onnx.load(opt).graph.node)


class Crops(CalibrationDataReader):
    def __init__(self, crops: torch.Tensor, name: str):
        self.batches = iter([{name: crops[i:i + 8].numpy()} for i in range(0, len(crops), 8)])

    def get_next(self):
        return next(self.batches, None)


def top1(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


def speed_rows(name: str, model: torch.nn.Module, calib: torch.Tensor, held: torch.Tensor, tmp: Path) -> dict:
    float_path = str(tmp / f"{name}_float.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (calib[:1],), float_path, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
        t = time.perf_counter()
        compiled = qcompiler.qcompile(model, calib[:1], target="cpu-x86-int8",
                                      calib_data=[calib[i:i + 8] for i in range(0, len(calib), 8)], progress=False)
        compile_s = time.perf_counter() - t
    ours_path = str(tmp / f"{name}_qcompiler.onnx")
    t = time.perf_counter()
    compiled.export_onnx(ours_path)
    export_s = time.perf_counter() - t
    ort_path = str(tmp / f"{name}_quantize_static.onnx")
    quantize_static(float_path, ort_path, Crops(calib, "x"), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    paths = {"float": float_path, "qcompiler": ours_path, "quantize_static": ort_path}
    out: dict = {"compile_s": compile_s, "export_s": export_s, "ms": {}, "ops": {}, "top1": {}, "size": {}}
    logits = {k: run(session(p), held) for k, p in paths.items()}
    with torch.no_grad():
        sim = torch.cat([compiled(held[i:i + 16]) for i in range(0, len(held), 16)]).numpy()
    out["sim_vs_export_top1"] = top1(sim, logits["qcompiler"])
    for k, p in paths.items():
        out["size"][k] = os.path.getsize(p)
        out["top1"][k] = top1(logits["float"], logits[k])
        ops = op_counts(p, tmp)
        out["ops"][k] = {op: n for op, n in ops.items() if op.startswith(("QLinear", "QGemm", "ConvInteger", "MatMulInteger"))}
    sessions = {k: session(p, threads=THREADS) for k, p in paths.items()}
    by_batch = {b: median_ms(sessions, held[:b].numpy(), rounds=10 if b == 1 else 4) for b in (1, 16)}
    out["ms"] = {k: {b: by_batch[b][k] for b in by_batch} for k in paths}
    return out


def agreement_rows(model: torch.nn.Module, calib: torch.Tensor, held: torch.Tensor, tmp: Path) -> list[tuple]:
    rows = []
    for target in qcompiler.list_targets():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = qcompiler.qcompile(model, calib[:1], target=target,
                                          calib_data=[calib[i:i + 8] for i in range(0, len(calib), 8)], progress=False)
        path = str(tmp / f"agree_{target}.onnx")
        result = compiled.export_onnx(path)
        got = run(session(path), held)
        with torch.no_grad():
            sim = torch.cat([compiled(held[i:i + 16]) for i in range(0, len(held), 16)]).numpy()
        out_node = [n for n in compiled.simulated.graph.nodes if n.op == "output"][0].args[0]
        fq = compiled.simulated.get_submodule(out_node.target) if out_node.op == "call_module" else None
        params = getattr(fq, "params", None)
        err = np.abs(got - sim)
        integer = params is not None and isinstance(fq.fmt, qcompiler.formats.IntFormat)
        within = f"{(err <= params.scale.item() * 1.001).mean() * 100:.2f} %" if integer else "-"
        row = [target, top1(sim, got), float(err.max()), float(np.abs(sim).max()), within]
        if integer:
            # The same comparison once the simulation's biases sit on the int32 accumulator grid.
            biases_on_accumulator_grid(compiled)
            compiled.export_onnx(path)
            got = run(session(path), held)
            with torch.no_grad():
                sim = torch.cat([compiled(held[i:i + 16]) for i in range(0, len(held), 16)]).numpy()
            err = np.abs(got - sim)
            row += [top1(sim, got), float(err.max()), f"{(err <= params.scale.item() * 1.001).mean() * 100:.2f} %"]
        else:
            row += [None, None, "-"]
        rows.append((*row, os.path.getsize(path), len(result.notes)))
    return rows


def biases_on_accumulator_grid(compiled) -> None:
    """Round the simulation's biases to int32 steps of input scale x weight scale, in place."""
    from qcompiler.quantizers import FakeQuantize

    gm = compiled.simulated
    for node in gm.graph.nodes:
        gid = node.meta.get("weight_group")
        if gid is None or node.op != "call_module" or getattr(gm.get_submodule(node.target), "bias", None) is None:
            continue
        src = node.args[0]
        while src.op == "call_module" and not isinstance(gm.get_submodule(src.target), FakeQuantize):
            src = src.args[0]
        fq = gm.get_submodule(src.target) if src.op == "call_module" else None
        wp = compiled.plan.group(gid).params
        if fq is None or fq.params is None or wp is None or not isinstance(fq.fmt, qcompiler.formats.IntFormat):
            continue
        step = (fq.params.scale.float() * wp.scale.float()).float()
        module = gm.get_submodule(node.target)
        with torch.no_grad():
            module.bias.copy_(torch.round(module.bias.double() / step.double()).float() * step)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the Markdown tables here")
    parser.add_argument("--models", default="efficientnet_lite0,resnet18,mobilenet_v2")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: speed, agreement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    calib = sample_crops(N_CALIB, seed=0, split="calib", size=SIZE)
    held = sample_crops(N_HELDOUT, seed=0, split="heldout", size=SIZE)
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
             f"onnxruntime {ort.__version__}, torch {torch.__version__}; {SIZE}x{SIZE} inputs, "
             f"{N_CALIB} calibration crops, {N_HELDOUT} held-out crops, {THREADS} intra-op threads for timings.", ""]
    lines += ["## cpu-x86-int8: speed and fidelity", "",
              "| model | runtime | integer kernels | size MiB | batch 1 ms | batch 16 ms | speed-up vs float b1 / b16 | top-1 vs float |",
              "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        effnet = efficientnet_lite0()
        for name in ([] if "speed" in args.skip else args.models.split(",")):
            model = effnet if name == "efficientnet_lite0" else random_model(name)
            r = speed_rows(name, model, calib, held, tmp)
            print(name, r, file=sys.stderr)
            f1, f16 = r["ms"]["float"][1], r["ms"]["float"][16]
            for k in ("float", "qcompiler", "quantize_static"):
                ops = ", ".join(f"{op} {n}" for op, n in sorted(r["ops"][k].items())) or "-"
                ms = r["ms"][k]
                lines.append(f"| {name} | {k} | {ops} | {r['size'][k] / 2**20:.1f} | {ms[1]:.2f} | {ms[16]:.1f} | "
                             f"{f1 / ms[1]:.2f}x / {f16 / ms[16]:.2f}x | {r['top1'][k] * 100:.1f} % |")
            lines.append(f"| {name} | (compile {r['compile_s']:.1f} s, export {r['export_s']:.1f} s; "
                         f"export vs simulation top-1 {r['sim_vs_export_top1'] * 100:.1f} %) | | | | | | |")
        lines += ["", "## EfficientNet-Lite0: ONNX Runtime vs our simulation, every built-in target", "",
                  "Right-hand columns: the same after rounding the simulation's float biases to the int32 "
                  "accumulator grid the export uses.", "",
                  "| target | top-1 agreement | max abs logit error | max abs logit | logits within 1 output code "
                  "| top-1, biases on grid | max error, biases on grid | within 1 code, biases on grid | file MiB | notes |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        if "agreement" not in args.skip:
            for target, agree, err, mx, within, agree2, err2, within2, size, notes in agreement_rows(effnet, calib, held, tmp):
                more = (f"{agree2 * 100:.1f} % | {err2:.3f} | {within2}" if agree2 is not None else "- | - | -")
                lines.append(f"| {target} | {agree * 100:.1f} % | {err:.3f} | {mx:.1f} | {within} | {more} | "
                             f"{size / 2**20:.1f} | {notes} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
