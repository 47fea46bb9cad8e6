"""Float baseline of EfficientNet-Lite0 on the held-out sample crops.

What later quantized models are compared against (top-1 agreement with these float
predictions): the spread of predicted classes, the confidence per photo, and CPU time per image
(median and spread of rounds). Also re-measures the preprocessing facts ``qcompiler.zoo`` relies
on (input scaling, TF SAME padding) and what the model sees in each whole photo.

    python benchmarks/float_baseline.py [--n 500] [--seed 0] [--threads 2] [--rounds 5] [--quick] [--out FILE]
"""
from __future__ import annotations

import collections
import sys
import time

import torch
from torch import nn

from qcompiler import zoo
from qcompiler.sample_data import PHOTOS, crop_boxes, photo_crop, sample_crops

from common import SPLIT_NOTE, emit, header, out_path, parser, spread


def predict(model: nn.Module, crops: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b).softmax(-1) for b in crops.split(batch_size)])


def ms_per_image(model: nn.Module, batch: torch.Tensor, rounds: int) -> list[float]:
    """Milliseconds per image of each round (one forward of `batch` per round, after a warm-up)."""
    with torch.no_grad():
        model(batch)                                   # warm-up: allocator, oneDNN kernels
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            model(batch)
            times.append((time.perf_counter() - start) * 1000 / len(batch))
    return times


def symmetric_padding_copy() -> nn.Module:
    """The same weights with PyTorch-style symmetric padding instead of TF SAME."""
    model = zoo.efficientnet_lite0()
    for module in model.modules():
        if isinstance(module, nn.Sequential) and "pad" in module._modules:
            k = module.conv.kernel_size[0]
            del module._modules["pad"]
            module.conv.padding = (k // 2, k // 2)
    return model


def speed_lines(model: nn.Module, batch: torch.Tensor, threads: int, rounds: int) -> list[str]:
    traced = torch.fx.symbolic_trace(model)
    lines = [f"## Speed, batch {len(batch)}, {rounds} rounds", "",
             "| threads | eager ms/image: median (min-max) | torch.fx traced ms/image |", "|---|---:|---:|"]
    for n_threads in sorted({1, threads}):
        torch.set_num_threads(n_threads)
        eager, fx = ms_per_image(model, batch, rounds), ms_per_image(traced, batch, rounds)
        lines.append(f"| {n_threads} | {spread(eager, digits=1)} | {spread(fx, digits=1)} |")
    torch.set_num_threads(threads)
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="held-out crops")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds")
    ap.add_argument("--speed-batch", type=int, default=32)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.rounds, args.speed_batch = 22, 2, 4
    torch.set_num_threads(args.threads)

    model = zoo.efficientnet_lite0()
    start = time.perf_counter()
    crops = sample_crops(args.n, seed=args.seed, split="heldout")
    crop_seconds = time.perf_counter() - start
    probs = predict(model, crops)
    top1 = probs.argmax(-1)
    confidence = probs.max(-1).values
    counts = collections.Counter(top1.tolist())

    lines = [header("Float baseline: EfficientNet-Lite0 on the held-out sample crops", __file__, argv, passes=None,
                    notes=[f"Model: `qcompiler.zoo.efficientnet_lite0()` "
                           f"({sum(p.numel() for p in model.parameters()):,} parameters). Data: "
                           f"`sample_crops({args.n}, seed={args.seed}, split=\"heldout\")`.", "", SPLIT_NOTE, "",
                           "These crops have no labels: quantized models are measured against the float "
                           "model's own predictions, the top-1 below."]),
             f"## Predictions ({args.n} held-out crops, seed {args.seed})", "",
             f"- crops cut in {crop_seconds:.2f} s",
             f"- distinct top-1 classes: {len(counts)} ({sum(c == 1 for c in counts.values())} predicted exactly once)",
             f"- max-softmax: mean {confidence.mean():.3f}, median {confidence.median():.3f}; share >= 0.5: "
             f"{(confidence >= 0.5).float().mean():.3f}",
             f"- most frequent top-1 (class: count): {counts.most_common(12)}",
             f"- top-1 of the first 20 crops: `{top1[:20].tolist()}`", "",
             "| photo | crops | distinct top-1 | most frequent top-1 (count) | mean max-softmax |",
             "|---|---:|---:|---|---:|"]
    boxes = crop_boxes(args.n, seed=args.seed, split="heldout")
    for name in PHOTOS:
        idx = torch.tensor([i for i, b in enumerate(boxes) if b.photo == name], dtype=torch.long)
        if len(idx) == 0:
            continue
        c = collections.Counter(top1[idx].tolist())
        lines.append(f"| {name} | {len(idx)} | {len(c)} | {c.most_common(3)} | {confidence[idx].mean():.3f} |")

    lines += [""] + speed_lines(model, crops[:args.speed_batch], args.threads, args.rounds)

    lines += ["", "## Preprocessing checks on the same crops", ""]
    unit = crops * 128 / 255 + 127 / 255
    imagenet = (unit - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    bn = model.stem.bn
    live = bn.running_var > 1e-3
    for label, x in (("(pixel - 127) / 128", crops), ("ImageNet mean/std", imagenet)):
        with torch.no_grad():
            y = torch.cat([model.stem.conv(model.stem.pad(b)) for b in x[:128].split(32)])
        ratio = (y.var(dim=(0, 2, 3))[live] / bn.running_var[live]).median()
        p = predict(model, x)
        lines.append(f"- {label}: stem variance / BN running variance (median over channels) {ratio:.2f}; "
                     f"mean max-softmax {p.max(-1).values.mean():.3f}")
    sym = predict(symmetric_padding_copy(), crops)
    lines.append(f"- symmetric instead of TF SAME padding: mean max-softmax {sym.max(-1).values.mean():.3f} "
                 f"(TF SAME {confidence.mean():.3f}); top-1 agreement with TF SAME "
                 f"{(sym.argmax(-1) == top1).float().mean():.3f}")

    lines += ["", "## Whole photos (largest centred square, `photo_crop`): top-3 classes", "",
              "| photo | top-3 (class: probability) |", "|---|---|"]
    for name in PHOTOS:
        p = predict(model, photo_crop(name)[None])[0]
        best = p.topk(3)
        lines.append(f"| {name} | " + ", ".join(f"{i}: {v:.2f}" for v, i in zip(best.values.tolist(),
                                                                              best.indices.tolist())) + " |")
    emit("\n".join(lines) + "\n", out_path(__file__, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
