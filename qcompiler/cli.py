"""The `qcompile` command line (also `python -m qcompiler`).

Each subcommand is a function `add_<name>(subparsers)` that adds its parser and sets a
`handler(args) -> int` default; `SUBCOMMANDS` lists them, so a new subcommand is one such
function and one entry. `main` turns every `QCompileError` into a one-line (or one-block)
`error: ...` message on stderr, never a traceback, and Python warnings into `warning: ...` lines.
The exit code of an error is 1 for `targets` (a spec that fails validation) and 2 for
`compile`, `report` and `demo` (a subcommand sets its own with the `error_exit` default).
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .errors import BudgetError, CalibrationError, QCompileError
from .executor import EXECUTORS
from .options import EFFORTS, RECONSTRUCTIONS, SENSITIVITY_METHODS
from .outputs import prepare_output_dir, write_text


class CommandLineError(QCompileError):
    """A command-line argument is malformed or names something that cannot be used."""


def _targets_list(args: argparse.Namespace) -> int:
    from .targets import list_targets, load_target

    names = list_targets()
    width = max(map(len, names), default=0)
    for name in names:
        print(f"{name:<{width}}  {load_target(name).description}")
    return 0


def _targets_show(args: argparse.Namespace) -> int:
    from .targets import load_target

    print(render_target(load_target(args.target)))
    return 0


def _targets_validate(args: argparse.Namespace) -> int:
    from .targets import load_target

    status = 0
    for path in args.files:
        try:
            spec = load_target(path if path.endswith(".toml") or "/" in path else f"./{path}")
        except QCompileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"OK: {path}: {spec.name} {spec.version} ({len(spec.formats)} formats, "
              f"{len(spec.ops)} op kinds)")
    return status


def _targets_schema(args: argparse.Namespace) -> int:
    from .targets import json_schema, schema_markdown

    if args.markdown:
        sys.stdout.write(schema_markdown())
    else:
        print(json.dumps(json_schema(), indent=2))
    return 0


def render_target(spec) -> str:  # spec: qcompiler.targets.TargetSpec
    """A readable summary of a target: formats, per-op table, rules and cost formulas."""
    from .targets import describe_format

    lines = [f"{spec.name} {spec.version}: {spec.description}", f"source: {spec.source}"]
    if spec.observer:
        lines.append(f"observer: {spec.observer}")
    lines += ["", "formats:"]
    width = max(map(len, spec.formats), default=0)
    lines += [f"  {n:<{width}}  {describe_format(f)}" for n, f in spec.formats.items()]

    def cell(names: tuple[str, ...], default: str | None) -> str:
        return ", ".join(n + ("*" if n == default and len(names) > 1 else "") for n in names) or "-"

    rows = [("op kind", "weights", "inputs", "outputs", "acc bits")]
    for kind, rule in spec.ops.items():
        rows.append((kind, cell(rule.weights, rule.default_weights),
                     cell(rule.inputs, rule.default_inputs), cell(rule.outputs, rule.default_outputs),
                     str(rule.accumulator_bits)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines += ["", "ops (* marks the default where there is a choice):"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += ["", "fusions:" if spec.fusions else "fusions: none"]
    lines += [f"  {' + '.join(p)}" for p in spec.fusions]
    lines += ["", f"shared scale: {', '.join(spec.shared_scale) or 'none'}",
              f"pass-through: {', '.join(spec.pass_through) or 'none'}"]
    lines.append("couplings:" if spec.couplings else "couplings: none")
    for c in spec.couplings:
        if c.kind == "equal_bits":
            lines.append(f"  equal bits for the inputs of {', '.join(c.ops)}")
        elif c.kind == "requires":
            scope = ", ".join(c.ops) if c.ops else "any op with weights"
            lines.append(f"  {scope}: weights of <= {c.if_weight_bits_at_most} bits require "
                         f"{c.then_activation_bits}-bit activations")
        else:
            lines.append(f"  {c.where} layer: at least {c.bits} bits ({c.tensors})")
    rq = spec.requant
    mult = f", {rq.multiplier_bits}-bit multiplier" if rq.multiplier_bits else ""
    lines += [f"requant: {rq.mode}{mult}, rounding {rq.rounding}",
              f"unsupported ops: {'run in float on the host' if spec.unsupported.action == 'host' else 'refused'}"]
    for metric, f in spec.unsupported.host_cost.items():
        lines.append(f"  host {metric} = {f.text}")
    lines += ["", "cost:" if spec.cost else "cost: none"]
    width = max(map(len, spec.cost), default=0)
    lines += [f"  {m:<{width}} = {f.text}" for m, f in spec.cost.items()]
    return "\n".join(lines)


def add_targets(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("targets", help="list, show, validate target specs",
                              description="Without a subcommand: list the built-in targets.")
    p.set_defaults(handler=_targets_list)
    sub = p.add_subparsers(dest="targets_command", metavar="{list,show,validate,schema}")
    sub.add_parser("list", help="the built-in targets with their descriptions").set_defaults(
        handler=_targets_list)
    show = sub.add_parser("show", help="a readable summary of one target")
    show.add_argument("target", help="a built-in name (npu-int4) or a path to a .toml spec")
    show.set_defaults(handler=_targets_show)
    validate = sub.add_parser("validate", help="check spec files; exit code 1 if any is invalid")
    validate.add_argument("files", nargs="+", metavar="FILE", help="a .toml target spec")
    validate.set_defaults(handler=_targets_validate)
    schema = sub.add_parser("schema", help="print the JSON Schema of target specs")
    schema.add_argument("--markdown", action="store_true",
                        help="print the Markdown key reference (docs/target-spec.md) instead")
    schema.set_defaults(handler=_targets_schema)


# ---------------------------------------------------------------------------------------------
# qcompile compile
# ---------------------------------------------------------------------------------------------

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)
CALIB_BATCH = 32
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_FACTORY_SYNTAX = re.compile(rf"({_DOTTED}):({_DOTTED})")
_BUDGET_SYNTAX = re.compile(r"\s*([A-Za-z_]\w*)\s*=(.*)")


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    # `python -m` puts the working directory on sys.path but the `qcompile` console script does
    # not; a user's model.py next to them must import either way.
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def load_factory(text: str) -> Callable[..., Any]:
    """Import `package.module:attr.path` and return the object it names (checked callable)."""
    match = _FACTORY_SYNTAX.fullmatch(text.strip())
    if match is None:
        raise CommandLineError(
            f"model {text!r} is not of the form MODULE:FACTORY; give an importable module and a "
            "callable in it that returns an nn.Module, e.g. torchvision.models:resnet18 or "
            "my_models:build_net")
    module_name, attr_path = match.groups()
    try:
        with _cwd_importable():
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or "?"
        if module_name == missing or module_name.startswith(missing + "."):
            raise CommandLineError(
                f"cannot import module {module_name!r} (from {text!r}): there is no module named "
                f"{missing!r}; check the spelling, install the package, or run qcompile from the "
                "directory that contains the module") from None
        raise CommandLineError(
            f"importing module {module_name!r} failed: it imports {missing!r}, which is not "
            "installed; install it and retry") from None
    except QCompileError:
        raise
    except Exception as exc:  # the user's module code: any error is theirs to fix, not a crash of ours
        raise CommandLineError(
            f"importing module {module_name!r} raised {type(exc).__name__}: {exc}; fix the module "
            "(running `python -c \"import " + module_name + "\"` shows the full traceback)") from None
    obj: Any = module
    parts = attr_path.split(".")
    for i, part in enumerate(parts):
        if not hasattr(obj, part):
            owner = module_name if i == 0 else f"{module_name}:{'.'.join(parts[:i])}"
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise CommandLineError(f"{owner!r} has no attribute {part!r} (from {text!r}){hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CommandLineError(
            f"{text!r} is not callable (it is of type {type(obj).__name__}); name a function or class that "
            "returns an nn.Module when called without arguments")
    return obj


def build_model(text: str) -> Any:
    """Call the factory named by MODULE:FACTORY and return its nn.Module in eval mode."""
    from torch import nn

    factory = load_factory(text)
    try:
        with _cwd_importable():
            model = factory()
    except QCompileError:
        raise
    except Exception as exc:  # the user's factory
        raise CommandLineError(
            f"calling {text}() raised {type(exc).__name__}: {exc}; the factory must build the model "
            "without arguments (wrap it in a function that passes them)") from None
    if not isinstance(model, nn.Module):
        raise CommandLineError(
            f"{text}() returned a {type(model).__name__}, not a torch.nn.Module; the factory must "
            "return the model itself")
    return model.eval()


def parse_input_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' -> (1, 3, 224, 224); every entry a positive integer."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(re.fullmatch(r"\d+", p) and int(p) > 0 for p in parts):
        raise CommandLineError(
            f"--input-shape {text!r} is not a shape; give comma-separated positive integers, batch "
            "first, e.g. --input-shape 1,3,224,224")
    return tuple(int(p) for p in parts)


def parse_budget(text: str) -> tuple[str, float]:
    """'weight_memory=1.5MiB' -> ('weight_memory', 1572864.0); '0.5' stays 0.5 and '60%' is 0.6
    (fractions of the spec-default model). The value syntax is qcompiler.allocation's."""
    from .allocation import BYTE_UNITS, read_budget_value

    match = _BUDGET_SYNTAX.fullmatch(text)
    if match is None or not match.group(2).strip():
        raise BudgetError(
            f"--budget {text!r} is not of the form METRIC=VALUE[UNIT]; e.g. "
            "--budget weight_memory=1.5MiB, --budget bops=0.5 or --budget bops=60% (units: "
            "B, KB, KiB, MB, MiB, GB, GiB, %)")
    metric, value = match.group(1), match.group(2).strip()
    number, unit = read_budget_value(metric, value)
    return metric, number / 100 if unit == "%" else number * BYTE_UNITS.get(unit, 1)


def _number(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise CommandLineError(f"--target-quality {key}={value!r}: give a number") from None


def parse_target_quality(text: str | None) -> dict[str, Any] | None:
    """--target-quality "sqnr_db=25" or "top1_agreement=0.95,cost=bops" -> the dict qcompile takes."""
    if text is None:
        return None
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise CommandLineError(f"--target-quality {text!r}: {part!r} is not KEY=VALUE; e.g. "
                                   "--target-quality sqnr_db=25 or --target-quality top1_agreement=0.95,cost=bops")
        key, value = key.strip(), value.strip()
        out[key] = value if key == "cost" else _number(key, value)
    return out


def parse_budgets(texts: Sequence[str] | None) -> dict[str, str]:
    """Repeated and/or comma-separated --budget values -> {metric: value text}; each metric once.

    The value keeps its text ("1B", "1.5MiB", "0.5"): with a unit it is absolute, without one a
    number in (0, 1] is a fraction of the spec-default model's value.
    """
    budget: dict[str, str] = {}
    for text in texts or ():
        for part in text.split(","):
            if not part.strip():
                continue
            metric, _ = parse_budget(part)  # checks the syntax and the unit
            if metric in budget:
                raise BudgetError(f"--budget {metric} is given twice; give each metric once")
            budget[metric] = part.split("=", 1)[1].strip()
    return budget


def load_calib(path: str) -> Any:
    """The calibration tensor [N, ...] saved with torch.save at `path`, checked finite."""
    import torch

    if not os.path.isfile(path):
        raise CalibrationError(f"calibration file {path!r} does not exist; save a tensor [N, ...] "
                               "with torch.save(x, path) and pass that path to --calib")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or corrupt files
        raise CalibrationError(f"cannot read calibration file {path!r}: {type(exc).__name__}: {exc}; "
                               "it must be a tensor saved with torch.save") from None
    if not isinstance(data, torch.Tensor):
        raise CalibrationError(f"calibration file {path!r} holds a {type(data).__name__}, not a tensor; "
                               "save a single tensor [N, ...] of N samples with torch.save")
    if data.ndim < 1 or data.shape[0] == 0:
        raise CalibrationError(f"calibration file {path!r} holds a tensor of shape {tuple(data.shape)}; "
                               "it needs a batch dimension with at least one sample: [N, ...]")
    if not data.is_floating_point():
        data = data.float()
    bad = int((~torch.isfinite(data)).sum())
    if bad:
        raise CalibrationError(
            f"calibration file {path!r} contains {bad} NaN or Inf value(s) out of {data.numel()}; "
            "clean the data (e.g. torch.nan_to_num) or drop those samples")
    return data


def _check_out_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise CommandLineError(f"--out {str(path)!r} is a file; give a directory (it is created if missing)")


def prepare_out_dir(path: Path) -> None:
    """The output directory, created and checked before the long computation (`outputs`)."""
    prepare_output_dir(path, "--out")


def _human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def compile_report_markdown(compiled: Any) -> str:
    """The compiled model's report, then the compile time and the time of every pass."""
    timings = compiled.timings
    lines = [compiled.report().to_markdown(), "## Compile time", "",
             f"Total: {compiled.compile_seconds:.2f} s", "", "| pass | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.3f} |" for stage, seconds in timings.items()]
    return "\n".join(lines) + "\n"


def write_compile_outputs(compiled: Any, out: Path) -> tuple[list[str], str | None]:
    """Write the report, the saved model and both drawings into `out`; returns what was written
    and, when no renderer could draw the graphs, one line on how to get the pictures.

    Every output is attempted even if an earlier one fails (a model the artifact format cannot
    hold still gets its report and drawings); the failures are raised together at the end. A
    drawing nothing here can render is written as its DOT source (graph.dot), which is no failure.
    """
    from .drawing import DrawingUnavailable, undrawn_note

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QCompileError(f"cannot create the output directory {out}: {exc.strerror or exc}") from None
    steps: list[tuple[str, Callable[[Path], str]]] = [
        ("report.md", lambda p: write_text(p, compile_report_markdown(compiled))),
        ("model", lambda p: compiled.save(str(p)) + os.sep),
        ("graph.svg", lambda p: compiled.render(str(p), colour_by="format")),
        ("graph_groups.svg", lambda p: compiled.render(str(p), stage="group_quantizers", colour_by="group")),
    ]
    written, failed, undrawn = [], [], []
    for name, write in steps:
        try:
            written.append(write(out / name))
        except DrawingUnavailable as exc:
            written.append(exc.dot_path)
            undrawn.append(exc)
        except QCompileError as exc:
            failed.append(f"{out / name}: {exc}")
    if failed:
        done = f"; written: {', '.join(written)}" if written else ""
        raise QCompileError("could not write every output:\n  " + "\n  ".join(failed) + done)
    note = undrawn_note([(e.dot_path, e.path) for e in undrawn], undrawn[0].reason) if undrawn else None
    return written, note


def _compile(args: argparse.Namespace) -> int:
    import torch

    from .api import qcompile
    from .drawing import check_drawing
    from .targets import load_target

    budget = parse_budgets(args.budget)
    shape = parse_input_shape(args.input_shape) if args.input_shape is not None else None
    spec = load_target(args.target)
    unknown = [m for m in budget if m not in spec.cost]
    if unknown:
        raise BudgetError(f"--budget {unknown[0]}: target {spec.name!r} has no cost metric {unknown[0]!r}; "
                          f"its metrics are {', '.join(spec.cost) or 'none'}")
    quality = parse_target_quality(args.target_quality)
    if quality is not None:
        from .quality_search import read_quality_target
        if budget:
            raise CommandLineError("give either --budget or --target-quality, not both")
        read_quality_target(quality, spec)
    validation = load_calib(args.validation) if args.validation is not None else None
    out = Path(args.out)
    _check_out_dir(out)

    model = build_model(args.model)
    if args.calib is not None:
        calib = load_calib(args.calib)
        if shape is not None and tuple(calib.shape[1:]) != shape[1:]:
            raise CommandLineError(
                f"--input-shape {args.input_shape} does not match the samples of {args.calib!r}, which "
                f"have shape {tuple(calib.shape[1:])}; drop --input-shape (the calibration data sets it)")
        example, batches = calib[:1], list(calib.split(CALIB_BATCH))
    else:
        shape = shape or DEFAULT_INPUT_SHAPE
        generator = torch.Generator().manual_seed(args.seed)
        example = torch.randn(shape, generator=generator)
        batches = [example]
        print(f"warning: no --calib given: calibrating on random normal data of shape {list(shape)}; "
              "the quantization ranges it gives are meaningless for real inputs, so the compiled "
              "model only shows what the compiler does. Pass --calib FILE.pt (a tensor [N, ...] of "
              "real samples saved with torch.save) for a usable model.", file=sys.stderr)

    # What the outputs need, checked before the compile: a writable directory and a renderer.
    prepare_out_dir(out)
    drawing_problem = check_drawing("svg")
    if drawing_problem:
        print(f"warning: {drawing_problem}", file=sys.stderr)

    compiled = qcompile(model, example, target=spec, calib_data=batches, budget=budget or None,
                        observer=args.observer, progress=not args.no_progress, seed=args.seed,
                        sensitivity=args.sensitivity, reconstruction=args.reconstruction,
                        plan_check=False if args.no_plan_check else None, threads=args.threads,
                        validation_data=None if validation is None else list(validation.split(CALIB_BATCH)),
                        target_quality=quality, effort=args.effort, executor=args.executor)
    written, drawing_note = write_compile_outputs(compiled, out)
    if args.onnx:
        exported = compiled.export_onnx(str(out / "model.onnx"))
        written.append(exported.path)
        for note in exported.notes:
            print(f"note: ONNX export: {note}", file=sys.stderr)

    totals = compiled.report().totals
    float_bytes = sum(p.numel() for p in model.parameters()) * 4.0
    memory = compiled.weight_memory_bytes
    ratio = f", {float_bytes / memory:.1f}x smaller" if memory else ""
    print(f"compiled {args.model} for {spec.name} in {compiled.compile_seconds:.1f} s")
    print(f"  quantizer groups: {totals.get('quantizer_groups', len(compiled.plan.groups))} "
          f"(layers falling back to float: {totals.get('float_fallbacks', 0)})")
    print(f"  weight memory:    {_human_bytes(memory)} (float32: {_human_bytes(float_bytes)}{ratio})")
    print(f"  written:          {', '.join(written)}")
    print(f"  per-layer table:  qcompile report {out}")
    if drawing_note:
        print(f"note: {drawing_note}", file=sys.stderr)
    return 0


def add_executor_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="ray: run independent measurements as Ray tasks (a local Ray instance, or the cluster "
                        "RAY_ADDRESS names); the result is the same (default: local)")


def add_compile(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compile", help="quantize a model for a target and write the model, report and graphs",
        description="Import MODULE:FACTORY, call it to build the float model, compile it for the "
                    "target and write DIR/model/, DIR/report.md, DIR/graph.svg and DIR/graph_groups.svg "
                    "(and DIR/model.onnx with --onnx).")
    p.add_argument("model", metavar="MODULE:FACTORY",
                   help="an importable module and a callable in it returning an nn.Module, "
                        "e.g. torchvision.models:resnet18")
    p.add_argument("--target", required=True, help="a built-in target (see `qcompile targets`) or a .toml spec")
    p.add_argument("--calib", metavar="FILE.pt",
                   help="calibration samples: a tensor [N, ...] saved with torch.save (batches of 32)")
    p.add_argument("--input-shape", metavar="SHAPE",
                   help="shape of the random example input when there is no --calib "
                        f"(default {','.join(map(str, DEFAULT_INPUT_SHAPE))})")
    p.add_argument("--budget", action="append", metavar="METRIC=VALUE",
                   help="a cost budget such as weight_memory=1.5MiB or bops=0.5 (a number in (0, 1] is a "
                        "fraction of the spec-default model's value); repeatable or comma-separated")
    p.add_argument("--target-quality", metavar="METRIC=VALUE[,cost=METRIC]",
                   help="instead of a budget: the cheapest plan whose output meets sqnr_db=DB or "
                        "top1_agreement=FRACTION against float on --validation (else the calibration data)")
    p.add_argument("--validation", metavar="FILE.pt",
                   help="validation samples (a tensor [N, ...]) for the plan check and --target-quality")
    p.add_argument("--no-plan-check", action="store_true",
                   help="with a budget, keep the bit-allocation program's plan without comparing it to the "
                        "widest uniform plan that fits")
    p.add_argument("--sensitivity", choices=SENSITIVITY_METHODS,
                   help="how mixed precision measures each group's sensitivity (default sqnr)")
    p.add_argument("--reconstruction", choices=RECONSTRUCTIONS,
                   help="fit the rounding per layer (default), per block, or over the whole model")
    add_executor_option(p)
    p.add_argument("--effort", choices=EFFORTS, default="default",
                   help="fast: 64 calibration samples, a third of AdaRound's steps, no plan check; "
                        "best: three times the steps over twice the samples (default: default)")
    p.add_argument("--observer", help="observer for every activation (minmax, moving_average, "
                                      "percentile, mse, histogram); the target's default otherwise")
    p.add_argument("--seed", type=int, default=0, help="random seed of the compile (default 0)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads for the compile (default: the cores other processes leave free)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--onnx", action="store_true",
                   help="also write DIR/model.onnx, a QDQ model for ONNX Runtime (opset 21, dynamic batch)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.set_defaults(handler=_compile, error_exit=2)


# ---------------------------------------------------------------------------------------------
# qcompile report
# ---------------------------------------------------------------------------------------------

def saved_model_dir(path: Path) -> Path:
    """The saved model inside a `qcompile compile` output DIR (DIR/model), or DIR if it is one."""
    from .artifact import MODEL_FILE

    if not path.is_dir():
        raise CommandLineError(f"{str(path)!r} is not a directory; give the --out directory of a "
                               "`qcompile compile` run")
    for candidate in (path / "model", path):
        if (candidate / MODEL_FILE).is_file():
            return candidate
    raise CommandLineError(
        f"{str(path)!r} is not a compile output: it has no model/{MODEL_FILE}; give the --out "
        "directory of a `qcompile compile` run (or a directory written by CompiledModel.save)")


def _report(args: argparse.Namespace) -> int:
    from . import load

    directory = Path(args.dir)
    compiled = load(saved_model_dir(directory))
    report = compiled.report()
    print(report)
    if report.rows and all(math.isnan(r.sqnr_db) for r in report.rows):
        where = directory / "report.md"
        hint = f"; {where} has the values measured at compile time" if where.is_file() else ""
        print(f"\n(SQNR needs the float model and calibration data, which a saved model does not keep{hint})")
    return 0


def add_report(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="print the per-layer table of a compiled model",
                              description="Load DIR/model (written by `qcompile compile --out DIR`) "
                                          "and print its per-layer report.")
    p.add_argument("dir", metavar="DIR", help="the --out directory of a compile")
    p.set_defaults(handler=_report, error_exit=2)


# ---------------------------------------------------------------------------------------------
# qcompile demo
# ---------------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def _demo(args: argparse.Namespace) -> int:
    from .demo import DEFAULT_TARGETS, results_table, run_demo

    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else list(DEFAULT_TARGETS)
    if not targets:
        raise CommandLineError(f"--targets {args.targets!r} names no target; e.g. --targets npu-int8,npu-int4")
    results = run_demo(targets, args.calib, args.heldout, args.out, progress=not args.no_progress,
                       echo=lambda line: print(line, file=sys.stderr, flush=True))
    print(results_table(results))
    saved = [r.model_dir for r in results if r.model_dir]
    print(f"\nwritten: {Path(args.out) / 'report.md'}, {', '.join(r.graph_path for r in results)}"
          + (f", {', '.join(saved)}" if saved else ""))
    for r in results:
        if r.save_error:
            print(f"warning: the {r.target} model was not saved: {r.save_error}", file=sys.stderr)
    undrawn = [r for r in results if r.drawing_error]
    if undrawn:
        from .drawing import undrawn_note

        pairs = [(r.graph_path, str(Path(r.graph_path).with_suffix(".svg"))) for r in undrawn]
        print(f"note: {undrawn_note(pairs, undrawn[0].drawing_error)}", file=sys.stderr)
    return 0


def add_demo(subparsers: argparse._SubParsersAction) -> None:
    from .demo import DEFAULT_N_CALIB, DEFAULT_N_HELDOUT, DEFAULT_TARGETS

    p = subparsers.add_parser(
        "demo", help="compile pretrained EfficientNet-Lite0 for several targets and compare with float",
        description="Compile the pretrained EfficientNet-Lite0 for each target on offline sample "
                    "crops and measure agreement with the float model on held-out crops.")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help=f"comma-separated targets (default {','.join(DEFAULT_TARGETS)})")
    p.add_argument("--calib", type=_positive_int, default=DEFAULT_N_CALIB, metavar="N",
                   help=f"number of calibration crops (default {DEFAULT_N_CALIB})")
    p.add_argument("--heldout", type=_positive_int, default=DEFAULT_N_HELDOUT, metavar="N",
                   help=f"number of held-out crops to measure on (default {DEFAULT_N_HELDOUT})")
    p.add_argument("--out", default="./qcompile-out", metavar="DIR",
                   help="output directory (default ./qcompile-out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_demo, error_exit=2)


# ---------------------------------------------------------------------------------------------
# qcompile pareto
# ---------------------------------------------------------------------------------------------

def _pareto(args: argparse.Namespace) -> int:
    from .mixed_precision import pareto

    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    if not budgets:
        raise CommandLineError(f"--budgets {args.budgets!r} names no budget; e.g. --budgets 1.0,0.75,0.6")
    out = Path(args.out)
    _check_out_dir(out)
    _require_matplotlib()
    model = build_model(args.model)
    calib = load_calib(args.calib)
    batches = list(calib.split(CALIB_BATCH))
    evaluation = None
    if args.eval is not None:
        evaluation = list(load_calib(args.eval).split(CALIB_BATCH))
    prepare_out_dir(out)
    result = pareto(model, calib[:1], target=args.target, calib_data=batches, budgets=budgets,
                    eval_data=evaluation, metric=args.metric, sensitivity=args.sensitivity,
                    progress=not args.no_progress, seed=args.seed, executor=args.executor, effort=args.effort)
    out.mkdir(parents=True, exist_ok=True)
    table = result.to_markdown()
    write_text(out / "pareto.md", table)
    result.plot(str(out / "pareto.png"))
    print(table)
    print(f"written: {out / 'pareto.md'}, {out / 'pareto.png'}")
    return 0


def _require_matplotlib() -> None:
    # pareto.png is drawn after minutes of sensitivity measurement: know first that it can be.
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise CommandLineError(f"qcompile pareto draws pareto.png with matplotlib, which cannot be imported "
                               f"({exc}); pip install matplotlib") from None


def add_pareto(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pareto", help="mixed precision at several budgets from one sensitivity run; writes pareto.png",
        description="Import MODULE:FACTORY, calibrate and measure sensitivities once, solve the bit "
                    "allocation for every budget and write DIR/pareto.md and DIR/pareto.png.")
    p.add_argument("model", metavar="MODULE:FACTORY", help="an importable module and a model factory in it")
    p.add_argument("--target", required=True, help="a built-in target (see `qcompile targets`) or a .toml spec")
    p.add_argument("--calib", required=True, metavar="FILE.pt", help="calibration samples: a tensor [N, ...]")
    p.add_argument("--eval", metavar="FILE.pt", help="held-out samples for SQNR and top-1 agreement "
                                                     "(the calibration samples, SQNR only, if omitted)")
    p.add_argument("--budgets", required=True, metavar="B1,B2,...",
                   help="budgets of --metric: fractions of the spec-default model (0.75, 60%%) or values with units (1.5MiB)")
    p.add_argument("--metric", default="weight_memory", help="the budgeted cost metric (default weight_memory)")
    p.add_argument("--no-plan-check", action="store_true",
                   help="with a budget, keep the bit-allocation program's plan without comparing it to the "
                        "widest uniform plan that fits")
    p.add_argument("--sensitivity", choices=SENSITIVITY_METHODS, help="sensitivity method (default sqnr)")
    p.add_argument("--effort", choices=EFFORTS, default="default",
                   help="calibration samples and AdaRound steps of every plan's compile, as for compile")
    add_executor_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.set_defaults(handler=_pareto, error_exit=2)


# Every subcommand, in the order `qcompile --help` lists them.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_compile, add_pareto, add_report, add_demo, add_targets]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcompile", description="qcompiler: quantize PyTorch models for edge accelerators.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return handler(args)
    except QCompileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(args, "error_exit", 1)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    # Users of the command line want the message, not the library line that issued it.
    print(f"warning: {message}", file=sys.stderr)
