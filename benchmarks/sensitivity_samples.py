"""How many calibration samples a budgeted compile measures its sensitivity on, chosen on the
validation split alone.

    python benchmarks/sensitivity_samples.py

The sqnr sensitivity reruns the model from each group on, once per candidate format, over the
samples it is given: its time grows with them. Each row compiles EfficientNet-Lite0 (ImageNet
weights) for npu-int4 with `budget={"weight_memory": 0.75}` on --calib calibration crops (the
budgeted compile of benchmarks/speed.py), measuring the sensitivity on the first N of them
(`EffortSettings.sensitivity_samples` of effort "default"); everything else is the default
compile, the plan check included. Each compile is measured against float on --validation crops
(never the held-out ones the README reports), with the rule of benchmarks/defaults.py, fixed
before looking: the highest logits SQNR wins unless its paired top-1 difference from the row
marked "default" (every calibration sample, the setting before this study) is significantly
negative. The winner becomes the default's `sensitivity_samples`.
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace

from common import SPLIT_NOTE, agreement, emit, header, load_split, logits, out_path, parser
from defaults import Row, study

from qcompiler import options, qcompile
from qcompiler.zoo import efficientnet_lite0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=64, help="calibration crops (calib split)")
    ap.add_argument("--validation", type=int, default=256, help="validation crops (validation split)")
    ap.add_argument("--samples", default="16,32", help="sensitivity samples to try besides all of them")
    args = ap.parse_args(argv)
    if args.quick:
        args.calib, args.validation, args.samples = 8, 22, "4"
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    model = efficientnet_lite0().eval()
    calib = load_split("calib", args.calib)
    val = load_split("validation", args.validation)
    batches = list(calib.crops.split(32))
    ref = logits(model, val.crops)
    parts = [header("Sensitivity samples of a budgeted compile, chosen on the validation split", __file__, argv,
                    notes=[f"Model: EfficientNet-Lite0 (ImageNet weights), npu-int4, 75 % of the default plan's "
                           f"weight memory. Calibration: {calib.describe}; measured on {val.describe}. Never on "
                           "held-out crops.", "", SPLIT_NOTE, "",
                           "Each row measures the sqnr sensitivity on the first N calibration samples. Winner "
                           "rule: highest validation SQNR, unless its paired top-1 difference from the row "
                           "marked default (all samples) is significantly negative. `compile s` is the whole "
                           "compile."])]
    rows = []
    default = options.EFFORT_SETTINGS["default"]
    try:
        for n in [*map(int, args.samples.split(",")), None]:
            label = f"all {args.calib} samples" if n is None else f"{n} samples"
            say(label)
            options.EFFORT_SETTINGS["default"] = replace(default, sensitivity_samples=n)
            start = time.perf_counter()
            compiled = qcompile(model, batches[0][:1], target="npu-int4", calib_data=batches,
                                budget={"weight_memory": 0.75}, progress=False)
            seconds = time.perf_counter() - start
            rows.append(Row(label, n is None, agreement(ref, logits(compiled, val.crops), val.photos), seconds))
    finally:
        options.EFFORT_SETTINGS["default"] = default
    parts += study(f"npu-int4, 75 % weight memory, {args.calib} calibration crops", rows, val.photos)
    emit("\n".join(parts) + "\n", out_path(__file__, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
