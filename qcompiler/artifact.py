"""Save and load compiled models as data: a `model.json` and a `tensors.safetensors`, never code.

A save is a directory. `model.json` holds the format version, the target spec (its TOML text, so
a custom spec file that is gone still loads), the quantization plan and the simulated graph node
by node; `tensors.safetensors` holds every tensor (module parameters and buffers, get_attr
constants, the plan's scales, zero points and codebooks) under stable keys, and its SHA-256 is
recorded in `model.json` so that corruption is caught before anything is built.

Loading builds nothing from names it does not know: functions are looked up with `getattr` on a
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
from safetensors.torch import save as st_save
from torch import fx, nn

from .errors import ArtifactError, QCompileError
from .formats import FloatFormat, Format, HostFloat, IntFormat, LUTFormat, NF4Format, QParams
from .exact import ExactAdd, ExactConv2d, ExactGlobalAvgPool, ExactLinear, KernelRequantize
from .layers import Affine
from .plan import GroupPlan, Plan, params_tensors
from .quantizers import FakeQuantize

FORMAT_NAME = "qcompiler-compiled-model"
FORMAT_VERSION = 1
MODEL_FILE = "model.json"
TENSOR_FILE = "tensors.safetensors"
# Larger than any honest model.json (a graph of 100k nodes is a few tens of MiB).
MAX_JSON_BYTES = 512 << 20

# The node meta the report, the drawing and the cost model read; everything else (stack traces,
# nn_module_stack with its class objects) is not needed by a loaded model.
META_KEYS = (
    "op_kind", "role", "group", "weight_group", "fallback", "fused_into", "kernel", "fusion",
    "format", "weight_format", "quantizes", "shape", "dtype", "params", "macs", "in_elems",
    "out_elems", "bias_fit",
)
# Type annotations of nodes only show in the generated code. Classes are saved by name from this
# table, string annotations (from `from __future__ import annotations`) as text of this shape;
# anything else is dropped.
NODE_TYPES: dict[str, type] = {"torch.Tensor": torch.Tensor, "int": int, "float": float, "bool": bool, "str": str}
_NODE_TYPE_NAMES = {t: name for name, t in NODE_TYPES.items()}
_ANNOTATION_TEXT = re.compile(r"[A-Za-z_][\w.\[\], ]{0,200}")
NODE_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


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


def function_name(fn: Any) -> str | None:
    """The qualified name under which `fn` is found in the allowlist, or None."""
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
    namespace, _, name = qualified.rpartition(".")
    if namespace not in FUNCTION_NAMESPACES:
        raise ValueError(
            f"function {qualified!r} is not in an allowed module ({', '.join(FUNCTION_NAMESPACES)})")
    fn = getattr(FUNCTION_NAMESPACES[namespace], name, None) if name.isidentifier() else None
    if fn is None or not _function_allowed(namespace, name, fn):
        raise ValueError(f"function {qualified!r} is not one a saved graph may call")
    return fn


def _getattr_allowed(args: tuple) -> bool:
    """`getattr(x, name)` nodes read public attributes (x.shape, x.device) and nothing else.

    Dunder attributes (`__class__`, `__globals__` ...) are how a crafted graph would walk from a
    tensor to arbitrary Python objects.
    """
    return len(args) == 2 and isinstance(args[1], str) and args[1].isidentifier() and not args[1].startswith("_")


def _method_allowed(name: Any) -> bool:
    return (isinstance(name, str) and name.isidentifier() and not name.startswith("_")
            and name not in _METHODS_DENIED and callable(getattr(torch.Tensor, name, None)))


# ---------------------------------------------------------------------------------------------
# Values: tagged JSON for what plain JSON cannot say
# ---------------------------------------------------------------------------------------------

def _torch_enum_name(value: Any) -> str:
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
        return {"dtype": _torch_enum_name(value)}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": _torch_enum_name(value)}
    if isinstance(value, torch.layout):
        return {"layout": _torch_enum_name(value)}
    raise ArtifactError(
        f"{where}: cannot save a value of type {type(value).__name__} ({value!r:.80}); saved graphs "
        "hold numbers, strings, tuples, lists, dicts, slices, dtypes, devices and node references")


def _torch_enum(name: Any, kind: type, what: str) -> Any:
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
        return _torch_enum(body, torch.dtype, "dtype")
    if tag == "memory_format":
        return _torch_enum(body, torch.memory_format, "memory format")
    if tag == "layout":
        return _torch_enum(body, torch.layout, "layout")
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
    # Rebuilt from the plan group it names: its format and parameters live in the plan.
    "qcompiler.quantizers.FakeQuantize": (FakeQuantize, lambda m: {"group": m.group}),
    # model_requant's exact kernels and requantizers: arguments here, integer tensors as buffers.
    "qcompiler.exact.ExactConv2d": (ExactConv2d, _with(_CONV, accumulator_bits=lambda m: m.accumulator_bits)),
    "qcompiler.exact.ExactLinear": (ExactLinear, _with(_attrs("in_features", "out_features", "accumulator_bits"),
                                                       bias=_has("bias"))),
    "qcompiler.exact.ExactAdd": (ExactAdd, _attrs("zero_points", "qmin", "qmax", "mode", "rounding")),
    "qcompiler.exact.ExactGlobalAvgPool": (ExactGlobalAvgPool, _attrs("channels", "window", "keepdim")),
    "qcompiler.exact.KernelRequantize": (KernelRequantize, _attrs("group", "channels", "channel_dim", "mode",
                                                                  "rounding")),
}
_CLASS_NAMES = {cls: name for name, (cls, _) in MODULE_CLASSES.items()}


def _construct(class_name: str, kwargs: dict[str, Any], plan: Plan) -> nn.Module:
    cls, _ = MODULE_CLASSES[class_name]
    if cls is Affine:
        channels = kwargs.pop("channels")
        return Affine(torch.zeros(channels), torch.zeros(channels), **kwargs)
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


def _state(module: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """Every parameter and buffer of a module by dotted name, with its kind."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        out[name] = ("parameter", p)
    for name, b in module.named_buffers(remove_duplicate=False):
        out[name] = ("buffer", b)
    return out


# ---------------------------------------------------------------------------------------------
# Formats and the plan
# ---------------------------------------------------------------------------------------------

FORMAT_FAMILIES: dict[str, type] = {
    "int": IntFormat, "fp": FloatFormat, "nf4": NF4Format, "lut": LUTFormat, "float": HostFloat,
}


def _encode_format(fmt: Format) -> dict[str, Any]:
    return {"family": fmt.family, "fields": dataclasses.asdict(fmt)}


def _decode_format(data: Any) -> Format:
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


def _tensor_info(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": _torch_enum_name(t.dtype)}


def _encode_group(g: GroupPlan) -> dict[str, Any]:
    params = None
    if g.params is not None:
        p = g.params
        params = {"axis": p.axis, "scale": _tensor_info(p.scale),
                  "zero_point": None if p.zero_point is None else _tensor_info(p.zero_point),
                  "codebook": None if p.codebook is None else _tensor_info(p.codebook)}
    return {
        "id": g.id, "kind": g.kind, "tensors": list(g.tensors), "weights": list(g.weights),
        "owner": g.owner, "op_kind": g.op_kind, "candidates": list(g.candidates),
        "format_name": g.format_name, "format": _encode_format(g.format), "params": params,
        "fallback": g.fallback,
    }


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

def _owning_module(target: str, module_targets: set[str]) -> str | None:
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in module_targets:
            return prefix
    return None


def _save_module(gm: fx.GraphModule, node: fx.Node, plan: Plan, tensors: dict[str, torch.Tensor]
                 ) -> dict[str, Any]:
    target = node.target
    module = gm.get_submodule(target)
    if node.meta.get("opaque"):
        reason = gm.meta.get("opaque_modules", {}).get(target, "it could not be traced")
        raise ArtifactError(
            f"cannot save: module {target!r} ({type(module).__name__}) is an opaque leaf ({reason}); "
            "a saved model holds data, not Python code, so it cannot rebuild that module's forward. "
            "Make it traceable (concrete_args, or rewrite the data-dependent control flow) and "
            "compile again, or save only the traceable part of the model")
    class_name = _CLASS_NAMES.get(type(module))
    if class_name is None:
        raise ArtifactError(
            f"cannot save: module {target!r} (node {node.name}) is a {type(module).__module__}."
            f"{type(module).__qualname__}, which a saved model cannot rebuild without its Python "
            f"code; saveable module classes are {', '.join(sorted(MODULE_CLASSES))}")
    args = MODULE_CLASSES[class_name][1](module)
    if isinstance(module, FakeQuantize):
        _check_fake_quantize(module, target, plan)
    where = f"module {target!r} ({class_name})"
    state = {}
    for name, (kind, t) in sorted(_state(module).items()):
        state[name] = {"kind": kind, **_tensor_info(t),
                       "requires_grad": bool(t.requires_grad) if kind == "parameter" else False}
        tensors[f"module.{target}.{name}"] = t
    return {"class": class_name, "args": {k: encode_value(v, where, nodes_ok=False) for k, v in args.items()},
            "state": state}


def _check_fake_quantize(module: FakeQuantize, target: str, plan: Plan) -> None:
    """A quantizer is saved as a reference to its plan group; refuse one that disagrees with it."""
    ok = 0 <= module.group < len(plan.groups)
    if ok:
        g = plan.group(module.group)
        ok = g.format == module.fmt and (
            (g.params is None and module.params is None)
            or (g.params is not None and module.params is not None and g.params.axis == module.params.axis
                and all(_same_tensor(getattr(g.params, f), getattr(module.params, f))
                        for f in ("scale", "zero_point", "codebook"))))
    if not ok:
        raise ArtifactError(
            f"cannot save: quantizer {target!r} (group {module.group}, {module.fmt.name}) does not match "
            "its group in the plan; a quantizer edited after compiling must be edited in the plan too")


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and torch.equal(a, b)


def _encode_graph(gm: fx.GraphModule, plan: Plan, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    nodes, modules, attrs = [], {}, {}
    module_targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for node in gm.graph.nodes:
        where = f"node {node.name} ({node.op} {node.target})"
        if node.op == "call_function":
            target = function_name(node.target)
            if target == "builtins.getattr" and not _getattr_allowed(node.args):
                raise ArtifactError(f"cannot save: {where} reads attribute {node.args[1:]!r}; saved graphs read "
                                    "only public attributes with getattr")
            if target is None:
                fn = node.target
                raise ArtifactError(
                    f"cannot save: {where} calls {getattr(fn, '__module__', '?')}."
                    f"{getattr(fn, '__qualname__', repr(fn))}, which is not in the allowlist of functions a "
                    f"saved graph may call (public ops of {', '.join(FUNCTION_NAMESPACES)}: getattr only)")
        elif node.op == "call_method":
            target = node.target
            if not _method_allowed(target):
                raise ArtifactError(f"cannot save: {where} calls method {target!r}, which is not an allowed "
                                    "torch.Tensor method")
        else:
            target = node.target
        if node.op == "call_module" and target not in modules:
            modules[target] = _save_module(gm, node, plan, tensors)
        elif node.op == "get_attr" and target not in attrs and _owning_module(target, module_targets) is None:
            value = _fetch_attr(gm, target)
            if not isinstance(value, torch.Tensor):
                raise ArtifactError(f"cannot save: {where} reads a {type(value).__name__}; saved graphs "
                                    "read only tensors with get_attr")
            kind = "parameter" if isinstance(value, nn.Parameter) else "buffer"
            attrs[target] = {"kind": kind, **_tensor_info(value),
                             "requires_grad": bool(value.requires_grad) if kind == "parameter" else False}
            tensors[f"attr.{target}"] = value
        meta = {k: encode_value(node.meta[k], f"{where} meta[{k!r}]", nodes_ok=False)
                for k in META_KEYS if k in node.meta}
        nodes.append({
            "name": node.name, "op": node.op, "target": target, "type": _encode_node_type(node.type),
            "args": [encode_value(a, where) for a in node.args],
            # Pairs, not an object: sort_keys would reorder them, and the order shows in the code.
            "kwargs": [[k, encode_value(v, where)] for k, v in node.kwargs.items()],
            "meta": meta,
        })
    return {"class_name": type(gm).__name__, "nodes": nodes, "modules": modules, "attrs": attrs}


def _encode_node_type(annotation: Any) -> dict[str, str] | None:
    if isinstance(annotation, str) and _ANNOTATION_TEXT.fullmatch(annotation):
        return {"text": annotation}
    name = _NODE_TYPE_NAMES.get(annotation) if isinstance(annotation, type) else None
    return None if name is None else {"class": name}


def _decode_node_type(data: Any) -> Any:
    if data is None:
        return None
    if isinstance(data, dict) and set(data) == {"class"} and data["class"] in NODE_TYPES:
        return NODE_TYPES[data["class"]]
    if (isinstance(data, dict) and set(data) == {"text"} and isinstance(data["text"], str)
            and _ANNOTATION_TEXT.fullmatch(data["text"])):
        return data["text"]
    raise ValueError(f"node type {data!r:.80} is neither one of {', '.join(NODE_TYPES)} nor annotation text")


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _encode_target(spec: Any) -> dict[str, Any]:
    if not getattr(spec, "text", ""):
        raise ArtifactError(
            f"cannot save: target {spec.name!r} has no TOML text to store (it was not loaded with "
            "load_target/loads_target); load the target from its spec file and compile again")
    # The file name only: a directory (often a temporary one) would make saves differ by machine.
    return {"name": spec.name, "version": str(spec.version), "source": Path(str(spec.source)).name,
            "toml": spec.text}


def _prepare_directory(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"cannot save to {path}: it exists and is not a directory; choose a new path")
    if path.is_dir() and any(path.iterdir()) and not (path / MODEL_FILE).is_file():
        raise ArtifactError(
            f"cannot save to {path}: the directory is not empty and is not a previous qcompiler save "
            f"(it has no {MODEL_FILE}); choose a new or empty directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot create the save directory {path}: {exc.strerror or exc}") from None


def _write_atomically(path: Path, data: bytes) -> None:
    # Write then rename: an interrupted save never leaves a half-written file under the real name.
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise ArtifactError(f"cannot write {path}: {exc.strerror or exc}") from None


def save_compiled(compiled: Any, path: str | os.PathLike[str]) -> str:
    """Write `compiled` (a CompiledModel) to the directory `path`; returns the path as a string.

    Refuses a non-empty directory that is not a previous save. Saves of equal compiles are
    byte-identical.
    """
    from . import __version__

    path = Path(path)
    gm, plan = compiled.simulated, compiled.plan
    tensors: dict[str, torch.Tensor] = {}
    graph = _encode_graph(gm, plan, tensors)
    target = _encode_target(compiled.target)
    for key, t in params_tensors(plan).items():
        tensors[f"plan.{key}"] = t
    # Clones: safetensors refuses tensors that share memory (tied weights, views of one buffer).
    blob = st_save({k: t.detach().contiguous().clone() for k, t in tensors.items()},
                   metadata={"format": "pt"})
    document = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "written_by": f"qcompiler {__version__}",
        "target": target,
        "plan": {"target": plan.target, "target_version": plan.target_version,
                 "groups": [_encode_group(g) for g in plan.groups]},
        "graph": graph,
        "tensors": {"file": TENSOR_FILE, "sha256": hashlib.sha256(blob).hexdigest(), "count": len(tensors)},
    }
    text = json.dumps(document, sort_keys=True, indent=1, allow_nan=False, ensure_ascii=True) + "\n"
    _prepare_directory(path)
    _write_atomically(path / TENSOR_FILE, blob)
    # model.json last: it is the marker of a complete save.
    _write_atomically(path / MODEL_FILE, text.encode("utf-8"))
    return str(path)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

class _Loader:
    """Reads one save directory; every error names the file and the part of it that is wrong."""

    def __init__(self, path: Path):
        self.path = path
        self.json_path = path / MODEL_FILE
        self.tensor_path = path / TENSOR_FILE
        self.tensors: dict[str, torch.Tensor] = {}

    def error(self, where: str, message: str, file: Path | None = None) -> ArtifactError:
        return ArtifactError(f"{file or self.json_path}: {where}: {message}")

    # -- files ------------------------------------------------------------------------------
    def read_document(self) -> dict[str, Any]:
        if not self.path.is_dir():
            raise ArtifactError(f"{self.path}: no saved model here (not a directory); give the directory "
                                "that CompiledModel.save wrote")
        for f in (self.json_path, self.tensor_path):
            if not f.is_file():
                raise ArtifactError(f"{f}: missing; a saved model is a directory with {MODEL_FILE} and "
                                    f"{TENSOR_FILE}, save the model again")
        size = self.json_path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ArtifactError(f"{self.json_path}: {size} bytes is too large for a model description")
        try:
            doc = json.loads(self.json_path.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ArtifactError(f"{self.json_path}: not valid JSON ({exc}); the file is corrupted or "
                                "truncated, save the model again") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise ArtifactError(f"{self.json_path}: not a qcompiler saved model (its 'format' is not "
                                f"{FORMAT_NAME!r})")
        version = doc.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"{self.json_path}: format_version is {version!r} but this qcompiler reads version "
                f"{FORMAT_VERSION}; load it with the qcompiler version that saved it, or compile again")
        return doc

    def read_tensors(self, info: Any) -> None:
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise self.error("tensors", "missing the checksum of the tensor file")
        blob = self.tensor_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != info["sha256"]:
            raise ArtifactError(
                f"{self.tensor_path}: its contents do not match the SHA-256 recorded in {MODEL_FILE}; the "
                "file is corrupted or truncated, or belongs to another save")
        try:
            self.tensors = st_load(blob)
        except Exception as exc:  # safetensors raises its own error types for malformed headers
            raise ArtifactError(f"{self.tensor_path}: not a readable safetensors file ({exc})") from None

    def tensor(self, key: str, info: Any, where: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The stored tensor `key`, checked against the shape and dtype `info` records (or `shape`)."""
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
            raise self.error(where, f"tensor record {info!r:.120} has no shape")
        t = self.tensors.get(key)
        if t is None:
            raise ArtifactError(f"{self.tensor_path}: tensor {key!r} ({where}) is missing; the tensor file "
                                "does not belong to this model.json")
        expected = tuple(info["shape"]) if shape is None else tuple(shape)
        if tuple(t.shape) != expected or tuple(info["shape"]) != expected:
            raise ArtifactError(f"{self.tensor_path}: tensor {key!r} ({where}) has shape {tuple(t.shape)}, "
                                f"expected {expected}")
        try:
            dtype = _torch_enum(info.get("dtype"), torch.dtype, "dtype")
        except ValueError as exc:
            raise self.error(where, str(exc)) from None
        if t.dtype != dtype:
            # params_tensors stores scales as float32; a cast back restores other dtypes exactly.
            t = t.to(dtype)
        return t

    # -- parts -------------------------------------------------------------------------------
    def target(self, data: Any) -> Any:
        from .targets.spec import loads_target

        if not isinstance(data, dict) or not isinstance(data.get("toml"), str):
            raise self.error("target", "missing the target spec's TOML text")
        # The spec's original file name, as recorded (no directory): loading it again, or saving
        # the loaded model, must not depend on where this save happens to live.
        source = data.get("source")
        if not isinstance(source, str) or not source or "/" in source or "\\" in source:
            source = f"{data.get('name')}.toml"
        try:
            spec = loads_target(data["toml"], source=source)
        except QCompileError as exc:
            raise self.error("target", f"the stored target spec does not load: {exc}") from None
        if spec.name != data.get("name") or str(spec.version) != data.get("version"):
            raise self.error("target", f"the stored spec is {spec.name!r} {spec.version!r} but the save "
                                       f"records {data.get('name')!r} {data.get('version')!r}")
        return spec

    def plan(self, data: Any) -> Plan:
        if not isinstance(data, dict) or not isinstance(data.get("groups"), list):
            raise self.error("plan", "missing its list of groups")
        groups = []
        for i, g in enumerate(data["groups"]):
            where = f"plan.groups[{i}]"
            try:
                if g["id"] != i:
                    raise ValueError(f"group ids must be 0, 1, 2 ... in order, found {g['id']!r} at {i}")
                fmt = _decode_format(g["format"])
                params = self.qparams(g["params"], i, where)
                groups.append(GroupPlan(
                    id=i, kind=_str(g["kind"]), tensors=_strs(g["tensors"]), weights=_strs(g["weights"]),
                    owner=_str(g["owner"]), op_kind=_str(g["op_kind"]), candidates=_strs(g["candidates"]),
                    format_name=_str(g["format_name"]), format=fmt, params=params, fallback=bool(g["fallback"]),
                ))
            except ArtifactError:
                raise
            except (KeyError, TypeError, ValueError) as exc:
                raise self.error(where, f"malformed ({type(exc).__name__}: {exc})") from None
        try:
            return Plan(target=_str(data.get("target")), target_version=_str(data.get("target_version")),
                        groups=tuple(groups))
        except TypeError as exc:
            raise self.error("plan", f"target and target_version must be strings ({exc})") from None

    def qparams(self, data: Any, gid: int, where: str) -> QParams | None:
        if data is None:
            return None
        parts = {}
        for part in ("scale", "zero_point", "codebook"):
            info = data[part]
            parts[part] = None if info is None else self.tensor(f"plan.group{gid}.{part}", info, f"{where}.{part}")
        axis = data["axis"]
        if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool)):
            raise ValueError(f"axis must be an integer or null, got {axis!r}")
        if parts["scale"] is None:
            raise ValueError("quantization parameters without a scale")
        return QParams(scale=parts["scale"], zero_point=parts["zero_point"], axis=axis, codebook=parts["codebook"])

    def module(self, target: str, data: Any, plan: Plan) -> nn.Module:
        where = f"graph.modules[{target!r}]"
        if not isinstance(data, dict) or not isinstance(data.get("args"), dict):
            raise self.error(where, "malformed module record")
        class_name = data.get("class")
        if not isinstance(class_name, str) or class_name not in MODULE_CLASSES:
            raise self.error(where, f"module class {class_name!r} is not one a saved model may contain "
                                    "(the file was written by another tool or has been tampered with)")
        try:
            kwargs = {k: decode_value(v, None) for k, v in data["args"].items()}
            module = _construct(class_name, kwargs, plan)
        except (TypeError, ValueError, KeyError) as exc:
            raise self.error(where, f"cannot rebuild the {class_name} ({type(exc).__name__}: {exc})") from None
        saved = data.get("state", {})
        fresh = _state(module)
        if not isinstance(saved, dict) or set(saved) != set(fresh):
            raise self.error(where, f"records tensors {sorted(saved) if isinstance(saved, dict) else saved!r} "
                                    f"but a {class_name} with these arguments has {sorted(fresh)}")
        for name, (kind, t) in fresh.items():
            info = saved[name]
            value = self.tensor(f"module.{target}.{name}", info, f"{where}.{name}", shape=tuple(t.shape))
            owner_path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            if kind == "parameter":
                value = nn.Parameter(value, requires_grad=bool(info.get("requires_grad", True)))
            setattr(owner, leaf, value)
        return module.eval()

    def graph(self, data: Any, plan: Plan) -> fx.GraphModule:
        if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
            raise self.error("graph", "missing its list of nodes")
        root = nn.Module()
        modules = data.get("modules", {})
        attrs = data.get("attrs", {})
        if not isinstance(modules, dict) or not isinstance(attrs, dict):
            raise self.error("graph", "'modules' and 'attrs' must be objects")
        # Parents before children, so that a module nested in another saved one replaces its copy.
        for target in sorted(modules, key=lambda t: (t.count("."), t)):
            _install(root, target, self.module(target, modules[target], plan), self)
        for target in sorted(attrs):
            info = attrs[target]
            t = self.tensor(f"attr.{target}", info, f"graph.attrs[{target!r}]")
            value = nn.Parameter(t, requires_grad=bool(info.get("requires_grad"))) if info.get("kind") == "parameter" else t
            _install(root, target, value, self)
        graph = fx.Graph()
        nodes: dict[str, fx.Node] = {}
        for i, record in enumerate(data["nodes"]):
            node = self.node(graph, nodes, record, modules, attrs, i)
            nodes[node.name] = node
        try:
            graph.lint()
            class_name = data.get("class_name", "GraphModule")
            if not isinstance(class_name, str) or not class_name.isidentifier():
                raise ValueError(f"class name {class_name!r} is not an identifier")
            gm = fx.GraphModule(root, graph, class_name)
        except Exception as exc:
            raise self.error("graph", f"does not form a valid graph ({type(exc).__name__}: {exc})") from None
        gm.meta["opaque_modules"] = {}
        return gm.eval()

    def node(self, graph: fx.Graph, nodes: dict[str, fx.Node], record: Any, modules: dict[str, Any],
             attrs: dict[str, Any], index: int) -> fx.Node:
        where = f"graph.nodes[{index}]"
        try:
            name, op, target = record["name"], record["op"], record["target"]
            where = f"graph.nodes[{index}] ({name})"
            if op not in NODE_OPS:
                raise ValueError(f"unknown node op {op!r}; one of {', '.join(NODE_OPS)}")
            if not isinstance(target, str):
                raise ValueError(f"target {target!r} must be a string")
            if op == "call_function":
                target = resolve_function(target)
            elif op == "call_method" and not _method_allowed(target):
                raise ValueError(f"method {target!r} is not an allowed torch.Tensor method")
            elif op == "call_module" and target not in modules:
                raise ValueError(f"calls module {target!r}, which graph.modules does not define")
            elif op == "get_attr" and target not in attrs and _owning_module(target, set(modules)) is None:
                raise ValueError(f"reads {target!r}, which graph.attrs does not define")
            if not isinstance(record["args"], list) or not isinstance(record["kwargs"], list):
                raise ValueError("args must be a list and kwargs a list of [name, value] pairs")
            args = tuple(decode_value(a, nodes) for a in record["args"])
            if target is getattr and not _getattr_allowed(args):
                raise ValueError(f"getattr reads {args[1:]!r:.80}; only public attribute names are allowed")
            kwargs = {}
            for pair in record["kwargs"]:
                if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                        and pair[0].isidentifier()):
                    raise ValueError(f"a keyword argument is a [name, value] pair, got {pair!r:.80}")
                kwargs[pair[0]] = decode_value(pair[1], nodes)
            meta = record.get("meta", {})
            if not isinstance(meta, dict) or not set(meta) <= set(META_KEYS):
                raise ValueError(f"meta keys must be among {', '.join(META_KEYS)}")
            meta = {k: decode_value(v, None) for k, v in meta.items()}
            if not isinstance(name, str) or not name.isidentifier() or name in nodes:
                raise ValueError(f"node name {name!r} is not a fresh identifier")
            type_expr = _decode_node_type(record.get("type"))
        except (KeyError, TypeError, ValueError) as exc:
            raise self.error(where, f"{type(exc).__name__}: {exc}") from None
        node = graph.create_node(op, target, args, kwargs, name=name, type_expr=type_expr)
        if node.name != name:
            raise self.error(where, f"node name {name!r} is not usable in a graph (became {node.name!r})")
        node.meta.update(meta)
        return node


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (non-finite floats are stored as tagged values)")


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r:.80}")
    return value


def _strs(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list of strings, got {value!r:.80}")
    return tuple(_str(v) for v in value)


def _install(root: nn.Module, target: str, value: Any, loader: _Loader) -> None:
    """Put a module or tensor at the dotted path `target` under `root`, creating parents."""
    parts = target.split(".") if isinstance(target, str) else []
    if not parts or not all(p and (p.isidentifier() or p.isdigit()) for p in parts):
        raise loader.error("graph", f"{target!r} is not a valid dotted module path")
    owner = root
    for part in parts[:-1]:
        child = owner._modules.get(part)
        if child is None:
            if hasattr(owner, part):
                raise loader.error("graph", f"cannot place {target!r}: {part!r} is already a tensor")
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    leaf = parts[-1]
    try:
        if isinstance(value, nn.Module):
            owner.add_module(leaf, value)
        elif isinstance(value, nn.Parameter):
            owner.register_parameter(leaf, value)
        else:
            owner.register_buffer(leaf, value)
    except (KeyError, TypeError, AttributeError) as exc:
        raise loader.error("graph", f"cannot place {target!r}: {exc}") from None


def load_compiled(path: str | os.PathLike[str]) -> Any:
    """Load a model written by `save_compiled` as a CompiledModel (final graph, plan and target)."""
    from .api import CompiledModel

    loader = _Loader(Path(path))
    doc = loader.read_document()
    loader.read_tensors(doc.get("tensors"))
    spec = loader.target(doc.get("target"))
    plan = loader.plan(doc.get("plan"))
    if (plan.target, plan.target_version) != (spec.name, str(spec.version)):
        raise loader.error("plan", f"was made for target {plan.target!r} {plan.target_version!r} but the "
                                   f"stored spec is {spec.name!r} {spec.version!r}")
    simulated = loader.graph(doc.get("graph"), plan)
    return CompiledModel(simulated, plan, spec, groups=(), run=None, float_graph=None, calib_batches=None)
