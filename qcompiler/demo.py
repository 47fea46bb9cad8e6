"""The demo: compile the pretrained EfficientNet-Lite0 for several targets and measure each.

This is the project's main job in one call. There are no labels for the offline sample crops, so
every quantized model is measured against the float model's own outputs on held-out crops
(the "heldout" split: one third of every sample photo; calibration crops come from the "calib"
third, and nothing here reads the "validation" third, which is for tuning): top-1 agreement with
a 95 % interval that accounts for crops of one photo being correlated (`qcompiler.stats`),
top-5 agreement, agreement on the crops the float model is confident about, and output SQNR.
Next to those: weight memory on the target (float32 for comparison) and compile time. `run_demo` writes
a Markdown report, a graph drawing and a saved model per target.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .errors import QCompileError
from .outputs import prepare_output_dir, write_text
from .stats import AgreementInterval

DEFAULT_TARGETS: tuple[str, ...] = ("npu-int8", "npu-int4", "cpu-x86-int8")
DEFAULT_N_CALIB = 256
DEFAULT_N_HELDOUT = 500
CALIB_BATCH = 32
EVAL_CHUNK = 50
# Crops whose float max-softmax reaches this are "confident": their top-1 is not a coin flip
# between near-equal logits, so disagreement there is a real loss (benchmarks/float_baseline.md).
CONFIDENT_SOFTMAX = 0.5


@dataclass(frozen=True)
class DemoResult:
    """How one target's compiled model compares with the float model on the held-out crops."""

    target: str
    n_heldout: int
    top1_agreement: float            # fraction of crops with the same argmax as float
    top5_agreement: float            # fraction where float's top-1 is in the quantized top-5
    confident_top1_agreement: float  # top-1 agreement where float max-softmax >= 0.5 (nan if none)
    confident_count: int
    sqnr_db: float                   # of the logits, over all held-out crops
    weight_memory_bytes: float
    float_weight_memory_bytes: float
    compile_seconds: float
    graph_path: str
    model_dir: str | None            # None when the model could not be saved (see save_error)
    save_error: str | None = None
    top1_interval: AgreementInterval | None = None   # 95 % interval, clustered by photo
    drawing_error: str | None = None  # why graph_path is DOT source rather than an SVG drawing


@dataclass(frozen=True)
class AgreementStats:
    """Agreement of quantized logits with float logits, the numbers a DemoResult reports."""

    top1: float
    top5: float
    confident_top1: float
    confident_count: int
    sqnr_db: float


def agreement_stats(ref: torch.Tensor, out: torch.Tensor) -> AgreementStats:
    """Compare logits `out` [N, C] with the float reference `ref` [N, C]."""
    from .report import sqnr_db

    if ref.shape != out.shape or ref.ndim != 2 or ref.shape[0] == 0:
        raise QCompileError(f"agreement needs two equal [N, C] logit tensors with N >= 1, got "
                            f"{tuple(ref.shape)} and {tuple(out.shape)}")
    ref64, out64 = ref.double(), out.double()
    ref_top1 = ref64.argmax(dim=1)
    same = out64.argmax(dim=1) == ref_top1
    k = min(5, out64.shape[1])
    in_top5 = (out64.topk(k, dim=1).indices == ref_top1[:, None]).any(dim=1)
    confident = ref64.softmax(dim=1).amax(dim=1) >= CONFIDENT_SOFTMAX
    n_conf = int(confident.sum())
    conf_top1 = float(same[confident].double().mean()) if n_conf else math.nan
    signal = float(ref64.pow(2).sum())
    noise = float((out64 - ref64).pow(2).sum())
    return AgreementStats(top1=float(same.double().mean()), top5=float(in_top5.double().mean()),
                          confident_top1=conf_top1, confident_count=n_conf,
                          sqnr_db=sqnr_db(signal, noise))


def logits_in_chunks(model: nn.Module, x: torch.Tensor, chunk: int = EVAL_CHUNK) -> torch.Tensor:
    """Run `model` over `x` in chunks: a batch of 500 224x224 crops would need gigabytes."""
    with torch.no_grad():
        return torch.cat([model(part) for part in x.split(chunk)])


def float_weight_bytes(model: nn.Module) -> float:
    return float(sum(p.numel() for p in model.parameters()) * 4)


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.2f} MiB"


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f} %"


def _db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1f}"


_COLUMNS = ("target", "top-1 agree", "top-5 agree", "confident top-1 (n)", "SQNR dB",
            "weight memory", "vs float", "compile s")


def _top1_cell(r: DemoResult) -> str:
    iv = r.top1_interval
    return _pct(r.top1_agreement) + (f" [{100 * iv.low:.1f}, {100 * iv.high:.1f}]" if iv is not None else "")


def _row(r: DemoResult) -> tuple[str, ...]:
    ratio = r.float_weight_memory_bytes / r.weight_memory_bytes if r.weight_memory_bytes else math.inf
    return (r.target, _top1_cell(r), _pct(r.top5_agreement),
            f"{_pct(r.confident_top1_agreement)} ({r.confident_count})", _db(r.sqnr_db),
            _mib(r.weight_memory_bytes), f"{ratio:.1f}x smaller", f"{r.compile_seconds:.1f}")


def results_table(results: Sequence[DemoResult], markdown: bool = False) -> str:
    """One row per target; plain text aligned in columns, or a Markdown table."""
    rows = [_row(r) for r in results]
    if markdown:
        lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "|".join("---" for _ in _COLUMNS) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(_COLUMNS)]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(_COLUMNS), fmt(tuple("-" * w for w in widths))] + [fmt(row) for row in rows])


def _markdown_report(results: Sequence[DemoResult], reports: Sequence[str], n_calib: int,
                     n_heldout: int) -> str:
    float_bytes = results[0].float_weight_memory_bytes if results else 0.0
    parts = [
        "# qcompiler demo: EfficientNet-Lite0\n",
        f"Calibrated on {n_calib} crops of the \"calib\" split, measured against the float model on "
        f"{n_heldout} crops of the \"heldout\" split ({split_note()}). Agreement is with the float "
        f"model's own predictions (the crops have no labels); \"confident\" counts crops whose float "
        f"max-softmax is at least {CONFIDENT_SOFTMAX}. Float weights: {_mib(float_bytes)} (float32).\n",
        results_table(results, markdown=True),
        interval_note(results),
    ]
    unsaved = [r for r in results if r.save_error]
    if unsaved:
        parts.append("Models that could not be saved:\n")
        parts += [f"- {r.target}: {r.save_error}" for r in unsaved]
        parts.append("")
    for r, text in zip(results, reports):
        parts += [f"\n# Target {r.target}\n", f"Graph: `{os.path.basename(r.graph_path)}`"
                  + (f"; saved model: `{os.path.basename(r.model_dir)}/`" if r.model_dir else "") + "\n",
                  text]
    return "\n".join(parts)


def split_note() -> str:
    """Where the demo's crops come from, for reports."""
    from .sample_data import PHOTOS

    return (f"{len(PHOTOS)} photos shipped with scikit-image, scikit-learn and matplotlib; each split "
            "owns one third of every photo, so no held-out pixel was seen in calibration or tuning")


def interval_note(results: Sequence[DemoResult]) -> str:
    """What the bracketed top-1 interval means, with the clustering it found."""
    ivs = [r.top1_interval for r in results if r.top1_interval is not None]
    if not ivs:
        return ""
    deffs = ", ".join(f"{r.target} {r.top1_interval.design_effect:.1f}" for r in results
                      if r.top1_interval is not None)
    return (f"Top-1 brackets: 95 % confidence interval over {ivs[0].clusters} photos (Korn-Graubard, "
            f"clustered by photo: crops of one photo are correlated). Design effect (variance over "
            f"that of independent crops): {deffs}.\n")


def run_demo(targets: Sequence[str] = DEFAULT_TARGETS, n_calib: int = DEFAULT_N_CALIB,
             n_heldout: int = DEFAULT_N_HELDOUT, out_dir: str | os.PathLike[str] = "qcompile-out",
             progress: bool = True, echo: Callable[[str], None] | None = None) -> list[DemoResult]:
    """Compile EfficientNet-Lite0 for each target and measure it against the float model.

    Writes `out_dir/report.md`, `out_dir/<target>.svg` (final graph coloured by format; its DOT
    source `<target>.dot` when nothing here can draw SVG, see `DemoResult.drawing_error`) and
    `out_dir/<target>/` (the saved model). `echo`, if given, receives one status line per step.
    """
    from . import qcompile
    from .drawing import DrawingUnavailable, check_drawing
    from .sample_data import crop_boxes, sample_crops
    from .stats import agreement_interval
    from .targets import load_target
    from .zoo import efficientnet_lite0

    say = echo or (lambda _line: None)
    if not targets:
        raise QCompileError("run_demo needs at least one target, e.g. targets=['npu-int8']")
    for name, value in (("n_calib", n_calib), ("n_heldout", n_heldout)):
        if not isinstance(value, int) or value < 1:
            raise QCompileError(f"{name} must be a positive integer, got {value!r}")
    # Load every spec before any compute, so a typo in the last target costs nothing.
    specs = [load_target(t) for t in targets]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise QCompileError(f"targets {list(targets)} name the same target twice; give each once")
    out = Path(out_dir)
    # What the outputs need, checked before any compute: a writable directory and a renderer.
    prepare_output_dir(out, "the demo output directory")
    drawing_problem = check_drawing("svg")
    if drawing_problem:
        say(f"warning: {drawing_problem}")

    say("loading EfficientNet-Lite0 and the sample crops")
    model = efficientnet_lite0().eval()
    calib = sample_crops(n_calib, seed=0, split="calib")
    heldout = sample_crops(n_heldout, seed=0, split="heldout")
    heldout_photos = [box.photo for box in crop_boxes(n_heldout, seed=0, split="heldout")]
    ref = logits_in_chunks(model, heldout)
    float_bytes = float_weight_bytes(model)

    results: list[DemoResult] = []
    reports: list[str] = []
    for spec in specs:
        say(f"compiling for {spec.name}")
        compiled = qcompile(model, calib[:1], target=spec, calib_data=list(calib.split(CALIB_BATCH)),
                            progress=progress)
        say(f"measuring {spec.name} on {n_heldout} held-out crops")
        logits = logits_in_chunks(compiled, heldout)
        stats = agreement_stats(ref, logits)
        hits = (logits.argmax(dim=1) == ref.argmax(dim=1)).numpy()
        interval = agreement_interval(hits, heldout_photos) if len(set(heldout_photos)) > 1 else None
        model_dir: str | None = str(out / spec.name)
        save_error = None
        try:
            compiled.save(model_dir)
        except QCompileError as exc:
            # A model the artifact format cannot hold yet should not cost the other targets' results.
            model_dir, save_error = None, str(exc)
            say(f"warning: the {spec.name} model was not saved: {exc}")
        drawing_error = None
        try:
            graph_path = compiled.render(str(out / f"{spec.name}.svg"), colour_by="format")
        except DrawingUnavailable as exc:  # the DOT source is written instead: the measurements stand
            graph_path, drawing_error = exc.dot_path, exc.reason
        reports.append(compiled.report().to_markdown())
        results.append(DemoResult(
            target=spec.name, n_heldout=n_heldout, top1_agreement=stats.top1, top5_agreement=stats.top5,
            confident_top1_agreement=stats.confident_top1, confident_count=stats.confident_count,
            sqnr_db=stats.sqnr_db, weight_memory_bytes=float(compiled.weight_memory_bytes),
            float_weight_memory_bytes=float_bytes, compile_seconds=float(compiled.compile_seconds or 0.0),
            graph_path=graph_path, model_dir=model_dir, save_error=save_error, top1_interval=interval,
            drawing_error=drawing_error,
        ))
        # Written after every target: an interrupted demo keeps what it measured.
        write_text(out / "report.md", _markdown_report(results, reports, n_calib, n_heldout))
    return results
