"""Quantization-aware training against the best post-training result, in the founding document's terms.

    python benchmarks/qat.py                       # every task (benchmarks/qat.md)
    python benchmarks/qat.py --tasks digits        # one task; --out picks the file
    python benchmarks/qat.py --quick               # smoke run, prints only

Tasks (`--tasks`):
- digits: classification with labels. `DigitsNet` (`tests/trained_models.py`: conv-BN-ReLU6,
  a depthwise-separable residual block, a strided conv, pool, linear) trained on scikit-learn's
  digits; QAT on 1024 labelled training digits with cross-entropy, checkpoints chosen on 173
  validation digits, accuracy reported on the 600 held-out digits. Seeds 0-2 (batch order,
  Quant-Noise's masks): median [min, max].
- denoise: a DnCNN-style denoiser (residual output, 7 convs, 24 channels, BatchNorm) trained
  in float on grey 40x40 patches of the sample photos with Gaussian plus Poisson noise at three
  levels; QAT with the clean patch as the label (MSE). Patches come from each photo's third
  that its split owns (`qcompiler.sample_data.region`): train on `calib`, checkpoint on
  `validation`, report PSNR and SSIM (`skimage.metrics`) on `heldout`.
- effnet: EfficientNet-Lite0 with ImageNet weights, label-free: QAT distils the float model's
  logits on `calib` and `validation` crops; agreement with float on `heldout` crops.

Targets: w8a8 is `npu-int8`; w4a4 and w2a2 are `benchmarks/npu-w4a4.toml` and
`benchmarks/npu-w2a2.toml`: 4-bit (2-bit) per-channel weights and asymmetric activations
everywhere except the first and the last layer, which stay at 8 bits.

The best PTQ is the better of per-layer AdaRound (qcompile's default) and block reconstruction
on the validation data. QAT starts from the default compile. Costs: training seconds per epoch
(median over epochs) relative to float training on the same batches, and the memory of the
tensors one training step saves for its backward pass (autograd's saved tensors; weights and
Adam's state come on top and are the same for every method).
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import emit, header, out_path, parser
from qcompiler import qat, qcompile
from qcompiler.sample_data import PHOTOS, load_photos, region

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from trained_models import HELDOUT, deterministic_torch, digits_tensors, train_digits  # noqa: E402

TARGETS = {"w8a8": "npu-int8", "w4a4": str(HERE / "npu-w4a4.toml"), "w2a2": str(HERE / "npu-w2a2.toml")}
METHODS: list[tuple[str, str, float]] = [
    ("QAT (STE)", "ste", 0.5), ("LSQ", "lsq", 0.5), ("LSQ+", "lsq+", 0.5), ("QSin", "qsin", 0.5),
    ("Quant-Noise p=0.5", "quant_noise", 0.5), ("Quant-Noise p=0.125", "quant_noise", 0.125),
]


# -- costs ----------------------------------------------------------------------------------------

def saved_mib(model: nn.Module, batch: tuple, loss_fn: Callable | None) -> float:
    """MiB of the tensors one training step keeps for its backward pass (autograd's saved tensors,
    each storage counted once): the memory training needs beyond the weights and Adam's state.
    A label-free batch (inputs only, `loss_fn` None) is scored against a constant target: the
    distillation's teacher runs without gradients and saves nothing."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch[0])
        loss = loss_fn(out, batch[1]) if loss_fn is not None else F.mse_loss(out, torch.zeros_like(out))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values()) / 2 ** 20


def float_epoch_seconds(model: nn.Module, batches: list, loss_fn: Callable, epochs: int, lr: float) -> tuple[list[float], float]:
    """Seconds per epoch of float training of a copy of `model`, and its saved-tensor MiB per step."""
    import copy

    m = copy.deepcopy(model).train()
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for x, y in batches:
            loss = loss_fn(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return times, saved_mib(m, batches[0], loss_fn)


@dataclass
class Trained:
    result: Any
    log: list
    memory_mib: float
    module: Any = None         # the trained QATModule, at its best checkpoint

    @property
    def epoch_seconds(self) -> float:
        return statistics.median(e.train_seconds for e in self.log[1:])


def run_fit(compiled, batches, validation, *, method: str, p: float, epochs: int, lr: float, seed: int,
            loss_fn=None) -> Trained:
    log: list = []
    module = qat.prepare(compiled, method, p=p, seed=seed)
    result = qat.fit(compiled, batches, epochs=epochs, method=method, p=p, lr=lr, step_lr=1e-3,
                     loss_fn=loss_fn, validation_data=validation, seed=seed, progress=False, log=log, module=module)
    memory = saved_mib(qat.prepare(compiled, method, p=p, seed=seed), batches[0], loss_fn)
    return Trained(result, log, memory, module)


def best_lr(runs: dict[float, Trained]) -> tuple[float, dict[float, float]]:
    """The learning rate whose run reached the lowest validation loss, and every run's best loss."""
    scores = {lr: min(e.validation for e in t.log) for lr, t in runs.items()}
    return min(scores, key=scores.get), scores


def med(values: list[float], fmt: str = "{:.1f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


# -- digits ---------------------------------------------------------------------------------------

def digits_task(quick: bool) -> list[str]:
    trained = train_digits()
    images, labels = digits_tensors()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[HELDOUT:]
    x, y = images[order], labels[order]
    n_train = 256 if quick else 1024
    train = [(x[i:i + 64], y[i:i + 64]) for i in range(0, n_train, 64)]
    val = [(x[1024:], y[1024:])]
    hx, hy = trained.heldout, trained.heldout_labels
    seeds = [0] if quick else [0, 1, 2]
    epochs = 2 if quick else 20

    def accuracy(model) -> float:
        with torch.no_grad():
            return 100 * float((model(hx).argmax(1) == hy).double().mean())

    def val_loss(model) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(val[0][0]), val[0][1]))

    lines = ["## Classification with labels: DigitsNet on scikit-learn's digits", "",
             f"Float: {accuracy(trained.model):.1f} % on the 600 held-out digits. QAT: {epochs} epochs of "
             f"{len(train)} batches of 64 labelled training digits, cross-entropy, Adam, cosine schedule; "
             f"the best epoch on the 173 validation digits (in the converted integer model) is kept. Seeds {seeds}: "
             "median [min, max]. Time per epoch relative to float training on the same batches.", ""]
    float_times, float_mem = float_epoch_seconds(trained.model, train, F.cross_entropy, 3, 1e-3)
    float_epoch = statistics.median(float_times)
    for name in ("w4a4", "w2a2"):
        with deterministic_torch():
            ptq = {kind: qcompile(trained.model, trained.calib[:1], target=TARGETS[name],
                                  calib_data=list(trained.calib.split(64)), progress=False,
                                  reconstruction=kind) for kind in ("layer", "block")}
        best_kind = min(ptq, key=lambda k: val_loss(ptq[k]))
        # The learning rate of the weights, chosen with LSQ at seed 0 on the validation digits.
        lrs = [1e-3] if quick else [1e-4, 1e-3, 3e-3]
        with deterministic_torch():
            lr, scores = best_lr({lr: run_fit(ptq["layer"], train, val, method="lsq", p=0.5, epochs=epochs, lr=lr,
                                              seed=0, loss_fn=F.cross_entropy) for lr in lrs})
        lines += [f"### {name} (`{Path(TARGETS[name]).name}`)", "",
                  f"Learning rate of the weights chosen on validation with LSQ: {lr:g} "
                  f"(validation cross-entropy {', '.join(f'{k:g}: {v:.3f}' for k, v in scores.items())}).", "",
                  "| method | held-out accuracy % | s/epoch (× float) | saved for backward, MiB/step |", "|---|---|---|---|",
                  f"| float | {accuracy(trained.model):.1f} | {float_epoch:.2f} s (1.0×) | {float_mem:.1f} |",
                  f"| best PTQ ({best_kind} reconstruction) | {accuracy(ptq[best_kind]):.1f} | - | - |"]
        for label, method, p in METHODS:
            accs, secs, mems = [], [], []
            for seed in seeds:
                with deterministic_torch():
                    t = run_fit(ptq["layer"], train, val, method=method, p=p, epochs=epochs, lr=lr, seed=seed,
                                loss_fn=F.cross_entropy)
                accs.append(accuracy(t.result))
                secs.append(t.epoch_seconds)
                mems.append(t.memory_mib)
            ratio = statistics.median(secs) / float_epoch
            lines.append(f"| {label} | {med(accs)} | {statistics.median(secs):.2f} s ({ratio:.1f}×) | "
                         f"{statistics.median(mems):.1f} |")
        lines.append("")
    return lines


# -- denoising ------------------------------------------------------------------------------------

NOISE_LEVELS = ((0.02, 400.0), (0.05, 100.0), (0.10, 25.0))   # (Gaussian sigma, Poisson peak)


class DnCNN(nn.Module):
    """conv-ReLU, five conv-BN-ReLU, conv; the output is the input minus the predicted noise."""

    def __init__(self, width: int = 24, depth: int = 7):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        layers.append(nn.Conv2d(width, 1, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x)


def grey_patches(split: str, n: int, size: int, seed: int) -> torch.Tensor:
    """`n` grey patches in [0, 1] from the thirds of the sample photos that `split` owns."""
    photos = load_photos()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        name = PHOTOS[i % len(PHOTOS)]
        r = region(name, split)
        img = photos[name].float() / 255.0
        grey = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])
        top = r.top + int(torch.randint(0, max(1, r.height - size), (1,), generator=gen))
        left = r.left + int(torch.randint(0, max(1, r.width - size), (1,), generator=gen))
        out.append(grey[top:top + size, left:left + size])
    return torch.stack(out)[:, None]


def add_noise(clean: torch.Tensor, levels: list[int], seed: int) -> torch.Tensor:
    """Poisson (photon) noise at the level's peak plus Gaussian noise at its sigma."""
    gen = torch.Generator().manual_seed(seed)
    noisy = torch.empty_like(clean)
    for i, level in enumerate(levels):
        sigma, peak = NOISE_LEVELS[level]
        photons = torch.poisson(clean[i] * peak, generator=gen) / peak
        noisy[i] = photons + sigma * torch.randn(clean[i].shape, generator=gen)
    return noisy


def psnr_ssim(model, noisy: torch.Tensor, clean: torch.Tensor) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    with torch.no_grad():
        out = torch.cat([model(b) for b in noisy.split(32)]).clamp(0, 1)
    p = [peak_signal_noise_ratio(c[0].numpy(), o[0].numpy(), data_range=1.0) for c, o in zip(clean, out)]
    s = [structural_similarity(c[0].numpy(), o[0].numpy(), data_range=1.0) for c, o in zip(clean, out)]
    return float(np.mean(p)), float(np.mean(s))


def denoise_task(quick: bool) -> list[str]:
    n_train, n_val, n_test = (256, 64, 33) if quick else (2048, 256, 198)
    float_epochs = 1 if quick else 16
    # QAT epochs and the candidate learning rates of the weights per target: w8a8 is at float after
    # 4 epochs at 1e-4; w4a4 needs more (chosen on validation: 16 epochs at 1e-3 or 3e-3 gained
    # over 2 dB on 4 epochs at 1e-4).
    settings = {"w8a8": (1, [1e-4]) if quick else (4, [1e-4]), "w4a4": (1, [1e-3]) if quick else (16, [1e-3, 3e-3])}
    clean_train = grey_patches("calib", n_train, 40, seed=0)
    levels = torch.randint(0, len(NOISE_LEVELS), (n_train,), generator=torch.Generator().manual_seed(1)).tolist()
    noisy_train = add_noise(clean_train, levels, seed=2)
    clean_val = grey_patches("validation", n_val, 40, seed=3)
    noisy_val = add_noise(clean_val, [i % 3 for i in range(n_val)], seed=4)
    clean_test = grey_patches("heldout", n_test, 64, seed=5)
    test_levels = [i % 3 for i in range(n_test)]
    noisy_test = add_noise(clean_test, test_levels, seed=6)
    batches = [(noisy_train[i:i + 32], clean_train[i:i + 32]) for i in range(0, n_train, 32)]
    val = [(noisy_val, clean_val)]

    with deterministic_torch(threads=torch.get_num_threads()), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DnCNN()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=float_epochs * len(batches))
        gen = torch.Generator().manual_seed(7)
        model.train()
        for _ in range(float_epochs):
            for i in torch.randperm(len(batches), generator=gen).tolist():
                x, c = batches[i]
                loss = F.mse_loss(model(x), c)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        model.eval()

    def row(label: str, m, extra: str) -> str:
        p, s = psnr_ssim(m, noisy_test, clean_test)
        return f"| {label} | {p:.2f} | {s:.3f} | {extra}"

    noisy_psnr = float(np.mean([10 * math.log10(1.0 / float(F.mse_loss(n.clamp(0, 1), c)))
                                for n, c in zip(noisy_test, clean_test)]))
    float_times, float_mem = float_epoch_seconds(model, batches, F.mse_loss, 2, 1e-4)
    float_epoch = statistics.median(float_times)
    lines = ["## Denoising: a DnCNN-style network on noisy crops of the sample photos", "",
             f"Float training: {float_epochs} epochs of {len(batches)} batches of 32 grey 40x40 patches (`calib` "
             f"thirds), Gaussian plus Poisson noise at (sigma, peak) levels {list(NOISE_LEVELS)}. Test: {n_test} "
             f"64x64 `heldout` patches, levels in turn; the noisy input scores {noisy_psnr:.2f} dB. QAT: "
             f"MSE to the clean patch, Adam (steps 1e-3), cosine schedule, best epoch on {n_val} `validation` "
             f"patches; epochs and the weights' learning rate per target below. One seed.", ""]
    for name in ("w8a8", "w4a4"):
        calib = [noisy_train[i:i + 32] for i in range(0, min(n_train, 256), 32)]
        with deterministic_torch(threads=torch.get_num_threads()):
            ptq = {kind: qcompile(model, noisy_train[:1], target=TARGETS[name], calib_data=calib, progress=False,
                                  reconstruction=kind) for kind in ("layer", "block")}
        with torch.no_grad():
            best_kind = min(ptq, key=lambda k: float(F.mse_loss(ptq[k](noisy_val), clean_val)))
        qat_epochs, lrs = settings[name]
        # The learning rate of the weights, chosen with LSQ at seed 0 on the validation patches.
        with deterministic_torch(threads=torch.get_num_threads()):
            chosen = {lr: run_fit(ptq["layer"], batches, val, method="lsq", p=0.5, epochs=qat_epochs, lr=lr, seed=0,
                                  loss_fn=F.mse_loss) for lr in lrs}
        lr, scores = best_lr(chosen)
        lines += [f"### {name} (`{Path(TARGETS[name]).name}`)", "",
                  f"QAT: {qat_epochs} epochs; learning rate of the weights {lr:g}" +
                  (f", chosen on validation with LSQ (validation MSE {', '.join(f'{k:g}: {v:.5f}' for k, v in scores.items())})."
                   if len(lrs) > 1 else "."), "",
                  "| method | PSNR dB | SSIM | s/epoch (× float) | saved for backward, MiB/step |", "|---|---|---|---|---|",
                  row("float", model, f"{float_epoch:.1f} s (1.0×) | {float_mem:.1f} |"),
                  row(f"best PTQ ({best_kind} reconstruction)", ptq[best_kind], "- | - |")]
        for label, method, p in METHODS:
            if quick and method not in ("lsq", "qsin"):
                continue
            if method == "lsq":
                t = chosen[lr]             # the selection's run at the chosen rate: the same seed and data
            else:
                with deterministic_torch(threads=torch.get_num_threads()):
                    t = run_fit(ptq["layer"], batches, val, method=method, p=p, epochs=qat_epochs, lr=lr, seed=0,
                                loss_fn=F.mse_loss)
            lines.append(row(label, t.result, f"{t.epoch_seconds:.1f} s ({t.epoch_seconds / float_epoch:.1f}×) | "
                                              f"{t.memory_mib:.1f} |"))
        lines.append("")
    return lines


# -- EfficientNet-Lite0, label-free ---------------------------------------------------------------

EFFNET_TARGETS = {"w4a4": str(HERE / "npu-w4a4.toml"), "w4a8": str(HERE / "npu-w4a8.toml")}


def effnet_task(quick: bool, methods: list[str] | None = None, rows: list[str] | None = None,
                lrs: list[float] | None = None) -> list[str]:
    from common import SPLIT_NOTE, agreement, load_split, logits
    from qcompiler.zoo import efficientnet_lite0

    n_calib, n_train, n_val, n_test = (8, 16, 8, 22) if quick else (256, 768, 128, 500)
    epochs = 1 if quick else 4
    model = efficientnet_lite0().eval()
    calib = load_split("calib", n_calib)
    # Distillation data: calibration and validation crops only (new seeds, more of them).
    train_crops = torch.cat([load_split("calib", n_train // 2, seed=1).crops,
                             load_split("validation", n_train // 2, seed=1).crops])
    val = load_split("validation", n_val)
    test = load_split("heldout", n_test)
    order = torch.randperm(len(train_crops), generator=torch.Generator().manual_seed(0))
    batches = [(train_crops[order[i:i + 16]],) for i in range(0, len(train_crops), 16)]
    ref = logits(model, test.crops)
    float_times, float_mem = float_epoch_seconds(
        model, [(b[0], model(b[0]).detach()) for b in batches[:4]], F.mse_loss, 1, 1e-4)
    float_step = statistics.median(float_times) / 4
    lines = ["## EfficientNet-Lite0 (ImageNet weights), label-free", "",
             f"QAT distils the float model's logits (MSE) on {len(train_crops)} crops ({n_train // 2} `calib` and "
             f"{n_train // 2} `validation` crops, seed 1), {epochs} epochs of batches of 16, Adam (steps 1e-3; the "
             f"weights' rate from {lrs or [1e-4]}, chosen with LSQ on validation), cosine schedule; the best epoch "
             f"on {val.describe} (seed 0, in the converted integer model) is kept. Compiled with {calib.describe}. Reported on {test.describe}. {SPLIT_NOTE}", "",
             f"Float training step (batch 16): {float_step:.2f} s; saved for backward {float_mem:.0f} MiB per step.", ""]
    for name in rows or list(EFFNET_TARGETS):
        start = time.perf_counter()
        ptq = qcompile(model, calib.crops[:1], target=EFFNET_TARGETS[name], calib_data=list(calib.crops.split(32)),
                       progress=False)
        ptq_seconds = time.perf_counter() - start
        res = agreement(ref, logits(ptq, test.crops), test.photos)
        lines += [f"### {name} (`{Path(EFFNET_TARGETS[name]).name}`)", "",
                  "| method | top-1 agreement [95 % CI] | logits SQNR dB | s/step (× float) | saved for backward, MiB/step | seconds |",
                  "|---|---:|---:|---:|---:|---:|",
                  f"| PTQ (per-layer AdaRound, the default) | {res.cell()} | {res.sqnr_db:.2f} | - | - | {ptq_seconds:.0f} |"]
        # The learning rate of the weights, chosen with LSQ on the validation crops.
        timed = {}
        for lr in lrs or [1e-4]:
            start = time.perf_counter()
            timed[lr] = (run_fit(ptq, batches, [(val.crops,)], method="lsq", p=0.5, epochs=epochs, lr=lr, seed=0),
                         time.perf_counter() - start)
        lr, scores = best_lr({k: t for k, (t, _) in timed.items()})
        if len(scores) > 1:
            lines.insert(-3, f"Weights' learning rate {lr:g}, chosen on validation with LSQ (validation loss "
                             f"{', '.join(f'{k:g}: {v:.4g}' for k, v in scores.items())}).\n")
        for label, method, p in METHODS:
            if method not in (methods or ["lsq"]) or (method == "quant_noise" and p != 0.5):
                continue
            if method == "lsq":
                t, seconds = timed[lr]
            else:
                start = time.perf_counter()
                t = run_fit(ptq, batches, [(val.crops,)], method=method, p=p, epochs=epochs, lr=lr, seed=0)
                seconds = time.perf_counter() - start
            res = agreement(ref, logits(t.result, test.crops), test.photos)
            step = t.epoch_seconds / len(batches)
            lines.append(f"| {label} | {res.cell()} | {res.sqnr_db:.2f} | {step:.2f} s ({step / float_step:.1f}×) | "
                         f"{t.memory_mib:.0f} | {seconds:.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
            if method == "lsq":
                # The same trained module, its folded BatchNorm statistics re-estimated on 256
                # training crops (qat.reestimate_statistics): no training of its own.
                start = time.perf_counter()
                qat.reestimate_statistics(t.module, [b for b in batches[:16]])
                res = agreement(ref, logits(qat.convert(t.module), test.crops), test.photos)
                lines.append(f"| {label}, then BatchNorm statistics re-estimated | {res.cell()} | {res.sqnr_db:.2f} | "
                             f"- | - | +{time.perf_counter() - start:.0f} |")
                print(lines[-1], file=sys.stderr, flush=True)
        lines.append("")
    return lines


TASKS = {"digits": digits_task, "denoise": denoise_task, "effnet": effnet_task}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    ap.add_argument("--effnet-methods", default="lsq", help="QAT methods of the EfficientNet task (costly: "
                    "about 12 minutes per method, learning rate and row on 2 cores)")
    ap.add_argument("--effnet-rows", default="w4a4,w4a8")
    ap.add_argument("--effnet-lrs", default="1e-4", help="candidate learning rates of the weights, chosen with "
                    "LSQ on the validation crops")
    args = ap.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        ap.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    path = out_path(__file__, args)
    text = header("Quantization-aware training against PTQ", __file__, argv,
                  notes=["Methods (`qcompiler.qat`): QAT with the straight-through estimator at the compiled "
                         "ranges (STE), learned steps (LSQ), learned steps and zero points (LSQ+), the "
                         "sinusoidal regulariser instead of STE on the weights (QSin), and Quant-Noise (a "
                         "random fraction p of the weights quantized per forward)."])
    for task in tasks:
        kw = {"methods": args.effnet_methods.split(","), "rows": args.effnet_rows.split(","),
              "lrs": [float(v) for v in args.effnet_lrs.split(",")]} if task == "effnet" else {}
        text += "\n" + "\n".join(TASKS[task](args.quick, **kw)) + "\n"
        emit(text, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
