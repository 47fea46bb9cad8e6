"""Target specs: load a TOML file into a validated, immutable `TargetSpec`.

A spec is data. `tomllib` (`tomli` before Python 3.11) parses it, `schema.check` validates its
shape against the one schema declaration, and this module checks what relates keys to each
other (an op naming an undefined format, a default not in its list, a rule that contradicts
another), builds the format dataclasses of `qcompiler.formats` and parses cost formulas with the
whitelisted grammar of `targets.formulas`. Every mistake becomes a `SpecError` naming the file
and the key path.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Iterable, Mapping, Union

from qcompiler.errors import SpecError
from qcompiler.formats import FloatFormat, Format, HostFloat, IntFormat, LUTFormat, NF4Format
from qcompiler.opkinds import META, OPAQUE, WEIGHTED

from . import schema
from .formulas import Formula, FormulaError, parse_formula
from .schema import Path as KeyPath
from .schema import Problem, format_path, suggest

# tomllib joined the standard library in Python 3.11; tomli is the same parser, published on
# PyPI for 3.10 (a dependency there, see pyproject.toml).
try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib

BUILTIN_DIR = Path(__file__).resolve().parent
ROLES = ("weights", "inputs", "outputs")
MAX_SPEC_BYTES = 1 << 20
# Op kinds that are not kernels: the compiler never asks the chip to run them.
_NOT_KERNELS = META + OPAQUE


# ---------------------------------------------------------------------------------------------
# The spec objects
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpRule:
    """What the hardware accepts for one op kind: candidate formats per role, and defaults.

    `default_*` is the format used when nothing asks for another; it is always one of the
    candidates (None only when that role has no candidates, e.g. weights of relu).
    """

    kind: str
    weights: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    default_weights: str | None
    default_inputs: str | None
    default_outputs: str | None
    accumulator_bits: int = 32
    bias_bits: int = 32

    def candidates(self, role: str) -> tuple[str, ...]:
        _check_role(role)
        return getattr(self, role)

    def default(self, role: str) -> str | None:
        _check_role(role)
        return getattr(self, f"default_{role}")


@dataclass(frozen=True)
class EqualBits:
    """The activation inputs of each op in `ops` have equal bit widths."""

    ops: tuple[str, ...]
    kind: ClassVar[str] = "equal_bits"


@dataclass(frozen=True)
class RequiresBits:
    """Weights of at most `if_weight_bits_at_most` bits need `then_activation_bits`-bit inputs.

    `ops` limits the rule to some op kinds with weights; empty means all of them.
    """

    if_weight_bits_at_most: int
    then_activation_bits: int
    ops: tuple[str, ...] = ()
    kind: ClassVar[str] = "requires"


@dataclass(frozen=True)
class MinBits:
    """The first or last op with weights (execution order), or the model's output tensors, keep
    at least `bits` bits."""

    where: str                       # "first" | "last" | "output"
    bits: int
    tensors: str = "all"             # "all" | "weights" | "activations"
    kind: ClassVar[str] = "min_bits"


Coupling = Union[EqualBits, RequiresBits, MinBits]


@dataclass(frozen=True)
class Requant:
    """How accumulators are rescaled to output codes (see schema.REQUANT_MODES, ROUNDINGS)."""

    mode: str = "float"
    multiplier_bits: int | None = None
    rounding: str = "half_even"


@dataclass(frozen=True)
class Unsupported:
    """What happens to op kinds the chip lacks; `host_cost` overrides per metric for host ops."""

    action: str = "refuse"
    host_cost: Mapping[str, Formula] = field(default_factory=lambda: MappingProxyType({}))

    def __reduce__(self) -> tuple:
        return _reduce_proxied(self)

    def __hash__(self) -> int:
        return hash((self.action, tuple(self.host_cost.items())))


@dataclass(frozen=True)
class TargetSpec:
    """A validated hardware target. Immutable; `text` is the TOML it was loaded from."""

    name: str
    version: str
    description: str
    source: str
    formats: Mapping[str, Format]
    ops: Mapping[str, OpRule]
    fusions: tuple[tuple[str, ...], ...]
    shared_scale: tuple[str, ...]
    pass_through: tuple[str, ...]
    couplings: tuple[Coupling, ...]
    requant: Requant
    unsupported: Unsupported
    cost: Mapping[str, Formula]
    observer: str | None = None
    channel_gains: tuple[str, ...] = ()
    reconstruction: str | None = None
    text: str = field(default="", repr=False, compare=False)

    def __repr__(self) -> str:
        return (f"TargetSpec({self.name!r}, version={self.version!r}, {len(self.formats)} formats, "
                f"{len(self.ops)} op kinds, source={self.source!r})")

    def __reduce__(self) -> tuple:
        return _reduce_proxied(self)

    def __hash__(self) -> int:
        # Equal specs agree on these; the mappings themselves are not hashable.
        return hash((self.name, self.version, self.source))

    def op_rule(self, kind: str) -> OpRule | None:
        """The rule for `kind`, or None when the chip has no kernel for it."""
        return self.ops.get(kind)

    def format(self, name: str) -> Format:
        """The format the spec defines as `name`."""
        try:
            return self.formats[name]
        except KeyError:
            raise SpecError(f"{self.source}: target {self.name!r} defines no format {name!r}"
                            f"{suggest(name, self.formats)}; it defines {', '.join(self.formats)}") from None

    def supports(self, kind: str) -> bool:
        """True if the chip runs `kind`: it has an `[ops]` rule or passes its quantizer through."""
        return kind in self.ops or kind in self.pass_through

    def candidates(self, kind: str, role: str) -> tuple[Format, ...]:
        """The formats `kind` accepts for `role` ("weights", "inputs", "outputs"); () if none."""
        _check_role(role)
        rule = self.ops.get(kind)
        return () if rule is None else tuple(self.formats[n] for n in rule.candidates(role))

    def default_format(self, kind: str, role: str) -> Format | None:
        _check_role(role)
        rule = self.ops.get(kind)
        name = None if rule is None else rule.default(role)
        return None if name is None else self.formats[name]

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(self.cost)

    def cost_of(self, metric: str, on_host: bool = False, **values: float) -> float:
        """One node's cost for `metric`, given the per-node variables of `formulas.VARIABLES`.

        For a node that runs on the host (`on_host`), `[unsupported.host_cost]` decides if it
        names the metric; otherwise the `[cost]` formula is evaluated as float32 runs it: inputs
        and outputs at 32 bits, weights at 32 bits if the node has parameters, no stored scales.
        """
        if metric not in self.cost:
            raise SpecError(f"{self.source}: target {self.name!r} has no cost metric {metric!r}"
                            f"{suggest(metric, self.cost)}; its metrics are "
                            f"{', '.join(self.cost) or 'none (add a [cost] table)'}")
        if on_host:
            if metric in self.unsupported.host_cost:
                return self.unsupported.host_cost[metric].evaluate(**values)
            values = {**values, "a_bits": 32, "out_bits": 32, "w_scales": 0,
                      "w_bits": 32 if values.get("params") else 0}
        return self.cost[metric].evaluate(**values)


def _reduce_proxied(obj: Any) -> tuple:
    """Pickle support for the frozen spec dataclasses (Ray moves specs between processes): their
    read-only mappings travel as plain dicts and are wrapped again on arrival."""
    values = {f.name: getattr(obj, f.name) for f in fields(obj)}
    proxied = tuple(k for k, v in values.items() if isinstance(v, MappingProxyType))
    return _rebuild_proxied, (type(obj), {k: dict(v) if k in proxied else v for k, v in values.items()}, proxied)


def _rebuild_proxied(cls: type, values: dict[str, Any], proxied: tuple[str, ...]) -> Any:
    return cls(**{k: MappingProxyType(v) if k in proxied else v for k, v in values.items()})


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def list_targets() -> list[str]:
    """Names of the built-in targets (the *.toml files shipped in this package)."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def load_target(name_or_path: str | Path | TargetSpec) -> TargetSpec:
    """A built-in target by name (`"npu-int4"`) or a spec file by path (`"my-chip.toml"`)."""
    if isinstance(name_or_path, TargetSpec):
        return name_or_path
    if not isinstance(name_or_path, (str, Path)):
        raise SpecError(f"a target is a built-in name or a path to a .toml file, got "
                        f"{type(name_or_path).__name__}")
    text = str(name_or_path)
    looks_like_path = (isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text
                       or "\\" in text)
    if not looks_like_path and text in list_targets():
        return _load_builtin(text)
    if looks_like_path or Path(text).is_file():
        path = Path(text)
        if not path.is_file() and path.stem in list_targets() and path.suffix == ".toml":
            raise SpecError(f"{path}: no such target spec file; for the built-in target write "
                            f"{path.stem!r} without .toml")
        return _load_file(path)
    known = list_targets()
    raise SpecError(f"unknown target {text!r}{suggest(text, known)}; built-in targets are "
                    f"{', '.join(known)}, or give the path to a .toml spec file")


def loads_target(text: str, source: str = "<string>") -> TargetSpec:
    """Parse and validate spec text; `source` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{source}: not valid TOML: {exc}") from None
    checked, problems = schema.check(data)
    if problems:
        raise _spec_error(source, problems)
    builder = _Builder(checked)
    spec = builder.build(source, text)
    if builder.problems:
        raise _spec_error(source, builder.problems)
    return spec


@functools.lru_cache(maxsize=None)
def _load_builtin(name: str) -> TargetSpec:
    return _load_file(BUILTIN_DIR / f"{name}.toml")


def _load_file(path: Path) -> TargetSpec:
    if not path.is_file():
        raise SpecError(f"{path}: no such target spec file; built-in targets are "
                        f"{', '.join(list_targets())}")
    if path.stat().st_size > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: {path.stat().st_size} bytes is too large for a target spec "
                        f"(at most {MAX_SPEC_BYTES})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: a target spec must be UTF-8 text ({exc.reason} at byte "
                        f"{exc.start})") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the target spec: {exc.strerror or exc}") from None
    return loads_target(text, source=str(path))


def _spec_error(source: str, problems: list[Problem]) -> SpecError:
    lines = [f"{format_path(path)}: {message}" for path, message in problems]
    if len(lines) == 1:
        message = f"{source}: {lines[0]}"
    else:
        message = f"{source}: {len(lines)} problems in target spec:\n  " + "\n  ".join(lines)
    error = SpecError(message)
    # Each (key path, message) pair, for tools that point at keys (editors, the CLI).
    error.problems = tuple((format_path(p), m) for p, m in problems)  # type: ignore[attr-defined]
    return error


# ---------------------------------------------------------------------------------------------
# Cross-key checks and construction
# ---------------------------------------------------------------------------------------------

# TOML key -> dataclass field, where they differ; used to point a format's ValueError at a key.
_FORMAT_FIELD_KEYS = {"scale_kind": "scale"}


class _Builder:
    def __init__(self, data: dict[str, Any]):
        self.data = data
        self.problems: list[Problem] = []

    def problem(self, path: KeyPath, message: str) -> None:
        self.problems.append((path, message))

    def build(self, source: str, text: str) -> TargetSpec:
        d = self.data
        formats = self.formats(d["formats"])
        ops = self.ops(d["ops"], formats)
        fusions = self.fusions(d["fusions"])
        self.scale_rules(d["shared_scale"], d["pass_through"], ops)
        couplings = self.couplings(d["couplings"], ops, formats)
        requant = self.requant(d["requant"], formats, ops)
        cost = self.formulas(d["cost"], ("cost",))
        unsupported = self.unsupported(d["unsupported"], cost)
        return TargetSpec(
            name=d["name"], version=d["version"], description=d["description"], source=source,
            formats=MappingProxyType(formats), ops=MappingProxyType(ops), fusions=fusions,
            shared_scale=tuple(d["shared_scale"]), pass_through=tuple(d["pass_through"]),
            couplings=couplings, requant=requant, unsupported=unsupported,
            cost=MappingProxyType(cost), observer=d["observer"], channel_gains=tuple(d["channel_gains"]),
            reconstruction=d["reconstruction"], text=text,
        )

    # -- formats ------------------------------------------------------------------------------

    def formats(self, tables: dict[str, dict[str, Any]]) -> dict[str, Format]:
        out: dict[str, Format] = {}
        for name, t in tables.items():
            path = ("formats", name)
            try:
                out[name] = _make_format(t)
            except ValueError as exc:
                self.problem(path + (_field_in(str(exc), t),), f"impossible format: {exc}")
        return out

    # -- ops ----------------------------------------------------------------------------------

    def ops(self, rules: dict[str, dict[str, Any]], formats: dict[str, Format]) -> dict[str, OpRule]:
        out: dict[str, OpRule] = {}
        for kind, r in rules.items():
            path: KeyPath = ("ops", kind)
            if kind in _NOT_KERNELS:
                self.problem(path, f"{kind!r} is not a kernel the chip runs (graph inputs, "
                                   "outputs, constants and opaque modules); remove it")
                continue
            outputs_given = r["outputs"] is not None
            lists = {"weights": r["weights"], "inputs": r["inputs"],
                     "outputs": r["outputs"] if outputs_given else r["inputs"]}
            if kind in WEIGHTED and not lists["weights"]:
                self.problem(path + ("weights",), f"{kind} has weights: list the weight formats "
                                                  "it accepts, e.g. weights = [\"w8\"]")
            if kind not in WEIGHTED and lists["weights"]:
                self.problem(path + ("weights",), f"{kind} has no weights; remove `weights` "
                                                  f"(ops with weights: {', '.join(WEIGHTED)})")
            for role, names in lists.items():
                if role == "outputs" and not outputs_given:
                    continue  # already checked as inputs
                for i, name in enumerate(names):
                    self.format_ref(path + (role, i), name, formats, activation=role != "weights")
            defaults: dict[str, str | None] = {}
            for role in ROLES:
                explicit = r[f"default_{role}"]
                if explicit is None and role == "outputs" and not outputs_given:
                    explicit = r["default_inputs"]
                if explicit is not None and explicit not in lists[role]:
                    where = f"its {role} list {list(lists[role])}" if lists[role] else f"an empty {role} list"
                    self.problem(path + (f"default_{role}",),
                                 f"default {explicit!r} is not in {where}; add it there or pick one of them")
                defaults[role] = explicit if explicit is not None else (lists[role][0] if lists[role] else None)
            bias_bits = r["bias_bits"] if r["bias_bits"] is not None else min(32, r["accumulator_bits"])
            if bias_bits > r["accumulator_bits"]:
                self.problem(path + ("bias_bits",), f"a {bias_bits}-bit bias does not fit the "
                                                    f"{r['accumulator_bits']}-bit accumulator; lower "
                                                    "bias_bits or raise accumulator_bits")
            out[kind] = OpRule(
                kind=kind, weights=tuple(lists["weights"]), inputs=tuple(lists["inputs"]),
                outputs=tuple(lists["outputs"]), default_weights=defaults["weights"],
                default_inputs=defaults["inputs"], default_outputs=defaults["outputs"],
                accumulator_bits=r["accumulator_bits"], bias_bits=bias_bits,
            )
        return out

    def format_ref(self, path: KeyPath, name: str, formats: dict[str, Format], activation: bool) -> None:
        if name not in formats:
            if name not in self.data["formats"]:  # otherwise it is defined but already reported
                defined = ", ".join(self.data["formats"]) or "none"
                self.problem(path, f"undefined format {name!r}{suggest(name, formats)}; "
                                   f"define [formats.{name}] or use one of: {defined}")
            return
        fmt = formats[name]
        if activation and isinstance(fmt, (NF4Format, LUTFormat)):
            self.problem(path, f"format {name!r} ({fmt.family}) is for weights only; activations "
                               "take int, fp or host formats")

    # -- graph rules --------------------------------------------------------------------------

    def fusions(self, patterns: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], ...]:
        for i, pattern in enumerate(patterns):
            for j, kind in enumerate(pattern):
                if kind in _NOT_KERNELS:
                    self.problem(("fusions", i, j), f"{kind!r} is not a kernel and cannot be fused")
        return tuple(tuple(p) for p in patterns)

    def scale_rules(self, shared: tuple[str, ...], passing: tuple[str, ...],
                    ops: dict[str, OpRule]) -> None:
        for i, kind in enumerate(shared):
            path = ("shared_scale", i)
            if kind in passing:
                self.problem(path, f"{kind!r} is both in shared_scale and in pass_through; an op "
                                   "either joins its inputs' and output's quantizers into one or "
                                   "inherits its input's: keep it in one list")
            elif kind not in ops:
                if kind not in self.data["ops"]:
                    self.problem(path, f"{kind!r} has no [ops.{kind}] rule saying which formats it "
                                       "accepts; add one")
            elif not set(ops[kind].inputs) & set(ops[kind].outputs):
                self.problem(path, f"{kind!r} shares one quantizer between inputs and output, but "
                                   f"ops.{kind} inputs and outputs have no format in common")
        for i, kind in enumerate(passing):
            path = ("pass_through", i)
            if kind in WEIGHTED:
                self.problem(path, f"{kind!r} has weights and computes new values; it cannot "
                                   "pass its input's quantizer through")
            elif kind in _NOT_KERNELS:
                self.problem(path, f"{kind!r} is not a kernel; remove it")

    def couplings(self, tables: tuple[dict[str, Any], ...], ops: dict[str, OpRule],
                  formats: dict[str, Format]) -> tuple[Coupling, ...]:
        out: list[Coupling] = []
        for i, t in enumerate(tables):
            path: KeyPath = ("couplings", i)
            kind = t["kind"]
            if kind == "equal_bits":
                self.known_ops(path + ("ops",), t["ops"], ops)
                out.append(EqualBits(ops=tuple(t["ops"])))
            elif kind == "requires":
                for j, op in enumerate(t["ops"]):
                    if op not in WEIGHTED:
                        self.problem(path + ("ops", j), f"{op!r} has no weights; `requires` "
                                                        f"applies to {', '.join(WEIGHTED)}")
                self.known_ops(path + ("ops",), t["ops"], ops)
                covered = [ops[k] for k in (t["ops"] or [k for k in ops if k in WEIGHTED]) if k in ops]
                act_bits = {formats[n].bits for r in covered for n in r.inputs if n in formats}
                if t["then_activation_bits"] not in act_bits:
                    self.problem(path + ("then_activation_bits",),
                                 f"no op it covers accepts {t['then_activation_bits']}-bit inputs "
                                 f"(their input formats have {sorted(act_bits)} bits)")
                out.append(RequiresBits(t["if_weight_bits_at_most"], t["then_activation_bits"],
                                        tuple(t["ops"])))
            else:
                if t["where"] == "output" and t["tensors"] == "weights":
                    self.problem(path + ("tensors",), "the model's outputs are activations; "
                                                      "`where = \"output\"` needs tensors = \"activations\" or \"all\"")
                self.min_bits_satisfiable(path, t, ops, formats)
                out.append(MinBits(where=t["where"], bits=t["bits"], tensors=t["tensors"]))
        return tuple(out)

    def known_ops(self, path: KeyPath, kinds: Iterable[str], ops: dict[str, OpRule]) -> None:
        for j, kind in enumerate(kinds):
            if kind not in self.data["ops"]:
                self.problem(path + (j,), f"op kind {kind!r} has no [ops.{kind}] rule, so the "
                                          "coupling can never apply; add the rule or remove it")

    def min_bits_satisfiable(self, path: KeyPath, t: dict[str, Any], ops: dict[str, OpRule],
                             formats: dict[str, Format]) -> None:
        weighted = [r for k, r in ops.items() if k in WEIGHTED]
        roles = {"weights": ("weights",), "activations": ("inputs",),
                 "all": ("weights", "inputs")}[t["tensors"]]
        for role in roles:
            best = max((formats[n].bits for r in weighted for n in r.candidates(role)
                        if n in formats), default=None)
            if best is not None and best < t["bits"]:
                self.problem(path + ("bits",), f"no op with weights accepts {role} of "
                                               f"{t['bits']} bits or more (widest: {best})")

    # -- requantization, unsupported ops, cost --------------------------------------------------

    def requant(self, t: dict[str, Any], formats: dict[str, Format], ops: dict[str, OpRule]) -> Requant:
        mode, multiplier = t["mode"], t["multiplier_bits"]
        if multiplier is not None and mode != "fixed_point":
            self.problem(("requant", "multiplier_bits"), f"multiplier_bits only applies to mode "
                                                         f"\"fixed_point\", not {mode!r}; remove it")
        if mode == "fixed_point" and multiplier is None:
            multiplier = 32
        if mode == "shift":
            used = {n for r in ops.values() for role in ROLES for n in r.candidates(role)}
            for name in sorted(used):
                fmt = formats.get(name)
                if isinstance(fmt, IntFormat) and fmt.scale_kind != "pow2":
                    self.problem(("formats", name, "scale"),
                                 "requant mode \"shift\" can only realise power-of-two scales; "
                                 "set scale = \"pow2\" on this format")
        return Requant(mode=mode, multiplier_bits=multiplier, rounding=t["rounding"])

    def unsupported(self, t: dict[str, Any], cost: dict[str, Formula]) -> Unsupported:
        host_cost = t["host_cost"]
        if host_cost and t["action"] != "host":
            self.problem(("unsupported", "host_cost"), f"host_cost only applies to action "
                                                       f"\"host\", not {t['action']!r}")
        for metric in host_cost:
            if metric not in self.data["cost"]:
                self.problem(("unsupported", "host_cost", metric),
                             f"{metric!r} is not a [cost] metric{suggest(metric, cost)}; "
                             f"metrics: {', '.join(self.data['cost']) or 'none'}")
        formulas = self.formulas(host_cost, ("unsupported", "host_cost"))
        return Unsupported(action=t["action"], host_cost=MappingProxyType(formulas))

    def formulas(self, table: dict[str, Any], path: KeyPath) -> dict[str, Formula]:
        out: dict[str, Formula] = {}
        for metric, text in table.items():
            key = path + (metric,)
            try:
                out[metric] = parse_formula(text, format_path(key))
            except FormulaError as exc:
                self.problem(key, exc.reason)
        return out


def _make_format(t: dict[str, Any]) -> Format:
    kind = t["type"]
    if kind == "int":
        return IntFormat(bits=t["bits"], signed=t["signed"], symmetric=t["symmetric"],
                         narrow_range=t["narrow_range"], granularity=t["granularity"],
                         group_size=t.get("group_size"), scale_kind=t["scale"])
    if kind == "fp":
        return FloatFormat(kind=t["kind"], granularity=t["granularity"], group_size=t.get("group_size"))
    if kind == "nf4":
        return NF4Format(block_size=t["block_size"])
    if kind == "lut":
        return LUTFormat(bits=t["bits"], granularity=t["granularity"])
    return HostFloat()


def _field_in(message: str, table: dict[str, Any]) -> str:
    """The spec key a format's ValueError is about: the first key named in the message."""
    keys = [_FORMAT_FIELD_KEYS.get(f, f) for cls in (IntFormat, FloatFormat, NF4Format, LUTFormat)
            for f in (x.name for x in fields(cls))]
    found = [(message.find(k), k) for k in dict.fromkeys(keys) if k in message]
    if found:
        return min(found)[1]
    return "type"


def describe_format(fmt: Format) -> str:
    """One line a person can read: `int8, symmetric, narrow range, per_channel`."""
    if isinstance(fmt, IntFormat):
        parts = [f"{'int' if fmt.signed else 'uint'}{fmt.bits}",
                 "symmetric" if fmt.symmetric else "asymmetric"]
        if fmt.narrow_range:
            parts.append("narrow range")
        parts.append(fmt.granularity if fmt.group_size is None else f"per_group {fmt.group_size}")
        if fmt.scale_kind == "pow2":
            parts.append("power-of-two scales")
        return ", ".join(parts)
    if isinstance(fmt, FloatFormat):
        gran = fmt.granularity if fmt.group_size is None else f"per_group {fmt.group_size}"
        return f"fp{fmt.bits} {fmt.kind}, {gran}"
    if isinstance(fmt, NF4Format):
        return f"nf4, blocks of {fmt.block_size}"
    if isinstance(fmt, LUTFormat):
        return f"look-up table of {2 ** fmt.bits} entries ({fmt.bits}-bit indices), {fmt.granularity}"
    return "float32 (not quantized)"


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a target spec; see `targets.schema`."""
    return schema.json_schema()


def schema_markdown() -> str:
    """The Markdown reference of every spec key (docs/target-spec.md)."""
    return schema.schema_markdown()
