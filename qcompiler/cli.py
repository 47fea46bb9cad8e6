"""The `qcompile` command line (also `python -m qcompiler`).

Each subcommand is a function `add_<name>(subparsers)` that adds its parser and sets a
`handler(args) -> int` default; `SUBCOMMANDS` lists them, so a new subcommand (compile, report,
demo) is one such function and one entry. `main` turns every `QCompileError` into a one-line
(or one-block) message on stderr and exit code 1: users see what is wrong, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from .errors import QCompileError


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


# Every subcommand, in the order `qcompile --help` lists them.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_targets]


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
        return handler(args)
    except QCompileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
