"""canonicalize: one spelling per op kind, and every node labelled with its kind.

Before: the graph as traced, where a ReLU may be `nn.ReLU`, `F.relu(x, inplace=True)`,
`torch.relu`, `x.relu()` or `x.relu_()`, an addition `operator.add`, `operator.iadd` (`+=`),
`torch.add` or `x.add_`, and dropout and identity modules still sit in the dataflow.
After: stateless ops are `call_function` nodes with one canonical target each (the first entry of
their row in CANONICAL below, never in-place), dropout and identity are gone, and every node has
`meta["op_kind"]` from `qcompiler.opkinds`. Modules with parameters (conv, linear, norms) stay
`call_module` nodes; they only get their kind. Functional convs and linears whose weights are
constants (parameters, or tensors computed from them) become module kernels first
(`qcompiler.kernel_modules`).
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..attention import decompose_attention, is_shifted_window_attention, masked_softmax
from ..context import CompileContext
from ..kernel_modules import explicit_module_padding, functional_kernels_to_modules
from ..opkinds import ATTENTION
from ..tracing import refresh_facts
from ..wrapped import unwrap_functions

# kind -> (canonical target, every other spelling as a function, method name or module class).
# Unary activations take (x,) plus the keyword arguments named in ACTIVATION_KWARGS.
CANONICAL: dict[str, tuple[Callable, tuple[Any, ...]]] = {
    "relu": (F.relu, (torch.relu, torch.relu_, F.relu_, "relu", "relu_", nn.ReLU)),
    "relu6": (F.relu6, (nn.ReLU6,)),
    "hardtanh": (F.hardtanh, (F.hardtanh_, nn.Hardtanh)),
    "clamp": (torch.clamp, (torch.clip, torch.clamp_, "clamp", "clip", "clamp_", "clip_")),
    "leaky_relu": (F.leaky_relu, (F.leaky_relu_, nn.LeakyReLU)),
    "elu": (F.elu, (nn.ELU,)),
    "hardswish": (F.hardswish, (nn.Hardswish,)),
    "hardsigmoid": (F.hardsigmoid, (nn.Hardsigmoid,)),
    "silu": (F.silu, (nn.SiLU,)),
    "mish": (F.mish, (nn.Mish,)),
    "gelu": (F.gelu, (nn.GELU,)),
    "sigmoid": (torch.sigmoid, (F.sigmoid, "sigmoid", "sigmoid_", nn.Sigmoid)),
    "tanh": (torch.tanh, (F.tanh, "tanh", "tanh_", nn.Tanh)),
    "softmax": (F.softmax, (torch.softmax, "softmax", nn.Softmax)),
    "log_softmax": (F.log_softmax, (torch.log_softmax, "log_softmax", nn.LogSoftmax)),
    "exp": (torch.exp, ("exp",)),
    "add": (operator.add, (operator.iadd, torch.add, "add", "add_")),
    "sub": (operator.sub, (operator.isub, torch.sub, "sub", "sub_")),
    "mul": (operator.mul, (operator.imul, torch.mul, "mul", "mul_")),
    "div": (operator.truediv, (operator.itruediv, torch.div, torch.true_divide, "div", "div_", "true_divide")),
    "matmul": (torch.matmul, (operator.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm")),
    "cat": (torch.cat, (torch.concat, torch.concatenate)),
    "flatten": (torch.flatten, ("flatten", nn.Flatten)),
    "reshape": (torch.reshape, ("reshape", "view")),
    "permute": (torch.permute, ("permute",)),
    "transpose": (torch.transpose, ("transpose",)),
    "mean": (torch.mean, ("mean",)),
}

# Module kinds that keep their module but get a label: (class, kind), checked in order.
MODULE_KINDS: tuple[tuple[type, str], ...] = (
    (nn.modules.conv._ConvTransposeNd, "conv_transpose"),
    (nn.modules.conv._ConvNd, "conv"),  # refined to depthwise_conv below
    (nn.Linear, "linear"),
    (nn.Embedding, "embedding"),
    (nn.modules.batchnorm._BatchNorm, "batch_norm"),
    (nn.LayerNorm, "layer_norm"),
    (nn.GroupNorm, "group_norm"),
    (nn.modules.instancenorm._InstanceNorm, "instance_norm"),
    (nn.PReLU, "prelu"),
    (nn.modules.pooling._MaxPoolNd, "max_pool"),
    (nn.modules.pooling._AvgPoolNd, "avg_pool"),
    (nn.modules.pooling._AdaptiveAvgPoolNd, "adaptive_avg_pool"),
    (nn.modules.pooling._AdaptiveMaxPoolNd, "adaptive_max_pool"),
    (nn.MultiheadAttention, "multi_head_attention"),
    (nn.Upsample, "interpolate"),
    (nn.PixelShuffle, "pixel_shuffle"),
    (nn.modules.padding._ConstantPadNd, "pad"),
    (nn.modules.padding._ReflectionPadNd, "pad"),
    (nn.modules.padding._ReplicationPadNd, "pad"),
)

# Functions and methods that keep their spelling but get a label.
FUNCTION_KINDS: dict[Any, str] = {
    F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv",
    F.conv_transpose1d: "conv_transpose", F.conv_transpose2d: "conv_transpose",
    F.conv_transpose3d: "conv_transpose", F.linear: "linear", F.embedding: "embedding",
    F.batch_norm: "batch_norm", F.layer_norm: "layer_norm", F.group_norm: "group_norm",
    F.max_pool1d: "max_pool", F.max_pool2d: "max_pool", F.max_pool3d: "max_pool",
    F.avg_pool1d: "avg_pool", F.avg_pool2d: "avg_pool", F.avg_pool3d: "avg_pool",
    F.adaptive_avg_pool1d: "adaptive_avg_pool", F.adaptive_avg_pool2d: "adaptive_avg_pool",
    F.adaptive_avg_pool3d: "adaptive_avg_pool", F.adaptive_max_pool2d: "adaptive_max_pool",
    F.scaled_dot_product_attention: "scaled_dot_product_attention", masked_softmax: "softmax",
    F.interpolate: "interpolate", F.pad: "pad", F.pixel_shuffle: "pixel_shuffle",
    operator.getitem: "getitem", getattr: "size", torch.stack: "stack", torch.split: "split",
    torch.chunk: "chunk", torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze", torch.roll: "roll",
    "size": "size", "dim": "size", "contiguous": "contiguous", "expand": "expand",
    "expand_as": "expand", "split": "split", "chunk": "chunk", "squeeze": "squeeze",
    "unsqueeze": "unsqueeze", "unbind": "split", torch.unbind: "split",
}

REMOVED_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
REMOVED_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout)
# torchvision's stochastic depth is the identity at inference (its `training` argument is False).
STOCHASTIC_DEPTH = ("torchvision.ops.stochastic_depth", "stochastic_depth")

# Keyword arguments that survive when an activation is rewritten, read from its module or call.
ACTIVATION_KWARGS = {
    "hardtanh": ("min_val", "max_val"), "leaky_relu": ("negative_slope",), "elu": ("alpha",),
    "gelu": ("approximate",), "softmax": ("dim",), "log_softmax": ("dim",),
}
# Positional parameter names of the canonical activation functions, to name positional args.
_POSITIONAL = {"hardtanh": ("min_val", "max_val"), "leaky_relu": ("negative_slope",), "elu": ("alpha",),
               "softmax": ("dim",), "log_softmax": ("dim",)}

_SPELLINGS: dict[Any, str] = {}
for _kind, (_canon, _others) in CANONICAL.items():
    for _s in (_canon,) + _others:
        _SPELLINGS.setdefault(_s, _kind)


def _spelling(node: fx.Node, gm: fx.GraphModule) -> Any:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target))
    return node.target


def _kind_of_module(m: nn.Module) -> str:
    for cls, kind in MODULE_KINDS:
        if isinstance(m, cls):
            if kind == "conv" and m.groups > 1 and m.groups == m.in_channels:
                return "depthwise_conv"
            return kind
    return "other"


def op_kind(node: fx.Node, gm: fx.GraphModule) -> str:
    """The canonical kind of a node as traced (before or after rewriting)."""
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    if node.meta.get("opaque"):
        return "opaque"
    spelling = _spelling(node, gm)
    if _hashable(spelling) and spelling in _SPELLINGS:
        kind = _SPELLINGS[spelling]
        if kind == "hardtanh" and _activation_kwargs(node, gm, kind) == {"min_val": 0.0, "max_val": 6.0}:
            return "relu6"
        return kind
    if node.op == "call_module":
        return _kind_of_module(gm.get_submodule(node.target))
    if spelling in (F.conv1d, F.conv2d, F.conv3d):
        groups = node.kwargs.get("groups", node.args[6] if len(node.args) > 6 else 1)
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        shape = weight.meta.get("shape") if isinstance(weight, fx.Node) else None
        if isinstance(groups, int) and groups > 1 and shape and shape[1] == 1:
            return "depthwise_conv"
    if is_shifted_window_attention(spelling):
        return "shifted_window_attention"
    return FUNCTION_KINDS.get(spelling, "other") if _hashable(spelling) else "other"


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _activation_kwargs(node: fx.Node, gm: fx.GraphModule, kind: str) -> dict[str, Any]:
    names = ACTIVATION_KWARGS.get(kind, ())
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return {n: getattr(m, n) for n in names if hasattr(m, n)}
    found = dict(zip(_POSITIONAL.get(kind, ()), node.args[1:]))
    found.update({k: v for k, v in node.kwargs.items() if k in names})
    return found


def _rewrite(node: fx.Node, gm: fx.GraphModule, kind: str) -> tuple[Any, tuple, dict] | None:
    """The canonical (target, args, kwargs) for `node`, or None to keep its spelling."""
    canon = CANONICAL[kind][0]
    args = node.args
    if kind in ("add", "sub", "mul", "div"):
        if len(args) != 2 or node.kwargs:  # alpha=, rounding_mode=, out=: keep as written
            return None
        return canon, tuple(args), {}
    if kind in ("cat", "flatten", "reshape", "permute", "transpose", "mean", "matmul", "clamp"):
        if node.op == "call_module":  # nn.Flatten
            m = gm.get_submodule(node.target)
            return canon, (args[0], m.start_dim, m.end_dim), {}
        if kind in ("reshape", "permute") and node.op == "call_method":
            sizes = None if node.kwargs else _sizes_argument(args[1:])
            return None if sizes is None else (canon, (args[0], sizes), {})
        return canon, tuple(args), dict(node.kwargs)
    # A unary activation: drop inplace=, keep the arguments that change the function.
    return canon, (args[0],), _activation_kwargs(node, gm, kind)


def _sizes_argument(sizes: tuple[Any, ...]) -> Any:
    """The one sequence argument of torch.reshape/permute for the method's varargs, or None if
    unknown. `x.reshape(2, n)`, `x.reshape((2, n))` and `x.reshape(s)` with `s` a traced tuple
    (`x.shape[:-1] + (-1,)`) are all legal; a traced `s` is a sequence when capture recorded a
    list for it (a tensor records a tuple, an int nothing), and without that fact we cannot tell
    `x.reshape(n)` from `x.reshape(s)`. `x.view(torch.half)` reinterprets bytes: not a reshape."""
    if len(sizes) != 1:
        return tuple(sizes) if sizes else None
    (only,) = sizes
    if isinstance(only, (tuple, list)):
        return only
    if isinstance(only, torch.dtype) or (
            isinstance(only, fx.Node) and only.target is getattr and only.args[1:] == ("dtype",)):
        return None
    if isinstance(only, fx.Node):
        recorded = only.meta.get("shape", "unknown")
        if isinstance(recorded, list):
            return only
        return (only,) if recorded is None and "dtype" in only.meta else None
    return (only,)


def _is_inference_identity(node: fx.Node) -> bool:
    target = node.target
    if (getattr(target, "__module__", None), getattr(target, "__name__", None)) == STOCHASTIC_DEPTH:
        training = node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True)
        return training is False
    return False


def _decompose_attention(gm: fx.GraphModule, ctx: CompileContext | None) -> None:
    """Attention into primitive ops (`qcompiler.attention`) unless the target runs it whole, and
    wrapped helpers into theirs (`qcompiler.wrapped`); the new nodes get their facts from the
    inputs capture recorded."""
    if "fact_inputs" not in gm.meta:
        return
    spec = ctx.target if ctx is not None else None
    keep = tuple(k for k in ATTENTION if spec is not None and k in spec.ops)
    done, kept = decompose_attention(gm, keep)
    unwrapped = unwrap_functions(gm)
    if done or unwrapped:
        refresh_facts(gm)
    if ctx is not None:
        if unwrapped:
            ctx.note("canonicalize", f"{len(unwrapped)} wrapped function call(s) written as primitive ops: "
                                     f"{', '.join(unwrapped[:6])}{' ...' if len(unwrapped) > 6 else ''}")
        if done:
            ctx.note("canonicalize", f"{len(done)} attention op(s) decomposed into linears, matmuls and a softmax: "
                                     f"{', '.join(done[:6])}{' ...' if len(done) > 6 else ''}")
        for name, reason in kept.items():
            ctx.note("canonicalize", f"attention {name} kept whole: {reason}")


def canonicalize(gm: fx.GraphModule, ctx: CompileContext | None = None) -> fx.GraphModule:
    _decompose_attention(gm, ctx)
    graph = gm.graph
    installed = functional_kernels_to_modules(gm)
    explicit_module_padding(gm)
    if installed and ctx is not None:
        ctx.note("canonicalize", f"{len(installed)} functional conv/linear/layer-norm call(s) with constant weights became "
                                 f"module kernels: {', '.join(installed[:8])}{' ...' if len(installed) > 8 else ''}")
    for node in list(graph.nodes):
        if node.op == "call_function" and _is_inference_identity(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            continue
        spelling = _spelling(node, gm) if node.op in ("call_module", "call_function", "call_method") else None
        if spelling is not None and not node.meta.get("opaque") and (
            (node.op == "call_module" and issubclass(spelling, REMOVED_MODULES))
            or (_hashable(spelling) and spelling in REMOVED_FUNCTIONS)
        ):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            continue
        kind = op_kind(node, gm)
        if kind == "other" and node.op != "call_module" and node.meta.get("shape") is None:
            kind = "size"  # arithmetic on shapes and asserts: no tensor to quantize
        keeps_spelling = _hashable(spelling) and spelling in FUNCTION_KINDS  # e.g. masked_softmax
        if kind in CANONICAL and not node.meta.get("opaque") and not keeps_spelling:
            rewritten = _rewrite(node, gm, kind)
            if rewritten is not None:
                # Rewrite in place so the node keeps its name, users and facts.
                node.op = "call_function"
                node.target, node.args, node.kwargs = rewritten
                node.meta["params"] = 0
        node.meta["op_kind"] = kind
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
