"""The safe codec for torch.fx graphs: graphs, modules and values as JSON plus tensors, never code.

Saved models (`qcompiler.artifact`) and qpacks (`qcompiler.backends.qpack`) are both a directory
holding one JSON document and one safetensors file whose SHA-256 the document records; this
module writes and reads such containers and encodes what goes in them.

Decoding builds nothing from names it does not know: functions are looked up with `getattr` on a
fixed set of module objects (torch, torch.nn.functional, operator, math, builtins.getattr) and
checked against what graphs legitimately call, methods must be `torch.Tensor` methods, and
modules are rebuilt from an allowlist of classes with their constructor arguments. No pickle,
no eval, no importlib of stored names. Values in node arguments and meta are JSON with a type tag
for everything JSON cannot say (tuples, non-finite floats, slices, dtypes, node references ...).
"""
from __future__ import annotations

import builtins
import dataclasses
import hashlib
import inspect
import json
import math
import operator
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from torch import fx, nn

from .attention import masked_softmax
from .errors import ArtifactError
from .exact import (
    ExactAdd, ExactConv2d, ExactEmbedding, ExactGlobalAvgPool, ExactLayerNorm, ExactLinear, ExactLUT, ExactMatmul, ExactScale,
    ExactSoftmax, KernelRequantize,
)
from .formats import FloatFormat, Format, HostFloat, IntFormat, LUTFormat, NF4Format
from .layers import Affine, GainLayerNorm, ScaledAdd
from .plan import Plan
from .quantizers import FakeQuantize

# Larger than any honest document (a graph of 100k nodes is a few tens of MiB).
MAX_JSON_BYTES = 512 << 20


# ---------------------------------------------------------------------------------------------
# Functions: qualified names through an explicit allowlist of module objects
# ---------------------------------------------------------------------------------------------

# Order matters only for which of two equal spellings is written (F.conv2d is torch.conv2d).
FUNCTION_NAMESPACES: dict[str, Any] = {
    "torch.nn.functional": F,
    "torch": torch,
    "operator": operator,
    "math": math,
    "builtins": builtins,
}
_BUILTINS_ALLOWED = frozenset({"getattr"})
# Private torch functions that traced graphs do contain.
_TORCH_PRIVATE_ALLOWED = frozenset({"_assert"})
# torch builtins that touch files, threads, global state or the TorchScript importer: never a
# tensor op of a quantized model, so a model.json naming them has been tampered with.
_TORCH_DENIED = frozenset({"from_file", "fork", "wait", "merge_type_from_type_comment", "from_numpy"})
_TORCH_DENIED_PREFIXES = ("set_", "autocast_", "clear_", "import_", "init_")
# operator.call calls any callable: it would turn a graph into a general interpreter.
_OPERATOR_DENIED = frozenset({"call"})
# Tensor methods that run a Python callable taken from the graph, or hand out storage.
_METHODS_DENIED = frozenset({
    "apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook",
    "untyped_storage", "storage", "share_memory_", "pin_memory", "numpy", "tolist",
})


def _function_allowed(namespace: str, name: str, fn: Any) -> bool:
    """Whether `fn`, found as `namespace.name`, is something a quantized graph may call."""
    if not name.isidentifier() or (name.startswith("_") and not (
            namespace == "torch" and name in _TORCH_PRIVATE_ALLOWED)):
        return False
    if inspect.isclass(fn) or inspect.ismodule(fn) or not callable(fn):
        return False
    module = getattr(fn, "__module__", None) or ""
    if namespace == "builtins":
        return name in _BUILTINS_ALLOWED
    if namespace == "operator":
        return name not in _OPERATOR_DENIED and inspect.isbuiltin(fn)
    if namespace == "math":
        return inspect.isbuiltin(fn)
    if namespace == "torch.nn.functional":
        return module == "torch.nn.functional" or (inspect.isbuiltin(fn) and module.startswith("torch"))
    # torch: its C++ ops, the Python ops of torch.functional (split, einsum ...) and _assert.
    if name in _TORCH_DENIED or name.startswith(_TORCH_DENIED_PREFIXES):
        return False
    if inspect.isbuiltin(fn):
        return module.startswith("torch")
    return module == "torch.functional" or name in _TORCH_PRIVATE_ALLOWED


# Graphs captured by torch.export keep the ATen operators qcompiler has no spelling for (mask
# arithmetic, shape queries): saved as "torch.ops.aten.<op>.<overload>". Operator names may be
# dunders (aten.__and__); the same denials as for torch apply.
ATEN_PREFIX = "torch.ops.aten."
_ATEN_NAME = re.compile(r"^(__)?[a-z][a-z0-9_]*[a-z0-9](__)?$")
# qcompiler's own graph functions (fx-wrapped leaves that canonicalize writes).
QCOMPILER_FUNCTIONS = {"qcompiler.attention.masked_softmax": masked_softmax}


def _aten_name(fn: Any) -> str | None:
    if not isinstance(fn, torch._ops.OpOverload) or fn.namespace != "aten":
        return None
    op, overload = fn._opname, fn._overloadname
    return f"{ATEN_PREFIX}{op}.{overload}" if _aten_allowed(op, overload) else None


def _aten_allowed(op: str, overload: str) -> bool:
    return (bool(_ATEN_NAME.match(op)) and (overload == "default" or overload.isidentifier())
            and op not in _TORCH_DENIED and not op.startswith(_TORCH_DENIED_PREFIXES))


def function_name(fn: Any) -> str | None:
    """The qualified name under which `fn` is found in the allowlist, or None."""
    aten = _aten_name(fn)
    if aten is not None:
        return aten
    for qualified, own_fn in QCOMPILER_FUNCTIONS.items():
        if fn is own_fn:
            return qualified
    own = getattr(fn, "__name__", None)
    for namespace, ns in FUNCTION_NAMESPACES.items():
        if isinstance(own, str) and getattr(ns, own, None) is fn and _function_allowed(namespace, own, fn):
            return f"{namespace}.{own}"
    # Some functions carry another __name__ than the one they are exported as (boolean_dispatch).
    for namespace, ns in FUNCTION_NAMESPACES.items():
        for name in sorted(vars(ns)):
            if vars(ns)[name] is fn and _function_allowed(namespace, name, fn):
                return f"{namespace}.{name}"
    return None


def resolve_function(qualified: Any) -> Callable[..., Any]:
    """The function a qualified name from a model.json names; ValueError if it is not allowed."""
    if not isinstance(qualified, str):
        raise ValueError(f"a function name must be a string, got {qualified!r}")
    if qualified in QCOMPILER_FUNCTIONS:
        return QCOMPILER_FUNCTIONS[qualified]
    if qualified.startswith(ATEN_PREFIX):
        op, _, overload = qualified[len(ATEN_PREFIX):].partition(".")
        packet = getattr(torch.ops.aten, op, None) if _aten_allowed(op, overload) else None
        fn = getattr(packet, overload, None) if packet is not None else None
        if not isinstance(fn, torch._ops.OpOverload):
            raise ValueError(f"function {qualified!r} is not one a saved graph may call")
        return fn
    namespace, _, name = qualified.rpartition(".")
    if namespace not in FUNCTION_NAMESPACES:
        raise ValueError(
            f"function {qualified!r} is not in an allowed module ({', '.join(FUNCTION_NAMESPACES)})")
    fn = getattr(FUNCTION_NAMESPACES[namespace], name, None) if name.isidentifier() else None
    if fn is None or not _function_allowed(namespace, name, fn):
        raise ValueError(f"function {qualified!r} is not one a saved graph may call")
    return fn


def getattr_allowed(args: tuple) -> bool:
    """`getattr(x, name)` nodes read public attributes (x.shape, x.device) and nothing else.

    Dunder attributes (`__class__`, `__globals__` ...) are how a crafted graph would walk from a
    tensor to arbitrary Python objects.
    """
    return len(args) == 2 and isinstance(args[1], str) and args[1].isidentifier() and not args[1].startswith("_")


def method_allowed(name: Any) -> bool:
    return (isinstance(name, str) and name.isidentifier() and not name.startswith("_")
            and name not in _METHODS_DENIED and callable(getattr(torch.Tensor, name, None)))


# ---------------------------------------------------------------------------------------------
# Values: tagged JSON for what plain JSON cannot say
# ---------------------------------------------------------------------------------------------

def torch_enum_name(value: Any) -> str:
    return str(value).removeprefix("torch.")


def encode_value(value: Any, where: str, nodes_ok: bool = True) -> Any:
    """`value` as JSON: scalars and lists as themselves, everything else as a one-key tag object."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {"float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, fx.Node):
        if not nodes_ok:
            raise ArtifactError(f"{where}: a graph node ({value.name}) where only data is expected")
        return {"node": value.name}
    if isinstance(value, torch.Size):
        return {"size": [int(v) for v in value]}
    if isinstance(value, tuple):
        return {"tuple": [encode_value(v, where, nodes_ok) for v in value]}
    if isinstance(value, list):
        return [encode_value(v, where, nodes_ok) for v in value]
    if isinstance(value, dict):
        return {"dict": [[encode_value(k, where, nodes_ok), encode_value(v, where, nodes_ok)]
                         for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [encode_value(v, where, nodes_ok) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": None}
    if isinstance(value, torch.dtype):
        return {"dtype": torch_enum_name(value)}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": torch_enum_name(value)}
    if isinstance(value, torch.layout):
        return {"layout": torch_enum_name(value)}
    raise ArtifactError(
        f"{where}: cannot save a value of type {type(value).__name__} ({value!r:.80}); saved graphs "
        "hold numbers, strings, tuples, lists, dicts, slices, dtypes, devices and node references")


def torch_enum(name: Any, kind: type, what: str) -> Any:
    value = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(value, kind):
        raise ValueError(f"{name!r} is not a torch {what}")
    return value


def decode_value(data: Any, nodes: dict[str, fx.Node] | None) -> Any:
    """The inverse of `encode_value`; ValueError on anything malformed."""
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [decode_value(v, nodes) for v in data]
    if not isinstance(data, dict) or len(data) != 1:
        raise ValueError(f"expected a value or a one-key tag object, got {data!r:.120}")
    (tag, body), = data.items()
    if tag == "float":
        if body not in ("nan", "inf", "-inf"):
            raise ValueError(f"a tagged float is 'nan', 'inf' or '-inf', got {body!r}")
        return float(body)
    if tag == "node":
        if nodes is None:
            raise ValueError(f"a node reference ({body!r}) where only data is allowed")
        if not isinstance(body, str) or body not in nodes:
            raise ValueError(f"refers to node {body!r}, which is not defined before it")
        return nodes[body]
    if tag in ("tuple", "size", "slice", "dict") and not isinstance(body, list):
        raise ValueError(f"a {tag!r} tag holds a list, got {body!r:.80}")
    if tag == "tuple":
        return tuple(decode_value(v, nodes) for v in body)
    if tag == "size":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in body):
            raise ValueError(f"a torch.Size holds integers, got {body!r:.80}")
        return torch.Size(body)
    if tag == "slice":
        if len(body) != 3:
            raise ValueError(f"a slice has three parts, got {body!r:.80}")
        return slice(*(decode_value(v, nodes) for v in body))
    if tag == "dict":
        out = {}
        for item in body:
            if not isinstance(item, list) or len(item) != 2:
                raise ValueError(f"dict items are [key, value] pairs, got {item!r:.80}")
            key = decode_value(item[0], nodes)
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise ValueError(f"a dict key must be a scalar, got {key!r:.80}")
            out[key] = decode_value(item[1], nodes)
        return out
    if tag == "ellipsis":
        return Ellipsis
    if tag == "dtype":
        return torch_enum(body, torch.dtype, "dtype")
    if tag == "memory_format":
        return torch_enum(body, torch.memory_format, "memory format")
    if tag == "layout":
        return torch_enum(body, torch.layout, "layout")
    if tag == "device":
        if not isinstance(body, str):
            raise ValueError(f"a device is a string, got {body!r:.80}")
        return torch.device(body)
    raise ValueError(f"unknown value tag {tag!r}")


# ---------------------------------------------------------------------------------------------
# Modules: allowlisted classes and their constructor arguments
# ---------------------------------------------------------------------------------------------

def _attrs(*names: str) -> Callable[[nn.Module], dict[str, Any]]:
    return lambda m: {n: getattr(m, n) for n in names}


def _with(base: Callable[[nn.Module], dict[str, Any]], **derived: Callable[[nn.Module], Any]
          ) -> Callable[[nn.Module], dict[str, Any]]:
    return lambda m: {**base(m), **{k: f(m) for k, f in derived.items()}}


def _has(attr: str) -> Callable[[nn.Module], bool]:
    return lambda m: getattr(m, attr) is not None


_CONV = _with(_attrs("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "groups", "padding_mode"), bias=_has("bias"))
_CONV_T = _with(_attrs("in_channels", "out_channels", "kernel_size", "stride", "padding",
                       "output_padding", "groups", "dilation", "padding_mode"), bias=_has("bias"))
_BN = _attrs("num_features", "eps", "momentum", "affine", "track_running_stats")
_MAX_POOL = _attrs("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_INPLACE = _attrs("inplace")
_NONE = _attrs()

# Exact classes (a subclass may override forward, which a save cannot carry) by saved name.
MODULE_CLASSES: dict[str, tuple[type, Callable[[nn.Module], dict[str, Any]]]] = {
    "torch.nn.Conv1d": (nn.Conv1d, _CONV),
    "torch.nn.Conv2d": (nn.Conv2d, _CONV),
    "torch.nn.Conv3d": (nn.Conv3d, _CONV),
    "torch.nn.ConvTranspose1d": (nn.ConvTranspose1d, _CONV_T),
    "torch.nn.ConvTranspose2d": (nn.ConvTranspose2d, _CONV_T),
    "torch.nn.ConvTranspose3d": (nn.ConvTranspose3d, _CONV_T),
    "torch.nn.Linear": (nn.Linear, _with(_attrs("in_features", "out_features"), bias=_has("bias"))),
    "torch.nn.BatchNorm1d": (nn.BatchNorm1d, _BN),
    "torch.nn.BatchNorm2d": (nn.BatchNorm2d, _BN),
    "torch.nn.BatchNorm3d": (nn.BatchNorm3d, _BN),
    "torch.nn.LayerNorm": (nn.LayerNorm, _with(_attrs("normalized_shape", "eps", "elementwise_affine"),
                                               bias=_has("bias"))),
    "torch.nn.GroupNorm": (nn.GroupNorm, _attrs("num_groups", "num_channels", "eps", "affine")),
    "torch.nn.Embedding": (nn.Embedding, _attrs("num_embeddings", "embedding_dim", "padding_idx",
                                                "max_norm", "norm_type", "scale_grad_by_freq", "sparse")),
    "torch.nn.MaxPool1d": (nn.MaxPool1d, _MAX_POOL),
    "torch.nn.MaxPool2d": (nn.MaxPool2d, _MAX_POOL),
    "torch.nn.MaxPool3d": (nn.MaxPool3d, _MAX_POOL),
    "torch.nn.AvgPool1d": (nn.AvgPool1d, _attrs("kernel_size", "stride", "padding", "ceil_mode",
                                                "count_include_pad")),
    "torch.nn.AvgPool2d": (nn.AvgPool2d, _attrs("kernel_size", "stride", "padding", "ceil_mode",
                                                "count_include_pad", "divisor_override")),
    "torch.nn.AvgPool3d": (nn.AvgPool3d, _attrs("kernel_size", "stride", "padding", "ceil_mode",
                                                "count_include_pad", "divisor_override")),
    "torch.nn.AdaptiveAvgPool1d": (nn.AdaptiveAvgPool1d, _attrs("output_size")),
    "torch.nn.AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, _attrs("output_size")),
    "torch.nn.AdaptiveAvgPool3d": (nn.AdaptiveAvgPool3d, _attrs("output_size")),
    "torch.nn.AdaptiveMaxPool1d": (nn.AdaptiveMaxPool1d, _attrs("output_size", "return_indices")),
    "torch.nn.AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d, _attrs("output_size", "return_indices")),
    "torch.nn.AdaptiveMaxPool3d": (nn.AdaptiveMaxPool3d, _attrs("output_size", "return_indices")),
    "torch.nn.MultiheadAttention": (nn.MultiheadAttention, _with(
        _attrs("embed_dim", "num_heads", "dropout", "add_zero_attn", "kdim", "vdim", "batch_first"),
        bias=_has("in_proj_bias"), add_bias_kv=_has("bias_k"))),
    "torch.nn.Upsample": (nn.Upsample, _attrs("size", "scale_factor", "mode", "align_corners",
                                              "recompute_scale_factor")),
    "torch.nn.PixelShuffle": (nn.PixelShuffle, _attrs("upscale_factor")),
    "torch.nn.PixelUnshuffle": (nn.PixelUnshuffle, _attrs("downscale_factor")),
    "torch.nn.Flatten": (nn.Flatten, _attrs("start_dim", "end_dim")),
    "torch.nn.Unflatten": (nn.Unflatten, _attrs("dim", "unflattened_size")),
    "torch.nn.Identity": (nn.Identity, _NONE),
    # Padding modules keep their pad widths in `padding` (a tuple) and constant pads a `value`.
    "torch.nn.ZeroPad1d": (nn.ZeroPad1d, _attrs("padding")),
    "torch.nn.ZeroPad2d": (nn.ZeroPad2d, _attrs("padding")),
    "torch.nn.ZeroPad3d": (nn.ZeroPad3d, _attrs("padding")),
    "torch.nn.ConstantPad1d": (nn.ConstantPad1d, _attrs("padding", "value")),
    "torch.nn.ConstantPad2d": (nn.ConstantPad2d, _attrs("padding", "value")),
    "torch.nn.ConstantPad3d": (nn.ConstantPad3d, _attrs("padding", "value")),
    "torch.nn.ReflectionPad1d": (nn.ReflectionPad1d, _attrs("padding")),
    "torch.nn.ReflectionPad2d": (nn.ReflectionPad2d, _attrs("padding")),
    "torch.nn.ReplicationPad1d": (nn.ReplicationPad1d, _attrs("padding")),
    "torch.nn.ReplicationPad2d": (nn.ReplicationPad2d, _attrs("padding")),
    "torch.nn.Dropout": (nn.Dropout, _attrs("p", "inplace")),
    "torch.nn.ReLU": (nn.ReLU, _INPLACE),
    "torch.nn.ReLU6": (nn.ReLU6, _INPLACE),
    "torch.nn.Hardtanh": (nn.Hardtanh, _attrs("min_val", "max_val", "inplace")),
    "torch.nn.LeakyReLU": (nn.LeakyReLU, _attrs("negative_slope", "inplace")),
    "torch.nn.PReLU": (nn.PReLU, _attrs("num_parameters")),
    "torch.nn.ELU": (nn.ELU, _attrs("alpha", "inplace")),
    "torch.nn.CELU": (nn.CELU, _attrs("alpha", "inplace")),
    "torch.nn.SELU": (nn.SELU, _INPLACE),
    "torch.nn.GELU": (nn.GELU, _attrs("approximate")),
    "torch.nn.SiLU": (nn.SiLU, _INPLACE),
    "torch.nn.Mish": (nn.Mish, _INPLACE),
    "torch.nn.Hardswish": (nn.Hardswish, _INPLACE),
    "torch.nn.Hardsigmoid": (nn.Hardsigmoid, _INPLACE),
    "torch.nn.Sigmoid": (nn.Sigmoid, _NONE),
    "torch.nn.Tanh": (nn.Tanh, _NONE),
    "torch.nn.LogSigmoid": (nn.LogSigmoid, _NONE),
    "torch.nn.Softsign": (nn.Softsign, _NONE),
    "torch.nn.Tanhshrink": (nn.Tanhshrink, _NONE),
    "torch.nn.Hardshrink": (nn.Hardshrink, _attrs("lambd")),
    "torch.nn.Softshrink": (nn.Softshrink, _attrs("lambd")),
    "torch.nn.Softplus": (nn.Softplus, _attrs("beta", "threshold")),
    "torch.nn.Threshold": (nn.Threshold, _attrs("threshold", "value", "inplace")),
    "torch.nn.GLU": (nn.GLU, _attrs("dim")),
    "torch.nn.Softmax": (nn.Softmax, _attrs("dim")),
    "torch.nn.LogSoftmax": (nn.LogSoftmax, _attrs("dim")),
    "torch.nn.Softmin": (nn.Softmin, _attrs("dim")),
    # Rebuilt from zeros; the saved scale and shift are assigned like any parameter.
    "qcompiler.layers.Affine": (Affine, lambda m: {"channels": m.num_channels, "channel_dim": m.channel_dim}),
    "qcompiler.layers.ScaledAdd": (ScaledAdd, lambda m: {"channels": m.channels}),
    "qcompiler.layers.GainLayerNorm": (GainLayerNorm, lambda m: {
        "normalized_shape": m.normalized_shape[-1], "eps": m.eps, "elementwise_affine": m.elementwise_affine,
        "bias": m.bias is not None}),
    # Rebuilt from the plan group it names: its format and parameters live in the plan.
    "qcompiler.quantizers.FakeQuantize": (FakeQuantize, lambda m: {"group": m.group}),
    # model_requant's exact kernels and requantizers: arguments here, integer tensors as buffers.
    "qcompiler.exact.ExactConv2d": (ExactConv2d, _with(_CONV, accumulator_bits=lambda m: m.accumulator_bits,
                                                       float32_output=lambda m: m.float32_output)),
    "qcompiler.exact.ExactLinear": (ExactLinear, _with(_attrs("in_features", "out_features", "accumulator_bits",
                                                              "float32_output"), bias=_has("bias"))),
    "qcompiler.exact.ExactAdd": (ExactAdd, _attrs("zero_points", "qmin", "qmax", "mode", "rounding", "left_shift",
                                                  "channels")),
    "qcompiler.exact.ExactLUT": (ExactLUT, _attrs("entries", "in_qmin", "in_zero_point", "out_zero_point")),
    "qcompiler.exact.ExactLayerNorm": (ExactLayerNorm, _attrs("size", "in_zero_point", "eps_codes", "out_zero_point", "qmin",
                                                              "qmax", "eps", "in_gain_bits")),
    "qcompiler.exact.ExactMatmul": (ExactMatmul, _attrs("zero_points", "qmin", "qmax", "mode", "rounding")),
    "qcompiler.exact.ExactScale": (ExactScale, _attrs("constant", "zero_points", "qmin", "qmax", "mode", "rounding")),
    "qcompiler.exact.ExactEmbedding": (ExactEmbedding, _attrs("num_embeddings", "embedding_dim", "out_zero_point")),
    "qcompiler.exact.ExactSoftmax": (ExactSoftmax, _attrs("entries", "dim", "is_causal", "out_zero_point", "qmin", "qmax",
                                                          "out_multiplier")),
    "qcompiler.exact.ExactGlobalAvgPool": (ExactGlobalAvgPool, _attrs("channels", "window", "keepdim")),
    "qcompiler.exact.KernelRequantize": (KernelRequantize, _attrs("group", "channels", "channel_dim", "mode",
                                                                  "rounding")),
}
CLASS_NAMES = {cls: name for name, (cls, _) in MODULE_CLASSES.items()}


def construct_module(class_name: str, kwargs: dict[str, Any], plan: Plan) -> nn.Module:
    cls, _ = MODULE_CLASSES[class_name]
    if cls is Affine:
        channels = kwargs.pop("channels")
        return Affine(torch.zeros(channels), torch.zeros(channels), **kwargs)
    if cls is ScaledAdd:
        return ScaledAdd(torch.ones(kwargs["channels"]), torch.ones(kwargs["channels"]))
    if cls is FakeQuantize:
        gid = kwargs["group"]
        if not isinstance(gid, int) or not 0 <= gid < len(plan.groups):
            raise ValueError(f"names quantizer group {gid!r}, which the plan does not have")
        g = plan.group(gid)
        return FakeQuantize(g.id, g.format, g.params)
    if cls is KernelRequantize:
        g = plan.group(_plan_group(kwargs.pop("group"), plan))
        return KernelRequantize(g.id, g.format, g.params, **kwargs)
    return cls(**kwargs)


def _plan_group(gid: Any, plan: Plan) -> int:
    if not isinstance(gid, int) or not 0 <= gid < len(plan.groups):
        raise ValueError(f"names quantizer group {gid!r}, which the plan does not have")
    return gid


def module_state(module: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """Every parameter and buffer of a module by dotted name, with its kind."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        out[name] = ("parameter", p)
    for name, b in module.named_buffers(remove_duplicate=False):
        out[name] = ("buffer", b)
    return out


# ---------------------------------------------------------------------------------------------
# Formats and tensor records
# ---------------------------------------------------------------------------------------------

FORMAT_FAMILIES: dict[str, type] = {
    "int": IntFormat, "fp": FloatFormat, "nf4": NF4Format, "lut": LUTFormat, "float": HostFloat,
}


def encode_format(fmt: Format) -> dict[str, Any]:
    return {"family": fmt.family, "fields": dataclasses.asdict(fmt)}


def decode_format(data: Any) -> Format:
    if not isinstance(data, dict) or set(data) != {"family", "fields"}:
        raise ValueError(f"a format is {{family, fields}}, got {data!r:.120}")
    cls = FORMAT_FAMILIES.get(data["family"])
    if cls is None:
        raise ValueError(f"unknown format family {data['family']!r}; known: {', '.join(FORMAT_FAMILIES)}")
    expected = {f.name for f in dataclasses.fields(cls)}
    fields = data["fields"]
    if not isinstance(fields, dict) or set(fields) != expected:
        raise ValueError(f"{cls.__name__} has fields {sorted(expected)}, got {fields!r:.120}")
    return cls(**fields)


def tensor_info(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": torch_enum_name(t.dtype)}


# ---------------------------------------------------------------------------------------------
# Containers: one JSON document and one safetensors file in a directory
# ---------------------------------------------------------------------------------------------

def reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (non-finite floats are stored as tagged values)")


def write_atomically(path: Path, data: bytes) -> None:
    # Write then rename: an interrupted write never leaves a half-written file under the real name.
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise ArtifactError(f"cannot write {path}: {exc.strerror or exc}") from None


def document_text(document: dict[str, Any]) -> bytes:
    """A document as the deterministic JSON text a container holds."""
    return (json.dumps(document, sort_keys=True, indent=1, allow_nan=False, ensure_ascii=True) + "\n").encode("utf-8")


def write_container(path: Path, document_file: str, document: dict[str, Any], tensor_file: str, blob: bytes) -> None:
    """Write the tensor file, then the document: the document is the marker of a complete write."""
    write_atomically(path / tensor_file, blob)
    write_atomically(path / document_file, document_text(document))


def blob_record(blob: bytes, **extra: Any) -> dict[str, Any]:
    """What a document records of its tensor file: the file's SHA-256 and anything else."""
    return {"sha256": hashlib.sha256(blob).hexdigest(), **extra}


class ContainerReader:
    """Reads one container directory; every error names the file and the part of it that is wrong.

    `kind` names what the directory holds ("saved model", "qpack") and `redo` what to do when it
    is damaged ("save the model again").
    """

    def __init__(self, path: Path, document_file: str, tensor_file: str, *, format_name: str,
                 format_version: int, kind: str, redo: str):
        self.path = path
        self.json_path, self.tensor_path = path / document_file, path / tensor_file
        self.format_name, self.format_version, self.kind, self.redo = format_name, format_version, kind, redo
        self.tensors: dict[str, torch.Tensor] = {}

    def error(self, where: str, message: str, file: Path | None = None) -> ArtifactError:
        return ArtifactError(f"{file or self.json_path}: {where}: {message}")

    def read_document(self) -> dict[str, Any]:
        if not self.path.is_dir():
            raise ArtifactError(f"{self.path}: no {self.kind} here (not a directory); give the directory "
                                f"that wrote it")
        for f in (self.json_path, self.tensor_path):
            if not f.is_file():
                raise ArtifactError(f"{f}: missing; a {self.kind} is a directory with {self.json_path.name} and "
                                    f"{self.tensor_path.name}, {self.redo}")
        size = self.json_path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ArtifactError(f"{self.json_path}: {size} bytes is too large for a {self.kind} description")
        try:
            doc = json.loads(self.json_path.read_bytes().decode("utf-8"), parse_constant=reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ArtifactError(f"{self.json_path}: not valid JSON ({exc}); the file is corrupted or "
                                f"truncated, {self.redo}") from None
        if not isinstance(doc, dict) or doc.get("format") != self.format_name:
            raise ArtifactError(f"{self.json_path}: not a {self.kind} of qcompiler (its 'format' is not "
                                f"{self.format_name!r})")
        version = doc.get("format_version")
        if version != self.format_version:
            raise ArtifactError(
                f"{self.json_path}: format_version is {version!r} but this qcompiler reads version "
                f"{self.format_version} of the {self.kind} format; read it with the qcompiler version that "
                f"wrote it, or {self.redo}")
        return doc

    def read_tensors(self, info: Any) -> None:
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise self.error("tensors", "missing the checksum of the tensor file")
        blob = self.tensor_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != info["sha256"]:
            raise ArtifactError(
                f"{self.tensor_path}: its contents do not match the SHA-256 recorded in {self.json_path.name}; "
                f"the file is corrupted or truncated, or belongs to another {self.kind}")
        try:
            self.tensors = st_load(blob)
        except Exception as exc:  # safetensors raises its own error types for malformed headers
            raise ArtifactError(f"{self.tensor_path}: not a readable safetensors file ({exc})") from None

    def tensor(self, key: str, info: Any, where: str, shape: tuple[int, ...] | None = None,
               cast: bool = False) -> torch.Tensor:
        """The stored tensor `key`, checked against the shape and dtype `info` records (or `shape`).

        A dtype other than the recorded one is an error, or with `cast` converted to it (a saved
        model stores every scale as float32).
        """
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
            raise self.error(where, f"tensor record {info!r:.120} has no shape")
        t = self.tensors.get(key)
        if t is None:
            raise ArtifactError(f"{self.tensor_path}: tensor {key!r} ({where}) is missing; the tensor file "
                                f"does not belong to this {self.json_path.name}")
        expected = tuple(info["shape"]) if shape is None else tuple(shape)
        if tuple(t.shape) != expected or tuple(info["shape"]) != expected:
            raise ArtifactError(f"{self.tensor_path}: tensor {key!r} ({where}) has shape {tuple(t.shape)}, "
                                f"expected {expected}")
        try:
            dtype = torch_enum(info.get("dtype"), torch.dtype, "dtype")
        except ValueError as exc:
            raise self.error(where, str(exc)) from None
        if t.dtype != dtype:
            if not cast:
                raise ArtifactError(f"{self.tensor_path}: tensor {key!r} ({where}) is {t.dtype}, but "
                                    f"{self.json_path.name} records {info.get('dtype')}")
            t = t.to(dtype)
        return t
