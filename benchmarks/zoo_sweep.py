"""The timm zoo as a test bed: capture, BatchNorm folding and a full npu-int8 compile of models
nobody here wrote (python benchmarks/zoo_sweep.py [--quick] [--out FILE]).

For every timm architecture (or a seeded sample of them, `--sample N`) with at most
`--max-params` parameters: build it with random weights, set its BatchNorm statistics from
random inputs (train-mode passes, so activations have a realistic spread instead of the
identity statistics of a fresh model), then

1. capture, canonicalize and fold_bn: the folded graph must reproduce the float model
   (largest difference at most 1e-4 of the output's range, both run in float64);
2. a full `qcompile(..., target="npu-int8")` with a short calibration (4 random batches) and a
   2-step AdaRound (the sweep checks that every pass runs on the graph, not accuracy): the
   compiled output must be finite, and its SQNR against float is recorded.

A model passes when both hold. Failures are tabulated by error class (the exception type and
the pass it came from). Models whose float forward fails at the sweep's input size are built at
their own default size; models that fail even in float are listed apart and not counted.

The models are independent, so `--executor ray` runs them as Ray tasks (one CPU and one torch
thread each; a local Ray instance, or the cluster named by RAY_ADDRESS). `--log FILE` appends
each model's row as one JSON line as it finishes and `--resume` skips the models already in it,
so a sweep that lasts hours survives an interruption; `--retry-timeouts` runs the models it
lists as timed out again (the timeout is wall time: a starved worker times out).
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import gc
import json
import math
import os
import random
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass

import torch
from torch import nn

import qcompiler
from qcompiler.context import CompileContext
from qcompiler.errors import CaptureError
from qcompiler.mixed_precision import output_sqnr_db
from qcompiler.pass_manager import PassManager

from common import emit, header, out_path, parser, pipeline

FOLD_TOLERANCE = 1e-4      # of the float output's range
CALIB_BATCHES = 4
BATCH = 2


@dataclass
class Row:
    name: str
    params_m: float
    size: int
    status: str               # "ok", "capture", "fold", "compile", "float", "timeout"
    error: str = ""
    fold_err: float = float("nan")
    sqnr_db: float = float("nan")
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "ok"


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


def candidates(max_params: float, sample: int | None, seed: int, names: list[str] | None) -> list[str]:
    if names:
        return names
    import timm

    every = sorted(timm.list_models())
    if sample is not None:
        every = sorted(random.Random(seed).sample(every, min(sample, len(every))))
    return every


def parameter_count(name: str) -> float:
    """Millions of parameters, counted on the meta device (nothing allocated)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return sum(p.numel() for p in model.parameters()) / 1e6


def build(name: str, size: int) -> tuple[nn.Module, int]:
    """A timm model with random weights at `size` if it runs there, else at its default size."""
    import timm

    torch.manual_seed(0)
    try:
        model = timm.create_model(name, pretrained=False, img_size=size)
    except TypeError:
        model = timm.create_model(name, pretrained=False)
    model.eval()
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, size, size))
        return model, size
    except Exception:
        default = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        with torch.no_grad():
            model(torch.randn(1, 3, default, default))
        return model, default


def set_batch_norm_statistics(model: nn.Module, size: int) -> None:
    """Running statistics of random inputs: two train-mode passes with a cumulative average."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = None
        m.reset_running_stats()
    if not norms:
        return
    model.train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, size, size, generator=g))
    model.eval()


def error_class(exc: BaseException) -> str:
    """The exception type and the innermost qcompiler frame it came from."""
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if "/qcompiler/" in frame.filename or "/passes/" in frame.filename:
            where = f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.name}"
    message = str(exc).strip().splitlines()[0][:140] if str(exc).strip() else ""
    return f"{type(exc).__name__}" + (f" in {where}" if where else "") + (f": {message}" if message else "")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    span = float(b.max() - b.min()) or 1.0
    return float((a - b).abs().max()) / span


def fold_error(folded: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    """Largest difference between the folded graph and the model, relative to the output's
    range, both run in float64 (on copies): what folding changes, not float32's rounding,
    which reaches 1e-4 of the range on the deepest random networks."""
    with torch.no_grad():
        try:
            a = copy.deepcopy(folded).double()(x.double())
            b = copy.deepcopy(model).double()(x.double())
        except Exception:          # a model that only runs in float32
            a, b = folded(x), model(x)
        return relative_error(a.float(), b.float())


def sweep_one(name: str, size: int, max_params: float, seconds: int) -> Row | None:
    start = time.perf_counter()
    signal.alarm(seconds)
    row = Row(name, float("nan"), size, "float")
    try:
        try:
            row.params_m = parameter_count(name)
            if row.params_m > max_params:
                return None

            model, row.size = build(name, size)
        except Timeout:
            raise
        except Exception as exc:  # the model itself does not run: not counted
            row.error = error_class(exc)
            return row
        set_batch_norm_statistics(model, row.size)
        g = torch.Generator().manual_seed(2)
        x = torch.randn(BATCH, 3, row.size, row.size, generator=g)
        calib = [torch.randn(BATCH, 3, row.size, row.size, generator=g) for _ in range(CALIB_BATCHES)]
        with torch.no_grad():
            ref = model(x)
        row.status = "fold"
        try:
            ctx = CompileContext(model=model, example_inputs=(x,))
            folded = PassManager(["capture", "canonicalize", "fold_bn"]).run(model, ctx=ctx).gm
            row.fold_err = fold_error(folded, model, x)
            if not row.fold_err <= FOLD_TOLERANCE:
                row.error = f"fold_bn changed the output by {row.fold_err:.2e} of its range"
                return row
            row.status = "compile"
            compiled = qcompiler.qcompile(model, x, target="npu-int8", calib_data=calib, passes=PASSES,
                                          progress=False)
            with torch.no_grad():
                out = compiled(x)
            if not torch.isfinite(out).all():
                row.error = "non-finite compiled output"
                return row
            row.sqnr_db = output_sqnr_db(ref.double(), out.double())
            row.status = "ok"
        except Timeout:
            raise
        except Exception as exc:
            row.error = error_class(exc)
            if isinstance(exc, CaptureError):
                row.status = "capture"
        return row
    except Timeout:
        row.status, row.error = "timeout", f"over {seconds} s"
        return row
    finally:
        signal.alarm(0)
        row.seconds = time.perf_counter() - start
        gc.collect()


PASSES: list = pipeline(quick=True)    # AdaRound cut to 2 steps: the sweep tests the passes, not accuracy


def report(rows: list[Row], top: str, args) -> str:
    tried = [r for r in rows if r.status != "float"]
    passed = [r for r in tried if r.passed]
    lines = [top, ""]
    rate = 100 * len(passed) / max(1, len(tried))
    lines += [f"**{len(passed)} of {len(tried)} models passed ({rate:.1f} %)**; "
              f"{sum(r.status == 'float' for r in rows)} more did not run in float and are not counted. "
              f"Input {args.size}×{args.size} unless the model needs its own size; at most "
              f"{args.max_params:g} M parameters; timeout {args.timeout} s per model.", ""]
    classes = collections.Counter((r.status, r.error.split(":")[0]) for r in tried if not r.passed)
    if classes:
        lines += ["## Failures by class", "", "| stage | error class | models |", "|---|---|---|"]
        for (status, cls), n in classes.most_common():
            names = ", ".join(f"`{r.name}`" for r in tried if not r.passed and (r.status, r.error.split(":")[0]) == (status, cls))
            lines.append(f"| {status} | {cls} | {n}: {names} |")
        lines += ["", "## Failure messages", ""]
        lines += [f"- `{r.name}` ({r.status}): {r.error}" for r in tried if not r.passed]
        lines.append("")
    sqnrs = sorted(r.sqnr_db for r in passed if math.isfinite(r.sqnr_db))
    if sqnrs:
        q = lambda p: sqnrs[min(len(sqnrs) - 1, int(p * len(sqnrs)))]
        lines += [f"Compiled output SQNR against float over the {len(sqnrs)} passing models: "
                  f"median {q(0.5):.1f} dB, 10th percentile {q(0.1):.1f} dB, lowest {sqnrs[0]:.1f} dB. With random "
                  "weights and noise inputs this guards against broken passes; it is not an accuracy figure "
                  "(a deep random network amplifies every layer's rounding noise).", ""]
    lines += ["## Every model", "", "| model | params (M) | input | result | fold_bn error | SQNR (dB) | seconds |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        result = "ok" if r.passed else f"{r.status}: {r.error[:80]}"
        lines.append(f"| `{r.name}` | {r.params_m:.1f} | {r.size} | {result} | {r.fold_err:.1e} | "
                     f"{r.sqnr_db:.1f} | {r.seconds:.1f} |")
    return "\n".join(lines)


def _sweep_task(name: str, size: int, max_params: float, seconds: int) -> Row | None:
    """One model in a Ray worker: its own timeout alarm (tasks run on the worker's main thread)."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    warnings.filterwarnings("ignore")
    return sweep_one(name, size, max_params, seconds)


def run_rows(names: list[str], args, done: dict[str, Row | None]):
    """(name, row) for every name not in `done`, here or on Ray, as each model finishes."""
    todo = [n for n in names if n not in done]
    if args.executor == "local":
        for name in todo:
            yield name, sweep_one(name, args.size, args.max_params, args.timeout)
        return
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    task = ray.remote(num_cpus=1, max_retries=0)(_sweep_task)
    pending = {task.remote(n, args.size, args.max_params, args.timeout): n for n in todo}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(ready[0])
        try:
            yield name, ray.get(ready[0])
        except Exception as exc:    # the worker died (out of memory, a crash in native code)
            yield name, Row(name, float("nan"), args.size, "compile", f"worker lost: {type(exc).__name__}")


def read_log(path: str | None) -> dict[str, Row | None]:
    """name -> row (None: over the parameter limit) from a log written by an earlier run."""
    if not path or not os.path.exists(path):
        return {}
    done = {}
    with open(path) as f:
        for line in f:
            item = json.loads(line)
            done[item["name"]] = Row(**item["row"]) if item["row"] else None
    return done


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser(__file__, __doc__.splitlines()[0])
    ap.add_argument("--max-params", type=float, default=30.0, help="in millions (default 30)")
    ap.add_argument("--size", type=int, default=96, help="input side (default 96)")
    ap.add_argument("--sample", type=int, default=None, help="a seeded random sample of this many names")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="", help="comma-separated timm names instead of the zoo")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per model")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    ap.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="ray: one task per model on a local Ray instance or RAY_ADDRESS's cluster")
    ap.add_argument("--log", default=None, help="append every model's row here as a JSON line")
    ap.add_argument("--resume", action="store_true", help="skip the models already in --log")
    ap.add_argument("--retry-timeouts", action="store_true",
                    help="with --resume: run again the models the log lists as timed out")
    args = ap.parse_args(argv)
    if args.quick:
        args.models = args.models or "resnet10t,mobilenetv3_small_050"
    if args.threads:
        torch.set_num_threads(args.threads)
    signal.signal(signal.SIGALRM, _alarm)
    warnings.filterwarnings("ignore")
    # The header (commit, load) is taken before the run, which can last hours.
    top = header("timm zoo sweep: capture, fold_bn and an npu-int8 compile", __file__, argv, passes=None,
                 notes=[__doc__.split("\n\n", 1)[1].strip()])
    names = candidates(args.max_params, args.sample, args.seed, [m for m in args.models.split(",") if m])
    done = read_log(args.log) if args.resume else {}
    if args.retry_timeouts:
        done = {n: r for n, r in done.items() if r is None or r.status != "timeout"}
    from_log = {n for n, r in done.items() if r is not None}
    log = open(args.log, "a" if args.resume else "w") if args.log else None
    for name, row in run_rows(names, args, done):
        done[name] = row
        if log:
            log.write(json.dumps({"name": name, "row": dataclasses.asdict(row) if row else None}) + "\n")
            log.flush()
        if row is not None:
            print(f"{row.name:45s} {row.status:8s} {row.seconds:6.1f}s {row.error[:100]}", file=sys.stderr, flush=True)
    rows = [done[n] for n in names if done.get(n) is not None]
    if from_log:
        top += (f"\n\nResumed from `{args.log}`: {len(from_log & {r.name for r in rows})} of the {len(rows)} models "
                "below were measured by the earlier run(s) that wrote it, the rest by this one.")
    emit(report(rows, top, args), out_path(__file__, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
