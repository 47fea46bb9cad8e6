"""Tests of targets/formulas.py: the whitelisted cost-formula grammar and its evaluation."""
from __future__ import annotations

import math

import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.errors import SpecError
from qcompiler.targets import FUNCTIONS, VARIABLES, Formula, FormulaError, parse_formula

# (formula, variables, value computed by hand)
HAND_COMPUTED = [
    ("params * w_bits / 8", dict(params=1000, w_bits=4), 500.0),
    ("macs * w_bits * a_bits", dict(macs=1_000_000, w_bits=8, a_bits=8), 64_000_000.0),
    # 3x3 conv 64->64 with bias: 36864 weights at 8 bit + 64 int32 biases.
    ("weight_elems * w_bits / 8 + (params - weight_elems) * 4",
     dict(weight_elems=36864, params=36928, w_bits=8), 37120.0),
    # compute-bound: 1e6/256 = 3906.25 cycles > (1000+2000)/16 = 187.5; /1000 -> us
    ("max(macs / 256, (in_elems + out_elems) / 16) / 1000",
     dict(macs=1_000_000, in_elems=1000, out_elems=2000), 3.90625),
    # memory-bound: 0 MACs, (4096+4096)/16 = 512 cycles
    ("max(macs / 256, (in_elems + out_elems) / 16) / 1000",
     dict(macs=0, in_elems=4096, out_elems=4096), 0.512),
    ("ceil(log2(params))", dict(params=1000), 10.0),
    ("ceil(log2(params))", dict(params=1024), 10.0),     # exact at a power of two
    ("ceil(log2(params))", dict(params=1025), 11.0),
    ("floor(params / 3)", dict(params=10), 3.0),
    ("min(w_bits, a_bits, out_bits)", dict(w_bits=4, a_bits=8, out_bits=6), 4.0),
    ("-w_bits + 2 ** a_bits", dict(w_bits=3, a_bits=4), 13.0),
    ("2 ** -w_bits", dict(w_bits=3), 0.125),
    ("-(-groups)", dict(groups=7), 7.0),
    ("+macs", dict(macs=5), 5.0),
    ("weight_elems * w_bits / 8 + w_scales * 2", dict(weight_elems=4096, w_bits=4, w_scales=128), 2304.0),
    ("42", {}, 42.0),
    ("1.5e3 / 2", {}, 750.0),
]


@pytest.mark.parametrize("text,values,expected", HAND_COMPUTED)
def test_evaluate_matches_hand_computed_value(text, values, expected):
    f = parse_formula(text, "cost.x")
    assert f.evaluate(**values) == pytest.approx(expected, rel=1e-12, abs=0)
    assert f(**values) == f.evaluate(**values)


@pytest.mark.parametrize("text,values,expected", HAND_COMPUTED)
def test_sympy_expression_agrees_with_evaluator(text, values, expected):
    f = parse_formula(text, "cost.x")
    subs = {sympy.Symbol(k): v for k, v in values.items()}
    assert float(f.expr.subs(subs)) == pytest.approx(expected, rel=1e-12, abs=0)
    assert set(f.variables) == {str(s) for s in f.expr.free_symbols}


def test_expr_is_the_sympy_expression_built_independently():
    params, w_bits, macs = sympy.symbols("params w_bits macs")
    assert parse_formula("params * w_bits / 8").expr == params * w_bits / 8
    assert parse_formula("max(macs, 2 * params)").expr == sympy.Max(macs, 2 * params)
    assert parse_formula("log2(params)").expr == sympy.log(params) / sympy.log(2)


def test_variables_are_sorted_and_only_those_used():
    f = parse_formula("w_bits * params + params")
    assert f.variables == ("params", "w_bits")
    assert parse_formula("3").variables == ()


def test_numbers_become_formulas():
    assert parse_formula(0, "cost.free").evaluate() == 0.0
    assert parse_formula(2.5, "cost.half").evaluate() == 2.5


def test_formulas_are_deterministic_values():
    a = parse_formula("max(macs / 256, params) * w_bits", "cost.latency")
    b = parse_formula("max(macs / 256, params) * w_bits", "cost.latency")
    assert a == b and hash(a) == hash(b)
    values = dict(macs=12345, params=77, w_bits=6)
    assert len({a.evaluate(**values) for _ in range(5)} | {b.evaluate(**values)}) == 1
    assert Formula.parse("params", "k") == parse_formula("params", "k")


_VALUES = st.integers(min_value=1, max_value=10**9)


@settings(max_examples=40, deadline=None)
@given(params=_VALUES, macs=_VALUES, w_bits=st.integers(2, 16), a_bits=st.integers(2, 16))
def test_evaluator_agrees_with_sympy_on_random_values(params, macs, w_bits, a_bits):
    text = "max(macs * w_bits / 2048, params * a_bits / 8 / 16) + ceil(log2(params)) - floor(macs / 7)"
    f = parse_formula(text)
    values = dict(params=params, macs=macs, w_bits=w_bits, a_bits=a_bits)
    reference = max(macs * w_bits / 2048, params * a_bits / 8 / 16) \
        + math.ceil(math.log2(params)) - macs // 7
    assert f.evaluate(**values) == pytest.approx(reference, rel=1e-9)
    symbolic = f.expr.subs({sympy.Symbol(k): v for k, v in values.items()})
    assert float(symbolic) == pytest.approx(reference, rel=1e-9)


REJECTED = [
    ("params * * 2", "not a valid formula"),
    ("params +", "not a valid formula"),
    ("", "empty"),
    ("paramz * 2", "unknown variable 'paramz'"),
    ("x + 1", "unknown variable 'x'"),
    ("abs(params)", "call 'abs(params)'"),
    ("pow(params, 2)", "call"),
    ("params.real", "attribute access 'params.real'"),
    ("params[0]", "subscript 'params[0]'"),
    ("__import__('os').system('touch X')", "call"),
    ("lambda: 1", "lambda"),
    ("(lambda: params)()", "call"),
    ("'abc'", "string literal"),
    ("params * 'a'", "string literal"),
    ("b'x'", "string literal"),
    ("True", "bool literal"),
    ("None", "NoneType literal"),
    ("1j", "complex literal"),
    ("params if macs else 1", "conditional"),
    ("params < macs", "comparison"),
    ("params and macs", "boolean operator"),
    ("[params]", "list"),
    ("(params, macs)", "tuple"),
    ("{'a': 1}", "dict"),
    ("[x for x in params]", "comprehension"),
    ("f'{params}'", "f-string"),
    ("params // 2", "FloorDiv"),
    ("params % 2", "Mod"),
    ("params << 2", "LShift"),
    ("~params", "operator"),
    ("not params", "operator"),
    ("(y := 3)", "assignment"),
    ("min(params)", "fewer than two arguments"),
    ("ceil(params, 2)", "2 arguments"),
    ("max(*params)", "starred"),
    ("ceil(x=params)", "keyword argument"),
    ("min", "function used without a call"),
    ("params / 0", "division by zero"),
    ("log2(0)", "log2 of a non-positive number"),
    ("9 ** 9 ** 9 ** 9", "exponent beyond"),
    ("params ** 5000", "exponent beyond"),
    ("10 ** 300 * 10 ** 300", "no finite value"),
    ("(-8) ** 0.5", "no finite real value"),
    ("1e999", "non-finite number"),
    ("params\nimport os", "not a valid formula"),
    ("params; macs", "not a valid formula"),
    ("1" * 1001, "at most 1000"),
]


@pytest.mark.parametrize("text,fragment", REJECTED)
def test_formulas_outside_the_grammar_are_rejected(text, fragment):
    with pytest.raises(FormulaError) as info:
        parse_formula(text, "cost.latency")
    message = str(info.value)
    assert isinstance(info.value, SpecError)
    assert message.startswith("cost.latency: ")
    assert fragment in message
    assert info.value.key == "cost.latency"


def test_rejection_message_says_what_is_allowed():
    with pytest.raises(FormulaError) as info:
        parse_formula("sqrt(params)", "cost.bops")
    message = str(info.value)
    for name in ("params", "w_bits", "min", "log2", "+ - * / **"):
        assert name in message


def test_code_injection_in_a_formula_runs_nothing(tmp_path):
    marker = tmp_path / "X"
    for text in (f"__import__('os').system('touch {marker}')",
                 f"params + __import__('os').system('touch {marker}')",
                 f"(lambda: __import__('os').system('touch {marker}'))()"):
        with pytest.raises(FormulaError):
            parse_formula(text)
    assert not marker.exists()


def test_evaluation_errors_name_the_formula_and_values():
    f = parse_formula("macs / groups", "cost.per_group")
    with pytest.raises(FormulaError) as info:
        f.evaluate(macs=10, groups=0)
    assert "cost.per_group" in str(info.value) and "groups=0" in str(info.value)
    with pytest.raises(FormulaError):
        parse_formula("log2(params)").evaluate(params=0)
    with pytest.raises(FormulaError):
        parse_formula("params ** 1000").evaluate(params=1e10)   # overflows a float


def test_evaluate_refuses_unknown_and_missing_variables():
    f = parse_formula("params * w_bits")
    with pytest.raises(TypeError, match="paramz"):
        f.evaluate(paramz=1, params=1, w_bits=8)
    with pytest.raises(TypeError, match="w_bits"):
        f.evaluate(params=1)
    # Known variables the formula does not use are fine: callers pass all of them.
    assert f.evaluate(params=2, w_bits=8, macs=5, a_bits=3) == 16.0


def test_documented_vocabulary():
    assert set(FUNCTIONS) == {"min", "max", "ceil", "floor", "log2"}
    assert {"params", "macs", "w_bits", "a_bits", "out_bits", "in_elems", "out_elems",
            "weight_elems", "groups"} <= set(VARIABLES)
    assert all(doc for doc in VARIABLES.values())
    for name in VARIABLES:   # every documented variable is accepted
        assert parse_formula(name).variables == (name,)
