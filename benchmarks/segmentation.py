"""torchvision's segmentation models under every NPU target: pixel agreement and output SQNR
against float (python benchmarks/segmentation.py [--quick] [--out FILE]).

deeplabv3_mobilenet_v3_large, fcn_resnet50 and lraspp_mobilenet_v3_large with random weights
(no pretrained segmentation weights ship in a package) and BatchNorm statistics set from random
inputs, compiled with the default pipeline on `--calib` noise images and measured on
`--heldout` other ones. With random weights the 21 class scores of a pixel lie close together,
so pixel agreement (same argmax as float) is a harsh measure: it shows whether the compiled
network computes the same function, not how well a trained one would segment.
"""
from __future__ import annotations

import sys
import time

import torch
import torchvision

import qcompiler
from qcompiler.mixed_precision import output_sqnr_db

from common import emit, header, out_path, parser, pipeline
from zoo_sweep import set_batch_norm_statistics

MODELS = {
    "lraspp_mobilenet_v3_large": lambda: torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights_backbone=None),
    "deeplabv3_mobilenet_v3_large": lambda: torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights_backbone=None, aux_loss=False),
    "fcn_resnet50": lambda: torchvision.models.segmentation.fcn_resnet50(weights_backbone=None, aux_loss=False),
}
NPU_TARGETS = ("npu-int8", "npu-int4", "npu-int8-transformer", "npu-int8-balanced")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--calib", type=int, default=32, help="calibration images")
    ap.add_argument("--heldout", type=int, default=16, help="images measured")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--targets", default=",".join(NPU_TARGETS))
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.calib, args.heldout = 64, 4, 2
    passes = pipeline(args.quick)
    top = header("Segmentation under the NPU targets", __file__, argv, notes=[__doc__.split("\n\n", 1)[1].strip()])
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(4, 3, args.size, args.size, generator=g) for _ in range(max(1, args.calib // 4))]
    held = torch.randn(args.heldout, 3, args.size, args.size, generator=g)
    lines = [top, "", f"Input {args.size}×{args.size}; {args.calib} calibration and {args.heldout} held-out noise images.",
             "", "| model | target | pixel agreement | output SQNR (dB) | compile (s) |", "|---|---|---|---|---|"]
    for name in [m for m in args.models.split(",") if m]:
        torch.manual_seed(0)
        model = MODELS[name]().eval()
        set_batch_norm_statistics(model, args.size)
        with torch.no_grad():
            ref = model(held)["out"]
        for target in [t for t in args.targets.split(",") if t]:
            start = time.perf_counter()
            compiled = qcompiler.qcompile(model, calib[0], target=target, calib_data=calib, passes=passes,
                                          progress=False)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                out = compiled(held)["out"]
            agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
            lines.append(f"| {name} | {target} | {100 * agree:.1f} % | {output_sqnr_db(ref.double(), out.double()):.1f} | "
                         f"{seconds:.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    emit("\n".join(lines), out_path(__file__, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
