"""Tests of targets/schema.py: the one schema declaration, its JSON Schema and Markdown reference."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from qcompiler.errors import SpecError
from qcompiler.targets import json_schema, list_targets, loads_target, schema_markdown
from qcompiler.targets.spec import tomllib  # the loader's parser: tomli before Python 3.11
from qcompiler.targets.schema import EXAMPLE, SPEC, ListOf, MapOf, Table, Tagged

ROOT = Path(__file__).resolve().parents[2]
VALIDATOR = jsonschema.Draft202012Validator(json_schema())


def _all_tables(node, seen=None):
    """Every Table reachable from a schema node (walked independently of the generators)."""
    out = [] if seen is None else seen
    if isinstance(node, Table):
        out.append(node)
        for key in node.keys:
            _all_tables(key.node, out)
    elif isinstance(node, (ListOf,)):
        _all_tables(node.item, out)
    elif isinstance(node, MapOf):
        _all_tables(node.value, out)
    elif isinstance(node, Tagged):
        for _, table in node.variants:
            _all_tables(table, out)
    return out


def test_committed_reference_equals_generated_markdown():
    committed = (ROOT / "docs" / "target-spec.md").read_text(encoding="utf-8")
    assert committed == schema_markdown(), (
        "docs/target-spec.md is stale: run `qcompile targets schema --markdown > docs/target-spec.md`")


def test_markdown_documents_every_key():
    text = schema_markdown()
    for table in _all_tables(SPEC):
        for key in table.keys:
            assert key.doc, f"key {key.name} has no doc"
            assert f"| `{key.name}` |" in text
    for section in ("[formats.<name>]", "[ops.<op_kind>]", "[[couplings]]", "[requant]",
                    "[unsupported]", "[cost]", 'type = "nf4"', 'kind = "min_bits"', "`w_scales`"):
        assert section in text


def test_json_schema_is_valid_json_schema_listing_every_top_level_key():
    schema = json.loads(json.dumps(json_schema()))
    jsonschema.Draft202012Validator.check_schema(schema)
    assert set(schema["properties"]) == {k.name for k in SPEC.keys}
    assert set(schema["required"]) == {"name", "version", "formats", "ops"}
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("name", list_targets())
def test_builtin_specs_satisfy_the_json_schema(name):
    data = tomllib.loads((ROOT / "targets" / f"{name}.toml").read_text())
    VALIDATOR.validate(data)


# Mistakes both the JSON Schema and the loader must reject: a second, independent check that
# the validator follows the declared schema.
STRUCTURAL_MISTAKES = [
    lambda d: d.update(nmae="x"),
    lambda d: d["formats"]["w8"].update(granularty="per_tensor"),
    lambda d: d["formats"]["w8"].update(bits="8"),
    lambda d: d["formats"].update(f8={"type": "fp", "kind": "e9m9"}),
    lambda d: d["ops"].update(convv={"inputs": ["a8"]}),
    lambda d: d.update(fusions=[["conv", "reluu"]]),
    lambda d: d["requant"].update(mode="fixedpoint"),
    lambda d: d.update(couplings=[{"kind": "min_bits", "where": "first"}]),
    lambda d: d.pop("version"),
    lambda d: d["ops"]["conv"].update(accumulator_bits=4),
    lambda d: d["cost"].update(couplings="1"),
]


@pytest.mark.parametrize("mutate", STRUCTURAL_MISTAKES)
def test_json_schema_and_loader_agree_on_structural_mistakes(mutate):
    data = tomllib.loads(EXAMPLE)
    VALIDATOR.validate(data)
    mutate(data)
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(data)
    with pytest.raises(SpecError):
        loads_target(_to_toml(data))


def _to_toml(data: dict) -> str:
    """A tiny TOML writer for the plain data these tests build (strings, ints, lists, tables)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
    return "\n".join(f"{json.dumps(k)} = {value(v)}" for k, v in data.items()) + "\n"


def test_toml_writer_round_trips():
    data = tomllib.loads(EXAMPLE)
    assert tomllib.loads(_to_toml(data)) == data
    assert loads_target(_to_toml(data)) == loads_target(EXAMPLE)


def test_example_in_reference_loads():
    spec = loads_target(EXAMPLE, "example")
    assert spec.name == "my-chip" and "latency" in spec.cost
