"""How well each sensitivity method ranks what a weight candidate costs once its rounding is optimised.

    python benchmarks/sensitivity_ranking.py            # writes benchmarks/sensitivity_ranking.md
    python benchmarks/sensitivity_ranking.py --quick    # smoke run, prints only

EfficientNet-Lite0 (ImageNet weights) under `benchmarks/npu-w248.toml` (2-, 4- and 8-bit weight
candidates on every conv and linear). For each weight group and its 2- and 4-bit candidates the
truth is the output noise power, on validation crops, with that group alone quantized and
rounded by AdaRound (`--truth-steps` iterations on `--truth-samples` calibration crops, the rest of
the model float): what the candidate costs after rounding is optimised. Each sensitivity method is
measured as the compile measures it, on `--calib` calibration crops, and ranked against the
truth: Spearman's rank correlation over all (group, candidate) pairs and within each candidate
(which groups the program should give fewer bits), with its time.
"""
from __future__ import annotations

import sys
import time

import torch
from scipy.stats import spearmanr

from common import emit, header, load_split, out_path, parser
from qcompiler.mixed_precision import MixedPrecisionSession
from qcompiler.options import SENSITIVITY_METHODS
from qcompiler.quantizers import ObserverStub
from qcompiler.sensitivity import measure_sensitivity, rounded_weights, sqnr_sensitivity
from qcompiler.zoo import efficientnet_lite0

SPEC = "benchmarks/npu-w248.toml"
MEASURED = ("w2", "w4")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=64, help="calibration crops the sensitivities are measured on")
    ap.add_argument("--truth-samples", type=int, default=128, help="calibration crops the truth's AdaRound fits on")
    ap.add_argument("--truth-steps", type=int, default=300)
    ap.add_argument("--n", type=int, default=128, help="validation crops the truth's noise is measured on")
    args = ap.parse_args(argv)
    if args.quick:
        args.calib, args.truth_samples, args.truth_steps, args.n = 8, 8, 10, 8
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    model = efficientnet_lite0().eval()
    calib = load_split("calib", max(args.calib, args.truth_samples))
    val = load_split("validation", args.n)
    session = MixedPrecisionSession(model, calib.crops[:1], target=SPEC, calib_data=list(calib.crops[:args.calib].split(32)),
                                    progress=False)
    gm, ctx = session.run.gm, session.ctx
    groups = [g for g in ctx.groups if g.kind == "weight" and not g.fallback and len(g.candidates) > 1]
    for stub in gm.modules():
        if isinstance(stub, ObserverStub):
            stub.enabled = False
    say(f"{len(groups)} weight groups; truth")
    start = time.perf_counter()
    truth_batches = [(b,) for b in calib.crops[:args.truth_samples].split(16)]
    truth_weights = rounded_weights(gm, groups, truth_batches, steps=args.truth_steps, samples=args.truth_samples)
    truth, _ = sqnr_sensitivity(gm, groups, ctx.observers, [(b,) for b in val.crops.split(16)], progress=False,
                                weights=truth_weights)
    truth_seconds = time.perf_counter() - start
    pairs = [(g.id, c) for g in groups for c in MEASURED if c in g.candidates and (g.id, c) in truth_weights]

    rows = []
    for method in SENSITIVITY_METHODS:
        say(method)
        table = measure_sensitivity(gm, groups, ctx.observers, ctx.calib_batches, method, progress=False)
        est = [table.values[g][c] for g, c in pairs]
        tru = [truth[g][c] for g, c in pairs]
        cells = [f"{spearmanr(est, tru)[0]:.3f}"]
        for c in MEASURED:
            sel = [i for i, (_, cc) in enumerate(pairs) if cc == c]
            cells.append(f"{spearmanr([est[i] for i in sel], [tru[i] for i in sel])[0]:.3f}")
        rows.append(f"| {method} | " + " | ".join(cells) + f" | {table.seconds:.0f} |")
        say(rows[-1])

    lines = [header("Sensitivity against the error after rounding is optimised (EfficientNet-Lite0)", __file__, argv,
                    passes=None, notes=[
        f"Spec `{SPEC}`; {len(groups)} weight groups, {len(pairs)} (group, candidate) pairs ({', '.join(MEASURED)}). "
        f"Sensitivities on {args.calib} crops of {calib.describe}; truth: each pair alone, AdaRound "
        f"{args.truth_steps} steps on {args.truth_samples} calibration crops, output noise on {val.describe} "
        f"({truth_seconds:.0f} s).",
    ])]
    lines += ["| method | Spearman rho, all pairs | rho, w2 only | rho, w4 only | seconds |", "|---|---:|---:|---:|---:|"]
    lines += rows
    emit("\n".join(lines), out_path(__file__, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
