"""A small CNN trained on scikit-learn's handwritten digits, for tests that need real trained weights.

Random weights say little about accuracy: their logits have near-zero margins and their
BatchNorm statistics are whatever initialisation left. This network trains in about five seconds
of CPU time (285 Adam steps), deterministically (fixed seed, one thread, deterministic
algorithms), so a test can measure how well a compiled model agrees with float, and labelled
accuracy, on digits it never saw.

The architecture covers what the compiler must get right on real networks: conv + BatchNorm +
ReLU6 (fold_bn, clamp fusion), a depthwise conv, a residual add followed by ReLU, a strided conv,
a global average pool and a linear classifier.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# 1797 digits: 1197 to train on (the calibration samples are drawn from these), 600 held out.
HELDOUT = 600
CALIB = 256
SEED = 0
EPOCHS = 15
BATCH = 64
LR = 1e-2


class DigitsNet(nn.Module):
    """stem conv-BN-ReLU6, a depthwise-separable residual block, a strided conv, pool, linear."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU6())
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.dw_bn = nn.BatchNorm2d(width)
        self.pw = nn.Conv2d(width, width, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = F.relu6(self.dw_bn(self.dw(x)))
        x = torch.relu(self.pw_bn(self.pw(y)) + x)
        x = self.down(x)
        return self.fc(torch.flatten(self.pool(x), 1))


@dataclass(frozen=True)
class TrainedDigits:
    """The trained float model and its data: train (calibration is a subset), held-out, labels."""

    model: DigitsNet
    calib: torch.Tensor         # [CALIB, 1, 8, 8], drawn from the training images
    heldout: torch.Tensor       # [HELDOUT, 1, 8, 8], never trained or calibrated on
    heldout_labels: torch.Tensor
    float_accuracy: float       # labelled accuracy of the float model on the held-out digits


@contextlib.contextmanager
def deterministic_torch(threads: int = 1) -> Iterator[None]:
    """Deterministic algorithms on `threads` intra-op threads; the previous settings come back."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits as [N, 1, 8, 8] float32 in [-1, 1] (pixels 0..16) and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1) / 8.0 - 1.0
    return images, torch.from_numpy(digits.target.astype(np.int64))


def train_digits(seed: int = SEED, epochs: int = EPOCHS) -> TrainedDigits:
    """Train DigitsNet with Adam; the same seed gives bit-identical weights."""
    images, labels = digits_tensors()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    heldout_idx, train_idx = order[:HELDOUT], order[HELDOUT:]
    x_train, y_train = images[train_idx], labels[train_idx]
    gen = torch.Generator().manual_seed(seed + 1)
    with deterministic_torch(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsNet()
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x_train), generator=gen)
            for i in range(0, len(perm), BATCH):
                idx = perm[i:i + BATCH]
                # A pixel shift of up to one position: more robust features, a margin to spare.
                dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
                xb = torch.roll(x_train[idx], shifts=(dy, dx), dims=(2, 3))
                loss = F.cross_entropy(model(xb), y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            float_accuracy = (model(images[heldout_idx]).argmax(1) == labels[heldout_idx]).float().mean().item()
    calib = x_train[torch.randperm(len(x_train), generator=gen)[:CALIB]]
    return TrainedDigits(model, calib, images[heldout_idx], labels[heldout_idx], float_accuracy)


@dataclass(frozen=True)
class Agreement:
    """How a compiled model's outputs compare with the float model's on the same held-out inputs."""

    top1_agreement: float       # fraction of inputs whose top-1 class equals float's
    sqnr_db: float              # 10 log10(sum f^2 / sum (q - f)^2) over all logits
    accuracy: float | None      # labelled accuracy, where labels exist


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `approx` against `reference`, in dB, in float64."""
    ref, err = reference.double(), (approx.double() - reference.double())
    return float(10 * torch.log10(ref.pow(2).sum() / err.pow(2).sum()))


def agreement(float_out: torch.Tensor, quant_out: torch.Tensor, labels: torch.Tensor | None = None) -> Agreement:
    top1 = float((quant_out.argmax(1) == float_out.argmax(1)).double().mean())
    acc = None if labels is None else float((quant_out.argmax(1) == labels).double().mean())
    return Agreement(top1, sqnr_db(float_out, quant_out), acc)


def output_quantizer(compiled) -> nn.Module:
    """The quantizer of the compiled model's output (the last node before the graph's output)."""
    out = next(n for n in compiled.simulated.graph.nodes if n.op == "output").args[0]
    return compiled.simulated.get_submodule(out.target)


def calib_offset_codes(trained: TrainedDigits, compiled) -> float:
    """The largest systematic error of one logit on the calibration samples bias correction fits
    (AdaRound's first `max_samples`): max over classes of |mean over samples of (q - f)|, in steps
    of the output quantizer (its scale)."""
    from qcompiler.adaround import AdaRoundConfig

    x = trained.calib[:AdaRoundConfig().max_samples]
    diff = run(compiled, x).double() - run(trained.model, x).double()
    scale = float(output_quantizer(compiled).params.scale.reshape(-1)[0])
    return float(diff.mean(0).abs().max()) / scale


def compile_digits(trained: TrainedDigits, target: str, seed: int = 0):
    """qcompile the trained model for `target`, calibrated on its calibration digits, on one thread."""
    import qcompiler

    with deterministic_torch():
        return qcompiler.qcompile(trained.model, trained.calib[:1], target=target,
                                  calib_data=list(trained.calib.split(64)), progress=False, seed=seed)


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output on `x`, without gradients, on one thread as the figures were measured."""
    with torch.no_grad(), deterministic_torch():
        return model(x)


def _main() -> None:
    """Print the figures the accuracy-guard thresholds are set from, for the training seeds given."""
    import argparse
    import time

    import qcompiler
    from qcompiler.formats import IntFormat

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", nargs="+", default=qcompiler.list_targets())
    args = parser.parse_args()
    print("| seed | target | float acc % | top-1 agree % | acc % | SQNR dB | calib offset (codes) | compile s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for seed in args.seeds:
        start = time.perf_counter()
        trained = train_digits(seed)
        print(f"| {seed} | (float, trained in {time.perf_counter() - start:.1f} s) | "
              f"{100 * trained.float_accuracy:.2f} | | | | | |", flush=True)
        ref = run(trained.model, trained.heldout)
        for target in args.targets:
            start = time.perf_counter()
            compiled = compile_digits(trained, target)
            seconds = time.perf_counter() - start
            out = run(compiled, trained.heldout)
            a = agreement(ref, out, trained.heldout_labels)
            # In output codes: meaningful only where the output is an integer format with one step.
            integer_out = isinstance(output_quantizer(compiled).fmt, IntFormat)
            offset = f"{calib_offset_codes(trained, compiled):.3f}" if integer_out else "-"
            print(f"| {seed} | {target} | {100 * trained.float_accuracy:.2f} | {100 * a.top1_agreement:.2f} | "
                  f"{100 * a.accuracy:.2f} | {a.sqnr_db:.2f} | {offset} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    _main()
