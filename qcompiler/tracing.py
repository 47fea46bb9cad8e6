"""Tracing: a float nn.Module as a torch.fx.GraphModule whose nodes know their facts.

`capture_module` gives a `GraphModule` from `torch.fx` symbolic tracing, in which every node
carries `meta["shape"]`, `meta["dtype"]`, `meta["params"]`, `meta["macs"]`,
`meta["in_elems"]` and `meta["out_elems"]`, found by running the graph on the example inputs
(the way `torch.fx.passes.shape_prop` does). MACs and element counts are for the example inputs
as given (batch included).

Tracing real models fails; that is the first complaint about every quantization tool. When the
whole model cannot be traced, the innermost module whose `forward` raised is kept as an opaque
leaf (it will run in float on the host) and tracing is tried again, until it succeeds or the
failure is in the root's own `forward`, which gets a `CaptureError` that names the module, the
source line, the reason and the way out. `gm.meta["opaque_modules"]` maps every module kept
opaque to the reason.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import math
import operator
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .context import as_input_tuple
from .errors import CaptureError

# Frames inside these directories are tracing machinery, never the user's code.
_TORCH_DIR = os.path.dirname(torch.__file__)
_MACHINERY = tuple(
    os.path.join(_TORCH_DIR, d) for d in ("fx", "_dynamo", "utils", "overrides.py", "_tensor.py", "_ops.py", "_jit_internal.py")
) + (os.path.abspath(__file__),)

# Messages of torch.fx errors, mapped to what they mean for the user.
_REASONS = (
    ("symbolically traced variables cannot be used as inputs to control flow",
     "data-dependent control flow: a value computed from a traced tensor decides an if/while/assert"),
    ("Proxy object cannot be iterated",
     "iteration over a traced value: a loop over an input list or tensor, or unpacking of unknown length"),
    ("object of type 'Proxy' has no len()", "len() of a traced value"),
    ("'Proxy' object cannot be interpreted as an integer", "a traced value used where Python needs an int"),
)


@dataclass(frozen=True)
class OpaqueModule:
    """Why a module could not be traced and where."""

    path: str
    module_type: str
    reason: str
    error: str
    source: str  # "file:line: code"

    def __str__(self) -> str:
        return f"{self.reason} at {self.source} ({self.error})"


def registered_notrace_functions() -> tuple[Any, ...]:
    """Functions a model library registered as not to be traced into, when it is loaded.

    timm buries shape-dependent control flow in small functions it registers for FX (CrossViT's
    `scale_image` compares the input size with the patch grid); traced as one call each, they
    run in float on the host like any op the chip does not have."""
    registry = sys.modules.get("timm.layers._fx")
    functions = getattr(registry, "_autowrap_functions", ()) if registry is not None else ()
    return tuple(sorted((f for f in functions if callable(f)), key=lambda f: getattr(f, "__qualname__", "")))


class _Tracer(fx.Tracer):
    """A Tracer with user leaves that remembers which module's forward raised."""

    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_paths: Iterable[str] = ()):
        # Defaults: plain pickle.loads re-traces a GraphModule's code with its tracer class, every
        # module a leaf (qcompiler.executor sends graphs node by node instead).
        super().__init__(autowrap_functions=registered_notrace_functions())
        self.leaf_types = leaf_types
        self.leaf_paths = set(leaf_paths)
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            # The innermost module sees the exception first; outer modules keep its answer.
            if not hasattr(exc, "_qcompiler_module"):
                try:
                    exc._qcompiler_module = self.path_of_module(m)
                except NameError:
                    pass
            raise


def _user_frame(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_MACHINERY)]
    if not frames:
        return "<unknown source>"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


def _own_dirs() -> tuple[str, ...]:
    """qcompiler's own code: the package and its passes (separate folders in a source tree)."""
    passes = importlib.util.find_spec("qcompiler.passes")
    dirs = [os.path.dirname(os.path.abspath(__file__))]
    if passes is not None and passes.submodule_search_locations:
        dirs += [os.path.abspath(p) for p in passes.submodule_search_locations]
    return tuple(d + os.sep for d in dirs)


def source_line(node: fx.Node) -> str:
    """'file:line: code' of the user's code that created `node`, from torch.fx's stack trace."""
    lines = (node.stack_trace or "").strip().splitlines()
    found = "<unknown source>"
    for i, text in enumerate(lines):
        text = text.strip()
        if not text.startswith('File "'):
            continue
        filename = text.split('"')[1]
        if filename.startswith((_TORCH_DIR + os.sep, *_own_dirs())):
            continue
        line_no = text.split(", line ")[1].split(",")[0] if ", line " in text else "?"
        code = lines[i + 1].strip() if i + 1 < len(lines) else ""
        found = f"{filename}:{line_no}: {code}"
    return found


def _reason(exc: BaseException) -> str:
    text = str(exc)
    for needle, meaning in _REASONS:
        if needle in text:
            return meaning
    return f"{type(exc).__name__} while tracing"


def _split_leaves(leaf_modules: Iterable[Any]) -> tuple[tuple[type, ...], set[str]]:
    types, paths = [], set()
    for leaf in leaf_modules:
        if isinstance(leaf, str):
            paths.add(leaf)
        elif isinstance(leaf, type) and issubclass(leaf, nn.Module):
            types.append(leaf)
        else:
            raise CaptureError(
                f"leaf_modules entries must be module paths (str) or nn.Module classes, got {leaf!r}"
            )
    return tuple(types), paths


def _check_leaf_paths(model: nn.Module, paths: set[str]) -> None:
    known = dict(model.named_modules())
    for p in sorted(paths):
        if p not in known:
            raise CaptureError(f"leaf_modules names {p!r}, which is not a submodule of {type(model).__name__}")


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _module_caches_restored(model: nn.Module):
    """Give every module back its public dict and list attributes as they were before a trace.

    Some modules memoise tensors in plain Python containers (timm's LeViT and EfficientFormerV2
    keep `attention_bias_cache`, keyed by `str(device)`). Under symbolic tracing the key is the
    name of a proxy and the value a proxy of this trace; left behind, a later trace (a retry
    with more leaves, or a second compile of the same model) reads that stale proxy and builds
    a graph referring to a node it does not have. The user's model must not keep them either."""
    saved = {}
    for module in model.modules():
        for key, value in vars(module).items():
            if not key.startswith("_") and type(value) in (dict, list):
                saved[(module, key)] = (value, copy.copy(value))
    try:
        yield
    finally:
        for (module, key), (container, contents) in saved.items():
            container.clear()
            if isinstance(container, dict):
                container.update(contents)
            else:
                container.extend(contents)
            vars(module)[key] = container


def trace(model: nn.Module, leaf_modules: Iterable[Any] = (), concrete_args: dict[str, Any] | None = None,
          ) -> fx.GraphModule:
    """Symbolically trace `model`, keeping untraceable submodules as opaque leaves."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture needs an nn.Module, got {type(model).__name__}")
    leaf_types, leaf_paths = _split_leaves(leaf_modules)
    _check_leaf_paths(model, leaf_paths)
    opaque: dict[str, OpaqueModule] = {}
    modules = dict(model.named_modules())
    while True:
        tracer = _Tracer(leaf_types, leaf_paths | set(opaque))
        try:
            with _module_caches_restored(model):
                graph = tracer.trace(model, concrete_args)
            break
        except CaptureError:
            raise
        except Exception as exc:
            path = getattr(exc, "_qcompiler_module", "")
            info = OpaqueModule(
                path=path, module_type=type(modules.get(path, model)).__name__, reason=_reason(exc),
                error=f"{type(exc).__name__}: {_one_line(exc)}", source=_user_frame(exc),
            )
            if path == "" or path in opaque:
                error = CaptureError(_root_failure_message(model, info, opaque))
                error.root_untraceable = True
                raise error from exc
            opaque[path] = info
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.meta["opaque_modules"] = {p: str(info) for p, info in opaque.items()}
    gm.meta["opaque_details"] = opaque
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in opaque:
            node.meta["opaque"] = True
    return gm


def _root_failure_message(model: nn.Module, info: OpaqueModule, opaque: dict[str, OpaqueModule]) -> str:
    where = f"module {info.path!r} ({info.module_type})" if info.path else f"the root module ({type(model).__name__})"
    # Suggest the largest child first: on detectors and segmenters that is the backbone.
    children = [n for n, c in sorted(model.named_children(), key=lambda nc: -sum(p.numel() for p in nc[1].parameters()))]
    lines = [
        f"cannot capture {type(model).__name__}: the forward of {where} cannot be traced by torch.fx.",
        f"  where:  {info.source}",
        f"  reason: {info.reason}",
        f"  error:  {info.error}",
        "  what to do:",
    ]
    if info.path:
        lines.append(f"    - pass leaf_modules=[{info.path!r}] to keep it opaque (it will run in float on the host);")
    else:
        if children:
            lines.append(
                f"    - capture a traceable part instead, e.g. qcompiler.capture(model.{children[0]}, ...) "
                f"(submodules: {', '.join(children[:8])});"
            )
    lines.append("    - pass concrete_args={'<argument>': value} to fix the value that drives the control flow;")
    lines.append("    - or rewrite that forward without Python control flow that depends on tensor values.")
    if opaque:
        lines.append("  already kept opaque: " + ", ".join(sorted(opaque)))
    return "\n".join(lines)


# --- facts per node -------------------------------------------------------------------------

_MATMULS = {operator.matmul, torch.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm"}
_FUNCTIONAL_CONVS = {F.conv1d, F.conv2d, F.conv3d}
_FUNCTIONAL_CONV_T = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}


def _numel(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (tuple, list)):
        return sum(_numel(v) for v in value)
    return 0


def _shape(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return [_shape(v) for v in value]
    return None


def _dtype(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.dtype
    if isinstance(value, (tuple, list)):
        return [_dtype(v) for v in value]
    return None


def _first_tensor(values: Iterable[Any]) -> torch.Tensor | None:
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    return None


def _attention_macs(m: nn.MultiheadAttention, args: tuple, kwargs: dict) -> int:
    q = args[0] if args else kwargs["query"]
    k = args[1] if len(args) > 1 else kwargs.get("key", q)
    e = m.embed_dim
    lq, lk = q.numel() // e, k.numel() // m.kdim
    proj = lq * e * e + lk * m.kdim * e + lk * m.vdim * e  # q, k, v projections
    attn = 2 * lq * (k.shape[0] if not m.batch_first else k.shape[1]) * e  # scores and weighted sum
    return proj + attn + lq * e * e  # plus the output projection


def module_macs(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> int:
    """Multiply-accumulates of one call of a leaf module (0 for element-wise work)."""
    x = _first_tensor(args)
    if isinstance(m, nn.modules.conv._ConvTransposeNd) and x is not None:
        return x.numel() * (m.out_channels // m.groups) * math.prod(m.kernel_size)
    if isinstance(m, nn.modules.conv._ConvNd) and isinstance(out, torch.Tensor):
        return out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    if isinstance(m, nn.Linear) and isinstance(out, torch.Tensor):
        return out.numel() * m.in_features
    if isinstance(m, nn.MultiheadAttention):
        return _attention_macs(m, args, kwargs)
    # Element-wise work and opaque leaves (whose insides are not traced) count no MACs.
    return 0


def function_macs(target: Any, args: tuple, kwargs: dict, out: Any) -> int:
    if not isinstance(out, torch.Tensor):
        return 0
    if target in _FUNCTIONAL_CONVS:
        w = args[1] if len(args) > 1 else kwargs["weight"]
        return out.numel() * w.shape[1] * math.prod(w.shape[2:])
    if target in _FUNCTIONAL_CONV_T:
        x, w = args[0], (args[1] if len(args) > 1 else kwargs["weight"])
        return x.numel() * w.shape[1] * math.prod(w.shape[2:])
    if target is F.linear:
        w = args[1] if len(args) > 1 else kwargs["weight"]
        return out.numel() * w.shape[1]
    if target in _MATMULS:
        a = args[0] if args else kwargs.get("input")
        return out.numel() * a.shape[-1] if isinstance(a, torch.Tensor) else 0
    if target is F.scaled_dot_product_attention:
        q, k = args[0], args[1]
        return 2 * q.numel() * k.shape[-2]
    return 0


class NodeFacts(fx.Interpreter):
    """Runs the graph once and writes shape, dtype, params, MACs and element counts on each node."""

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        out = getattr(self, n.op)(n.target, args, kwargs)
        params = macs = 0
        if n.op == "call_module":
            m = self.fetch_attr(n.target)
            params = sum(p.numel() for p in m.parameters())
            macs = module_macs(m, args, kwargs, out)
        elif n.op == "call_function":
            macs = function_macs(n.target, args, kwargs, out)
        elif n.op == "call_method" and n.target in _MATMULS:
            macs = function_macs(n.target, args, kwargs, out)
        elif n.op == "get_attr" and isinstance(out, torch.Tensor):
            params = out.numel()
        x = _first_tensor(list(args) + list(kwargs.values()))
        n.meta.update(
            shape=_shape(out), dtype=_dtype(out), params=params, macs=macs,
            out_elems=_numel(out), in_elems=x.numel() if x is not None else 0,
        )
        return out


def record_facts(gm: fx.GraphModule, example_inputs: tuple[Any, ...], concrete_args: dict[str, Any] | None = None,
                 arg_names: list[str] | None = None) -> Any:
    """Run `gm` on the example inputs with NodeFacts; returns the output."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if concrete_args and arg_names:
        # Arguments fixed by concrete_args stay placeholders (torch.fx checks them): pass the values.
        example_inputs = tuple(example_inputs) + tuple(
            concrete_args.get(name, p.args[0] if p.args else None)
            for name, p in zip(arg_names[len(example_inputs):], placeholders[len(example_inputs):])
        )
    if len(example_inputs) > len(placeholders):
        raise CaptureError(
            f"{len(example_inputs)} example inputs given but the traced forward takes {len(placeholders)}: "
            f"{', '.join(p.target for p in placeholders)}"
        )
    gm.meta["fact_inputs"] = RecordedInputs(tuple(example_inputs))
    # Run in eval mode so BatchNorm neither uses batch statistics nor updates the user's running
    # statistics, then give every module back the mode it had.
    modes = {m: m.training for m in gm.modules()}
    try:
        gm.eval()
        with torch.no_grad():
            return NodeFacts(gm).run(*example_inputs)
    except Exception as exc:
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs]
        raise CaptureError(
            f"the captured graph of {gm.__class__.__name__} fails on the example inputs {shapes}: "
            f"{type(exc).__name__}: {_one_line(exc)}\n"
            "  check that example_inputs have the shape and dtype the model expects (batch dimension included)"
        ) from exc
    finally:
        for m, mode in modes.items():
            m.training = mode


@dataclass(frozen=True, eq=False)
class RecordedInputs:
    """The inputs a graph's facts were recorded on (`gm.meta["fact_inputs"]`). Equal when their
    tensors are equal, so graphs that carry them still compare by value."""

    values: tuple[Any, ...]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecordedInputs) and _same_values(self.values, other.values)

    __hash__ = None  # type: ignore[assignment]


def _same_values(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_values(x, y) for x, y in zip(a, b))
    return a == b


def refresh_facts(gm: fx.GraphModule) -> None:
    """Record the facts again on the inputs capture used, after a rewrite added nodes."""
    inputs = gm.meta.get("fact_inputs")
    if inputs is None:
        raise CaptureError("the graph was not captured by qcompiler.tracing (no example inputs recorded); "
                           "capture it with capture_module first")
    record_facts(gm, inputs.values)


def unsupplied_defaults(model: nn.Module, given: int, concrete_args: dict[str, Any] | None) -> dict[str, Any]:
    """The forward's optional arguments that the example inputs leave out, with their defaults
    (tensor defaults and arguments the user fixed in concrete_args excepted)."""
    if not isinstance(model, nn.Module):
        return {}                       # trace() says what is wrong
    params = list(inspect.signature(model.forward).parameters.values())
    return {p.name: p.default for p in params[given:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty
            and not isinstance(p.default, torch.Tensor) and p.name not in (concrete_args or {})}


def bind_defaults(gm: fx.GraphModule, defaults: dict[str, Any], arg_names: list[str]) -> list[str]:
    """Remove the placeholders of arguments traced as constants at their defaults.

    `forward(self, x, attn_mask=None, is_causal=False)` called with `x` alone always runs with
    the defaults: capture traces it with them fixed (torch.fx then drops the branches they
    decide), and here their checked placeholders go, so the compiled model takes exactly what
    the example inputs give and every pass, the calibration data and the backends agree on it.
    Returns the names bound."""
    bound = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for name, node in zip(arg_names, placeholders):
        if name not in defaults:
            continue
        value = defaults[name]
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
        gm.graph.erase_node(node)
        bound.append(name)
    if bound:
        gm.recompile()
    return bound


def capture_module(model: nn.Module, example_inputs: Any, leaf_modules: Iterable[Any] = (),
                   concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    inputs = as_input_tuple(example_inputs)
    if not inputs:
        raise CaptureError("example_inputs is empty: give one tensor or a tuple of the forward's tensors")
    defaults = unsupplied_defaults(model, len(inputs), concrete_args)
    try:
        gm = trace(model, leaf_modules, {**defaults, **(concrete_args or {})} or None)
    except CaptureError as exc:
        if not getattr(exc, "root_untraceable", False):
            raise
        gm = _exported_or_raise(model, inputs, exc)
        record_facts(gm, inputs)
        return gm
    gm.meta["front_end"] = "torch.fx"
    arg_names = list(inspect.signature(model.forward).parameters)
    gm.meta["bound_defaults"] = bind_defaults(gm, defaults, arg_names)
    kept = [n for n in arg_names if n not in gm.meta["bound_defaults"]]
    record_facts(gm, inputs, concrete_args, kept)
    return gm


def _exported_or_raise(model: nn.Module, inputs: tuple[Any, ...], fx_error: CaptureError) -> fx.GraphModule:
    """The second front end (`qcompiler.export_frontend`) for a root torch.fx cannot trace; if it
    fails too, torch.fx's error with export's reason added (still root_untraceable, so a model
    with traceable parts is compiled in parts)."""
    from .export_frontend import export_module

    try:
        gm = export_module(model, inputs)
    except CaptureError as exc:
        error = CaptureError(f"{fx_error}\n  {exc}")
        error.root_untraceable = True
        raise error from fx_error
    gm.meta.update(front_end="torch.export", opaque_modules={}, opaque_details={}, bound_defaults=[],
                   fx_failure=str(fx_error).splitlines()[0])
    return gm
