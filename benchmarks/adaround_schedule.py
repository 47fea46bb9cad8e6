"""AdaRound's schedule (Adam steps and learning rate per kernel) by weight width, chosen on the
validation split alone.

    python benchmarks/adaround_schedule.py

Each candidate schedule runs on every kernel (`AdaRoundConfig(steps=, lr=, wide_bits=None)`) of
EfficientNet-Lite0 (ImageNet weights) compiled on --calib calibration crops, for two targets:
npu-int8 (8-bit weights everywhere) and benchmarks/npu-w4a8.toml (4-bit weights everywhere,
8-bit activations). Each compile is measured against float on --validation VALIDATION crops
(never the held-out ones the README reports), with the rule of benchmarks/defaults.py, fixed
before looking: the highest logits SQNR wins unless its paired top-1 difference from the row
marked "before" (300 steps at 0.01, the schedule every kernel ran until this study) is
significantly negative. The winner on 8-bit weights becomes `AdaRoundConfig.wide_steps` /
`wide_lr` (kernels of 8 bits or more); the winner on 4-bit weights `steps` / `lr`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from common import SPLIT_NOTE, agreement, emit, header, load_split, logits, out_path, parser, passes_with
from defaults import Row, study

from qcompiler import qcompile
from qcompiler.adaround import AdaRoundConfig
from qcompiler.zoo import efficientnet_lite0

BEFORE = (300, 1e-2)
TARGETS = {
    "npu-int8 (8-bit weights)": ("npu-int8", "300:0.01,200:0.02,150:0.02,150:0.03,100:0.02,100:0.03,100:0.05"),
    "npu-w4a8 (4-bit weights)": (str(Path(__file__).parent / "npu-w4a8.toml"), "300:0.01,150:0.02,100:0.02,100:0.03"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=256, help="calibration crops (calib split)")
    ap.add_argument("--validation", type=int, default=256, help="validation crops (validation split)")
    args = ap.parse_args(argv)
    if args.quick:
        args.calib, args.validation = 8, 22
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    model = efficientnet_lite0().eval()
    calib = load_split("calib", args.calib)
    val = load_split("validation", args.validation)
    batches = list(calib.crops.split(32))
    ref = logits(model, val.crops)
    parts = [header("AdaRound schedule by weight width, chosen on the validation split", __file__, argv,
                    notes=[f"Model: EfficientNet-Lite0 (ImageNet weights). Calibration: {calib.describe}; "
                           f"measured on {val.describe}. Never on held-out crops.", "", SPLIT_NOTE, "",
                           "Each row runs one schedule on every kernel. Winner rule: highest validation SQNR, "
                           "unless its paired top-1 difference from the row marked default (the schedule "
                           "before this study) is significantly negative. `compile s` is the whole compile."])]
    for title, (target, candidates) in TARGETS.items():
        rows = []
        for cand in candidates.split(","):
            steps, lr = int(cand.split(":")[0]), float(cand.split(":")[1])
            if args.quick:
                steps = max(2, steps // 50)
            say(f"{title}: {steps} steps at {lr:g}")
            cfg = AdaRoundConfig(steps=steps, lr=lr, wide_bits=None)
            start = time.perf_counter()
            compiled = qcompile(model, batches[0][:1], target=target, calib_data=batches,
                                passes=passes_with(cfg), progress=False)
            seconds = time.perf_counter() - start
            rows.append(Row(f"{steps} steps at {lr:g}", (steps, lr) == BEFORE or (args.quick and lr == BEFORE[1]),
                            agreement(ref, logits(compiled, val.crops), val.photos), seconds))
        parts += study(title, rows, val.photos)
    emit("\n".join(parts) + "\n", out_path(__file__, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
