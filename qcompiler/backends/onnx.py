"""ONNX export of a compiled model: a QDQ graph that ONNX Runtime runs.

The exporter walks the simulated fx graph in order and writes one ONNX node (or a few) per fx
node: every `FakeQuantize` becomes QuantizeLinear → DequantizeLinear with its group's scale and
zero point, every quantized weight is stored as its integer codes (or FP8 bit patterns) followed
by a DequantizeLinear, and a conv or linear whose input is quantized gets its bias as int32 on the
accumulator grid (scale = input scale x weight scale). That is the layout ONNX Runtime's QDQ
fusion turns into its integer kernels (QLinearConv, QGemm, QLinearAdd, ...).

Graphs captured by torch.export (Hugging Face models) compute their masks and positions with
ATen ops from the inputs' sizes: they are exported at fixed input shapes, where those ops are
constants the export computes, and the ops that read an input's values (the attention mask)
are translated one by one (`_ATEN_OPS`).

Everything is read from the compiled model's plan (groups' formats and QParams) and the simulated
graph (FakeQuantize modules, kernel modules holding their quantized weights). Formats ONNX cannot
express (NF4, look-up tables, FP4) become float constants of their decoded values, with a note;
`strict=True` makes that an error.
"""
from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..attention import masked_softmax
from ..errors import OnnxExportError
from ..formats import FloatFormat, HostFloat, IntFormat, QParams
from ..fx_util import fetch_attr
from ..layers import Affine, GainLayerNorm, ScaledAdd
from ..exact import (
    SOFTMAX_EXP_BITS, ExactAdd, ExactEmbedding, ExactGlobalAvgPool, ExactLayerNorm, ExactLUT, ExactMatmul, ExactScale,
    ExactSoftmax,
)
from ..quantizers import FakeQuantize
from ..plan import Plan
from ..requant import bias_fit_weight_scale
from ..version import __version__

log = logging.getLogger(__name__)

DEFAULT_OPSET = 21
BATCH_DIM = "batch"


def _onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:  # pragma: no cover - onnx is a dependency
        raise OnnxExportError("ONNX export needs the `onnx` package: pip install onnx") from exc
    return onnx, TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class QuantInfo:
    """How a float tensor of the ONNX graph was last quantized (it is a DequantizeLinear output)."""

    scale: np.ndarray            # float32, scalar or per-channel
    zero_point: np.ndarray | None
    axis: int | None


@dataclass
class ExportResult:
    """Where the model was written, and what of it ONNX could not express exactly (one line each)."""

    path: str
    notes: list[str] = field(default_factory=list)


# ONNX element types of integer codes by (container bits, signed).
_INT_TYPES = {
    (8, True): "INT8", (8, False): "UINT8", (16, True): "INT16", (16, False): "UINT16",
    (4, True): "INT4", (4, False): "UINT4",
}
_FP8_TYPES = {"e4m3": "FLOAT8E4M3FN", "e5m2": "FLOAT8E5M2"}


def _container(fmt: IntFormat, opset: int) -> str:
    """The ONNX integer type that holds the codes of `fmt`.

    4-bit formats use INT4/UINT4 (opset 21); 2- and 3-bit codes go into 8-bit types, which every
    runtime has kernels for.
    """
    if fmt.bits == 4 and opset >= 21:
        return _INT_TYPES[(4, fmt.signed)]
    return _INT_TYPES[(8 if fmt.bits <= 8 else 16, fmt.signed)]


class _Builder:
    def __init__(self, gm: fx.GraphModule, plan: Any, opset: int, strict: bool):
        self.gm = gm
        self.plan = plan
        self.opset = opset
        self.strict = strict
        self.onnx, self.TP, self.helper, self.numpy_helper = _onnx()
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self.names: dict[fx.Node, Any] = {}       # fx node -> ONNX tensor name (or list of them)
        self.quant: dict[str, QuantInfo] = {}      # ONNX tensor name -> its quantization
        self.producer: dict[str, int] = {}         # ONNX tensor name -> index of the node writing it
        self.notes: list[str] = []
        self.fixed_shapes = False
        # Reshapes of a Gemm's float output back to the graph's shape: a per-tensor quantizer of
        # one quantizes the Gemm's output instead, then reshapes (`qdq`, `grid_reshape`).
        self.row_views: set[str] = set()
        # Nodes whose value the export computes (constants, and at fixed shapes the sizes and the
        # integer and boolean tensors computed from them): written as initializers where used.
        self.values: dict[fx.Node, Any] = {}
        self._counter = 0

    # -- helpers ------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        self._counter += 1
        return f"{base}__{self._counter}"

    def const(self, base: str, array: np.ndarray | torch.Tensor, onnx_type: str | None = None) -> str:
        name = self.fresh(base)
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        array = np.asarray(array)
        if onnx_type is None:
            tensor = self.numpy_helper.from_array(array, name)
        else:
            elem = getattr(self.TP, onnx_type)
            if onnx_type.startswith("FLOAT8"):
                raw = array.astype(np.uint8).tobytes()
            elif onnx_type in ("INT4", "UINT4"):
                raw = _pack_nibbles(array)
            else:
                raw = array.astype(_NUMPY_OF[onnx_type]).tobytes()
            tensor = self.helper.make_tensor(name, elem, array.shape, raw, raw=True)
        self.initializers.append(tensor)
        return name

    def emit(self, op: str, inputs: list[str], base: str, n_out: int = 1, **attrs: Any) -> Any:
        outs = [self.fresh(base) for _ in range(n_out)]
        self.nodes.append(self.helper.make_node(op, inputs, outs, name=self.fresh(f"{base}_{op}"), **attrs))
        for o in outs:
            self.producer[o] = len(self.nodes) - 1
        return outs[0] if n_out == 1 else outs

    def prune(self) -> None:
        """Drop nodes and initializers nothing reads (a pad folded into its conv leaves some)."""
        needed = {o.name for o in self.outputs}
        kept = []
        for n in reversed(self.nodes):
            if any(o in needed for o in n.output):
                kept.append(n)
                needed.update(i for i in n.input if i)
        self.nodes = kept[::-1]
        self.initializers = [t for t in self.initializers if t.name in needed]

    def unclip(self, x: str) -> None:
        """Rewrite the Clip or Relu that produces `x` as Max/Min (same values).

        ONNX Runtime's Clip→QuantizeLinear fusion reads the zero point as an integer and fails
        on FP8 zero points, and its Relu→QuantizeLinear fusion drops a Relu before an FP8
        quantizer as if the format could not hold negatives; Max/Min are left alone.
        """
        i = self.producer.get(x)
        if i is not None and self.nodes[i].op_type == "Relu":
            relu = self.nodes[i]
            zero = self.const(f"{relu.name}_zero", np.array(0.0, np.float32))
            self.nodes[i] = self.helper.make_node("Max", [relu.input[0], zero], list(relu.output),
                                                  name=self.fresh(f"{relu.name}_Max"))
            return
        if i is None or self.nodes[i].op_type != "Clip":
            return
        clip = self.nodes[i]
        y, lo, hi = (list(clip.input) + ["", ""])[:3]
        new = []
        if lo:
            y_lo = self.fresh(f"{clip.name}_max")
            new.append(self.helper.make_node("Max", [y, lo], [y_lo], name=self.fresh(f"{clip.name}_Max")))
            y = y_lo
        new.append(self.helper.make_node("Min" if hi else "Identity", [y, hi] if hi else [y], list(clip.output),
                                         name=self.fresh(f"{clip.name}_Min")))
        self.nodes[i:i + 1] = new
        self.producer = {o: j for j, n in enumerate(self.nodes) for o in n.output}

    def grid_reshape(self, x: str, shape: str, base: str) -> str | None:
        """Reshape(x) of a per-tensor dequantized `x`, quantized again on x's grid (exact: the
        values are on it), or None when `x` is not one. ONNX Runtime fuses a kernel only with a
        DequantizeLinear right before it and a QuantizeLinear right after, and converts int8
        activations to the uint8 its integer Gemm takes only on adjacent QuantizeLinear →
        DequantizeLinear pairs; its own QDQ propagation across a Reshape breaks on int8."""
        i = self.producer.get(x)
        if i is None or self.nodes[i].op_type != "DequantizeLinear" or self.quant.get(x) is None \
                or self.quant[x].axis is not None:
            return None
        _, scale, zp = self.nodes[i].input[:3]
        q = self.emit("QuantizeLinear", [self.emit("Reshape", [x, shape], base), scale, zp], f"{base}_q")
        y = self.emit("DequantizeLinear", [q, scale, zp], f"{base}_dq")
        self.quant[y] = self.quant[x]
        return y

    def note(self, message: str) -> None:
        if self.strict:
            raise OnnxExportError(message + " (strict=True; call export_onnx with strict=False to accept this)")
        log.info(message)
        self.notes.append(message)

    def arg(self, a: Any, dtype: torch.dtype = torch.float32) -> str:
        """The ONNX tensor of an fx argument; a Python number becomes a constant of `dtype`."""
        if isinstance(a, fx.Node):
            if a in self.values and a not in self.names:
                self.names[a] = self.const(a.name, _array_of(self.values[a]))
            name = self.names.get(a)
            if not isinstance(name, str):
                raise OnnxExportError(f"node {a.name} has no single ONNX tensor (a tuple or no value)")
            return name
        if isinstance(a, (int, float, bool)):
            return self.const("scalar", np.array(a, dtype=_NUMPY_DTYPES[dtype]))
        raise OnnxExportError(f"cannot export argument {a!r} of type {type(a).__name__}")

    def value(self, a: Any) -> Any:
        """A Python value of an fx argument: literals as they are, constant nodes computed."""
        if isinstance(a, fx.Node):
            if a not in self.values:
                raise OnnxExportError(f"{a.name} is computed from the inputs' values; a constant is needed here")
            return self.values[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.value(x) for x in a)
        return a

    def cast(self, x: str, from_dtype: Any, to_dtype: torch.dtype, base: str) -> str:
        if from_dtype == to_dtype:
            return x
        return self.emit("Cast", [x], f"{base}_cast", to=getattr(self.TP, _ONNX_DTYPES[to_dtype]))

    # -- quantize / dequantize ----------------------------------------------------------
    def qdq(self, x: str, fmt: Any, params: QParams | None, base: str, shape: tuple[int, ...]) -> str:
        """QuantizeLinear → DequantizeLinear of a float tensor in `fmt` (an activation quantizer)."""
        if isinstance(fmt, HostFloat) or params is None:
            return x
        if isinstance(fmt, IntFormat) and fmt.granularity in ("per_tensor", "per_channel"):
            type_name = _container(fmt, self.opset)
            scale = params.scale.detach().float().reshape(-1).numpy()
            zp = (params.zero_point.detach().reshape(-1).numpy() if params.zero_point is not None
                  else np.zeros_like(scale, dtype=np.int64))
            per_tensor = fmt.granularity == "per_tensor"
            if per_tensor:
                scale, zp = scale.reshape(()), zp.reshape(())
            attrs = {} if per_tensor else {"axis": int(params.axis)}
            s_name = self.const(f"{base}_scale", scale.astype(np.float32))
            z_name = self.const(f"{base}_zp", zp, type_name)
            view = self.nodes[self.producer[x]] if per_tensor and x in self.row_views else None
            if view is not None:       # quantize the kernel's output, then reshape (`grid_reshape`)
                x = view.input[0]
            q = self.emit("QuantizeLinear", [x, s_name, z_name], f"{base}_q", **attrs)
            if (fmt.qmin, fmt.qmax) != _INT_RANGES[type_name]:
                # Codes narrower than their container (int6, narrow range): clip the codes.
                if type_name in ("INT4", "UINT4"):
                    raise OnnxExportError(f"{base}: {fmt.name} activations do not fill a 4-bit type")
                lo = self.const(f"{base}_qmin", np.array(fmt.qmin), type_name)
                hi = self.const(f"{base}_qmax", np.array(fmt.qmax), type_name)
                q = self.emit("Clip", [q, lo, hi], f"{base}_qclip")
            y = self.emit("DequantizeLinear", [q, s_name, z_name], f"{base}_dq", **attrs)
            self.quant[y] = QuantInfo(scale=scale.astype(np.float32), zero_point=zp, axis=None if per_tensor else params.axis)
            return y if view is None else self.grid_reshape(y, view.input[1], f"{base}_view")
        if isinstance(fmt, FloatFormat) and fmt.kind in _FP8_TYPES and fmt.granularity in ("per_tensor", "per_channel"):
            type_name = _FP8_TYPES[fmt.kind]
            scale = params.scale.detach().float().reshape(-1).numpy()
            per_tensor = fmt.granularity == "per_tensor"
            if per_tensor:
                scale = scale.reshape(())
            attrs = {} if per_tensor else {"axis": int(params.axis)}
            self.unclip(x)
            s_name = self.const(f"{base}_scale", scale.astype(np.float32))
            z_name = self.const(f"{base}_zp", np.zeros(scale.shape, dtype=np.uint8), type_name)
            q = self.emit("QuantizeLinear", [x, s_name, z_name], f"{base}_q", **attrs)
            return self.emit("DequantizeLinear", [q, s_name, z_name], f"{base}_dq", **attrs)
        self.note(f"activation quantizer {base} in {fmt.name} has no ONNX equivalent: the tensor stays float")
        return x

    def weight(self, module: nn.Module, attr: str, gid: int | None, base: str,
               x_quant: QuantInfo | None = None) -> tuple[str, QuantInfo | None]:
        """A kernel's weight: integer codes + DequantizeLinear where ONNX can express the format.

        `x_quant` (the kernel input's quantization) is needed to keep the bias on the int32
        accumulator grid: see `_bias_room`.
        """
        w = getattr(module, attr).detach().float()
        group = self.plan.group(gid) if gid is not None else None
        fmt = group.format if group is not None else HostFloat()
        params = group.params if group is not None else None
        if params is None or isinstance(fmt, HostFloat):
            return self.const(f"{base}_{attr}", w.numpy()), None
        if isinstance(fmt, IntFormat) and fmt.granularity in ("per_tensor", "per_channel"):
            type_name = _container(fmt, self.opset)
            codes = fmt.quantize(w, params).numpy()
            scale = params.scale.detach().float().reshape(-1).numpy()
            zp = (params.zero_point.detach().reshape(-1).numpy() if params.zero_point is not None
                  else np.zeros_like(scale, dtype=np.int64))
            per_tensor = fmt.granularity == "per_tensor"
            bias = getattr(module, "bias", None)
            if not per_tensor and x_quant is not None and x_quant.axis is None and bias is not None:
                codes, scale = self._bias_room(codes, scale, zp, w, bias, float(x_quant.scale), params.axis, fmt, base)
            if per_tensor:
                scale, zp = scale.reshape(()), zp.reshape(())
            attrs = {} if per_tensor else {"axis": int(params.axis)}
            c_name = self.const(f"{base}_{attr}_codes", codes, type_name)
            s_name = self.const(f"{base}_{attr}_scale", scale.astype(np.float32))
            z_name = self.const(f"{base}_{attr}_zp", zp, type_name)
            out = self.emit("DequantizeLinear", [c_name, s_name, z_name], f"{base}_{attr}_dq", **attrs)
            return out, QuantInfo(scale=scale.astype(np.float32), zero_point=zp, axis=None if per_tensor else params.axis)
        if isinstance(fmt, IntFormat) and fmt.granularity == "per_group" and self.opset >= 21:
            # Blocked DequantizeLinear (opset 21) over the [rows, K] view the format groups along.
            type_name = _container(fmt, self.opset)
            rows = w.shape[0]
            codes = fmt.quantize(w, params).reshape(rows, -1).numpy()
            scale = params.scale.detach().float().numpy()
            zp = (params.zero_point.detach().numpy() if params.zero_point is not None
                  else np.zeros_like(scale, dtype=np.int64))
            c_name = self.const(f"{base}_{attr}_codes", codes, type_name)
            s_name = self.const(f"{base}_{attr}_scale", scale.astype(np.float32))
            z_name = self.const(f"{base}_{attr}_zp", zp, type_name)
            flat = self.emit("DequantizeLinear", [c_name, s_name, z_name], f"{base}_{attr}_dq",
                             axis=1, block_size=int(fmt.group_size))
            shape = self.const(f"{base}_{attr}_shape", np.array(w.shape, dtype=np.int64))
            return self.emit("Reshape", [flat, shape], f"{base}_{attr}"), None
        if isinstance(fmt, FloatFormat) and fmt.kind in _FP8_TYPES and fmt.granularity in ("per_tensor", "per_channel"):
            type_name = _FP8_TYPES[fmt.kind]
            codes = fmt.quantize(w, params).numpy()
            scale = params.scale.detach().float().reshape(-1).numpy()
            per_tensor = fmt.granularity == "per_tensor"
            if per_tensor:
                scale = scale.reshape(())
            attrs = {} if per_tensor else {"axis": int(params.axis)}
            c_name = self.const(f"{base}_{attr}_codes", codes, type_name)
            s_name = self.const(f"{base}_{attr}_scale", scale.astype(np.float32))
            z_name = self.const(f"{base}_{attr}_zp", np.zeros(scale.shape, dtype=np.uint8), type_name)
            return self.emit("DequantizeLinear", [c_name, s_name, z_name], f"{base}_{attr}_dq", **attrs), None
        self.note(f"weights of {base} are {fmt.name}, which ONNX cannot express: stored as float constants of "
                  "their decoded values (the numbers match the target; the file is not smaller)")
        return self.const(f"{base}_{attr}", w.numpy()), None

    def _bias_room(self, codes: np.ndarray, scale: np.ndarray, zp: np.ndarray, w: torch.Tensor, bias: torch.Tensor,
                   s_in: float, axis: int, fmt: IntFormat, base: str) -> tuple[np.ndarray, np.ndarray]:
        """Raise the weight scale of output channels whose bias does not fit int32 at s_in * s_w.

        A channel with (nearly) vanishing weights and a large bias (a BatchNorm with tiny gamma
        folded into it) gets a weight scale so small that bias / (s_in * s_w) exceeds 2^31. The
        integer kernel cannot represent that bias, so, like TFLite's converter, the channel's
        weight scale is raised until the bias fits and its weights are re-quantized at that
        scale (they round to nearly nothing: they were negligible next to the bias).
        """
        need = bias_fit_weight_scale(bias, s_in, torch.from_numpy(scale.copy()), 32).numpy()
        low = need > scale
        if not low.any():
            return codes, scale
        scale = np.where(low, need, scale).astype(np.float32)
        changed = low & (np.moveaxis(codes, axis, 0).reshape(scale.size, -1) != zp[:, None]).any(1)
        if changed.any():
            view = [1] * w.dim()
            view[axis] = -1
            q = torch.round(w / torch.from_numpy(scale).reshape(view)) + torch.from_numpy(zp.astype(np.float32)).reshape(view)
            requant = q.clamp(fmt.qmin, fmt.qmax).numpy().astype(codes.dtype)
            mask = np.broadcast_to(changed.reshape(view), codes.shape)
            codes = np.where(mask, requant, codes)
            self.notes.append(f"{base}: {int(changed.sum())} output channel(s) with negligible weights and a bias "
                              "beyond the int32 accumulator grid got a larger weight scale")
        return codes, scale

    def bias(self, module: nn.Module, base: str, x_quant: QuantInfo | None, w_quant: QuantInfo | None) -> str | None:
        b = getattr(module, "bias", None)
        if b is None:
            return None
        b = b.detach().float()
        if x_quant is None or w_quant is None or x_quant.axis is not None:
            return self.const(f"{base}_bias", b.numpy())
        # int32 on the accumulator grid: the scale ONNX Runtime's integer kernels assume.
        scale = (np.float32(x_quant.scale) * w_quant.scale.astype(np.float32)).astype(np.float32)
        scale_t = torch.from_numpy(np.broadcast_to(scale, b.shape).copy())
        codes = torch.round(b.double() / scale_t.double())
        if (codes.abs() > 2**31 - 1).any():
            self.note(f"{base}: bias does not fit the int32 accumulator grid (input scale x weight scale too "
                      "small); saturated to int32")
        codes = codes.clamp(-2**31, 2**31 - 1).to(torch.int32).numpy()
        c_name = self.const(f"{base}_bias_codes", codes)
        s_name = self.const(f"{base}_bias_scale", scale.reshape(-1) if scale.ndim else scale)
        z_name = self.const(f"{base}_bias_zp", np.zeros(scale.shape, dtype=np.int32))
        attrs = {"axis": 0} if scale.ndim else {}
        return self.emit("DequantizeLinear", [c_name, s_name, z_name], f"{base}_bias_dq", **attrs)


# Tensor element types of inputs, outputs and integer/boolean mask arithmetic.
_ONNX_DTYPES = {
    torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.float64: "DOUBLE", torch.int64: "INT64",
    torch.int32: "INT32", torch.int16: "INT16", torch.int8: "INT8", torch.uint8: "UINT8", torch.bool: "BOOL",
}
_NUMPY_DTYPES = {
    torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64,
    torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
}


def _array_of(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.dtype not in _NUMPY_DTYPES:
            raise OnnxExportError(f"a constant of type {value.dtype} has no ONNX equivalent here")
        return value.detach().cpu().numpy()
    if isinstance(value, bool):
        return np.array(value, np.bool_)
    if isinstance(value, int):
        return np.array(value, np.int64)
    if isinstance(value, float):
        return np.array(value, np.float32)
    raise OnnxExportError(f"cannot write {value!r} ({type(value).__name__}) as an ONNX constant")


_NUMPY_OF = {"INT8": np.int8, "UINT8": np.uint8, "INT16": np.int16, "UINT16": np.uint16, "INT32": np.int32}


def _pack_nibbles(codes: np.ndarray) -> bytes:
    """4-bit codes packed two per byte, the first element in the low nibble (ONNX's INT4 layout)."""
    flat = (codes.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


_INT_RANGES = {
    "INT8": (-128, 127), "UINT8": (0, 255), "INT16": (-32768, 32767), "UINT16": (0, 65535),
    "INT4": (-8, 7), "UINT4": (0, 15),
}


# -- op translations ---------------------------------------------------------------------------
# Each takes (builder, fx node, module or None) and returns the ONNX tensor name of the output.

def _pair(v: Any, n: int = 2) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [int(v)] * n


def _foldable_pad(b: _Builder, node: fx.Node) -> tuple[fx.Node, list[int], list[int]] | None:
    """(the tensor before the pad, spatial pads before, after) when a zero pad can join the conv.

    Matches input quantizer → zero Pad → quantizer of the same group → this conv, with the pad
    and its quantizer used by the conv alone. Zero is on every integer grid and the second
    quantizer has the first's parameters, so the conv's own (asymmetric) pads compute the same
    thing; ONNX Runtime then runs the pad inside QLinearConv instead of dequantizing, padding
    in float and quantizing again.
    """
    fq = node.args[0]
    if not (isinstance(fq, fx.Node) and fq.op == "call_module" and isinstance(b.gm.get_submodule(fq.target), FakeQuantize)
            and len(fq.users) == 1):
        return None
    pad = fq.args[0]
    if not (isinstance(pad, fx.Node) and pad.meta.get("op_kind") == "pad" and pad.op == "call_module" and len(pad.users) == 1):
        return None
    pm = b.gm.get_submodule(pad.target)
    if not isinstance(pm, nn.modules.padding._ConstantPadNd) or float(pm.value) != 0.0:
        return None
    src = pad.args[0]
    if not (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(b.gm.get_submodule(src.target), FakeQuantize)
            and src.meta.get("group") is not None and src.meta.get("group") == fq.meta.get("group")):
        return None
    if not isinstance(b.gm.get_submodule(fq.target).fmt, IntFormat):
        return None
    rank = len(pad.meta["shape"])
    padding = list(pm.padding)
    if len(padding) > 2 * (rank - 2):
        return None  # pads the channel or batch dimension
    nd = rank - 2
    begins, ends = [0] * nd, [0] * nd
    for i in range(len(padding) // 2):  # torch lists the last dimension first
        begins[nd - 1 - i], ends[nd - 1 - i] = int(padding[2 * i]), int(padding[2 * i + 1])
    return src, begins, ends


def _conv(b: _Builder, node: fx.Node, m: nn.Module) -> str:
    folded = _foldable_pad(b, node) if not isinstance(m, nn.modules.conv._ConvTransposeNd) else None
    x = b.arg(folded[0] if folded else node.args[0])
    gid = node.meta.get("weight_group")
    w, wq = b.weight(m, "weight", gid, node.name, b.quant.get(x))
    bias = b.bias(m, node.name, b.quant.get(x), wq)
    nd = m.weight.dim() - 2
    if isinstance(m.padding, str):
        raise OnnxExportError(f"{node.name}: padding={m.padding!r} is not exported; use explicit padding")
    if m.padding_mode != "zeros":
        raise OnnxExportError(f"{node.name}: padding_mode={m.padding_mode!r} is not exported")
    pads = _pair(m.padding, nd)
    pads = pads + pads
    if folded:
        pads = [p + e for p, e in zip(pads, folded[1] + folded[2])]
    attrs = dict(kernel_shape=list(m.kernel_size), strides=_pair(m.stride, nd), pads=pads,
                 dilations=_pair(m.dilation, nd), group=int(m.groups))
    op = "Conv"
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        op = "ConvTranspose"
        attrs["output_padding"] = _pair(m.output_padding, nd)
    return b.emit(op, [x, w] + ([bias] if bias else []), node.name, **attrs)


def _linear(b: _Builder, node: fx.Node, m: nn.Linear) -> str:
    x = b.arg(node.args[0])
    gid = node.meta.get("weight_group")
    w, wq = b.weight(m, "weight", gid, node.name, b.quant.get(x))
    bias = b.bias(m, node.name, b.quant.get(x), wq)
    shape = node.args[0].meta.get("shape") if isinstance(node.args[0], fx.Node) else None
    if shape is not None and len(shape) == 2:
        return b.emit("Gemm", [x, w] + ([bias] if bias else []), node.name, transB=1)
    if shape is not None and b.fixed_shapes:
        # A Gemm on the rows, between two reshapes: ONNX Runtime's QDQ rules fuse it into an
        # integer kernel, where a MatMul on a transposed weight is not fused. The reshapes keep
        # their quantizers on either side (`grid_reshape`, `qdq`), so DequantizeLinear → Gemm →
        # QuantizeLinear stay adjacent.
        rows_shape = b.const(f"{node.name}_rows", np.array([-1, shape[-1]], np.int64))
        rows = b.grid_reshape(x, rows_shape, node.name) or b.emit("Reshape", [x, rows_shape], node.name)
        y = b.emit("Gemm", [rows, w] + ([bias] if bias else []), node.name, transB=1)
        out = b.emit("Reshape", [y, b.const(f"{node.name}_out", np.array(node.meta["shape"], np.int64))], node.name)
        b.row_views.add(out)
        return out
    wt = b.emit("Transpose", [w], f"{node.name}_wT", perm=[1, 0])
    y = b.emit("MatMul", [x, wt], node.name)
    return b.emit("Add", [y, bias], node.name) if bias else y


def _clip(b: _Builder, x: str, lo: float | None, hi: float | None, base: str) -> str:
    ins = [x, b.const(f"{base}_min", np.array(lo, np.float32)) if lo is not None else "",
           b.const(f"{base}_max", np.array(hi, np.float32)) if hi is not None else ""]
    while ins and ins[-1] == "":
        ins.pop()
    return b.emit("Clip", ins, base)


def _kw(node: fx.Node, name: str, pos: int, default: Any) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[pos] if len(node.args) > pos else default


def _activation(b: _Builder, node: fx.Node, kind: str) -> str:
    x = b.arg(node.args[0])
    base = node.name
    if kind == "relu":
        return b.emit("Relu", [x], base)
    if kind == "relu6":
        return _clip(b, x, 0.0, 6.0, base)
    if kind == "hardtanh":
        return _clip(b, x, float(_kw(node, "min_val", 1, -1.0)), float(_kw(node, "max_val", 2, 1.0)), base)
    if kind == "clamp":
        lo, hi = _kw(node, "min", 1, None), _kw(node, "max", 2, None)
        return _clip(b, x, None if lo is None else float(lo), None if hi is None else float(hi), base)
    if kind == "leaky_relu":
        return b.emit("LeakyRelu", [x], base, alpha=float(_kw(node, "negative_slope", 1, 0.01)))
    if kind == "sigmoid":
        return b.emit("Sigmoid", [x], base)
    if kind == "tanh":
        return b.emit("Tanh", [x], base)
    if kind == "exp":
        return b.emit("Exp", [x], base)
    if kind == "hardswish":
        return b.emit("HardSwish", [x], base)
    if kind == "hardsigmoid":
        return b.emit("HardSigmoid", [x], base, alpha=1.0 / 6.0, beta=0.5)
    if kind == "silu":
        return b.emit("Mul", [x, b.emit("Sigmoid", [x], base)], base)
    if kind == "gelu":
        approx = _kw(node, "approximate", 1, "none")
        return b.emit("Gelu", [x], base, approximate=str(approx))
    if kind in ("softmax", "log_softmax"):
        dim = _kw(node, "dim", 1, None)
        if dim is None:
            raise OnnxExportError(f"{node.name}: {kind} without dim= is ambiguous; give dim explicitly")
        return b.emit("Softmax" if kind == "softmax" else "LogSoftmax", [x], base, axis=int(dim))
    if kind == "elu":
        return b.emit("Elu", [x], base, alpha=float(_kw(node, "alpha", 1, 1.0)))
    raise OnnxExportError(f"{node.name}: activation {kind} is not exported")


_BINARY_OPS = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "matmul": "MatMul"}


def _pool(b: _Builder, node: fx.Node, kind: str, m: nn.Module | None) -> str:
    x = b.arg(node.args[0])
    in_shape = node.args[0].meta.get("shape")
    out_shape = node.meta.get("shape")
    if kind in ("adaptive_avg_pool", "adaptive_max_pool"):
        if out_shape is not None and all(s == 1 for s in out_shape[2:]):
            return b.emit("GlobalAveragePool" if kind == "adaptive_avg_pool" else "GlobalMaxPool", [x], node.name)
        if in_shape is None or out_shape is None or any(i % o for i, o in zip(in_shape[2:], out_shape[2:])):
            raise OnnxExportError(f"{node.name}: adaptive pooling to {out_shape} from {in_shape} is exported only "
                                  "when the input size is a multiple of the output size")
        k = [i // o for i, o in zip(in_shape[2:], out_shape[2:])]
        return b.emit("AveragePool" if kind == "adaptive_avg_pool" else "MaxPool", [x], node.name,
                      kernel_shape=k, strides=k)
    if m is None:
        raise OnnxExportError(f"{node.name}: functional {kind} is not exported; use the nn module")
    nd = len(in_shape) - 2 if in_shape is not None else 2
    k = _pair(m.kernel_size, nd)
    stride = _pair(m.stride if m.stride is not None else m.kernel_size, nd)
    pads = _pair(m.padding, nd)
    attrs = dict(kernel_shape=k, strides=stride, pads=pads + pads, ceil_mode=int(bool(m.ceil_mode)))
    if kind == "max_pool":
        return b.emit("MaxPool", [x], node.name, dilations=_pair(m.dilation, nd), **attrs)
    if getattr(m, "divisor_override", None):
        raise OnnxExportError(f"{node.name}: avg_pool divisor_override is not exported")
    return b.emit("AveragePool", [x], node.name, count_include_pad=int(bool(m.count_include_pad)), **attrs)


def _pad(b: _Builder, node: fx.Node, m: nn.Module | None) -> str:
    x = b.arg(node.args[0])
    if m is not None:
        pad, value = list(m.padding), float(getattr(m, "value", 0.0))
        mode = {"ReflectionPad": "reflect", "ReplicationPad": "edge"}
        mode = next((v for k, v in mode.items() if type(m).__name__.startswith(k)), "constant")
    else:
        pad = list(_kw(node, "pad", 1, None))
        mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}[_kw(node, "mode", 2, "constant")]
        value = float(_kw(node, "value", 3, 0.0) or 0.0)
    rank = len(node.args[0].meta["shape"])
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):  # torch lists the last dimension first
        begins[rank - 1 - i], ends[rank - 1 - i] = int(pad[2 * i]), int(pad[2 * i + 1])
    ins = [x, b.const(f"{node.name}_pads", np.array(begins + ends, np.int64))]
    if mode == "constant":
        ins.append(b.const(f"{node.name}_value", np.array(value, np.float32)))
    return b.emit("Pad", ins, node.name, mode=mode)


def _flatten(b: _Builder, node: fx.Node) -> str:
    x = b.arg(node.args[0])
    start, end = int(_kw(node, "start_dim", 1, 0)), int(_kw(node, "end_dim", 2, -1))
    rank = len(node.args[0].meta["shape"])
    if end % rank != rank - 1:
        raise OnnxExportError(f"{node.name}: flatten with end_dim={end} is not exported")
    if start == 0:
        return b.emit("Reshape", [x, b.const(f"{node.name}_shape", np.array([-1], np.int64))], node.name)
    if start == 1:
        return b.emit("Flatten", [x], node.name, axis=1)
    shape = np.array([0] * start + [-1], np.int64)
    return b.emit("Reshape", [x, b.const(f"{node.name}_shape", shape)], node.name)


def _mean(b: _Builder, node: fx.Node) -> str:
    x = b.arg(node.args[0])
    dims = _kw(node, "dim", 1, None)
    keep = int(bool(_kw(node, "keepdim", 2, False)))
    if dims is None:
        return b.emit("ReduceMean", [x], node.name, keepdims=keep)
    dims = [int(d) for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
    return b.emit("ReduceMean", [x, b.const(f"{node.name}_axes", np.array(dims, np.int64))], node.name, keepdims=keep)


def _export_node(b: _Builder, node: fx.Node) -> Any:
    gm = b.gm
    kind = node.meta.get("op_kind")
    m = gm.get_submodule(node.target) if node.op == "call_module" else None
    if isinstance(m, FakeQuantize):
        x = b.arg(node.args[0])
        shape = tuple(node.meta.get("shape") or ())
        return b.qdq(x, m.fmt, m.params, node.name, shape)
    if kind in ("conv", "depthwise_conv", "conv_transpose") and m is not None:
        return _conv(b, node, m)
    if kind == "linear" and isinstance(m, nn.Linear):
        return _linear(b, node, m)
    if isinstance(m, Affine):
        x = b.arg(node.args[0])
        rank = len(node.args[0].meta["shape"])
        view = [1] * rank
        view[m.channel_dim] = -1
        s = b.const(f"{node.name}_scale", m.scale.detach().float().reshape(view).numpy())
        t = b.const(f"{node.name}_shift", m.shift.detach().float().reshape(view).numpy())
        return b.emit("Add", [b.emit("Mul", [x, s], node.name), t], node.name)
    if isinstance(m, ExactSoftmax):
        # The simulation's integer softmax; ONNX Runtime computes it in float.
        mask = _kw(node, "mask", 1, None)
        if len(node.args) > 2:      # an additive mask as weights and offsets: back to its float values
            w, c = (fetch_attr(gm, a.target).double() for a in node.args[1:3])
            additive = c * float(m.in_scale) + torch.log(w.clamp_min(1) / 2 ** SOFTMAX_EXP_BITS)
            mask = b.const(f"{node.name}_mask", additive.masked_fill(w == 0, -torch.inf).float().numpy())
        return _masked_softmax(b, node, b.arg(node.args[0]), mask, m.dim, m.is_causal)
    if node.op == "call_function" and node.target is masked_softmax:
        x, mask, dim = (_kw(node, k, i, None) for i, k in enumerate(("x", "mask", "dim")))
        return _masked_softmax(b, node, b.arg(x), mask, int(dim), bool(_kw(node, "is_causal", 3, False)))
    if kind == "roll":
        return _roll(b, node)
    if kind == "embedding" and node.op == "call_function" and node.target is F.embedding:
        # A lookup of float rows (a target that runs embeddings on the host): Gather.
        ids, weight = _kw(node, "input", 0, None), _kw(node, "weight", 1, None)
        if _kw(node, "max_norm", 3, None) is not None:
            raise OnnxExportError(f"{node.name}: embedding with max_norm is not exported")
        return b.emit("Gather", [b.arg(weight), b.arg(ids, torch.int64)], node.name, axis=0)
    if kind in ("relu", "relu6", "hardtanh", "clamp", "leaky_relu", "sigmoid", "tanh", "exp", "hardswish",
                "hardsigmoid", "silu", "gelu", "softmax", "log_softmax", "elu"):
        # An ExactLUT is the simulation's table of the activation; ONNX Runtime computes it in float.
        if m is not None and not isinstance(m, ExactLUT):
            raise OnnxExportError(f"{node.name}: activation module {type(m).__name__} was not canonicalized")
        return _activation(b, node, kind)
    if isinstance(m, ExactGlobalAvgPool):
        # The simulation's integer pool (sum of codes, one requantization) is a mean over H, W.
        # GlobalAveragePool keeps ONNX Runtime's integer pooling kernel within reach.
        pooled = b.emit("GlobalAveragePool", [b.arg(node.args[0])], node.name)
        return pooled if m.keepdim else b.emit("Flatten", [pooled], node.name, axis=1)
    if isinstance(m, ExactMatmul):
        # The simulation's integer matmul; ONNX Runtime's QDQ MatMul requantizes in float.
        return b.emit("MatMul", [b.arg(node.args[0]), b.arg(node.args[1])], node.name)
    if isinstance(m, ExactScale):
        # The simulation's requantization by the constant; ONNX Runtime multiplies dequantized values.
        c = b.const(f"{node.name}_constant", np.array(m.constant, np.float32))
        return b.emit("Mul", [b.arg(node.args[0]), c], node.name)
    if isinstance(m, ExactEmbedding):
        # The table of output codes, decoded: the quantizer that follows gives back the same codes.
        table = (m.table.float() - m.out_zero_point) * m.out_scale
        return b.emit("Gather", [b.const(f"{node.name}_table", table.numpy()), b.arg(node.args[0])], node.name, axis=0)
    if isinstance(m, (ExactAdd, ScaledAdd)) and len(node.args) == 2:
        # The integer adder of fixed-point targets; ONNX Runtime adds dequantized values, each
        # times its per-channel gains where the add has them (a balanced residual stream).
        a, c = b.arg(node.args[0]), b.arg(node.args[1])
        gains = m.gains if isinstance(m, ExactAdd) and m.channels is not None else (
            torch.stack([m.gain_a, m.gain_b]) if isinstance(m, ScaledAdd) else None)
        if gains is not None:
            a = b.emit("Mul", [a, b.const(f"{node.name}_gain_a", gains[0].float().numpy())], node.name)
            c = b.emit("Mul", [c, b.const(f"{node.name}_gain_b", gains[1].float().numpy())], node.name)
        return b.emit("Add", [a, c], node.name)
    if kind in _BINARY_OPS and node.op == "call_function" and len(node.args) == 2 and not node.kwargs:
        a, c = node.args
        if kind != "matmul" and not isinstance(a, fx.Node):
            a, c = (c, a) if kind in ("add", "mul") else (a, c)
        dtype = node.meta.get("dtype")
        names, _ = _operands(b, node, (a, c), dtype if isinstance(dtype, torch.dtype) else torch.float32)
        return b.emit(_BINARY_OPS[kind], names, node.name)
    if kind in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool"):
        return _pool(b, node, kind, m)
    if kind == "pad":
        return _pad(b, node, m)
    if kind == "flatten":
        return _flatten(b, node)
    if kind == "cat":
        tensors = node.args[0]
        dim = int(_kw(node, "dim", 1, 0))
        return b.emit("Concat", [b.arg(t) for t in tensors], node.name, axis=dim)
    if kind == "mean":
        return _mean(b, node)
    if kind == "reshape":
        shape = _kw(node, "shape", 1, None)
        if not isinstance(shape, (tuple, list)) or not all(isinstance(s, int) for s in shape):
            if b.fixed_shapes:      # computed from input sizes: the shape the capture recorded
                return b.emit("Reshape", [b.arg(node.args[0]), b.const(f"{node.name}_shape", np.array(
                    node.meta["shape"], np.int64))], node.name)
            raise OnnxExportError(f"{node.name}: reshape to a computed shape is not exported")
        shape = list(shape)
        batch = node.args[0].meta["shape"][0]
        if shape and shape[0] == batch and -1 not in shape[1:]:
            shape[0] = 0  # keep the batch dimension dynamic
        return b.emit("Reshape", [b.arg(node.args[0]), b.const(f"{node.name}_shape", np.array(shape, np.int64))], node.name)
    if kind == "contiguous":
        return b.arg(node.args[0])
    if kind in ("transpose", "permute"):
        return _transpose(b, node, kind)
    if kind == "expand" and b.fixed_shapes:
        return b.emit("Expand", [b.arg(node.args[0]), b.const(f"{node.name}_shape", np.array(
            node.meta["shape"], np.int64))], node.name)
    if kind == "layer_norm":
        return _layer_norm(b, node, m)
    if kind == "unsqueeze" and node.op == "call_function":
        return _unsqueeze(b, node)
    if kind == "squeeze" and node.op == "call_function":
        return _squeeze(b, node)
    if node.op == "call_function" and node.target in _ATEN_OPS:
        return _ATEN_OPS[node.target](b, node)
    if node.op == "call_function" and node.target in (operator.neg, torch.neg) and len(node.args) == 1:
        return b.emit("Neg", [b.arg(node.args[0])], node.name)
    if kind == "getitem" and isinstance(node.args[0], fx.Node) and isinstance(b.names.get(node.args[0]), str):
        return _slice(b, node)
    target = node.target if isinstance(node.target, torch._ops.OpOverload) else getattr(node.target, "__name__", node.target)
    hint = ""
    if isinstance(node.target, torch._ops.OpOverload):
        reads = [n.name for n in node.all_input_nodes if n not in b.values]
        hint = (f" (an ATen op of torch.export's graph; it reads {', '.join(reads) or 'nothing'} at run time, so it "
                "cannot be written as a constant)")
    raise OnnxExportError(
        f"node {node.name} (op kind {kind!r}, {node.op} {target}){_source(node)} has no ONNX translation yet{hint}; "
        "run it outside the compiled part of the model (e.g. build the mask before calling the model) or add a "
        "translation to qcompiler.backends.onnx (_ATEN_OPS for ATen ops)"
    )


def _roll(b: _Builder, node: fx.Node) -> str:
    """torch.roll along given dims as a Concat of two Slices per dim (sizes as captured)."""
    shifts, dims = _kw(node, "shifts", 1, None), _kw(node, "dims", 2, None)
    shape = node.args[0].meta["shape"]
    if dims is None or isinstance(shifts, fx.Node):
        raise OnnxExportError(f"{node.name}: torch.roll without dims or with traced shifts is not exported")
    shifts, dims = (list(v) if isinstance(v, (tuple, list)) else [v] for v in (shifts, dims))
    x = b.arg(node.args[0])
    for shift, dim in zip(shifts, dims):
        size = shape[dim]
        cut = size - shift % size
        if cut == size:
            continue

        def part(start: int, end: int, x=x, dim=dim) -> str:
            ins = [x] + [b.const(f"{node.name}_{k}", np.array([v], np.int64))
                         for k, v in (("starts", start), ("ends", end), ("axes", dim))]
            return b.emit("Slice", ins, node.name)
        x = b.emit("Concat", [part(cut, size), part(0, cut)], node.name, axis=dim)
    return x


def _transpose(b: _Builder, node: fx.Node, kind: str) -> str:
    rank = len(node.args[0].meta["shape"])
    if kind == "permute":
        dims = _kw(node, "dims", 1, None)
        perm = [int(d) % rank for d in dims]
    else:
        d0, d1 = int(_kw(node, "dim0", 1, 0)) % rank, int(_kw(node, "dim1", 2, 1)) % rank
        perm = list(range(rank))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    return b.emit("Transpose", [b.arg(node.args[0])], node.name, perm=perm)


def _layer_norm(b: _Builder, node: fx.Node, m: nn.Module | None) -> str:
    """LayerNormalization (opset 17) over the trailing `normalized_shape` dimensions."""
    x = b.arg(node.args[0])
    input_gain = None
    if isinstance(m, ExactLayerNorm) and m.in_gain_bits:
        input_gain = m.in_gain.double() / 2 ** m.in_gain_bits
    elif isinstance(m, GainLayerNorm):
        input_gain = m.input_gain
    if input_gain is not None:             # a balanced input: its per-channel factors first
        x = b.emit("Mul", [x, b.const(f"{node.name}_input_gain", input_gain.float().numpy())], node.name)
    if isinstance(m, ExactLayerNorm):      # the simulation's integer LayerNorm; ONNX Runtime's is float
        shape, eps, weight, bias = (m.size,), float(m.eps), m.float_weight, m.float_bias
    elif m is not None:
        shape, eps = tuple(m.normalized_shape), float(m.eps)
        weight = m.weight.detach() if m.weight is not None else None
        bias = m.bias.detach() if m.bias is not None else None
    else:
        shape, eps = tuple(_kw(node, "normalized_shape", 1, None)), float(_kw(node, "eps", 4, 1e-5))
        weight, bias = (_constant_of(b, _kw(node, k, i, None)) for k, i in (("weight", 2), ("bias", 3)))
    w = b.const(f"{node.name}_weight", (weight if weight is not None else torch.ones(shape)).float().numpy())
    ins = [x, w] + ([b.const(f"{node.name}_bias", bias.float().numpy())] if bias is not None else [])
    return b.emit("LayerNormalization", ins, node.name, axis=-len(shape), epsilon=eps)


def _constant_of(b: _Builder, a: Any) -> torch.Tensor | None:
    if a is None:
        return None
    if isinstance(a, fx.Node) and a.op == "get_attr":
        return fetch_attr(b.gm, a.target).detach()
    raise OnnxExportError(f"{a}: a layer norm's weight must be a constant to export")


def _source(node: fx.Node) -> str:
    """' at file:line: code' of the user's code that created the node, or ''."""
    from ..tracing import source_line

    where = source_line(node)
    return "" if where.startswith("<unknown") else f" at {where}"


def _slice(b: _Builder, node: fx.Node) -> str:
    """x[...] with integer indices and step-1 or strided slices: ONNX Slice, then Squeeze for indices."""
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    rank = len(node.args[0].meta["shape"])
    starts, ends, axes, steps, squeeze = [], [], [], [], []
    for axis, item in enumerate(index):
        if item is Ellipsis or item is None or isinstance(item, fx.Node):
            raise OnnxExportError(f"{node.name}: indexing with {item!r} is not exported")
        if isinstance(item, int):
            starts.append(item), ends.append(item + 1 if item != -1 else 2**62), axes.append(axis), steps.append(1)
            squeeze.append(axis)
        elif isinstance(item, slice):
            if item == slice(None):
                continue
            step = 1 if item.step is None else item.step
            starts.append(0 if item.start is None else item.start)
            ends.append(2**62 if item.stop is None else item.stop)
            axes.append(axis), steps.append(step)
    if len(index) > rank:
        raise OnnxExportError(f"{node.name}: {len(index)} indices for a {rank}-d tensor")
    x = b.arg(node.args[0])
    if axes:
        ins = [x] + [b.const(f"{node.name}_{k}", np.array(v, np.int64)) for k, v in
                     (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps))]
        x = b.emit("Slice", ins, node.name)
    if squeeze:
        x = b.emit("Squeeze", [x, b.const(f"{node.name}_sq", np.array(squeeze, np.int64))], node.name)
    return x


# -- torch.export's ATen ops: mask, position and index arithmetic ------------------------------
# Graphs captured by torch.export keep ATen ops with no fx spelling (qcompiler.export_frontend).
# At fixed shapes most compute constants (positions, a causal mask): `_computable` finds those and
# the export writes their values; the ones that read an input's values are translated here.

aten = torch.ops.aten

# Ops that read their first argument's shape alone (at fixed shapes their value is a constant).
_SHAPE_ONLY = (aten.sym_size.int, aten.sym_numel.default, aten.full_like.default, aten.zeros_like.default,
               aten.ones_like.default, aten.new_ones.default, aten.new_zeros.default, aten.new_full.default)


def _dtype_of(a: Any) -> Any:
    return a.meta.get("dtype") if isinstance(a, fx.Node) else None


def _floating(dtype: Any) -> bool:
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def _computable(b: _Builder, node: fx.Node) -> bool:
    """At fixed shapes: whether `node`'s value follows from constants and the recorded shapes
    alone (a size, a position table, a mask built from sizes). Float results count only when
    they read no float tensor, so a weight looked up by constant positions stays a lookup."""
    if node.op not in ("call_function", "call_method"):
        return False
    inputs = node.all_input_nodes
    shape_only = node.meta.get("op_kind") == "size" or node.target in _SHAPE_ONLY
    if shape_only and inputs and isinstance(inputs[0].meta.get("shape"), tuple):
        inputs = inputs[1:]
    if not all(n in b.values for n in inputs):
        return False
    return not _floating(node.meta.get("dtype")) or not any(_floating(_dtype_of(n)) for n in inputs)


def _compute(b: _Builder, node: fx.Node) -> Any:
    """The value of a `_computable` node; a tensor read for its shape alone is an uninitialised
    one of the recorded shape."""
    args = list(node.args)
    first = args[0] if args else None
    if isinstance(first, fx.Node) and first not in b.values:
        dtype = first.meta.get("dtype") if isinstance(first.meta.get("dtype"), torch.dtype) else torch.float32
        args[0] = torch.empty(first.meta["shape"], dtype=dtype)
    args = [b.value(a) if not isinstance(a, torch.Tensor) else a for a in args]
    kwargs = {k: b.value(v) for k, v in node.kwargs.items()}
    with torch.no_grad():
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)


def _operands(b: _Builder, node: fx.Node, args: tuple[Any, ...], dtype: Any = None) -> tuple[list[str], torch.dtype]:
    """ONNX tensors of `args` in one element type (ONNX does not promote): `dtype`, or torch's
    promotion of the arguments'."""
    if dtype is None:
        probes = [torch.empty(1, dtype=_dtype_of(a)) if isinstance(a, fx.Node) else a for a in args]
        dtype = torch.result_type(*probes) if len(probes) == 2 else _dtype_of(args[0])
    names = [b.cast(b.arg(a, dtype), _dtype_of(a), dtype, node.name) if isinstance(a, fx.Node) else b.arg(a, dtype)
             for a in args]
    return names, dtype


def _aten_cast(b: _Builder, node: fx.Node) -> str:
    x = node.args[0]
    return b.cast(b.arg(x), _dtype_of(x), node.meta["dtype"], node.name)


def _aten_slice(b: _Builder, node: fx.Node) -> str:
    # aten.slice.Tensor(x, dim=0, start=None, end=None, step=1)
    dim, start, end, step = (b.value(_kw(node, k, i, d)) for k, i, d in
                             (("dim", 1, 0), ("start", 2, None), ("end", 3, None), ("step", 4, 1)))
    ins = [b.arg(node.args[0])] + [b.const(f"{node.name}_{k}", np.array([v], np.int64)) for k, v in
                                   (("starts", 0 if start is None else start), ("ends", 2**62 if end is None else min(end, 2**62)),
                                    ("axes", dim), ("steps", step))]
    return b.emit("Slice", ins, node.name)


def _aten_expand(b: _Builder, node: fx.Node) -> str:
    if not b.fixed_shapes:
        raise OnnxExportError(f"{node.name}: expand is exported at fixed shapes only")
    shape = b.const(f"{node.name}_shape", np.array(node.meta["shape"], np.int64))
    return b.emit("Expand", [b.arg(node.args[0]), shape], node.name)


def _unsqueeze(b: _Builder, node: fx.Node) -> str:
    axis = int(b.value(_kw(node, "dim", 1, None))) % len(node.meta["shape"])
    return b.emit("Unsqueeze", [b.arg(node.args[0]), b.const(f"{node.name}_axes", np.array([axis], np.int64))], node.name)


def _squeeze(b: _Builder, node: fx.Node) -> str:
    dims = b.value(_kw(node, "dim", 1, None))
    if dims is None:
        return b.emit("Squeeze", [b.arg(node.args[0])], node.name)
    rank = len(node.args[0].meta["shape"])
    dims = [int(d) % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    shape = node.args[0].meta["shape"]
    dims = [d for d in dims if shape[d] == 1]           # torch ignores a dim that is not 1
    if not dims:
        return b.arg(node.args[0])
    return b.emit("Squeeze", [b.arg(node.args[0]), b.const(f"{node.name}_axes", np.array(dims, np.int64))], node.name)


def _logical(op: str, bitwise: str) -> Any:
    def translate(b: _Builder, node: fx.Node) -> str:
        names, dtype = _operands(b, node, tuple(node.args[:2]))
        return b.emit(op if dtype == torch.bool else bitwise, names, node.name)
    return translate


def _not(b: _Builder, node: fx.Node) -> str:
    x = node.args[0]
    if node.target is aten.logical_not.default and _dtype_of(x) != torch.bool:
        return b.emit("Equal", _operands(b, node, (x, 0))[0], node.name)     # logical not of a number: x == 0
    return b.emit("Not" if _dtype_of(x) == torch.bool else "BitwiseNot", [b.arg(x)], node.name)


def _compare(op: str, negate: bool = False) -> Any:
    def translate(b: _Builder, node: fx.Node) -> str:
        names, _ = _operands(b, node, tuple(node.args[:2]))
        y = b.emit(op, names, node.name)
        return b.emit("Not", [y], node.name) if negate else y
    return translate


def _arithmetic(op: str, reverse: bool = False) -> Any:
    def translate(b: _Builder, node: fx.Node) -> str:
        a, c = node.args[:2]
        alpha = node.kwargs.get("alpha", 1)
        names, dtype = _operands(b, node, (a, c), node.meta["dtype"])
        if alpha != 1:
            names[1] = b.emit("Mul", [names[1], b.arg(alpha, dtype)], node.name)
        return b.emit(op, names[::-1] if reverse else names, node.name)
    return translate


def _masked_fill(b: _Builder, node: fx.Node) -> str:
    x, mask, value = node.args[:3]
    names, _ = _operands(b, node, (value, x), node.meta["dtype"])
    return b.emit("Where", [b.arg(mask)] + names, node.name)


def _where(b: _Builder, node: fx.Node) -> str:
    cond, x, y = node.args[:3]
    names, _ = _operands(b, node, (x, y), node.meta["dtype"])
    return b.emit("Where", [b.arg(cond)] + names, node.name)


def _aten_index(b: _Builder, node: fx.Node) -> str:
    """x[i0, i1, ...] with constant index tensors on the leading dimensions (a mask broadcast to
    the attention's shape, `mask[arange(n)[:, None, None, None], arange(t)]`): GatherND."""
    x, indices = node.args[:2]
    if any(i is None or (isinstance(i, fx.Node) and i not in b.values) for i in indices):
        raise OnnxExportError(f"{node.name}: indexing with an index computed from the inputs (or a skipped "
                              "dimension) is not exported; only constant index tensors on the leading dimensions are")
    tensors = [b.value(i) for i in indices]
    if any(t.dtype == torch.bool for t in tensors):
        raise OnnxExportError(f"{node.name}: boolean-mask indexing is not exported")
    rank = len(x.meta["shape"])
    stacked = torch.stack(torch.broadcast_tensors(*tensors), dim=-1).to(torch.int64)
    stacked = torch.where(stacked < 0, stacked + torch.tensor(x.meta["shape"][:len(tensors)]), stacked)
    if len(tensors) > rank:
        raise OnnxExportError(f"{node.name}: {len(tensors)} indices for a {rank}-d tensor")
    return b.emit("GatherND", [b.arg(x), b.const(f"{node.name}_indices", stacked)], node.name)


def _aten_gather(b: _Builder, node: fx.Node) -> str:
    x, dim, index = node.args[:3]
    return b.emit("GatherElements", [b.arg(x), b.arg(index)], node.name, axis=int(dim))


def _identity(b: _Builder, node: fx.Node) -> str:
    return b.arg(node.args[0])


_ATEN_OPS: dict[Any, Any] = {
    aten.to.device: _aten_cast, aten.to.dtype: _aten_cast, aten.to.dtype_layout: _aten_cast,
    aten._to_copy.default: _aten_cast, aten.type_as.default: _aten_cast,
    aten.slice.Tensor: _aten_slice, aten.expand.default: _aten_expand,
    aten.unsqueeze.default: _unsqueeze, aten.squeeze.dim: _squeeze, aten.squeeze.dims: _squeeze,
    aten.__and__.Tensor: _logical("And", "BitwiseAnd"), aten.bitwise_and.Tensor: _logical("And", "BitwiseAnd"),
    aten.logical_and.default: _logical("And", "And"),
    aten.__or__.Tensor: _logical("Or", "BitwiseOr"), aten.bitwise_or.Tensor: _logical("Or", "BitwiseOr"),
    aten.logical_or.default: _logical("Or", "Or"),
    aten.bitwise_not.default: _not, aten.logical_not.default: _not,
    aten.eq.Scalar: _compare("Equal"), aten.eq.Tensor: _compare("Equal"),
    aten.ne.Scalar: _compare("Equal", negate=True), aten.ne.Tensor: _compare("Equal", negate=True),
    aten.lt.Scalar: _compare("Less"), aten.lt.Tensor: _compare("Less"),
    aten.le.Scalar: _compare("LessOrEqual"), aten.le.Tensor: _compare("LessOrEqual"),
    aten.gt.Scalar: _compare("Greater"), aten.gt.Tensor: _compare("Greater"),
    aten.ge.Scalar: _compare("GreaterOrEqual"), aten.ge.Tensor: _compare("GreaterOrEqual"),
    aten.add.Tensor: _arithmetic("Add"), aten.add.Scalar: _arithmetic("Add"),
    aten.sub.Tensor: _arithmetic("Sub"), aten.sub.Scalar: _arithmetic("Sub"),
    aten.rsub.Scalar: _arithmetic("Sub", reverse=True), aten.rsub.Tensor: _arithmetic("Sub", reverse=True),
    aten.mul.Tensor: _arithmetic("Mul"), aten.mul.Scalar: _arithmetic("Mul"),
    aten.masked_fill.Scalar: _masked_fill, aten.masked_fill.Tensor: _masked_fill,
    aten.where.self: _where, aten.where.ScalarSelf: _where, aten.where.ScalarOther: _where,
    aten.index.Tensor: _aten_index, aten.gather.default: _aten_gather,
    aten.clone.default: _identity, aten.alias.default: _identity, aten.lift_fresh_copy.default: _identity,
    aten.contiguous.default: _identity,
}


def _masked_softmax(b: _Builder, node: fx.Node, x: str, mask: Any, dim: int, causal: bool) -> str:
    """Softmax of `x` over the positions a mask allows (`qcompiler.attention.masked_softmax`): a
    float mask (a node, or an ONNX constant written for an integer softmax's mask weights and
    offsets) is added to the scores; a boolean mask, and a causal one (j <= i, a constant of the
    export's shape), keep positions: Where(keep, x, -inf), Softmax, then Where(keep, y, 0), so a
    row that keeps nothing gives zeros like the integer softmax (float softmax gives NaN)."""
    keep = None
    if isinstance(mask, str):       # an ONNX constant
        x = b.emit("Add", [x, mask], node.name)
    elif isinstance(mask, fx.Node):
        if _dtype_of(mask) == torch.bool:
            keep = b.arg(mask)
        else:
            x = b.emit("Add", [x, b.cast(b.arg(mask), _dtype_of(mask), torch.float32, node.name)], node.name)
    elif mask is not None:
        raise OnnxExportError(f"{node.name}: a softmax mask {mask!r} is not exported")
    if causal:
        rows, cols = node.meta["shape"][-2:]
        tril = b.const(f"{node.name}_causal", torch.ones(rows, cols, dtype=torch.bool).tril())
        keep = tril if keep is None else b.emit("And", [keep, tril], f"{node.name}_causal")
    if keep is None:
        return b.emit("Softmax", [x], node.name, axis=dim)
    minus_inf = b.const(f"{node.name}_minus_inf", np.array(-np.inf, np.float32))
    y = b.emit("Softmax", [b.emit("Where", [keep, x, minus_inf], node.name)], node.name, axis=dim)
    return b.emit("Where", [keep, y, b.const(f"{node.name}_zero", np.array(0.0, np.float32))], node.name)


def _with_facts_of(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> fx.GraphModule:
    """A copy of `gm`'s graph (sharing its modules) with shapes and dtypes recorded on
    `example_inputs`: the export writes those shapes, and the compiled model keeps its own."""
    from ..tracing import record_facts

    recorded = fx.GraphModule(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)
    record_facts(recorded, tuple(example_inputs))
    return recorded


def _softmax_mask_weights(gm: fx.GraphModule, node: fx.Node, value: Any) -> bool:
    """Whether a graph constant is the int64 mask weights or offsets integer softmaxes read (and
    nothing else)."""
    return isinstance(value, torch.Tensor) and value.dtype == torch.int64 and all(
        u.op == "call_module" and isinstance(gm.get_submodule(u.target), ExactSoftmax) for u in node.users)


def build_onnx_model(simulated: fx.GraphModule, plan: Plan, *, opset: int = DEFAULT_OPSET, strict: bool = False,
                     dynamic_batch: bool = True, example_inputs: tuple[Any, ...] | None = None) -> tuple[Any, list[str]]:
    """The ONNX ModelProto of a compiled model's simulated graph and plan, and the export's notes
    (see `export_onnx`)."""
    if opset < 19:
        raise OnnxExportError(f"opset {opset} is too old: QDQ with FP8 and per-axis int types needs opset >= 19 (21 for INT4)")
    if example_inputs is not None:
        example_inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    gm = simulated if example_inputs is None else _with_facts_of(simulated, example_inputs)
    b = _Builder(gm, plan, opset, strict)
    onnx, TP, helper, _ = b.onnx, b.TP, b.helper, b.numpy_helper
    # A graph that computes shapes from its input's sizes (x.shape, x.size(0)) is written with the
    # shapes the capture recorded: its batch, and every other input dimension, is then fixed.
    b.fixed_shapes = any(n.meta.get("op_kind") == "size" for n in gm.graph.nodes)
    if b.fixed_shapes:
        dynamic_batch = False
        shapes = ", ".join(f"{n.name} {tuple(n.meta['shape'])}" for n in gm.graph.nodes
                           if n.op == "placeholder" and isinstance(n.meta.get("shape"), tuple))
        b.notes.append(f"the graph computes shapes from its inputs' sizes: exported at fixed input shapes ({shapes}; "
                       "batch fixed, and sequence length or image size too). Those are the compile's example inputs' "
                       "unless export_onnx(example_inputs=...) gives others; pad smaller inputs to them where the model "
                       "masks padding (a BERT attention mask of 0 on padded tokens changes no other token's output)")
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = node.meta.get("shape")
            if shape is None:
                raise OnnxExportError(f"input {node.name} has no recorded shape; compile with example inputs")
            dtype = node.meta.get("dtype", torch.float32)
            if dtype not in _ONNX_DTYPES:
                raise OnnxExportError(f"input {node.name} of type {dtype} has no ONNX equivalent")
            dims = [BATCH_DIM if (i == 0 and dynamic_batch) else int(d) for i, d in enumerate(shape)]
            b.inputs.append(helper.make_tensor_value_info(node.name, getattr(TP, _ONNX_DTYPES[dtype]), dims))
            b.names[node] = node.name
        elif node.op == "output":
            results = node.args[0]
            results = results if isinstance(results, (tuple, list)) else (results,)
            for i, r in enumerate(results):
                name = "output" if len(results) == 1 else f"output_{i}"
                b.nodes.append(helper.make_node("Identity", [b.arg(r)], [name], name=f"{name}_identity"))
                shape = r.meta.get("shape") if isinstance(r, fx.Node) else None
                dims = ([BATCH_DIM if (j == 0 and dynamic_batch) else int(d) for j, d in enumerate(shape)]
                        if shape is not None else None)
                dtype = r.meta.get("dtype") if isinstance(r, fx.Node) else None
                elem = getattr(TP, _ONNX_DTYPES.get(dtype, "FLOAT") if isinstance(dtype, torch.dtype) else "FLOAT")
                b.outputs.append(helper.make_tensor_value_info(name, elem, dims))
        elif node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if _softmax_mask_weights(gm, node, value):
                b.names[node] = None    # no ONNX tensor of their own: the softmax's export reads them
                continue
            if not isinstance(value, torch.Tensor):
                raise OnnxExportError(f"node {node.name}: graph constant {node.target} is not a tensor")
            b.values[node] = value.detach().float() if value.is_floating_point() else value.detach()
        elif b.fixed_shapes and _computable(b, node):
            b.values[node] = _compute(b, node)
        elif b.fixed_shapes and (node.meta.get("op_kind") == "size" or not isinstance(node.meta.get("shape"), tuple)):
            b.names[node] = None        # sizes and shapes: the shapes they compute are written as recorded
        else:
            b.names[node] = _export_node(b, node)
    b.prune()
    graph = helper.make_graph(b.nodes, f"{plan.target}_qdq", b.inputs, b.outputs, b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="qcompiler", producer_version=__version__)
    model.ir_version = min(model.ir_version, 10)
    meta = {"target": plan.target, "target_version": plan.target_version}
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, str(v)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises its own ValidationError
        raise OnnxExportError(f"the exported graph fails ONNX's checker: {exc}") from exc
    return model, b.notes


def export_onnx(simulated: fx.GraphModule, plan: Plan, target: Any, path: str | Path, *, opset: int = DEFAULT_OPSET,
                strict: bool = False, dynamic_batch: bool = True,
                example_inputs: tuple[Any, ...] | None = None) -> ExportResult:
    """Write the compiled model as a QDQ ONNX file that ONNX Runtime runs.

    opset: 21 by default (INT4/UINT4 and blocked DequantizeLinear need it; FP8 needs 19; int16
    activations are INT16 QuantizeLinear/DequantizeLinear, which ONNX Runtime runs from 21).
    strict: raise OnnxExportError instead of storing a format ONNX cannot express as float.
    dynamic_batch: the first dimension of inputs and outputs is the symbolic `batch`. A graph that
    computes shapes from its inputs' sizes (torch.export's captures, ViT's reshapes) is exported at
    fixed shapes instead, and a note says which.
    example_inputs: inputs whose shapes the export records (a graph of fixed shapes is written at
    them); by default the shapes the compile recorded on its example inputs.
    Returns the path and the notes (what was stored as float and why, which shapes are fixed).
    """
    model, notes = build_onnx_model(simulated, plan, opset=opset, strict=strict, dynamic_batch=dynamic_batch,
                                    example_inputs=example_inputs)
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise OnnxExportError(f"cannot write {path}: directory {path.parent} does not exist")
    onnx = _onnx()[0]
    onnx.save_model(model, str(path))
    return ExportResult(path=str(path), notes=notes)
