"""Target specs: the TOML schema and loader, the built-in specs, the lowering backends.

`load_target("npu-int4")` or `load_target("my-chip.toml")` gives a validated, immutable
`TargetSpec`; see docs/target-spec.md for every key a spec may hold.
"""
from __future__ import annotations

from .formulas import FUNCTIONS, VARIABLES, Formula, FormulaError, parse_formula
from .spec import (
    Coupling, EqualBits, MinBits, OpRule, Requant, RequiresBits, TargetSpec, Unsupported,
    describe_format, json_schema, list_targets, load_target, loads_target, schema_markdown,
)

__all__ = [
    "Coupling", "EqualBits", "FUNCTIONS", "Formula", "FormulaError", "MinBits", "OpRule",
    "Requant", "RequiresBits", "TargetSpec", "Unsupported", "VARIABLES", "describe_format",
    "json_schema", "list_targets", "load_target", "loads_target", "parse_formula",
    "schema_markdown",
]
