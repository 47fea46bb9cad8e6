"""torchvision's vit_b_16 (or swin_t) under every built-in target, with attention decomposed and quantized
(python benchmarks/vit.py [--model swin_t] [--quick] [--out FILE]).

Random weights (no pretrained ViT ships in a package) with LayerNorm parameters and the
classifier head randomised (torchvision initialises the head to zero), calibrated on `--calib`
noise images and measured on `--heldout` others: logit SQNR and top-1 agreement against float,
whether the reference backend equals the simulation bit for bit, and for the targets ONNX
Runtime runs as integers, the QDQ ONNX export's SQNR against the simulation and its latency
against the float model exported by torch.onnx, at the example batch of 4 (the export fixes it;
one thread; medians of `--rounds` alternating rounds, with their spread). The compiles skip rounding optimisation (min-max ranges, round-to-nearest
weights: `--passes naive`; AdaRound over vit_b_16's 86 M weights takes minutes per target). With random weights the logits lie close
together, so top-1 agreement is a harsh measure: it shows whether the compiled network
computes the same function, not how well a trained one would classify.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

import qcompiler
from qcompiler.mixed_precision import output_sqnr_db

from common import emit, header, out_path, parser

ONNX_TARGETS = ("cpu-x86-int8", "npu-int8")
NAIVE = ("capture", "canonicalize", "fold_bn", "fuse", "group_quantizers", "insert_observers", "calibrate",
         "convert", "model_requant")
# Targets whose requantization is integer: the reference backend must equal the simulation there.
INTEGER_REQUANT = ("fixed_point", "shift")
SWIN_NOTES = """Random weights (no pretrained Swin ships in a package) with LayerNorm parameters, the relative
position bias tables (std 1 instead of torchvision's 0.02, so that the bias shapes the attention
as a trained one does) and the classifier head randomised; otherwise as for vit_b_16
(benchmarks/vit.md): `--calib` noise images to calibrate, `--heldout` others to measure, naive
compiles, ONNX latency at batch 4 on one thread. Every window attention (12) is decomposed: its
relative position bias and shift mask enter the softmax as one constant additive mask, which the
integer softmax of the fixed-point targets takes as code offsets and Q15 weights; the two
matmuls per block run on integers there too."""


def vit(size: int) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=size).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
        model.heads.head.weight.normal_(0, 0.05)
        model.heads.head.bias.normal_(0, 0.1)
    return model


def swin(size: int) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.swin_t().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            if isinstance(m, torchvision.models.swin_transformer.ShiftedWindowAttention):
                m.relative_position_bias_table.normal_(0, 1.0)
        model.head.weight.normal_(0, 0.05)
        model.head.bias.normal_(0, 0.1)
    return model


# --model -> (builder taking the input size, notes for the Markdown, default output file)
MODELS = {"vit_b_16": (vit, None, "vit.md"), "swin_t": (swin, SWIN_NOTES, "swin.md")}


def _session(path: str, disabled=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, options, disabled_optimizers=disabled)


def _latency(session, x, rounds: int) -> list[float]:
    feed = {session.get_inputs()[0].name: x.numpy()}
    session.run(None, feed)
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        session.run(None, feed)
        out.append(time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_b_16", choices=tuple(MODELS))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--heldout", type=int, default=8, help="a multiple of 4")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--targets", default=",".join(qcompiler.list_targets()))
    ap.add_argument("--passes", default="naive", choices=("naive", "default"))
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.calib, args.heldout, args.rounds = 32, 4, 4, 2
    build, notes, default_out = MODELS[args.model]
    notes = notes or __doc__.split("\n\n", 1)[1].strip()
    model = build(args.size)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, args.size, args.size, generator=g) for _ in range(max(1, args.calib // 4))]
    held = torch.randn(args.heldout, 3, args.size, args.size, generator=g)
    with torch.no_grad():
        ref = model(held)
    top = header(f"{args.model} under every target", __file__, argv, passes=None, notes=[notes])
    lines = [top, "", f"Input {args.size}×{args.size}; {args.calib} calibration and {args.heldout} held-out noise images.",
             "", "| target | logit SQNR (dB) | top-1 agreement | reference bit-exact | ONNX SQNR vs simulation (dB) | "
             "ONNX latency / float ONNX latency, batch 4 | compile (s) |", "|---|---|---|---|---|---|---|"]
    tmp = Path(tempfile.mkdtemp())
    float_onnx = None
    for target in [t for t in args.targets.split(",") if t]:
        start = time.perf_counter()
        compiled = qcompiler.qcompile(model, calib[0], target=target, calib_data=calib, progress=False,
                                      passes=NAIVE if args.passes == "naive" else None)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            out = compiled(held)
            integer = compiled.target.requant.mode in INTEGER_REQUANT
            exact = torch.equal(compiled.lower("reference")(held), out) if integer else None
        row = [target, f"{output_sqnr_db(ref.double(), out.double()):.1f}",
               f"{int((out.argmax(1) == ref.argmax(1)).sum())}/{len(held)}",
               {True: "yes", False: "NO", None: "-"}[exact]]
        if target in ONNX_TARGETS:
            # The export keeps the example inputs' batch (the graph computes shapes from sizes).
            batch = calib[0].shape[0]
            if float_onnx is None:
                float_onnx = str(tmp / "float.onnx")
                torch.onnx.export(model, (calib[0],), float_onnx, dynamo=False, opset_version=21)
            path = compiled.export_onnx(tmp / f"{target}.onnx").path
            # ONNX Runtime 1.32's QDQS8ToU8Transformer breaks on int8 activation x activation MatMuls.
            session = _session(path, ["QDQS8ToU8Transformer"] if target == "npu-int8" else None)
            name = session.get_inputs()[0].name
            got = torch.cat([torch.from_numpy(session.run(None, {name: held[i:i + batch].numpy()})[0])
                             for i in range(0, len(held), batch)])
            fl = _session(float_onnx)
            ratios = []
            for _ in range(args.rounds):
                q_t = statistics.median(_latency(session, calib[0], 3))
                f_t = statistics.median(_latency(fl, calib[0], 3))
                ratios.append(q_t / f_t)
            row += [f"{output_sqnr_db(out.double(), got.double()):.1f}",
                    f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"]
        else:
            row += ["-", "-"]
        row.append(f"{seconds:.0f}")
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    out = out_path(__file__, args)
    if out is not None and not args.out:
        out = out.with_name(default_out)
    emit("\n".join(lines), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
