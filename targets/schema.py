"""The target-spec schema, declared once as data, and everything derived from it.

`SPEC` lists every key a target spec may hold (name, type, required, default, doc). The same
declaration drives three things, so they cannot drift apart: `check` (the structural validator:
unknown keys, wrong types, missing keys, bad choices; it fills in defaults), `json_schema()`
and `schema_markdown()` (the reference in docs/target-spec.md). Checks that relate keys to each
other (an op naming an undefined format) live in `targets.spec`.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Any, Union

from qcompiler.formats import GRANULARITIES, MINIFLOATS, SCALE_KINDS
from qcompiler.observers import OBSERVER_NAMES as OBSERVERS
from qcompiler.options import RECONSTRUCTIONS
from qcompiler.opkinds import ALL_OP_KINDS
from qcompiler.requant import MODES as REQUANT_MODES
from qcompiler.requant import ROUNDINGS

from .formulas import FUNCTIONS, VARIABLES

UNSUPPORTED_ACTIONS = ("host", "refuse")
MIN_BITS_WHERE = ("first", "last", "output")
MIN_BITS_TENSORS = ("all", "weights", "activations")
NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_-]*"
TARGET_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.+-]*"


class _NoDefault:
    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Any = _NoDefault()


# ---------------------------------------------------------------------------------------------
# Schema node types
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scalar:
    """A string, integer, number or boolean; `ref` names what a string refers to."""

    type: str                                  # "string" | "integer" | "number" | "boolean"
    choices: tuple[Any, ...] | None = None
    minimum: int | None = None
    maximum: int | None = None
    pattern: str | None = None
    ref: str | None = None                     # "op_kind" | "format" | "metric"

    def allowed(self) -> tuple[Any, ...] | None:
        return ALL_OP_KINDS if self.ref == "op_kind" else self.choices


@dataclass(frozen=True)
class FormulaValue:
    """A cost formula: a string in the formula grammar, or a plain number."""


@dataclass(frozen=True)
class ListOf:
    item: "Node"
    min_items: int = 0
    unique: bool = False


@dataclass(frozen=True)
class Key:
    name: str
    node: "Node"
    doc: str
    required: bool = False
    default: Any = NO_DEFAULT
    default_doc: str | None = None             # shown instead of `default` when it is derived


@dataclass(frozen=True)
class Table:
    """A TOML table with a closed set of keys."""

    keys: tuple[Key, ...]
    doc: str = ""

    def key(self, name: str) -> Key | None:
        return next((k for k in self.keys if k.name == name), None)


@dataclass(frozen=True)
class MapOf:
    """A TOML table whose keys the user names (formats, op kinds, metrics)."""

    value: "Node"
    key_ref: str                               # "name" | "op_kind" | "metric"
    doc: str = ""
    min_items: int = 0


@dataclass(frozen=True)
class Tagged:
    """A table whose `tag` key picks one of several key sets (format types, coupling kinds)."""

    tag: str
    variants: tuple[tuple[str, Table], ...]
    doc: str = ""

    def variant(self, name: str) -> Table | None:
        return dict(self.variants).get(name)


Node = Union[Scalar, FormulaValue, ListOf, Table, MapOf, Tagged]


# ---------------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------------

_STR = Scalar("string")
_OP_KIND = Scalar("string", ref="op_kind")
_FORMAT_REF = Scalar("string", ref="format")
_FORMAT_LIST = ListOf(_FORMAT_REF, unique=True)
_OP_LIST = ListOf(_OP_KIND, unique=True)
_GRANULARITY = Key(
    "granularity", Scalar("string", choices=GRANULARITIES),
    "one scale for the whole tensor, one per output channel, or one per `group_size` consecutive "
    "elements along the input dimension", default="per_tensor",
)
_GROUP_SIZE = Key(
    "group_size", Scalar("integer", minimum=1),
    "elements per group; required with `granularity = \"per_group\"` and only then",
)

_INT_FORMAT = Table((
    Key("bits", Scalar("integer"), "bit width, 2 to 16", required=True),
    Key("signed", Scalar("boolean"), "signed (int) or unsigned (uint) codes", default=True),
    Key("symmetric", Scalar("boolean"), "zero point fixed at 0 (true) or calibrated (false)",
        default=True),
    Key("narrow_range", Scalar("boolean"),
        "drop the most negative signed code so the range is odd-symmetric (int8: -127..127)",
        default=False),
    _GRANULARITY,
    _GROUP_SIZE,
    Key("scale", Scalar("string", choices=SCALE_KINDS),
        "scale factors are any float, or powers of two (shift-only hardware)", default="float"),
), doc="Uniform integer quantization: x = scale * (q - zero_point).")

_FP_FORMAT = Table((
    Key("kind", Scalar("string", choices=tuple(MINIFLOATS)),
        "minifloat layout: OCP FP8 E4M3 or E5M2, or FP4 E2M1", required=True),
    _GRANULARITY,
    _GROUP_SIZE,
), doc="A scaled minifloat: x = scale * decode(code).")

_NF4_FORMAT = Table((
    Key("block_size", Scalar("integer", minimum=1), "elements per absmax-scaled block", default=64),
), doc="4-bit NormalFloat (QLoRA) with block-wise absmax scales; weights only.")

_LUT_FORMAT = Table((
    Key("bits", Scalar("integer"), "index bits: the codebook has 2**bits entries (1 to 8)",
        required=True),
    Key("granularity", Scalar("string", choices=("per_tensor", "per_channel")),
        "one codebook per tensor or per output channel", default="per_tensor"),
), doc="Weight clustering: each weight is an index into a k-means codebook; weights only.")

_HOST_FORMAT = Table((), doc="Not quantized: the tensor stays float32 (weight-only targets, host ops).")

FORMAT = Tagged("type", (
    ("int", _INT_FORMAT), ("fp", _FP_FORMAT), ("nf4", _NF4_FORMAT), ("lut", _LUT_FORMAT),
    ("host", _HOST_FORMAT),
), doc="A named number format. `type` picks the family; the other keys depend on it.")

OP_RULE = Table((
    Key("weights", _FORMAT_LIST,
        "formats the op's weights accept (mixed-precision candidates); required for ops with "
        "weights (conv, depthwise_conv, conv_transpose, linear, embedding) and only for them",
        default=()),
    Key("inputs", ListOf(_FORMAT_REF, min_items=1, unique=True),
        "formats the op's activation inputs accept", required=True),
    Key("outputs", _FORMAT_LIST, "formats the op's output accepts", default=None,
        default_doc="same as `inputs`"),
    Key("default_weights", _FORMAT_REF, "the weight format used when no budget asks for less; "
        "must be in `weights`", default=None, default_doc="first of `weights`"),
    Key("default_inputs", _FORMAT_REF, "default input format; must be in `inputs`",
        default=None, default_doc="first of `inputs`"),
    Key("default_outputs", _FORMAT_REF, "default output format; must be in `outputs`",
        default=None, default_doc="first of `outputs`"),
    Key("accumulator_bits", Scalar("integer", minimum=8, maximum=64),
        "width of the accumulator the kernel sums products in", default=32),
    Key("bias_bits", Scalar("integer", minimum=8, maximum=64),
        "width of the integer bias added to the accumulator (on its grid, scale s_in * s_w); "
        "where a channel's bias does not fit, that channel's weight scale is raised until it "
        "does, and, where the bias outweighs the channel's largest possible products, until "
        "bias plus products fit the accumulator (the report lists each such channel); at most "
        "`accumulator_bits`",
        default=None, default_doc="the smaller of 32 and `accumulator_bits`"),
), doc="What the hardware accepts for one canonical op kind. Op kinds not listed (and not in "
       "`pass_through`) are unsupported by the chip; see `[unsupported]`.")

COUPLING = Tagged("kind", (
    ("equal_bits", Table((
        Key("ops", ListOf(_OP_KIND, min_items=1, unique=True),
            "op kinds whose activation inputs must all have the same bit width", required=True),
    ), doc="The inputs of each listed op have equal bit widths (e.g. an adder that takes two "
           "operands of one word size).")),
    ("requires", Table((
        Key("if_weight_bits_at_most", Scalar("integer", minimum=1, maximum=16),
            "applies when an op's weights have at most this many bits", required=True),
        Key("then_activation_bits", Scalar("integer", minimum=2, maximum=16),
            "then its input activations must have exactly this many bits", required=True),
        Key("ops", _OP_LIST, "op kinds with weights it applies to", default=(),
            default_doc="every op with weights"),
    ), doc="Narrow weights are only allowed together with a given activation width (e.g. int4 "
           "weights only with int8 activations).")),
    ("min_bits", Table((
        Key("where", Scalar("string", choices=MIN_BITS_WHERE),
            "the first or the last op with weights of the model, in execution order, or the "
            "model's outputs (the tensors it returns; activations only)",
            required=True),
        Key("bits", Scalar("integer", minimum=2, maximum=32), "the least bit width allowed there",
            required=True),
        Key("tensors", Scalar("string", choices=MIN_BITS_TENSORS),
            "whether the bound holds for its weights, its activations, or both", default="all"),
    ), doc="The first or last layer, or the model's outputs, keep at least `bits` bits (e.g. first and "
           "last layer 8 bit; an image-to-image network's output image 8 bit).")),
), doc="A bit-width coupling the hardware imposes; `kind` picks one of a closed set.")

REQUANT = Table((
    Key("mode", Scalar("string", choices=REQUANT_MODES),
        "how an int32 accumulator is rescaled to the output format: a float multiply, an "
        "integer multiplier and a right shift (fixed_point), or a right shift alone (shift: "
        "every int format must then use `scale = \"pow2\"`)", default="float"),
    Key("multiplier_bits", Scalar("integer", minimum=2, maximum=32),
        "bits of the integer multiplier; only with mode fixed_point", default=None,
        default_doc="32 with fixed_point"),
    Key("rounding", Scalar("string", choices=ROUNDINGS),
        "how the rescaled value is rounded to an integer", default="half_even"),
), doc="How the hardware requantizes accumulators to output codes.")

UNSUPPORTED = Table((
    Key("action", Scalar("string", choices=UNSUPPORTED_ACTIONS),
        "an op kind the chip does not support runs in float on the host, or compilation stops "
        "with an error naming the node", default="refuse"),
    Key("host_cost", MapOf(FormulaValue(), key_ref="metric",
                           doc="Per cost metric, the cost of one op run on the host."),
        "cost of a host op per metric (each a `[cost]` metric); metrics not listed use the "
        "`[cost]` formula with 32-bit widths; only with action host", default={}),
), doc="What happens to op kinds the chip does not support.")

SPEC = Table((
    Key("name", Scalar("string", pattern=TARGET_NAME_PATTERN),
        "the target's name, e.g. npu-int4 (built-in specs: equal to the file name)", required=True),
    Key("version", _STR, "version of this spec, e.g. \"1.0\" (a string)", required=True),
    Key("description", _STR, "one line on the hardware this spec models", default=""),
    Key("observer", Scalar("string", choices=OBSERVERS),
        "default calibration observer for this target", default=None,
        default_doc="the compiler's choice"),
    Key("reconstruction", Scalar("string", choices=RECONSTRUCTIONS),
        "how `optimize_rounding` fits integer weights for this target unless the compile says: "
        "layer (AdaRound), block, model or nearest (round-to-nearest)", default=None,
        default_doc="layer"),
    Key("channel_gains", _OP_LIST,
        "op kinds that apply one integer factor per channel to their inputs: an `add` that "
        "rescales each input per channel and a `layer_norm` that multiplies its input codes per "
        "channel; with both, residual-stream tensors are balanced (`balance_residual`)",
        default=()),
    Key("formats", MapOf(FORMAT, key_ref="name", min_items=1,
                         doc="Number formats by name; ops refer to these names."),
        "named number formats", required=True),
    Key("ops", MapOf(OP_RULE, key_ref="op_kind", min_items=1,
                     doc="Per canonical op kind, what the hardware accepts."),
        "per op kind, accepted formats", required=True),
    Key("fusions", ListOf(ListOf(_OP_KIND, min_items=2), unique=True),
        "patterns of op kinds (producer first) the hardware runs as one kernel with no "
        "quantizer inside, e.g. [\"conv\", \"add\", \"relu\"]", default=()),
    Key("shared_scale", _OP_LIST,
        "op kinds whose inputs and output share one quantizer (cat on most chips)", default=()),
    Key("pass_through", _OP_LIST,
        "op kinds that inherit their input's quantizer (max_pool, reshape, ...); they need no "
        "`[ops]` entry", default=()),
    Key("couplings", ListOf(COUPLING), "bit-width couplings", default=()),
    Key("requant", REQUANT, "requantization", default={}),
    Key("unsupported", UNSUPPORTED, "unsupported op kinds", default={}),
    Key("cost", MapOf(FormulaValue(), key_ref="metric",
                      doc="Named cost metrics, each a formula over per-node variables; a budget "
                          "names a metric and bounds its sum over the model. Conventional names: "
                          "`weight_memory` and `activation_memory` (bytes), `bops` "
                          "(bit-operations), `latency` (microseconds)."),
        "cost model", default={}),
), doc="A hardware target: what number formats each op kind accepts and what the rules are.")


# ---------------------------------------------------------------------------------------------
# Key paths and suggestions
# ---------------------------------------------------------------------------------------------

Path = tuple[Union[str, int], ...]
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def format_path(path: Path) -> str:
    """`("ops", "conv", "weights", 1)` -> `ops.conv.weights[1]`, quoting keys TOML would quote."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if _BARE_KEY.match(part) else json.dumps(part)
            out += ("." if out else "") + text
    return out or "<top level>"


def suggest(word: str, options: Any) -> str:
    """`; did you mean 'x'?` for the closest option, or nothing."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _describe(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a table"}
    kind = names.get(type(value), type(value).__name__)
    shown = repr(value) if not isinstance(value, (list, dict)) else ""
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{kind} {shown}".strip()


def _type_name(node: Node) -> str:
    if isinstance(node, Scalar):
        if node.ref == "op_kind":
            return "an op kind"
        if node.ref == "format":
            return "a format name"
        return {"string": "a string", "integer": "an integer", "number": "a number",
                "boolean": "a boolean (true/false)"}[node.type]
    if isinstance(node, FormulaValue):
        return "a formula (string) or a number"
    if isinstance(node, ListOf):
        return f"a list of {_plural(node.item)}"
    return "a table"


def _plural(node: Node) -> str:
    if isinstance(node, ListOf):
        return f"lists of {_plural(node.item)}"
    if isinstance(node, Scalar):
        return {"op_kind": "op kinds", "format": "format names"}.get(node.ref or "", f"{node.type}s")
    if isinstance(node, FormulaValue):
        return "formulas"
    return "tables"


# ---------------------------------------------------------------------------------------------
# Structural validation
# ---------------------------------------------------------------------------------------------

Problem = tuple[Path, str]


def check(data: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """Validate parsed TOML against `SPEC`; return it with defaults filled in, and the problems.

    Lists become tuples. Each problem is a key path and a message saying what is expected.
    """
    problems: list[Problem] = []
    value = _check(SPEC, data, (), problems)
    return value, problems


def _check(node: Node, value: Any, path: Path, problems: list[Problem]) -> Any:
    if isinstance(node, Scalar):
        return _check_scalar(node, value, path, problems)
    if isinstance(node, FormulaValue):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            problems.append((path, f"expected a formula (string) or a number, got {_describe(value)}"))
        return value
    if isinstance(node, ListOf):
        return _check_list(node, value, path, problems)
    if isinstance(node, Table):
        return _check_table(node, value, path, problems)
    if isinstance(node, MapOf):
        return _check_map(node, value, path, problems)
    return _check_tagged(node, value, path, problems)


def _check_scalar(node: Scalar, value: Any, path: Path, problems: list[Problem]) -> Any:
    ok = {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
    }[node.type]
    if not ok:
        problems.append((path, f"expected {_type_name(node)}, got {_describe(value)}"))
        return value
    allowed = node.allowed()
    if allowed is not None and value not in allowed:
        what = "op kind" if node.ref == "op_kind" else "value"
        listing = "" if node.ref == "op_kind" else f"; expected one of {', '.join(map(str, allowed))}"
        hint = " (see qcompiler.opkinds.ALL_OP_KINDS)" if node.ref == "op_kind" else ""
        problems.append((path, f"unknown {what} {value!r}{suggest(value, allowed)}{listing}{hint}"))
    if node.minimum is not None and value < node.minimum:
        problems.append((path, f"expected at least {node.minimum}, got {value!r}"))
    if node.maximum is not None and value > node.maximum:
        problems.append((path, f"expected at most {node.maximum}, got {value!r}"))
    if node.pattern is not None and not re.fullmatch(node.pattern, value):
        problems.append((path, f"{value!r} is not a valid name (letters, digits, _ - . +; "
                               "starting with a letter or digit)"))
    return value


def _misplaced(key: str, path: Path) -> str:
    """A hint for the commonest TOML slip: a top-level key written below a [table] header."""
    if path and SPEC.key(key) is not None:
        return (f"; {key!r} is a top-level key: TOML puts every key after a [table] header into "
                "that table, so move it above the first [table]")
    return ""


def _check_list(node: ListOf, value: Any, path: Path, problems: list[Problem]) -> Any:
    if not isinstance(value, list):
        problems.append((path, f"expected {_type_name(node)}, got {_describe(value)}"))
        return ()
    if len(value) < node.min_items:
        problems.append((path, f"expected at least {node.min_items} item(s), got {len(value)}"))
    items = tuple(_check(node.item, v, path + (i,), problems) for i, v in enumerate(value))
    if node.unique:
        seen: dict[Any, int] = {}
        for i, item in enumerate(items):
            frozen = tuple(item) if isinstance(item, (list, tuple)) else item
            try:
                if frozen in seen:
                    problems.append((path + (i,), f"duplicate of item [{seen[frozen]}]"))
                seen.setdefault(frozen, i)
            except TypeError:
                pass  # an unhashable item was already reported as the wrong type
    return items


def _check_table(node: Table, value: Any, path: Path, problems: list[Problem],
                 skip: tuple[str, ...] = ()) -> Any:
    if not isinstance(value, dict):
        problems.append((path, f"expected a table, got {_describe(value)}"))
        return {}
    names = [k.name for k in node.keys]
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key in skip:
            out[key] = item
            continue
        spec_key = node.key(key)
        if spec_key is None:
            valid = ", ".join(names) if names else "none"
            problems.append((path + (key,), f"unknown key {key!r}{suggest(key, names)} "
                                            f"(valid keys here: {valid}){_misplaced(key, path)}"))
            continue
        out[key] = _check(spec_key.node, item, path + (key,), problems)
    for spec_key in node.keys:
        if spec_key.name in out:
            continue
        if spec_key.required:
            problems.append((path + (spec_key.name,), f"missing required key {spec_key.name!r}: "
                                                      f"{spec_key.doc}"))
        elif spec_key.default is not NO_DEFAULT and isinstance(spec_key.node, Table):
            # An omitted table still gets its own keys' defaults ([requant], [unsupported]).
            out[spec_key.name] = _check(spec_key.node, dict(spec_key.default), path + (spec_key.name,), problems)
        elif spec_key.default is not NO_DEFAULT:
            out[spec_key.name] = spec_key.default
    return out


def _check_map(node: MapOf, value: Any, path: Path, problems: list[Problem]) -> Any:
    if not isinstance(value, dict):
        problems.append((path, f"expected a table, got {_describe(value)}"))
        return {}
    if len(value) < node.min_items:
        problems.append((path, f"expected at least {node.min_items} entry, got none"))
    out: dict[str, Any] = {}
    for key, item in value.items():
        if SPEC.key(key) is not None:
            problems.append((path + (key,), f"{key!r} cannot name an entry here{_misplaced(key, path)}"))
            continue
        if node.key_ref == "op_kind" and key not in ALL_OP_KINDS:
            problems.append((path + (key,), f"unknown op kind {key!r}{suggest(key, ALL_OP_KINDS)} "
                                            f"(see qcompiler.opkinds.ALL_OP_KINDS){_misplaced(key, path)}"))
            continue
        if node.key_ref in ("name", "metric") and not re.fullmatch(NAME_PATTERN, key):
            problems.append((path + (key,), f"{key!r} is not a valid name (letters, digits, _ and -, "
                                            "starting with a letter or _)"))
            continue
        out[key] = _check(node.value, item, path + (key,), problems)
    return out


def _check_tagged(node: Tagged, value: Any, path: Path, problems: list[Problem]) -> Any:
    tags = [t for t, _ in node.variants]
    if not isinstance(value, dict):
        problems.append((path, f"expected a table, got {_describe(value)}"))
        return {}
    if node.tag not in value:
        problems.append((path + (node.tag,), f"missing required key {node.tag!r}: one of "
                                              f"{', '.join(tags)}"))
        return {}
    tag = value[node.tag]
    variant = node.variant(tag) if isinstance(tag, str) else None
    if variant is None:
        problems.append((path + (node.tag,), f"unknown {node.tag} {tag!r}{suggest(tag, tags)}; "
                                              f"expected one of {', '.join(tags)}"))
        return {}
    return _check_table(variant, value, path, problems, skip=(node.tag,))


# ---------------------------------------------------------------------------------------------
# JSON Schema
# ---------------------------------------------------------------------------------------------

def json_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of a target spec, as parsed from TOML."""
    schema = _json(SPEC)
    schema.update({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://qcompiler.invalid/target-spec.schema.json",
        "title": "qcompiler target spec",
    })
    return schema


def _json(node: Node, doc: str = "") -> dict[str, Any]:
    out: dict[str, Any]
    if isinstance(node, Scalar):
        out = {"type": node.type}
        allowed = node.allowed()
        if allowed is not None:
            out["enum"] = list(allowed)
        if node.minimum is not None:
            out["minimum"] = node.minimum
        if node.maximum is not None:
            out["maximum"] = node.maximum
        if node.pattern is not None:
            out["pattern"] = f"^{node.pattern}$"
    elif isinstance(node, FormulaValue):
        out = {"type": ["string", "number"]}
    elif isinstance(node, ListOf):
        out = {"type": "array", "items": _json(node.item)}
        if node.min_items:
            out["minItems"] = node.min_items
        if node.unique:
            out["uniqueItems"] = True
    elif isinstance(node, Table):
        out = _json_table(node)
    elif isinstance(node, MapOf):
        out = {"type": "object", "additionalProperties": _json(node.value)}
        if node.key_ref == "op_kind":
            out["propertyNames"] = {"enum": list(ALL_OP_KINDS)}
        else:
            # Top-level key names are refused as entry names: they are TOML slips (see _misplaced).
            out["propertyNames"] = {"pattern": f"^{NAME_PATTERN}$",
                                    "not": {"enum": [k.name for k in SPEC.keys]}}
        if node.min_items:
            out["minProperties"] = node.min_items
    else:
        out = {"oneOf": [_json_table(t, tag=(node.tag, name)) for name, t in node.variants]}
    description = doc or getattr(node, "doc", "")
    if description:
        out["description"] = description
    return out


def _json_table(table: Table, tag: tuple[str, str] | None = None) -> dict[str, Any]:
    props: dict[str, Any] = {}
    required: list[str] = []
    if tag is not None:
        props[tag[0]] = {"const": tag[1]}
        required.append(tag[0])
    for key in table.keys:
        prop = _json(key.node, key.doc)
        if key.default is not NO_DEFAULT and key.default is not None:
            prop["default"] = list(key.default) if isinstance(key.default, tuple) else key.default
        props[key.name] = prop
        if key.required:
            required.append(key.name)
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = required
    if table.doc:
        out["description"] = table.doc
    return out


# ---------------------------------------------------------------------------------------------
# Markdown reference
# ---------------------------------------------------------------------------------------------

EXAMPLE = '''\
# my-chip.toml: an invented int8 accelerator, written in a few minutes.
name = "my-chip"
version = "1.0"
description = "int8 NPU with per-channel weights and a fixed-point requantizer"
# Top-level keys go before the first [table]: TOML puts later keys inside that table.
fusions = [["conv", "relu"], ["conv", "add", "relu"]]
shared_scale = ["cat"]
pass_through = ["max_pool", "reshape", "flatten"]
couplings = [{ kind = "min_bits", where = "first", bits = 8 }]

[formats.w8]
type = "int"
bits = 8
narrow_range = true
granularity = "per_channel"

[formats.a8]
type = "int"
bits = 8
symmetric = false

[ops]
conv = { weights = ["w8"], inputs = ["a8"] }
linear = { weights = ["w8"], inputs = ["a8"] }
add = { inputs = ["a8"] }
cat = { inputs = ["a8"] }
relu = { inputs = ["a8"] }

[requant]
mode = "fixed_point"
multiplier_bits = 32
rounding = "half_away_from_zero"

[unsupported]
action = "host"

[cost]
weight_memory = "params * w_bits / 8"
bops = "macs * w_bits * a_bits"
latency = "max(macs / 512, (in_elems * a_bits + weight_elems * w_bits) / 8 / 32) / 1000"
'''


def _md_type(node: Node) -> str:
    if isinstance(node, Scalar):
        if node.ref in ("op_kind", "format"):
            return {"op_kind": "op kind", "format": "format name"}[node.ref]
        text = node.type
        if node.choices is not None:
            text += ": " + " \\| ".join(f"`{c}`" for c in node.choices)
        if node.minimum is not None or node.maximum is not None:
            lo = "" if node.minimum is None else node.minimum
            hi = "" if node.maximum is None else node.maximum
            text += f" ({lo}..{hi})"
        return text
    if isinstance(node, FormulaValue):
        return "formula"
    if isinstance(node, ListOf):
        extra = f", at least {node.min_items}" if node.min_items else ""
        return f"list of {_plural(node.item)}{extra}"
    if isinstance(node, MapOf):
        return f"table by {node.key_ref.replace('_', ' ')}"
    if isinstance(node, Tagged):
        return f"table, by `{node.tag}`"
    return "table"


def _md_default(key: Key) -> str:
    if key.required:
        return "required"
    if key.default_doc is not None:
        return key.default_doc
    if key.default is NO_DEFAULT:
        return "none"
    if key.default in ((), {}):
        return "empty"
    if isinstance(key.default, str):
        return f'`"{key.default}"`'
    if isinstance(key.default, bool):
        return f"`{str(key.default).lower()}`"
    return f"`{key.default}`"


def _md_keys(table: Table, tag: tuple[str, str] | None = None) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    if tag is not None:
        lines.append(f'| `{tag[0]}` | string | required | `"{tag[1]}"` |')
    for key in table.keys:
        lines.append(f"| `{key.name}` | {_md_type(key.node)} | {_md_default(key)} | {key.doc} |")
    return lines


def _md_sections(path: str, node: Node, array: bool = False) -> list[str]:
    """Sections for a key's value, titled as TOML would spell its header (`[ops.<op_kind>]`)."""
    title = f"[[{path}]]" if array else f"[{path}]"
    if isinstance(node, ListOf) and isinstance(node.item, (Table, Tagged)):
        return _md_sections(path, node.item, array=True)
    if isinstance(node, MapOf):
        if isinstance(node.value, (Table, Tagged)):
            return _md_sections(f"{path}.<{node.key_ref}>", node.value)
        return ["", f"## `{title}`", "", node.doc, "",
                f"Each key is a {node.key_ref} name, each value a {_md_type(node.value)} "
                "(see [Formulas](#formulas))."]
    if isinstance(node, Table):
        lines = ["", f"## `{title}`", "", node.doc, ""] + _md_keys(node)
        for key in node.keys:
            lines += _md_sections(f"{path}.{key.name}", key.node)
        return lines
    if isinstance(node, Tagged):
        lines = ["", f"## `{title}`", "", node.doc]
        for name, table in node.variants:
            lines += ["", f'### {node.tag} = "{name}"', "", table.doc, ""]
            lines += (_md_keys(table, tag=(node.tag, name)) if table.keys
                      else [f'No keys besides `{node.tag} = "{name}"`.'])
        return lines
    return []


def schema_markdown() -> str:
    """The reference of every spec key, generated from `SPEC` (committed as docs/target-spec.md)."""
    lines = [
        "# Target spec reference",
        "",
        "<!-- Generated by targets.spec.schema_markdown(); do not edit by hand. Regenerate with",
        "     `qcompile targets schema --markdown > docs/target-spec.md`. -->",
        "",
        "A target spec is a TOML file that describes an accelerator: the number formats it "
        "supports, what each op kind accepts, which ops fuse or share quantizers, how it "
        "requantizes, what happens to ops it lacks, and a cost model. It is data only: loading "
        "it never runs code. Every key is validated, and each mistake is reported with its key "
        "path (e.g. `ops.conv.weights[1]`).",
        "",
        "Load one with `qcompiler.targets.load_target(\"npu-int8\")` (a built-in) or "
        "`load_target(\"my-chip.toml\")`; check one with `qcompile targets validate my-chip.toml`.",
        "",
        "## Example",
        "",
        "```toml",
        EXAMPLE.rstrip("\n"),
        "```",
    ]
    lines += ["", "## Top-level keys", "", SPEC.doc, ""] + _md_keys(SPEC)
    for key in SPEC.keys:
        lines += _md_sections(key.name, key.node)
    lines += [
        "", "## Formulas", "",
        "`[cost]` and `[unsupported.host_cost]` values are formulas over per-node variables, "
        "parsed with a whitelisted grammar: numbers, the variables below, `+ - * / **`, unary "
        "minus and the functions below. Anything else (names, attributes, subscripts, other "
        "calls, strings, lambdas) is rejected when the spec is loaded. A budget such as "
        "`{\"weight_memory\": \"1.5 MiB\"}` bounds the sum of a metric over the model.",
        "", "| variable | meaning |", "|---|---|",
    ]
    lines += [f"| `{name}` | {doc} |" for name, doc in VARIABLES.items()]
    lines += ["", "| function | meaning |", "|---|---|"]
    lines += [f"| `{name}` | {doc} |" for name, doc in FUNCTIONS.items()]
    lines += ["", "## Op kinds", "",
              "The canonical op kinds (`qcompiler.opkinds.ALL_OP_KINDS`) that `[ops]`, "
              "`fusions`, `shared_scale`, `pass_through` and couplings may name:", ""]
    lines += [", ".join(f"`{k}`" for k in ALL_OP_KINDS)]
    return "\n".join(lines) + "\n"
