"""Accuracy-target mode: does the plan it returns meet its target on held-out data, and how many
plans did the search finish to find it?

    python benchmarks/accuracy_target.py            # writes benchmarks/accuracy_target.md
    python benchmarks/accuracy_target.py --quick    # smoke run, prints only

EfficientNet-Lite0 (ImageNet weights) under npu-int4 (int4 or int8 weights per group), default
pipeline. `qcompile(..., target_quality=T, validation_data=V)` searches on the `validation`
split; the model it returns is then measured on the `heldout` split, which neither the compile
nor the search saw. Each target is one compile.
"""
from __future__ import annotations

import sys
import time

from common import SPLIT_NOTE, agreement, emit, header, load_split, logits, out_path, parser, pipeline

import qcompiler
from qcompiler.zoo import efficientnet_lite0

TARGETS = ("sqnr_db=20", "top1_agreement=0.8")


def parse(text: str) -> dict:
    key, value = text.split("=")
    return {key: float(value)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--validation", type=int, default=64)
    ap.add_argument("--heldout", type=int, default=300)
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated METRIC=VALUE")
    args = ap.parse_args(argv)
    if args.quick:
        args.calib, args.validation, args.heldout, args.targets = 8, 8, 8, "sqnr_db=12"
    model = efficientnet_lite0().eval()
    calib = load_split("calib", args.calib)
    val = load_split("validation", args.validation)
    held = load_split("heldout", args.heldout)
    ref = logits(model, held.crops)
    passes = pipeline(args.quick)
    rows = ["| target (on validation) | plans finished | weight memory | on validation | held-out SQNR | "
            "held-out top-1 agreement | meets it on held-out | compile |",
            "|---|---:|---:|---:|---:|---:|---|---:|"]
    details: list[str] = []
    for text in args.targets.split(","):
        wanted = parse(text.strip())
        metric, value = next(iter(wanted.items()))
        start = time.perf_counter()
        try:
            compiled = qcompiler.qcompile(model, calib.crops[:1], target="npu-int4",
                                          calib_data=list(calib.crops.split(32)), validation_data=list(val.crops.split(32)),
                                          target_quality=wanted, passes=passes, progress=False)
        except qcompiler.BudgetError as exc:  # out of reach: the row says so and the others still run
            rows.append(f"| {metric} >= {value:g} | | | {exc} | | | | {time.perf_counter() - start:.0f} s |")
            continue
        seconds = time.perf_counter() - start
        report = compiled.report()
        steps = report.totals["accuracy-target search"].split(" | ")
        kept = [s for s in steps if "(meets the target)" in s]
        on_val = kept[-1].split(f"{metric} ")[1].split(" (")[0] if kept else ""
        held_q = agreement(ref, logits(compiled, held.crops), held.photos)
        held_value = held_q.sqnr_db if metric == "sqnr_db" else held_q.top1_rate
        rows.append(f"| {metric} >= {value:g} | {len(steps)} | {compiled.weight_memory_bytes / 1024:,.1f} KiB | "
                    f"{on_val} | {held_q.sqnr_db:.2f} dB | {held_q.cell()} | {'yes' if held_value >= value else 'no'} | "
                    f"{seconds:.0f} s |")
        details += ["", f"### {metric} >= {value:g}", "",
                    "The plans finished, in order (percentages of the most precise plan's weight memory):", "",
                    *steps, "", f"Allocation: {report.totals['bit allocation']}"]
    text = "\n".join([
        header("Accuracy-target mode", __file__, argv, passes=passes if not args.quick else None, notes=[
            f"EfficientNet-Lite0 (ImageNet weights), npu-int4. Calibration: {calib.describe}; the search "
            f"measures on {val.describe}; reported on {held.describe}, which no setting saw.", "", SPLIT_NOTE]),
        *rows, "", "## The searches", *details, ""])
    emit(text, out_path(__file__, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
