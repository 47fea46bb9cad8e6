"""Every default of the pipeline, chosen on the validation split alone.

For each default, the candidates are compiled for EfficientNet-Lite0 (ImageNet weights) on
calibration crops and measured against the float model on VALIDATION crops (never the held-out
crops the README reports): top-1 agreement with a photo-clustered 95 % interval, the paired
difference from the default (same crops, so their difficulty cancels; also clustered by photo)
and logits SQNR. The rule, fixed before looking: the validation winner is the candidate with
the highest SQNR (one crop moves top-1 by 0.4 points on 256 crops; SQNR is far less noisy); a
default should change when another candidate wins on SQNR and its paired top-1 difference is
not significantly negative.

Studies:
- activation observer, per target (npu-int8, npu-int4; cpu-x86-int8 uses npu-int8's minmax);
- AdaRound's regulariser weight (`AdaRoundConfig.reg_weight`), on npu-int8;
- sensitivity method (hessian vs sqnr) for a mixed-precision plan under npu-int4 at a weight
  budget (75 % of int8 by default);
- input preprocessing: the model's own (pixel - 127) / 128 against (pixel - 127.5) / 127.5
  (TF-Lite's (x - 0.5) / 0.5), on npu-int8, each measured against float under its own inputs.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from common import (
    SPLIT_NOTE, Agreement, agreement, emit, header, load_split, logits, out_path, parser, passes_with,
)
from qcompiler import qcompile
from qcompiler.mixed_precision import MixedPrecisionSession
from qcompiler.adaround import AdaRoundConfig
from qcompiler.options import DEFAULT_SENSITIVITY as DEFAULT_METHOD
from qcompiler.options import SENSITIVITY_METHODS as METHODS
from qcompiler.stats import paired_difference_interval
from qcompiler.targets import load_target
from qcompiler.zoo import efficientnet_lite0

DEFAULT_REG_WEIGHT = AdaRoundConfig().reg_weight


def tflite(x: torch.Tensor) -> torch.Tensor:
    """Crops hold (p - 127) / 128 exactly; the same pixels under TF-Lite's (p - 127.5) / 127.5."""
    return (x * 128 + 127 - 127.5) / 127.5


@dataclass(frozen=True)
class Row:
    candidate: str
    is_default: bool
    result: Agreement
    seconds: float


def table(rows: Sequence[Row], photos: Sequence[str]) -> list[str]:
    default = next(r for r in rows if r.is_default)
    lines = ["| candidate | top-1 agreement [95 % CI] | top-1 minus default [95 % CI] | logits SQNR dB "
             "| design effect | compile s |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.is_default:
            diff = "(default)"
        else:
            d = paired_difference_interval(r.result.hits, default.result.hits, list(photos))
            diff = f"{100 * d.estimate:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"
        deff = f"{r.result.top1.design_effect:.1f}" if r.result.top1 is not None else "-"
        lines.append(f"| {r.candidate}{' (default)' if r.is_default else ''} | {r.result.cell()} | {diff} | "
                     f"{r.result.sqnr_db:.2f} | {deff} | {r.seconds:.0f} |")
    return lines


def verdict(rows: Sequence[Row], photos: Sequence[str]) -> str:
    default = next(r for r in rows if r.is_default)
    best = max(rows, key=lambda r: r.result.sqnr_db)
    if best is default:
        return f"Validation winner (highest SQNR): **{best.candidate}**, the default. Keep it."
    d = paired_difference_interval(best.result.hits, default.result.hits, list(photos))
    worse = d.high < 0
    return (f"Validation winner (highest SQNR): **{best.candidate}** ({best.result.sqnr_db:.2f} dB against the "
            f"default's {default.result.sqnr_db:.2f} dB; top-1 {100 * d.estimate:+.1f} points "
            f"[{100 * d.low:+.1f}, {100 * d.high:+.1f}]). "
            + ("Its top-1 is significantly worse, so the default stays."
               if worse else f"By the rule, the default should become {best.candidate}."))


def study(title: str, rows: list[Row], photos: Sequence[str], notes: Sequence[str] = ()) -> list[str]:
    return ["", f"## {title}", "", *notes, *([""] if notes else []), *table(rows, photos), "",
            verdict(rows, photos)]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=64, help="calibration crops (calib split)")
    ap.add_argument("--validation", type=int, default=256, help="validation crops (validation split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--observers", default="minmax,mse,percentile")
    ap.add_argument("--observer-targets", default="npu-int8,npu-int4")
    ap.add_argument("--reg-weights", default="0.01,0.3,3,10")
    ap.add_argument("--budget", type=float, default=0.75,
                    help="weight budget of the sensitivity study (fraction of int8)")
    ap.add_argument("--studies", default="observer,adaround,sensitivity,preprocessing")
    ap.add_argument("--adaround-steps", type=int, default=AdaRoundConfig().steps,
                    help="Adam steps per layer (the default's; --quick uses 2)")
    args = ap.parse_args(argv)
    if args.quick:
        args.calib, args.validation = 4, 22
        args.observers, args.observer_targets, args.reg_weights = "minmax,mse", "npu-int8", "3"
        args.adaround_steps = 2
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    adaround = AdaRoundConfig(steps=args.adaround_steps)
    studies = args.studies.split(",")

    model = efficientnet_lite0().eval()
    calib = load_split("calib", args.calib, args.seed)
    val = load_split("validation", args.validation, args.seed)
    calib_batches = list(calib.crops.split(32))
    ref = logits(model, val.crops)
    photos = val.photos

    cache: dict[tuple, tuple[Agreement, float]] = {}

    def compile_and_measure(target: str, *, observer: str | None = None, cfg: AdaRoundConfig = adaround,
                            inputs: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[Agreement, float]:
        """Compile with one setting changed from the defaults; the same setting is compiled once."""
        spec = load_target(target)
        key = (spec.name, observer or spec.observer, cfg, inputs)
        if key not in cache:
            batches = calib_batches if inputs is None else list(inputs(calib.crops).split(32))
            x = val.crops if inputs is None else inputs(val.crops)
            reference = ref if inputs is None else logits(model, x)
            compiled, seconds = timed(lambda: qcompile(model, batches[0][:1], target=spec, calib_data=batches,
                                                       observer=observer, passes=passes_with(cfg), progress=False))
            cache[key] = (agreement(reference, logits(compiled, x), photos), seconds)
        return cache[key]

    parts = [header("Defaults chosen on the validation split", __file__, argv,
                    notes=[f"Model: EfficientNet-Lite0 (ImageNet weights). Calibration: {calib.describe}; "
                           f"measured on {val.describe}. Never on held-out crops.", "", SPLIT_NOTE,
                           "", f"AdaRound: {args.adaround_steps} steps per layer. Winner rule: highest "
                           "validation SQNR; change a default only if the winner's paired top-1 "
                           "difference is not significantly negative."])]

    if "observer" in studies:
        for target in args.observer_targets.split(","):
            spec = load_target(target)
            rows = []
            for obs in args.observers.split(","):
                say(f"observer {obs} on {target}")
                result, seconds = compile_and_measure(target, observer=obs)
                rows.append(Row(obs, obs == spec.observer, result, seconds))
            if not any(r.is_default for r in rows):
                say(f"{target}'s default observer {spec.observer} was not among the candidates")
                result, seconds = compile_and_measure(target)
                rows.insert(0, Row(spec.observer, True, result, seconds))
            parts += study(f"Activation observer on {target}", rows, photos,
                           [f"Every activation quantizer with the same observer (`qcompile(..., observer=NAME)`); "
                            f"the spec's default is `{spec.observer}`."])

    if "adaround" in studies:
        rows = []
        for w in [float(v) for v in args.reg_weights.split(",")]:
            say(f"AdaRound reg_weight {w:g}")
            cfg = AdaRoundConfig(steps=args.adaround_steps, reg_weight=w)
            result, seconds = compile_and_measure("npu-int8", cfg=cfg)
            rows.append(Row(f"reg_weight {w:g}", w == DEFAULT_REG_WEIGHT, result, seconds))
        if not any(r.is_default for r in rows):
            result, seconds = compile_and_measure("npu-int8")
            rows.insert(0, Row(f"reg_weight {DEFAULT_REG_WEIGHT:g}", True, result, seconds))
        parts += study("AdaRound regulariser weight (npu-int8)", rows, photos,
                       ["`AdaRoundConfig.reg_weight`: the rounding regulariser's weight against the layer's "
                        "reconstruction error (normalised so round-to-nearest scores 1)."])

    if "sensitivity" in studies:
        rows = []
        for method in METHODS:
            say(f"sensitivity {method}")

            def mixed(method: str = method) -> tuple[Any, Any]:
                session = MixedPrecisionSession(model, calib.crops[:1], target="npu-int4", calib_data=calib_batches,
                                                sensitivity=method, progress=False, passes=passes_with(adaround))
                default = {g: session.problem.defaults[g] for g in session.problem.candidates}
                budget = args.budget * session.problem.cost("weight_memory", default)
                plan = session.solve({"weight_memory": budget})
                return session.compile(plan.choice), plan

            (compiled, plan), seconds = timed(mixed)
            rows.append(Row(method, method == DEFAULT_METHOD, agreement(ref, logits(compiled, val.crops), photos),
                            seconds))
        parts += study(f"Sensitivity method (npu-int4, weight memory at {args.budget:.0%} of int8)", rows, photos,
                       ["Each method's sensitivities feed the same bit allocation (integer program); the plan is compiled "
                        "with the default pipeline."])

    if "preprocessing" in studies:
        say("preprocessing")
        default, s1 = compile_and_measure("npu-int8")
        other, s2 = compile_and_measure("npu-int8", inputs=tflite)
        rows = [Row("(pixel - 127) / 128", True, default, s1), Row("(pixel - 127.5) / 127.5", False, other, s2)]
        parts += study("Input preprocessing (npu-int8)", rows, photos,
                       ["Both measured against the float model fed the same preprocessing."])

    emit("\n".join(parts) + "\n", out_path(__file__, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
