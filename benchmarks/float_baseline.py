"""Float baseline of EfficientNet-Lite0 on the held-out sample crops.

What later quantized models are compared against (top-1 agreement with these float
predictions): the spread of predicted classes, the confidence, and CPU time per image. Also
re-measures the two preprocessing facts ``qcompiler.zoo`` relies on (input scaling and TF SAME
padding). Results are written up in ``benchmarks/float_baseline.md``.

    python benchmarks/float_baseline.py [--n 500] [--seed 0] [--threads 2] [--speed-only]
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import time

import torch
from torch import nn

from qcompiler import zoo
from qcompiler.sample_data import PHOTOS, crop_boxes, sample_crops


def predict(model: nn.Module, crops: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b).softmax(-1) for b in crops.split(batch_size)])


def seconds_per_image(model: nn.Module, batch: torch.Tensor, repeats: int = 5) -> float:
    with torch.no_grad():
        model(batch)                                   # warm-up: allocator, oneDNN kernels
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times) / len(batch)


def symmetric_padding_copy() -> nn.Module:
    """The same weights with PyTorch-style symmetric padding instead of TF SAME."""
    model = zoo.efficientnet_lite0()
    for module in model.modules():
        if isinstance(module, nn.Sequential) and "pad" in module._modules:
            k = module.conv.kernel_size[0]
            del module._modules["pad"]
            module.conv.padding = (k // 2, k // 2)
    return model


def report_speed(model: nn.Module, batch: torch.Tensor, threads: int) -> None:
    traced = torch.fx.symbolic_trace(model)
    # Other jobs on the machine inflate these numbers; the load average says how much.
    print(f"\n## Speed, batch {len(batch)}, load average {os.getloadavg()[0]:.1f} at start")
    for n_threads in sorted({1, threads}):
        torch.set_num_threads(n_threads)
        eager, fx = seconds_per_image(model, batch), seconds_per_image(traced, batch)
        print(f"- {n_threads} thread(s): eager {eager * 1e3:.2f} ms/image, "
              f"torch.fx traced {fx * 1e3:.2f} ms/image")
    torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speed-only", action="store_true", help="skip the accuracy part")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = zoo.efficientnet_lite0()
    if args.speed_only:
        report_speed(model, sample_crops(32, seed=args.seed, split="heldout"), args.threads)
        return
    start = time.perf_counter()
    crops = sample_crops(args.n, seed=args.seed, split="heldout")
    crop_seconds = time.perf_counter() - start
    probs = predict(model, crops)
    top1 = probs.argmax(-1)
    confidence = probs.max(-1).values
    counts = collections.Counter(top1.tolist())

    print(f"## {args.n} held-out crops, seed {args.seed}")
    print(f"- crops cut in {crop_seconds:.2f} s")
    print(f"- distinct top-1 classes: {len(counts)}")
    print(f"- most frequent top-1 classes (class: count): {counts.most_common(12)}")
    print(f"- classes predicted exactly once: {sum(c == 1 for c in counts.values())}")
    print(f"- max-softmax: mean {confidence.mean():.3f}, median {confidence.median():.3f}, "
          f"share >= 0.5: {(confidence >= 0.5).float().mean():.3f}")
    print(f"- top-1 fingerprint (first 20 crops): {top1[:20].tolist()}")

    print("\n| photo | crops | distinct top-1 | most frequent top-1 (count) | mean max-softmax |")
    print("|---|---|---|---|---|")
    boxes = crop_boxes(args.n, seed=args.seed, split="heldout")
    for name in PHOTOS:
        idx = torch.tensor([i for i, b in enumerate(boxes) if b.photo == name])
        c = collections.Counter(top1[idx].tolist())
        print(f"| {name} | {len(idx)} | {len(c)} | {c.most_common(3)} "
              f"| {confidence[idx].mean():.3f} |")

    report_speed(model, crops[:32], args.threads)

    print("\n## Preprocessing checks on the same crops")
    unit = crops * 0.5 + 0.5
    imagenet = (unit - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    bn = model.stem.bn
    live = bn.running_var > 1e-3
    for label, x in (("(x-0.5)/0.5", crops), ("ImageNet mean/std", imagenet)):
        with torch.no_grad():
            y = torch.cat([model.stem.conv(model.stem.pad(b)) for b in x[:128].split(32)])
        ratio = (y.var(dim=(0, 2, 3))[live] / bn.running_var[live]).median()
        p = predict(model, x)
        print(f"- {label}: stem variance / BN running variance (median over channels) "
              f"{ratio:.2f}; mean max-softmax {p.max(-1).values.mean():.3f}")
    sym = predict(symmetric_padding_copy(), crops)
    print(f"- symmetric instead of TF SAME padding: mean max-softmax "
          f"{sym.max(-1).values.mean():.3f} (TF SAME {confidence.mean():.3f}); top-1 agreement "
          f"with TF SAME {(sym.argmax(-1) == top1).float().mean():.3f}; TF SAME more confident "
          f"on {(confidence > sym.max(-1).values).float().mean():.3f} of crops")


if __name__ == "__main__":
    main()
