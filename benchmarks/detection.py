"""torchvision detectors compiled whole: the network quantized, pre- and post-processing in float
on the host (python benchmarks/detection.py [--quick] [--out FILE]).

Each detector (random weights; BatchNorm statistics set from random images) goes through one
`qcompile(detector, ...)` call. Its root cannot be traced (image resizing, anchors, box
decoding, NMS), so qcompile splits it into its largest traceable parts (`qcompiler.partition`),
compiles each as its own graph and runs the detector's own forward around them. Measured
against the float detector on the same held-out images:

- head SQNR: the raw outputs of the detection head (class logits, box regression; for Faster
  R-CNN the region-proposal head), captured by hooks in both models, in dB;
- matched boxes: the share of the float detector's boxes that the compiled one also returns
  (same label, IoU >= 0.5), and the mean absolute score difference of the matched pairs.

A tensor one part hands to another is quantized once (`PartitionedModel.boundary_table()`,
listed under each partition); `--budget weight_memory=0.6` compiles with one budget over all
parts (a fraction of the weight memory with every group at the target's default format).

Random weights give near-uniform scores, so every detector is run with its score threshold at
0 and at most 100 detections per image: the comparison covers its top boxes instead of an
empty set. Detections of random weights are arbitrary; the figures say whether the compiled
detector computes what the float one does.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

import torch
import torchvision
from torch import nn
from torchvision.models import detection as D

import qcompiler
from qcompiler.calibration import tensors_of
from qcompiler.mixed_precision import output_sqnr_db

from common import emit, header, out_path, parser, pipeline

# name -> (constructor at an input size, module whose raw outputs are compared)
DETECTORS: dict[str, tuple[Callable[[int], nn.Module], str]] = {
    "retinanet_resnet50_fpn": (lambda s: D.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=s, max_size=s, score_thresh=0.0, detections_per_img=100), "head"),
    "ssdlite320_mobilenet_v3_large": (lambda s: D.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, score_thresh=0.0, detections_per_img=100), "head"),
    "ssd300_vgg16": (lambda s: D.ssd300_vgg16(
        weights=None, weights_backbone=None, score_thresh=0.0, detections_per_img=100), "head"),
    "fcos_resnet50_fpn": (lambda s: D.fcos_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=s, max_size=s, score_thresh=0.0, detections_per_img=100), "head"),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (lambda s: D.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.0, box_detections_per_img=100), "rpn.head"),
}


def detector(name: str, size: int) -> nn.Module:
    """A detector with random weights and BatchNorm statistics of random images."""
    torch.manual_seed(0)
    model = DETECTORS[name][0](size).eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = None
        m.reset_running_stats()
        m.train()                      # batch statistics in an otherwise eval-mode forward
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(2):
            model([torch.rand(3, size, size, generator=g) for _ in range(2)])
    return model.eval()


def images(n_batches: int, per_batch: int, size: int, seed: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.rand(3, size, size, generator=g) for _ in range(per_batch)] for _ in range(n_batches)]


def run_with_head(model: nn.Module, path: str, batches: list) -> tuple[list, torch.Tensor]:
    """The detections on every batch and the head's raw outputs, flattened into one vector."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(path).register_forward_hook(
        lambda m, a, out: seen.extend(t.detach().flatten().double() for t in tensors_of(out)))
    try:
        with torch.no_grad():
            detections = [d for batch in batches for d in model(batch)]
    finally:
        handle.remove()
    return detections, torch.cat(seen)


def match_boxes(ref: list[dict], out: list[dict], iou: float = 0.5) -> tuple[float, float]:
    """(share of float boxes the compiled detector also finds, mean |score difference| of pairs).
    A pair: the same label and IoU >= `iou`, each compiled box used once, float boxes by score."""
    found, total, diffs = 0, 0, []
    for r, o in zip(ref, out):
        total += len(r["boxes"])
        if not len(r["boxes"]) or not len(o["boxes"]):
            continue
        overlap = torchvision.ops.box_iou(r["boxes"], o["boxes"])
        same = r["labels"][:, None] == o["labels"][None, :]
        overlap = torch.where(same, overlap, torch.zeros_like(overlap))
        used = torch.zeros(len(o["boxes"]), dtype=torch.bool)
        for i in torch.argsort(r["scores"], descending=True).tolist():
            row = torch.where(used, torch.full_like(overlap[i], -1.0), overlap[i])
            j = int(row.argmax())
            if row[j] >= iou:
                used[j] = True
                found += 1
                diffs.append(float((r["scores"][i] - o["scores"][j]).abs()))
    return found / max(1, total), (sum(diffs) / len(diffs) if diffs else float("nan"))


def measure(name: str, size: int, calib: list, held: list, target: str, passes: list,
            budget: dict[str, float] | None = None) -> dict[str, Any]:
    model = detector(name, size)
    path = DETECTORS[name][1]
    start = time.perf_counter()
    compiled = qcompiler.qcompile(model, (calib[0],), target=target, calib_data=calib, passes=passes, budget=budget,
                                  progress=False)
    seconds = time.perf_counter() - start
    ref_dets, ref_head = run_with_head(model, path, held)
    out_dets, out_head = run_with_head(compiled.root, path, held)
    matched, score_diff = match_boxes(ref_dets, out_dets)
    return {"compiled": compiled, "seconds": seconds, "head_sqnr_db": output_sqnr_db(ref_head, out_head),
            "matched": matched, "score_diff": score_diff, "boxes": sum(len(d["boxes"]) for d in ref_dets),
            "parts": len(compiled.parts), "host": len(compiled.partition.host),
            "boundaries": len(compiled.boundaries),
            "one_quantizer": sum("one quantizer" in line for line in compiled.boundary_table().splitlines()),
            "weight_mib": compiled.weight_memory_bytes / 2**20}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="input side for the detectors that resize (default 256)")
    ap.add_argument("--calib", type=int, default=8, help="calibration batches of 2 images")
    ap.add_argument("--heldout", type=int, default=4, help="held-out batches of 2 images")
    ap.add_argument("--models", default=",".join(DETECTORS))
    ap.add_argument("--target", default="npu-int8")
    ap.add_argument("--budget", default=None, help="one budget over all parts, e.g. weight_memory=0.6")
    args = ap.parse_args(argv)
    budget = None
    if args.budget:
        metric, _, value = args.budget.partition("=")
        budget = {metric: float(value)}
    if args.quick:
        args.size, args.calib, args.heldout = 128, 2, 1
    passes = pipeline(args.quick)
    top = header("Detectors compiled whole", __file__, argv, notes=[__doc__.split("\n\n", 1)[1].strip()])
    calib, held = images(args.calib, 2, args.size, 10), images(args.heldout, 2, args.size, 20)
    lines = [top, "", f"Target `{args.target}`; images {args.size}×{args.size} (each detector's transform then "
             f"resizes as it defines); {2 * args.calib} calibration and {2 * args.heldout} held-out random images"
             + (f"; budget {budget} over all parts" if budget else "") + ".", "",
             "| detector | compiled parts | host modules | tensors between parts (one quantizer) | weight MiB | "
             "head SQNR (dB) | float boxes matched | mean score diff | compile (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    partitions = []
    for name in [m for m in args.models.split(",") if m]:
        try:
            r = measure(name, args.size, calib, held, args.target, passes, budget)
        except qcompiler.QCompileError as exc:     # e.g. a budget this detector cannot meet: say so, go on
            lines.append(f"| {name} | {type(exc).__name__}: {str(exc).splitlines()[0][:200]} |" + " |" * 7)
            print(lines[-1], file=sys.stderr, flush=True)
            continue
        lines.append(f"| {name} | {r['parts']} | {r['host']} | {r['boundaries']} ({r['one_quantizer']}) | "
                     f"{r['weight_mib']:.2f} | {r['head_sqnr_db']:.1f} | "
                     f"{100 * r['matched']:.1f} % of {r['boxes']} | {r['score_diff']:.4f} | {r['seconds']:.0f} |")
        partitions += ["", f"### {name}", "", "```", r["compiled"].partition.table(), "",
                       "tensors passed between parts:", r["compiled"].boundary_table(), "```"]
        print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", "## Partitions", "", "What each detector compiled as graphs and what ran on the host, with the "
              "reason (`PartitionedModel.partition.table()`), and the tensors passed between parts "
              "(`boundary_table()`)."] + partitions
    emit("\n".join(lines), out_path(__file__, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
