"""Functional convolutions, linears and LayerNorms whose weights are constants become modules.

Models call `F.conv2d(x, w, b, ...)` or `F.linear(x, w, b)` where `w` is a parameter of theirs
(timm's `Linear` and `Conv2dSame` subclasses trace through to the functional call) or a tensor
computed from parameters (re-parameterised blocks that sum branch kernels, weight
standardisation, scaled weights). At inference every such weight is a constant. Evaluating it
once and installing an `nn.Linear` / `nn.ConvNd` that holds it lets every later pass (BatchNorm
folding, weight groups, rounding, lowering) treat the kernel like any module kernel.

A weight that depends on a model input (a dynamic convolution, attention) is not a constant and
stays functional: it is an activation, quantized as one.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .fx_util import copy_sharing_tensors, fetch_attr, set_submodule

__all__ = ["constant_value", "explicit_padding", "functional_kernel_error", "functional_kernels_to_modules"]

# functional -> (module class, names of its positional arguments after the input)
KERNELS: dict[Any, tuple[type[nn.Module], tuple[str, ...]]] = {
    F.linear: (nn.Linear, ("weight", "bias")),
    F.conv1d: (nn.Conv1d, ("weight", "bias", "stride", "padding", "dilation", "groups")),
    F.conv2d: (nn.Conv2d, ("weight", "bias", "stride", "padding", "dilation", "groups")),
    F.conv3d: (nn.Conv3d, ("weight", "bias", "stride", "padding", "dilation", "groups")),
    # A functional LayerNorm (torch.export's graphs) holds its weights as graph constants, which
    # later passes would take for activations to quantize; as a module they are its parameters.
    F.layer_norm: (nn.LayerNorm, ("normalized_shape", "weight", "bias", "eps")),
}
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "eps": 1e-5}


def functional_kernel_error(name: str) -> str:
    """What to do about a functional kernel whose weights canonicalize could not make a module of."""
    return (f"weights of functional kernel {name} cannot be quantized: they are not a float tensor of a "
            "conv/linear shape that canonicalize can turn into a module kernel; call it through an "
            "nn.Conv2d / nn.Linear, or keep its module in float with leaf_modules=[...]")


class _NotConstant(Exception):
    pass


def _constant(arg: Any, gm: fx.GraphModule, memo: dict[fx.Node, Any]) -> Any:
    """The value of `arg` if it depends on no graph input, else raise _NotConstant."""
    if isinstance(arg, (tuple, list)):
        return type(arg)(_constant(a, gm, memo) for a in arg)
    if isinstance(arg, dict):
        return {k: _constant(v, gm, memo) for k, v in arg.items()}
    if not isinstance(arg, fx.Node):
        return arg
    if arg in memo:
        return memo[arg]
    if arg.op == "get_attr":
        value = fetch_attr(gm, arg.target)
    elif arg.op in ("call_function", "call_method", "call_module") and not arg.meta.get("opaque"):
        args, kwargs = _constant(arg.args, gm, memo), _constant(arg.kwargs, gm, memo)
        with torch.no_grad():
            if arg.op == "call_function":
                value = arg.target(*args, **kwargs)
            elif arg.op == "call_method":
                value = getattr(args[0], arg.target)(*args[1:], **kwargs)
            else:
                value = gm.get_submodule(arg.target)(*args, **kwargs)
    else:
        raise _NotConstant(arg.name)
    memo[arg] = value
    return value


def constant_value(arg: Any, gm: fx.GraphModule) -> Any:
    """The value of `arg` (a node, or a structure of nodes) evaluated once, if it depends on no graph
    input; None if it does."""
    try:
        return _constant(arg, gm, {})
    except _NotConstant:
        return None


def _module_name(gm: fx.GraphModule, weight: Any, node: fx.Node) -> str:
    """The weight's owner path when the weight is read straight from `<owner>.weight` and the
    owner holds nothing else the graph could need; otherwise a fresh name after the node."""
    if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target.endswith(".weight"):
        owner = weight.target[: -len(".weight")]
        try:
            held = gm.get_submodule(owner)
        except AttributeError:
            held = None
        if held is not None and type(held) is nn.Module and not list(held.children()) and (
                {name for name, _ in held.named_parameters(recurse=False)}
                | {name for name, _ in held.named_buffers(recurse=False)}) <= {"weight", "bias"}:
            return owner
    name, i = f"{node.name}_kernel", 1
    while hasattr(gm, name):
        name, i = f"{node.name}_kernel_{i}", i + 1
    return name


def _as_parameter(value: torch.Tensor) -> nn.Parameter:
    """A model's own parameter stays the same object (shared, never copied); a computed weight
    becomes a new parameter."""
    if isinstance(value, nn.Parameter):
        return value
    return nn.Parameter(value.detach().clone(), requires_grad=False)


def explicit_padding(padding: Any, kernel_size: tuple[int, ...], dilation: Any) -> Any:
    """`padding="valid"` or `"same"` as the integers it means, where it is symmetric; else as given.

    "same" pads `dilation * (k - 1)` in total per dimension, the odd pixel after; symmetric (and
    so expressible as integers, which the integer backends and ONNX take) when that is even."""
    if not isinstance(padding, str):
        return padding
    n = len(kernel_size)
    if padding == "valid":
        return (0,) * n
    dilation = (dilation,) * n if isinstance(dilation, int) else tuple(dilation)
    totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
    if padding == "same" and all(t % 2 == 0 for t in totals):
        return tuple(t // 2 for t in totals)
    return padding


def _build(cls: type[nn.Module], values: dict[str, Any]) -> nn.Module | None:
    weight, bias = values["weight"], values["bias"]
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or (
            bias is not None and not isinstance(bias, torch.Tensor)):
        return None
    if cls is nn.LayerNorm:
        shape = values["normalized_shape"]
        if not isinstance(shape, (tuple, list)) or tuple(weight.shape) != tuple(shape) or not isinstance(values["eps"], float):
            return None
        module = nn.LayerNorm(tuple(shape), eps=values["eps"], bias=bias is not None, device="meta")
    elif cls is nn.Linear:
        if weight.dim() != 2:
            return None
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        groups = values["groups"]
        if not isinstance(groups, int) or weight.dim() < 3:
            return None
        kernel = tuple(weight.shape[2:])
        padding = explicit_padding(values["padding"], kernel, values["dilation"])
        module = cls(weight.shape[1] * groups, weight.shape[0], kernel, stride=values["stride"],
                     padding=padding, dilation=values["dilation"], groups=groups,
                     bias=bias is not None, device="meta")
    module.weight = _as_parameter(weight)
    if bias is not None:
        module.bias = _as_parameter(bias)
    return module


def explicit_module_padding(gm: fx.GraphModule) -> list[str]:
    """Give conv modules with `padding="valid"` / symmetric `"same"` their integer padding (a
    copy of the module sharing its tensors is installed; the user's module is not touched).
    Returns the modules changed."""
    changed = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.meta.get("opaque"):
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.modules.conv._ConvNd) or isinstance(module, nn.modules.conv._ConvTransposeNd):
            continue
        padding = explicit_padding(module.padding, module.kernel_size, module.dilation)
        if isinstance(module.padding, str) and not isinstance(padding, str):
            copy = copy_sharing_tensors(module)
            copy.padding = padding
            copy._reversed_padding_repeated_twice = [p for p in reversed(padding) for _ in range(2)]
            set_submodule(gm, node.target, copy)
            changed.append(node.target)
    return changed


def functional_kernels_to_modules(gm: fx.GraphModule) -> list[str]:
    """Replace every functional conv/linear whose weight and bias are constants by a call of a
    module holding them; returns the names of the modules installed. Exact: the module computes
    the same function with the same tensors."""
    installed = []
    memo: dict[fx.Node, Any] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in KERNELS or not node.args:
            continue
        cls, names = KERNELS[node.target]
        given = dict(zip(names, node.args[1:]))
        given.update({k: v for k, v in node.kwargs.items() if k in names})
        if "weight" not in given or set(node.kwargs) - set(names):
            continue
        raw = {k: given.get(k, _DEFAULTS.get(k)) for k in names}
        try:
            values = {k: _constant(v, gm, memo) for k, v in raw.items()}
        except _NotConstant:
            continue
        module = _build(cls, values)
        if module is None:
            continue
        target = _module_name(gm, raw["weight"], node)
        gm.add_submodule(target, module)
        node.op, node.target, node.args, node.kwargs = "call_module", target, (node.args[0],), {}
        installed.append(target)
    if installed:
        gm.graph.eliminate_dead_code()
    return installed
