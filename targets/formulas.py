"""Cost-model formulas of target specs: a whitelisted arithmetic grammar, parsed and never run.

A spec's `[cost]` entries (`weight_memory = "params * w_bits / 8"`) are text from a file the
user may have downloaded. We parse them with `ast.parse(mode="eval")`, accept only numbers, the
per-node variables of `VARIABLES`, `+ - * / **`, unary minus and the functions of `FUNCTIONS`,
and from that checked tree build both a sympy expression (for display and symbolic use) and a
plain-Python evaluator. No formula text ever reaches eval, exec, compile-to-bytecode or sympify.
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

import sympy

from qcompiler.errors import SpecError

# The closed list of per-node quantities a formula may use. The cost model (allocate_bits)
# computes these for every node and candidate format; keep this list and its docs in sync
# with it, the docs are printed in docs/target-spec.md.
VARIABLES: Mapping[str, str] = MappingProxyType({
    "params": "parameters of the node (weight and bias elements); 0 for ops without parameters",
    "weight_elems": "elements of the weight tensor alone (bias excluded); 0 for ops without weights",
    "macs": "multiply-accumulate operations of one forward pass (batch 1)",
    "w_bits": "bits per weight of the weight format (32 for float weights); for ops that multiply "
              "two activations (matmul) the second operand's bits; 0 for other ops without weights",
    "a_bits": "bits per element of the input activation format (32 when not quantized)",
    "out_bits": "bits per element of the output activation format (32 when not quantized)",
    "in_elems": "elements of all activation inputs together (batch 1)",
    "out_elems": "elements of the output (batch 1)",
    "groups": "convolution groups (channels for depthwise conv; 1 for every other op)",
    "w_scales": "scale (and zero-point) values stored with the weights: 1 per tensor, one per "
                "output channel, one per group or block; for look-up tables the codebook entries "
                "(2**bits per table); 0 for float weights and ops without weights",
})

# Functions a formula may call, with their arity and meaning.
FUNCTIONS: Mapping[str, str] = MappingProxyType({
    "min": "min(a, b, ...): the smallest argument (at least two)",
    "max": "max(a, b, ...): the largest argument (at least two)",
    "ceil": "ceil(x): the smallest integer >= x",
    "floor": "floor(x): the largest integer <= x",
    "log2": "log2(x): base-2 logarithm, exact for powers of two; x must be positive",
})

MAX_FORMULA_CHARS = 1000
# A constant exponent beyond this is never a cost model, and exact sympy arithmetic on e.g.
# 9**9**9 would hang the loader; a spec must not be able to do that.
MAX_CONSTANT_EXPONENT = 1024

_Evaluator = Callable[[Mapping[str, float]], float]

_OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}
_GRAMMAR = (
    "a formula may use numbers, the variables " + ", ".join(VARIABLES)
    + ", the operators + - * / ** and unary minus, and the functions " + ", ".join(FUNCTIONS)
)


class FormulaError(SpecError):
    """A formula is not in the whitelisted grammar, or cannot be evaluated with given values.

    `key` is where the formula sits in the spec (e.g. `cost.latency`) and `reason` what is wrong
    with it, so the spec loader can report it under the file name.
    """

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class _Node:
    """One checked piece of a formula: its sympy form, evaluator and value if constant."""

    expr: sympy.Expr
    fn: _Evaluator
    const: float | None


@dataclass(frozen=True)
class Formula:
    """A parsed cost formula over the per-node variables of `VARIABLES`.

    `expr` is the sympy expression, `variables` the names it uses (sorted), `text` what the
    spec said. `evaluate(**values)` computes it in floating point.
    """

    text: str
    key: str
    expr: sympy.Expr = field(compare=False)
    variables: tuple[str, ...]
    _fn: _Evaluator = field(repr=False, compare=False)

    @classmethod
    def parse(cls, text: str | int | float, key: str = "formula") -> "Formula":
        return parse_formula(text, key)

    def __reduce__(self) -> tuple:
        # Pickled (by Ray, between processes) as its text, parsed again on arrival.
        return parse_formula, (self.text, self.key)

    def evaluate(self, **values: float) -> float:
        """The formula's value; every name in `variables` must be given, others are ignored.

        Names outside `VARIABLES` are refused so that a misspelt variable in the calling code
        does not silently leave the formula's input unset.
        """
        unknown = sorted(set(values) - set(VARIABLES))
        if unknown:
            raise TypeError(f"unknown formula variable(s) {unknown}; known: {', '.join(VARIABLES)}")
        missing = [v for v in self.variables if v not in values]
        if missing:
            raise TypeError(f"formula {self.key} = {self.text!r} needs {', '.join(missing)}")
        try:
            result = self._fn(values)
        except (ZeroDivisionError, OverflowError, ValueError) as exc:
            used = ", ".join(f"{v}={values[v]!r}" for v in self.variables)
            raise FormulaError(
                self.key, f"{self.text!r} cannot be evaluated with {used or 'no variables'}: {exc}"
            ) from None
        return result

    __call__ = evaluate


def parse_formula(text: str | int | float, key: str = "formula") -> Formula:
    """Check `text` against the formula grammar and build a `Formula`; raise FormulaError."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise FormulaError(key, f"a formula is a string or a number, got {type(text).__name__}")
    if not isinstance(text, str):
        text = repr(text)
    if len(text) > MAX_FORMULA_CHARS:
        raise FormulaError(key, f"formula is {len(text)} characters long; at most {MAX_FORMULA_CHARS} are allowed")
    if not text.strip():
        raise FormulaError(key, "formula is empty; " + _GRAMMAR)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        detail = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
        raise FormulaError(key, f"{text!r} is not a valid formula ({detail}); {_GRAMMAR}") from None
    names: set[str] = set()
    node = _Builder(text.strip(), key, names).build(tree.body)
    return Formula(text=text, key=key, expr=node.expr, variables=tuple(sorted(names)), _fn=node.fn)


class _Builder:
    """Walks a parsed formula, refusing every node outside the grammar."""

    def __init__(self, text: str, key: str, names: set[str]):
        self.text = text
        self.key = key
        self.names = names

    def reject(self, node: ast.AST, what: str) -> FormulaError:
        segment = ast.get_source_segment(self.text, node) or self.text
        return FormulaError(self.key, f"{what} {segment!r} is not allowed in {self.text!r}; {_GRAMMAR}")

    def build(self, node: ast.AST) -> _Node:
        if isinstance(node, ast.Constant):
            return self.constant(node)
        if isinstance(node, ast.Name):
            return self.variable(node)
        if isinstance(node, ast.UnaryOp):
            return self.unary(node)
        if isinstance(node, ast.BinOp):
            return self.binary(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        kinds = {
            ast.Attribute: "attribute access", ast.Subscript: "subscript", ast.Lambda: "lambda",
            ast.Compare: "comparison", ast.BoolOp: "boolean operator", ast.IfExp: "conditional",
            ast.ListComp: "comprehension", ast.GeneratorExp: "comprehension",
            ast.SetComp: "comprehension", ast.DictComp: "comprehension", ast.List: "list",
            ast.Tuple: "tuple", ast.Dict: "dict", ast.Set: "set", ast.JoinedStr: "f-string",
            ast.NamedExpr: "assignment", ast.Starred: "starred argument", ast.Await: "await",
        }
        what = next((w for t, w in kinds.items() if isinstance(node, t)), type(node).__name__)
        raise self.reject(node, what)

    def constant(self, node: ast.Constant) -> _Node:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            what = "string literal" if isinstance(value, (str, bytes)) else f"{type(value).__name__} literal"
            raise self.reject(node, what)
        try:
            as_float = float(value)
        except OverflowError:
            raise self.reject(node, "number too large") from None
        if not math.isfinite(as_float):
            raise self.reject(node, "non-finite number")
        expr = sympy.Integer(value) if isinstance(value, int) else sympy.Float(value)
        return _Node(expr, lambda env, v=as_float: v, as_float)

    def variable(self, node: ast.Name) -> _Node:
        if node.id not in VARIABLES:
            if node.id in FUNCTIONS:
                raise self.reject(node, "function used without a call")
            raise self.reject(node, "unknown variable")
        self.names.add(node.id)
        name = node.id
        return _Node(sympy.Symbol(name), lambda env: float(env[name]), None)

    def unary(self, node: ast.UnaryOp) -> _Node:
        operand = self.build(node.operand)
        if isinstance(node.op, ast.UAdd):
            return operand
        if not isinstance(node.op, ast.USub):
            raise self.reject(node, "operator")
        f = operand.fn
        return self.folded(node, -operand.expr, lambda env: -f(env), operand.const is not None)

    def binary(self, node: ast.BinOp) -> _Node:
        op = type(node.op)
        if op not in _OPERATORS:
            raise self.reject(node, f"operator {type(node.op).__name__}")
        left, right = self.build(node.left), self.build(node.right)
        lf, rf = left.fn, right.fn
        if op is ast.Add:
            return self.folded(node, left.expr + right.expr, lambda env: lf(env) + rf(env),
                               left.const is not None and right.const is not None)
        if op is ast.Sub:
            return self.folded(node, left.expr - right.expr, lambda env: lf(env) - rf(env),
                               left.const is not None and right.const is not None)
        if op is ast.Mult:
            return self.folded(node, left.expr * right.expr, lambda env: lf(env) * rf(env),
                               left.const is not None and right.const is not None)
        if op is ast.Div:
            if right.const == 0.0:
                raise self.reject(node, "division by zero")
            return self.folded(node, left.expr / right.expr, lambda env: lf(env) / rf(env),
                               left.const is not None and right.const is not None)
        # Power: bound constant exponents before sympy computes anything exactly.
        if right.const is not None and abs(right.const) > MAX_CONSTANT_EXPONENT:
            raise self.reject(node, f"exponent beyond {MAX_CONSTANT_EXPONENT}")
        if left.const is not None and right.const is not None:
            try:
                value = math.pow(left.const, right.const)
            except (OverflowError, ValueError, ZeroDivisionError):
                raise self.reject(node, "power with no finite real value") from None
            if not math.isfinite(value):
                raise self.reject(node, "power with no finite real value")
        return self.folded(node, sympy.Pow(left.expr, right.expr), lambda env: math.pow(lf(env), rf(env)),
                           left.const is not None and right.const is not None)

    def call(self, node: ast.Call) -> _Node:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            raise self.reject(node, "call")
        name = node.func.id
        if node.keywords:
            raise self.reject(node, "keyword argument in call")
        args = [self.build(a) for a in node.args]
        const = all(a.const is not None for a in args)
        fns = [a.fn for a in args]
        if name in ("min", "max"):
            if len(args) < 2:
                raise self.reject(node, f"{name} with fewer than two arguments")
            if name == "min":
                return self.folded(node, sympy.Min(*[a.expr for a in args]),
                                   lambda env: min(f(env) for f in fns), const)
            return self.folded(node, sympy.Max(*[a.expr for a in args]),
                               lambda env: max(f(env) for f in fns), const)
        if len(args) != 1:
            raise self.reject(node, f"{name} with {len(args)} arguments (it takes one)")
        (arg,) = args
        f = arg.fn
        if name == "ceil":
            return self.folded(node, sympy.ceiling(arg.expr), lambda env: float(math.ceil(f(env))), const)
        if name == "floor":
            return self.folded(node, sympy.floor(arg.expr), lambda env: float(math.floor(f(env))), const)
        if arg.const is not None and arg.const <= 0:
            raise self.reject(node, "log2 of a non-positive number")
        return self.folded(node, sympy.log(arg.expr, 2), lambda env: math.log2(f(env)), const)

    def folded(self, node: ast.AST, expr: sympy.Expr, fn: _Evaluator, const: bool) -> _Node:
        """Evaluate constant sub-trees now so that overflow is a load-time error, not a surprise."""
        if not const:
            return _Node(expr, fn, None)
        try:
            value = fn({})
        except (ZeroDivisionError, OverflowError, ValueError):
            raise self.reject(node, "constant expression with no finite value") from None
        if not math.isfinite(value):
            raise self.reject(node, "constant expression with no finite value")
        return _Node(expr, fn, value)
