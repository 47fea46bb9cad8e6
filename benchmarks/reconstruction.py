"""Reconstruction on EfficientNet-Lite0 (ImageNet weights): layer, block and model granularity.

    python benchmarks/reconstruction.py                         # held-out table (benchmarks/reconstruction.md)
    python benchmarks/reconstruction.py --split validation --out benchmarks/reconstruction_validation.md
    python benchmarks/reconstruction.py --quick                 # smoke run, prints only

Each row compiles the model with one setting and one `reconstruction=` granularity on `calib`
crops and measures top-1 agreement with the float model (95 % interval clustered by photo) and
logits SQNR on the chosen split: settings are chosen on `validation`, reported on `heldout`.

Settings (`--rows`):
- w4a8: 4-bit weights on every conv and linear, depthwise, first and last included
  (`benchmarks/npu-w4a8.toml`), 8-bit activations;
- w4a4: 4-bit weights and activations, the first and last layer at 8 bits (`benchmarks/npu-w4a4.toml`);
- mp50: mixed precision with 2-, 4- and 8-bit weight candidates everywhere
  (`benchmarks/npu-w248.toml`) within the weight memory of the 4-bit-everywhere model (4-bit
  weights and int32 biases: 50.9 % of the int8 model's), with qcompile's plan check;
- w8a8: npu-int8.
"nearest" is the pipeline without `optimize_rounding` (round-to-nearest, no bias correction).
"""
from __future__ import annotations

import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from common import SPLIT_NOTE, agreement, emit, header, load_split, logits, out_path, parser
from qcompiler import qcompile
from qcompiler.api import DEFAULT_PASSES
from qcompiler.reconstruction import ReconstructionConfig
from qcompiler.zoo import efficientnet_lite0

HERE = Path(__file__).parent
ROWS = {
    "w4a8": ("W4A8, 4-bit weights everywhere", str(HERE / "npu-w4a8.toml"), None),
    "w4a4": ("W4A4, first and last layer 8-bit", str(HERE / "npu-w4a4.toml"), None),
    "mp50": ("mixed 2/4/8-bit weights in the 4-bit-everywhere memory", str(HERE / "npu-w248.toml"), "w4"),
    "w8a8": ("W8A8 (npu-int8)", "npu-int8", None),
}
OVERRIDES = ("steps", "batch_size", "lr", "scale_lr", "bias_lr", "reg_weight", "tap_weight", "qdrop", "loss",
             "learn_scales", "learn_weight_scales", "learn_bias", "max_samples", "start")


def four_bit_memory(model: torch.nn.Module) -> float:
    """Bytes of the model with 4-bit weights and int32 biases on every conv and linear (after
    BatchNorm folding every kernel has a bias): the w4a8 row's weight memory."""
    kernels = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return sum(m.weight.numel() / 2 + 4 * m.weight.shape[0] for m in kernels)


def config(granularity: str, args, quick: bool) -> ReconstructionConfig:
    kinds = {f.name: f.type for f in fields(ReconstructionConfig)}
    kw = {}
    for name in OVERRIDES:
        value = getattr(args, name)
        if value is None:
            continue
        kind = kinds[name]
        kw[name] = (value.lower() in ("1", "true", "yes")) if kind in (bool, "bool") else \
            int(value) if kind in (int, "int") else float(value) if kind in (float, "float") else value
    if quick:
        kw["steps"] = 4
    return ReconstructionConfig(granularity=granularity, **kw)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--split", default="heldout", choices=("heldout", "validation"))
    ap.add_argument("--n", type=int, default=500, help="crops of the measured split")
    ap.add_argument("--rows", default="w4a8,w4a4,mp50,w8a8")
    ap.add_argument("--granularities", default="nearest,layer,block,model")
    for name in OVERRIDES:
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                        help=f"ReconstructionConfig.{name} for block and model")
    args = ap.parse_args(argv)
    if args.quick:
        args.calib, args.n, args.rows, args.granularities = 8, 22, "w4a8", "nearest,layer,block"
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    model = efficientnet_lite0().eval()
    calib = load_split("calib", args.calib)
    measured = load_split(args.split, args.n)
    batches = list(calib.crops.split(32))
    ref = logits(model, measured.crops)
    example = ReconstructionConfig()
    lines = [header("Reconstruction on EfficientNet-Lite0: layer, block and model", __file__, argv, notes=[
        f"Model: `qcompiler.zoo.efficientnet_lite0()` (ImageNet weights). Calibration: {calib.describe}; "
        f"measured on {measured.describe}.", "", SPLIT_NOTE, "",
        "layer: per-kernel AdaRound with bias correction (the default pipeline). block, model: "
        f"`qcompiler.reconstruction` with {config('block', args, args.quick)} "
        f"(defaults: {example.steps} steps, batch {example.batch_size}).",
    ])]
    lines += ["| setting | reconstruction | top-1 agreement [95 % CI] | logits SQNR dB | weight memory | compile s |",
              "|---|---|---:|---:|---:|---:|"]
    for key in args.rows.split(","):
        label, target, budget = ROWS[key]
        budget = {"weight_memory": four_bit_memory(model)} if budget == "w4" else budget
        for gran in args.granularities.split(","):
            say(f"{key}: {gran}")
            kw = {}
            if gran == "nearest":
                kw["passes"] = [p for p in DEFAULT_PASSES if p != "optimize_rounding"]
            elif gran != "layer":
                kw["reconstruction"] = config(gran, args, args.quick)
            elif args.quick:
                from common import pipeline
                kw["passes"] = pipeline(True)
            start = time.perf_counter()
            compiled = qcompile(model, calib.crops[:1], target=target, calib_data=batches, budget=budget,
                                progress=False, **kw)
            seconds = time.perf_counter() - start
            res = agreement(ref, logits(compiled, measured.crops), measured.photos)
            lines.append(f"| {label} | {gran} | {res.cell()} | {res.sqnr_db:.2f} | "
                         f"{compiled.weight_memory_bytes / 2**20:.2f} MiB | {seconds:.0f} |")
            say(lines[-1])
            # Written after every row, so that a long run that is stopped keeps what it measured.
            emit("\n".join(lines), out_path(__file__, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
