"""ONNX export benchmark: speed and agreement of `compiled.export_onnx` in ONNX Runtime.

Measured in one run (python benchmarks/onnx_export.py [--quick] [--out FILE]):

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

import collections
import os
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

import qcompiler
from qcompiler.zoo import efficientnet_lite0

from common import SPLIT_NOTE, Agreement, agreement, emit, header, load_split, out_path, parser, pipeline, spread

PASSES: list = pipeline(quick=False)   # main() sets the --quick pipeline

SIZE = 224
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
    # Without it ONNX Runtime's u8s8 integer kernels saturate on x86 CPUs without VNNI (AVX2).
    so.add_session_config_entry("session.x64quantprecision", "1")
    if optimized:
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, x: torch.Tensor, chunk: int = 16) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + chunk].numpy()})[0] for i in range(0, len(x), chunk)])


def round_ms(sessions: dict[str, ort.InferenceSession], x: np.ndarray, rounds: int,
             per_round: int = 3) -> dict[str, list[float]]:
    """Each session's latency in every round (median of `per_round` runs), the sessions
    interleaved within a round so that load drift on a shared machine hits every runtime alike."""
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        s.run(None, feeds[k])
    out: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            times = []
            for _ in range(per_round):
                t = time.perf_counter()
                s.run(None, feeds[k])
                times.append(time.perf_counter() - t)
            out[k].append(statistics.median(times) * 1000)
    return out


def op_counts(path: str, tmp: Path) -> collections.Counter:
    opt = str(tmp / "optimized.onnx")
    session(path, optimized=opt)
    return collections.Counter(n.op_type for n in onnx.load(opt).graph.node)


class Crops:
    """Calibration batches in the form of onnxruntime's CalibrationDataReader (duck-typed, so that
    the slow onnxruntime.quantization import happens only when quantize_static runs)."""

    def __init__(self, crops: torch.Tensor, name: str):
        self.batches = iter([{name: crops[i:i + 8].numpy()} for i in range(0, len(crops), 8)])

    def get_next(self):
        return next(self.batches, None)


def top1(a: np.ndarray, b: np.ndarray, photos) -> Agreement:
    """Top-1 agreement of logits `b` with reference `a`, with its photo-clustered interval."""
    return agreement(torch.from_numpy(a).float(), torch.from_numpy(b).float(), photos)


def speed_rows(name: str, model: torch.nn.Module, calib: torch.Tensor, held: torch.Tensor, photos, tmp: Path,
               rounds: tuple[int, int]) -> dict:
    float_path = str(tmp / f"{name}_float.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (calib[:1],), float_path, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
        t = time.perf_counter()
        compiled = qcompiler.qcompile(model, calib[:1], target="cpu-x86-int8",
                                      calib_data=[calib[i:i + 8] for i in range(0, len(calib), 8)],
                                      passes=PASSES, progress=False)
        compile_s = time.perf_counter() - t
    ours_path = str(tmp / f"{name}_qcompiler.onnx")
    t = time.perf_counter()
    compiled.export_onnx(ours_path)
    export_s = time.perf_counter() - t
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    ort_path = str(tmp / f"{name}_quantize_static.onnx")
    quantize_static(float_path, ort_path, Crops(calib, "x"), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    paths = {"float": float_path, "qcompiler": ours_path, "quantize_static": ort_path}
    out: dict = {"compile_s": compile_s, "export_s": export_s, "ms": {}, "ops": {}, "top1": {}, "size": {}}
    logits = {k: run(session(p), held) for k, p in paths.items()}
    with torch.no_grad():
        sim = torch.cat([compiled(held[i:i + 16]) for i in range(0, len(held), 16)]).numpy()
    out["sim_vs_export_top1"] = top1(sim, logits["qcompiler"], photos)
    for k, p in paths.items():
        out["size"][k] = os.path.getsize(p)
        out["top1"][k] = top1(logits["float"], logits[k], photos)
        ops = op_counts(p, tmp)
        out["ops"][k] = {op: n for op, n in ops.items() if op.startswith(("QLinear", "QGemm", "ConvInteger", "MatMulInteger"))}
    sessions = {k: session(p, threads=THREADS) for k, p in paths.items()}
    by_batch = {b: round_ms(sessions, held[:b].numpy(), rounds=n) for b, n in zip((1, 16), rounds)}
    out["ms"] = {k: {b: by_batch[b][k] for b in by_batch} for k in paths}
    return out


def agreement_rows(model: torch.nn.Module, calib: torch.Tensor, held: torch.Tensor, photos, tmp: Path,
                   targets: list[str]) -> list[tuple]:
    rows = []
    for target in targets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = qcompiler.qcompile(model, calib[:1], target=target,
                                          calib_data=[calib[i:i + 8] for i in range(0, len(calib), 8)],
                                          passes=PASSES, progress=False)
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
        row = [target, top1(sim, got, photos), float(err.max()), float(np.abs(sim).max()), within]
        if integer:
            # The same comparison once the simulation's biases sit on the int32 accumulator grid.
            biases_on_accumulator_grid(compiled)
            compiled.export_onnx(path)
            got = run(session(path), held)
            with torch.no_grad():
                sim = torch.cat([compiled(held[i:i + 16]) for i in range(0, len(held), 16)]).numpy()
            err = np.abs(got - sim)
            row += [top1(sim, got, photos), float(err.max()), f"{(err <= params.scale.item() * 1.001).mean() * 100:.2f} %"]
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet_lite0,resnet18,mobilenet_v2")
    ap.add_argument("--targets", default=",".join(qcompiler.list_targets()),
                    help="targets of the ONNX-vs-simulation part")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: speed, agreement")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--heldout", type=int, default=99)
    ap.add_argument("--rounds", default="10,4", help="timing rounds at batch 1 and batch 16")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.targets, args.calib, args.heldout, args.rounds = \
            "efficientnet_lite0", "cpu-x86-int8", 4, 16, "2,1"
    rounds = tuple(int(r) for r in args.rounds.split(","))
    global PASSES
    PASSES = pipeline(args.quick)
    torch.set_num_threads(1)
    calib = load_split("calib", args.calib)
    held = load_split("heldout", args.heldout)
    lines = [header("ONNX export: speed in ONNX Runtime and agreement with the simulation", __file__, argv, notes=[
        f"onnxruntime {ort.__version__}; {SIZE}x{SIZE} inputs; calibration: {calib.describe} (also fed to "
        f"`quantize_static`); measured on {held.describe}; {THREADS} intra-op threads for timings. Every session sets "
        "`session.x64quantprecision` (without it the u8s8 kernels saturate on x86 CPUs without VNNI).", "",
        SPLIT_NOTE, "",
        "Float: `torch.onnx.export` of the float model. qcompiler: `compiled.export_onnx` after "
        "`qcompile(..., target=\"cpu-x86-int8\")`. quantize_static: ONNX Runtime's own post-training "
        "quantizer (QDQ, per-channel int8 weights, uint8 activations, min-max calibration). resnet18 and "
        "mobilenet_v2 have random weights (BatchNorm statistics from random inputs), so their top-1 says "
        "little; EfficientNet-Lite0 has its ImageNet weights.", "",
        f"Timing: {rounds[0]} rounds at batch 1 and {rounds[1]} at batch 16; in every round the three "
        "runtimes run in turn (3 runs each, their median is the round's latency), and the speed-up over "
        "float is computed per round. Cells give the median over rounds (min-max)."])]
    lines += ["## cpu-x86-int8: speed and fidelity", "",
              "| model | runtime | integer kernels | size MiB | batch 1 ms | batch 16 ms | speed-up vs float, batch 1 "
              "| speed-up vs float, batch 16 | top-1 vs float [95 % CI] |",
              "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        effnet = efficientnet_lite0()
        for name in ([] if "speed" in args.skip else args.models.split(",")):
            model = effnet if name == "efficientnet_lite0" else random_model(name)
            r = speed_rows(name, model, calib.crops, held.crops, held.photos, tmp, rounds)
            print(name, {k: v for k, v in r.items() if k != "top1"}, file=sys.stderr)
            for k in ("float", "qcompiler", "quantize_static"):
                ops = ", ".join(f"{op} {n}" for op, n in sorted(r["ops"][k].items())) or "-"
                ms = r["ms"][k]
                ups = [spread([f / m for f, m in zip(r["ms"]["float"][b], ms[b])], "x") for b in (1, 16)]
                lines.append(f"| {name} | {k} | {ops} | {r['size'][k] / 2**20:.1f} | {spread(ms[1])} | "
                             f"{spread(ms[16], digits=1)} | {ups[0]} | {ups[1]} | {r['top1'][k].cell()} |")
            lines.append(f"| {name} | (compile {r['compile_s']:.1f} s, export {r['export_s']:.1f} s; "
                         f"export vs simulation top-1 {r['sim_vs_export_top1'].cell()}) | | | | | | | |")
        lines += ["", "## EfficientNet-Lite0: ONNX Runtime vs our simulation, per target", "",
                  "Right-hand columns: the same after rounding the simulation's float biases to the int32 "
                  "accumulator grid the export uses.", "",
                  "| target | top-1 agreement | max abs logit error | max abs logit | logits within 1 output code "
                  "| top-1, biases on grid | max error, biases on grid | within 1 code, biases on grid | file MiB | notes |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        if "agreement" not in args.skip:
            for target, agree, err, mx, within, agree2, err2, within2, size, notes in agreement_rows(
                    effnet, calib.crops, held.crops, held.photos, tmp, args.targets.split(",")):
                more = (f"{agree2.cell()} | {err2:.3f} | {within2}" if agree2 is not None else "- | - | -")
                lines.append(f"| {target} | {agree.cell()} | {err:.3f} | {mx:.1f} | {within} | {more} | "
                             f"{size / 2**20:.1f} | {notes} |")
    emit("\n".join(lines) + "\n", out_path(__file__, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
