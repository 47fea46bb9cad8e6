"""The `reference` backend: the compiled model as the target's integer hardware computes it.

`build_reference(simulated)` walks the simulated graph and writes a new `fx.GraphModule` whose
tensors between kernels are integer codes:

- the input is quantized by its group's format (`Quantize`), the outputs are dequantized
  (`Dequantize`); `ReferenceModule.codes(x)` returns the output codes instead;
- every exact kernel of the simulation (conv/linear with its fused clamps, residual add and
  output quantizer, see `qcompiler.exact`) is one `IntegerKernel`: integer weight codes, exact
  wide accumulation of `(q_in - z_in) * q_w` (float64 on integers, exact below 2**53, which the
  constructor proves from the weights and the input format), int32 bias, saturation to the
  accumulator width, clamps as integer bounds on the accumulator, a residual joined through a
  per-channel table over its codes, requantization per the spec (`qcompiler.requant`), output
  zero point and saturation;
- every global average pool is one `IntegerGlobalAvgPool`: the sum of the codes over the window,
  requantized by one multiplier that also divides by the window;
- every add of two quantized tensors on a fixed-point or shift target is one `IntegerAdd`: each
  input's `(q - z) << 20` (15 for 16-bit inputs) rescaled to a common grid, summed, requantized;
- every element-wise activation the simulation runs as a table (`ExactLUT`) is one `IntegerLUT`:
  the output code read from the table at the input code;
- every softmax and LayerNorm the simulation computes on integers (`ExactSoftmax`,
  `ExactLayerNorm`) is one `IntegerSoftmax` or `IntegerLayerNorm`, and every matmul of two
  activations (`ExactMatmul`) one `IntegerMatmul`, every multiply by a constant (`ExactScale`)
  one `IntegerScale` and every embedding lookup of output codes (`ExactEmbedding`) one
  `IntegerEmbedding`;
- every other op (other pooling, element-wise activations, shared-scale cat, host-float fallback ops)
  runs as the simulation runs it: its code inputs are decoded to their exact values
  (`Dequantize`), the op runs in float32, and the next quantizer encodes its result. For ops that
  only move values on the grid (max-pool, reshape, cat of one scale) this is exact integer data
  movement; for others it is the target's float requantization (ONNX Runtime's QLinear* ops).
  Minifloat, NF4 and look-up-table formats are decoded to their exact values the same way.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..errors import QCompileError
from ..exact import (
    ADD_LEFT_SHIFT, FLOAT64_EXACT, ChainIndex, ExactAdd, ExactEmbedding, ExactLayerNorm, ExactLUT, ExactMatmul, ExactScale,
    ExactSoftmax, layer_norm_codes, matmul_codes, scale_codes, softmax_codes, ExactConv2d, ExactGlobalAvgPool, add_codes, ExactLinear, KernelChain, KernelRequantize, NotExact,
    accumulator_range, check_window,
)
from ..formats import Format, HostFloat, IntFormat, QParams
from ..fx_util import fetch_attr
from ..quantizers import FakeQuantize
from ..requant import requantize


class Quantize(nn.Module):
    """Float -> codes of a format (int32 for integer formats, uint8 bit patterns otherwise)."""

    def __init__(self, group: int, fmt: Format, params: QParams | None):
        super().__init__()
        self.group, self.fmt, self.params = group, fmt, params

    def forward(self, x: Tensor) -> Tensor:
        return self.fmt.quantize(x.to(torch.float32), self.params)

    def extra_repr(self) -> str:
        return f"group={self.group}, format={self.fmt.name}"


class Dequantize(Quantize):
    """Codes -> their exact float32 values."""

    def forward(self, q: Tensor) -> Tensor:
        return self.fmt.dequantize(q, self.params)


class OnCodes(nn.Module):
    """Runs a data-movement module (max-pool) on integer codes, through float32 (exact for codes
    of up to 24 bits: the op only selects values)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, q: Tensor) -> Tensor:
        return self.inner(q.to(torch.float32)).to(q.dtype)


# Ops that only move, select or join values: on codes of one quantizer they give that
# quantizer's codes of the float result, so the reference runs them on the codes.
CODE_OPS = ("reshape", "flatten", "permute", "transpose", "getitem", "contiguous", "squeeze", "unsqueeze",
            "expand", "split", "chunk", "cat", "stack", "max_pool", "adaptive_max_pool")
# Of those, the ones torch computes on float tensors only.
FLOAT_ONLY_CODE_OPS = ("max_pool", "adaptive_max_pool")


class IntegerKernel(nn.Module):
    """A conv or linear kernel with its fused clamps and residual, in integers: codes in, codes out.

    kind: "conv2d" or "linear". Tensors: `weight` (integer codes), `bias` (int32 values, int64),
    `acc_lo`/`acc_hi` (per-channel accumulator bounds of the fused clamps), `multiplier`,
    `shift`, `float_multiplier` (per-channel requantization constants), `residual_table`
    ([channels, codes]: a residual code's value on the accumulator grid, or empty).
    """

    def __init__(self, kind: str, conv: dict[str, Any], in_zero_point: int, in_qmin: int, in_qmax: int,
                 out_zero_point: int, out_qmin: int, out_qmax: int, accumulator_bits: int,
                 mode: str, rounding: str, residual_qmin: int | None = None,
                 tensors: dict[str, Tensor] | None = None):
        super().__init__()
        if kind not in ("conv2d", "linear"):
            raise QCompileError(f"IntegerKernel kind must be conv2d or linear, got {kind!r}")
        self.kind, self.conv = kind, dict(conv)
        self.in_zero_point, self.in_qmin, self.in_qmax = int(in_zero_point), int(in_qmin), int(in_qmax)
        self.out_zero_point, self.out_qmin, self.out_qmax = int(out_zero_point), int(out_qmin), int(out_qmax)
        self.accumulator_bits, self.mode, self.rounding = int(accumulator_bits), mode, rounding
        self.residual_qmin = None if residual_qmin is None else int(residual_qmin)
        for name, t in (tensors or {}).items():
            self.register_buffer(name, t)
        self.check()

    TENSORS = ("weight", "bias", "acc_lo", "acc_hi", "multiplier", "shift", "float_multiplier", "residual_table")

    def check(self) -> None:
        """Shapes agree and every partial sum is an integer that float64 holds exactly."""
        missing = [n for n in self.TENSORS if not hasattr(self, n)]
        if missing:
            raise QCompileError(f"IntegerKernel lacks tensors {missing}")
        c = self.weight.shape[0]
        for name in ("bias", "acc_lo", "acc_hi", "multiplier", "shift", "float_multiplier"):
            if tuple(getattr(self, name).shape) != (c,):
                raise QCompileError(f"IntegerKernel.{name} has shape {tuple(getattr(self, name).shape)}, "
                                    f"expected ({c},) for {c} output channels")
        if self.residual_qmin is not None and (self.residual_table.ndim != 2 or self.residual_table.shape[0] != c):
            raise QCompileError(f"IntegerKernel.residual_table has shape {tuple(self.residual_table.shape)}, "
                                f"expected ({c}, codes)")
        span = max(abs(self.in_qmin - self.in_zero_point), abs(self.in_qmax - self.in_zero_point))
        bound = float(self.weight.double().abs().reshape(c, -1).sum(1).max()) * span
        if bound >= FLOAT64_EXACT:
            raise QCompileError(f"IntegerKernel: partial sums can reach {bound:.3g}, beyond exact float64 "
                                "integers; this kernel's formats are too wide for the reference backend")

    def _view(self, t: Tensor, ndim: int) -> Tensor:
        shape = [1] * ndim
        shape[1 if self.kind == "conv2d" else -1] = -1
        return t.reshape(shape)

    def accumulate(self, q: Tensor) -> Tensor:
        """The int64 accumulator: sum (q - z_in) * w + bias, saturated to the accumulator width."""
        x = q.to(torch.float64) - self.in_zero_point
        w = self.weight.to(torch.float64)
        if self.kind == "conv2d":
            c = self.conv
            acc = F.conv2d(x, w, None, c["stride"], c["padding"], c["dilation"], c["groups"])
        else:
            acc = F.linear(x, w)
        acc = acc.to(torch.int64) + self._view(self.bias, acc.ndim)
        lo, hi = accumulator_range(self.accumulator_bits)
        return acc.clamp(int(lo), int(hi))

    def forward(self, q: Tensor, residual: Tensor | None = None) -> Tensor:
        acc = self.accumulate(q)
        n = acc.ndim
        if residual is not None:
            if self.residual_qmin is None:
                raise QCompileError("this IntegerKernel has no residual input")
            idx = residual.to(torch.int64) - self.residual_qmin
            channels = self._view(torch.arange(self.weight.shape[0]), n)
            acc = acc + self.residual_table[channels, idx]
        acc = torch.maximum(torch.minimum(acc, self._view(self.acc_hi, n)), self._view(self.acc_lo, n))
        y = requantize(acc, self.mode, self.rounding, self._view(self.multiplier, n), self._view(self.shift, n),
                       self._view(self.float_multiplier, n))
        return (y + self.out_zero_point).clamp(self.out_qmin, self.out_qmax).to(torch.int32)

    def extra_repr(self) -> str:
        return (f"{self.kind}, out_channels={self.weight.shape[0]}, acc={self.accumulator_bits} bits, "
                f"requant={self.mode}/{self.rounding}" + (", residual" if self.residual_qmin is not None else ""))


class IntegerGlobalAvgPool(nn.Module):
    """Global average pooling on codes: sum of (q - z_in) over a fixed window, then requantization
    by `s_in / (window * s_out)` per the spec, output zero point, saturation."""

    TENSORS = ("multiplier", "shift", "float_multiplier")

    def __init__(self, window: int, keepdim: bool, in_zero_point: int, out_zero_point: int, out_qmin: int,
                 out_qmax: int, mode: str, rounding: str, tensors: dict[str, Tensor] | None = None):
        super().__init__()
        self.window, self.keepdim = int(window), bool(keepdim)
        self.in_zero_point, self.out_zero_point = int(in_zero_point), int(out_zero_point)
        self.out_qmin, self.out_qmax, self.mode, self.rounding = int(out_qmin), int(out_qmax), mode, rounding
        for name, t in (tensors or {}).items():
            self.register_buffer(name, t)
        shapes = {tuple(getattr(self, n).shape) for n in self.TENSORS if hasattr(self, n)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1 or not all(hasattr(self, n) for n in self.TENSORS):
            raise QCompileError(f"IntegerGlobalAvgPool needs per-channel {', '.join(self.TENSORS)} of one shape")

    def forward(self, q: Tensor) -> Tensor:
        check_window(q, self.window)
        acc = (q.to(torch.int64) - self.in_zero_point).sum(dim=(2, 3), keepdim=self.keepdim)
        shape = [1, -1] + [1] * (acc.ndim - 2)
        y = requantize(acc, self.mode, self.rounding, self.multiplier.reshape(shape), self.shift.reshape(shape),
                       self.float_multiplier.reshape(shape))
        return (y + self.out_zero_point).clamp(self.out_qmin, self.out_qmax).to(torch.int32)

    def extra_repr(self) -> str:
        return f"window={self.window}, requant={self.mode}/{self.rounding}"


class IntegerLUT(nn.Module):
    """An element-wise activation on codes: `table[q - in_qmin]` (the simulation's `ExactLUT`)."""

    TENSORS = ("table",)

    def __init__(self, in_qmin: int, tensors: dict[str, Tensor] | None = None):
        super().__init__()
        self.in_qmin = int(in_qmin)
        for name, t in (tensors or {}).items():
            self.register_buffer(name, t)
        if not hasattr(self, "table") or self.table.ndim != 1 or self.table.dtype != torch.int32:
            raise QCompileError("IntegerLUT needs a one-dimensional int32 table")

    def forward(self, q: Tensor) -> Tensor:
        index = (q.to(torch.int64) - self.in_qmin).clamp_(0, self.table.numel() - 1)
        return self.table[index]

    def extra_repr(self) -> str:
        return f"entries={self.table.numel()}, in_qmin={self.in_qmin}"


class IntegerSoftmax(nn.Module):
    """Softmax on codes (`qcompiler.exact.softmax_codes`), the simulation's `ExactSoftmax`."""

    TENSORS = ("exp_table",)

    def __init__(self, dim: int, is_causal: bool, out_zero_point: int, qmin: int, qmax: int, out_multiplier: int,
                 tensors: dict[str, Tensor] | None = None):
        super().__init__()
        self.dim, self.is_causal, self.out_zero_point = int(dim), bool(is_causal), int(out_zero_point)
        self.qmin, self.qmax, self.out_multiplier = int(qmin), int(qmax), int(out_multiplier)
        for name, t in (tensors or {}).items():
            self.register_buffer(name, t)
        if not hasattr(self, "exp_table") or self.exp_table.ndim != 1 or self.exp_table.dtype != torch.int64:
            raise QCompileError("IntegerSoftmax needs a one-dimensional int64 exp_table")

    def forward(self, q: Tensor, mask: Tensor | None = None, offsets: Tensor | None = None) -> Tensor:
        if self.is_causal:
            causal = torch.ones(q.shape[-2], q.shape[-1], dtype=torch.bool, device=q.device).tril()
            mask = causal if mask is None else mask & causal
        mask = None if mask is None else mask.expand(q.shape)
        return softmax_codes(q, mask, self.dim, self.exp_table, self.out_multiplier, self.out_zero_point,
                             (self.qmin, self.qmax), offsets).to(torch.int32)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, is_causal={self.is_causal}, out_zero_point={self.out_zero_point}"


class IntegerLayerNorm(nn.Module):
    """LayerNorm on codes (`qcompiler.exact.layer_norm_codes`), the simulation's `ExactLayerNorm`."""

    TENSORS = ("gain", "offset")

    def __init__(self, size: int, in_zero_point: int, eps_codes: int, out_zero_point: int, qmin: int, qmax: int,
                 tensors: dict[str, Tensor] | None = None, in_gain_bits: int = 0):
        super().__init__()
        self.size, self.in_zero_point, self.eps_codes = int(size), int(in_zero_point), int(eps_codes)
        self.out_zero_point, self.qmin, self.qmax = int(out_zero_point), int(qmin), int(qmax)
        self.in_gain_bits = int(in_gain_bits)
        for name, t in (tensors or {}).items():
            self.register_buffer(name, t)
        names = self.TENSORS + (("in_gain",) if self.in_gain_bits else ())
        if not all(hasattr(self, n) and tuple(getattr(self, n).shape) == (self.size,) and
                   getattr(self, n).dtype == torch.int64 for n in names):
            raise QCompileError(f"IntegerLayerNorm needs int64 {', '.join(names)} of shape ({self.size},)")

    def forward(self, q: Tensor) -> Tensor:
        return layer_norm_codes(q, self.in_zero_point, self.size, self.eps_codes, self.gain, self.offset,
                                self.out_zero_point, (self.qmin, self.qmax), getattr(self, "in_gain", None),
                                self.in_gain_bits).to(torch.int32)

    def extra_repr(self) -> str:
        return f"size={self.size}, in_zero_point={self.in_zero_point}, out_zero_point={self.out_zero_point}"


class IntegerMatmul(nn.Module):
    """The product of two activations on codes (`qcompiler.exact.matmul_codes`), the simulation's
    `ExactMatmul`."""

    TENSORS = ("multiplier", "shift")

    def __init__(self, zero_points: tuple[int, int, int], qmin: int, qmax: int, mode: str, rounding: str,
                 tensors: dict[str, Tensor] | None = None):
        super().__init__()
        self.zero_points = tuple(int(z) for z in zero_points)
        if len(self.zero_points) != 3:
            raise QCompileError("IntegerMatmul needs three zero points (input 1, input 2, output)")
        self.qmin, self.qmax, self.mode, self.rounding = int(qmin), int(qmax), mode, rounding
        for name, t in (tensors or {}).items():
            self.register_buffer(name, t)
        if not all(hasattr(self, n) and getattr(self, n).numel() == 1 for n in self.TENSORS):
            raise QCompileError("IntegerMatmul needs one multiplier and one shift")

    def forward(self, q1: Tensor, q2: Tensor) -> Tensor:
        return matmul_codes(q1, q2, self.zero_points, (self.qmin, self.qmax), self.mode, self.rounding,
                            self.multiplier.reshape(()), self.shift.reshape(())).to(torch.int32)

    def extra_repr(self) -> str:
        return f"zero_points={self.zero_points}, requant={self.mode}/{self.rounding}"


class IntegerScale(nn.Module):
    """Codes times a constant (`qcompiler.exact.scale_codes`), the simulation's `ExactScale`."""

    TENSORS = ("multiplier", "shift")

    def __init__(self, zero_points: tuple[int, int], qmin: int, qmax: int, negate: bool, mode: str, rounding: str,
                 tensors: dict[str, Tensor] | None = None):
        super().__init__()
        self.zero_points = tuple(int(z) for z in zero_points)
        if len(self.zero_points) != 2:
            raise QCompileError("IntegerScale needs two zero points (input, output)")
        self.qmin, self.qmax, self.negate, self.mode, self.rounding = int(qmin), int(qmax), bool(negate), mode, rounding
        for name, t in (tensors or {}).items():
            self.register_buffer(name, t)
        if not all(hasattr(self, n) and getattr(self, n).numel() == 1 for n in self.TENSORS):
            raise QCompileError("IntegerScale needs one multiplier and one shift")

    def forward(self, q: Tensor) -> Tensor:
        return scale_codes(q, self.zero_points, (self.qmin, self.qmax), self.negate, self.mode, self.rounding,
                           self.multiplier.reshape(()), self.shift.reshape(())).to(torch.int32)

    def extra_repr(self) -> str:
        return f"zero_points={self.zero_points}, negate={self.negate}, requant={self.mode}/{self.rounding}"


class IntegerEmbedding(nn.Module):
    """An embedding lookup that gathers output codes (the simulation's `ExactEmbedding`)."""

    TENSORS = ("table",)

    def __init__(self, tensors: dict[str, Tensor] | None = None):
        super().__init__()
        for name, t in (tensors or {}).items():
            self.register_buffer(name, t)
        if not hasattr(self, "table") or self.table.dim() != 2:
            raise QCompileError("IntegerEmbedding needs a two-dimensional table of codes")

    def forward(self, ids: Tensor) -> Tensor:
        return self.table[ids].to(torch.int32)


class IntegerAdd(nn.Module):
    """The add of two quantized tensors on codes: `qcompiler.exact.add_codes` with the constants
    `multiplier`/`shift` (input 1, input 2, sum)."""

    TENSORS = ("multiplier", "shift")

    def __init__(self, zero_points: tuple[int, int, int], qmin: int, qmax: int, mode: str, rounding: str,
                 tensors: dict[str, Tensor] | None = None, left_shift: int = ADD_LEFT_SHIFT):
        super().__init__()
        self.zero_points = tuple(int(z) for z in zero_points)
        if len(self.zero_points) != 3:
            raise QCompileError("IntegerAdd needs three zero points (input 1, input 2, output)")
        self.qmin, self.qmax, self.mode, self.rounding = int(qmin), int(qmax), mode, rounding
        self.left_shift = int(left_shift)
        for name, t in (tensors or {}).items():
            self.register_buffer(name, t)
        shapes = {tuple(getattr(self, n).shape) if hasattr(self, n) else None for n in self.TENSORS}
        if len(shapes) != 1 or not all(s is not None and len(s) in (1, 2) and s[0] == 3 for s in shapes):
            raise QCompileError("IntegerAdd needs multiplier and shift of one shape, (3,) or (3, channels)")

    def forward(self, q1: Tensor, q2: Tensor) -> Tensor:
        return add_codes(q1, q2, self.zero_points, (self.qmin, self.qmax), self.mode, self.rounding,
                         self.multiplier, self.shift, self.left_shift).to(torch.int32)

    def extra_repr(self) -> str:
        return f"zero_points={self.zero_points}, left_shift={self.left_shift}, requant={self.mode}/{self.rounding}"


def _zero_point(params: QParams) -> int:
    return 0 if params.zero_point is None else int(params.zero_point.reshape(-1)[0])


def integer_kernel(gm: fx.GraphModule, chain: KernelChain) -> IntegerKernel:
    """The IntegerKernel of an exact kernel chain of the simulation."""
    exact = gm.get_submodule(chain.anchor.target)
    requant = gm.get_submodule(chain.output.target)
    if not isinstance(exact, (ExactConv2d, ExactLinear)) or not isinstance(requant, KernelRequantize):
        raise NotExact(f"{chain.anchor.name} was not made exact by model_requant")
    acc_scale = exact.acc_scale
    # The simulation recovers accumulators as round(value * (1 / s_acc)): the same expression
    # puts clamp bounds and residual values on the accumulator grid here.
    inverse = acc_scale.reciprocal()
    c = acc_scale.numel()
    lo_acc, hi_acc = accumulator_range(exact.accumulator_bits)
    acc_lo = torch.full((c,), int(lo_acc), dtype=torch.int64)
    acc_hi = torch.full((c,), int(hi_acc), dtype=torch.int64)
    residual_table = torch.zeros(0, 0, dtype=torch.int64)
    residual_qmin = None
    for step, value in chain.steps:
        if step == "clamp":
            lo, hi = value
            # The accumulator grid point nearest each bound (what the float clamp recovers to).
            if lo is not None:
                acc_lo = torch.maximum(acc_lo, torch.round(torch.tensor(lo, dtype=torch.float64) * inverse).to(torch.int64))
            if hi is not None:
                acc_hi = torch.minimum(acc_hi, torch.round(torch.tensor(hi, dtype=torch.float64) * inverse).to(torch.int64))
            if acc_hi.lt(acc_lo).any():
                raise NotExact(f"{chain.anchor.name}: fused clamps leave an empty range")
        else:
            if (acc_lo > int(lo_acc)).any() or (acc_hi < int(hi_acc)).any():
                raise NotExact(f"{chain.anchor.name}: a clamp before the residual add")
            rq = gm.get_submodule(value.target)
            codes = torch.arange(rq.fmt.qmin, rq.fmt.qmax + 1, dtype=torch.int32)
            values = rq.fmt.dequantize(codes, rq.params).to(torch.float64)
            residual_table = torch.round(values.reshape(1, -1) * inverse.reshape(-1, 1)).to(torch.int64)
            residual_qmin = rq.fmt.qmin
    in_q, out_q = chain.in_quant, chain.out_quant
    weight_bits = int(exact.weight_codes.abs().max().item()).bit_length() + 1
    wdtype = torch.int8 if weight_bits <= 8 else torch.int16 if weight_bits <= 16 else torch.int32
    tensors = {
        "weight": exact.weight_codes.to(wdtype), "bias": exact.bias_codes.clone(),
        "acc_lo": acc_lo, "acc_hi": acc_hi, "multiplier": requant.multiplier.clone(),
        "shift": requant.shift.clone(), "float_multiplier": requant.float_multiplier.clone(),
        "residual_table": residual_table,
    }
    if isinstance(exact, ExactConv2d):
        kind = "conv2d"
        conv = {"stride": list(exact.stride), "padding": list(exact.padding), "dilation": list(exact.dilation),
                "groups": exact.groups}
    else:
        kind, conv = "linear", {}
    return IntegerKernel(kind, conv, _zero_point(in_q.params), in_q.fmt.qmin, in_q.fmt.qmax,
                         _zero_point(out_q.params), out_q.fmt.qmin, out_q.fmt.qmax, exact.accumulator_bits,
                         requant.mode, requant.rounding, residual_qmin, tensors)


class ReferenceModule(fx.GraphModule):
    """The reference backend's graph: float in, float out; `codes(x)` gives the output codes."""

    def codes(self, *args: Any) -> Any:
        """The integer codes of the outputs (a quantized output's codes; float outputs as they are)."""
        return self.code_graph(*args)


def _install(root: nn.Module, name: str, module: nn.Module) -> str:
    base, i = name.replace(".", "_"), 0
    candidate = base
    while hasattr(root, candidate):
        i += 1
        candidate = f"{base}_{i}"
    root.add_module(candidate, module)
    return candidate


def _on_codes(node: fx.Node, domain: dict[str, Any]) -> bool:
    """Whether a node only moves values and all its tensor inputs are codes of one quantizer."""
    if node.meta.get("op_kind") not in CODE_OPS or node.op not in ("call_module", "call_function", "call_method"):
        return False
    if node.meta.get("op_kind") in FLOAT_ONLY_CODE_OPS and node.op != "call_module":
        return False
    quantizers = [domain.get(a.name) for a in node.all_input_nodes]
    return bool(quantizers) and all(q is not None and isinstance(q.fmt, IntFormat) for q in quantizers) and \
        len({q.group for q in quantizers}) == 1


def build_graph(gm: fx.GraphModule, root: nn.Module, return_codes: bool) -> fx.Graph:
    """Write the reference graph of a simulated graph (modules go into `root`)."""
    chains: dict[str, KernelChain] = {}
    pools: dict[str, fx.Node] = {}
    skipped: set[str] = set()
    index = ChainIndex(gm)
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (ExactConv2d, ExactLinear)):
            chain = KernelChain(gm, n, index)
            chains[chain.output.name] = chain
            skipped.update(m.name for m in chain.members)
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), ExactGlobalAvgPool):
            pools[next(iter(n.users)).name] = n
            skipped.add(n.name)

    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    domain: dict[str, FakeQuantize | None] = {}     # the quantizer whose codes a value holds
    decoded: dict[str, fx.Node] = {}

    def as_float(node: fx.Node) -> fx.Node:
        q = domain.get(node.name)
        if q is None:
            return env[node.name]
        if node.name not in decoded:
            target = _install(root, f"dequant_{node.name}", Dequantize(q.group, q.fmt, q.params))
            decoded[node.name] = graph.call_module(target, (env[node.name],))
        return decoded[node.name]

    for n in gm.graph.nodes:
        if n.name in skipped:
            continue
        if n.op == "placeholder":
            env[n.name] = graph.placeholder(n.target, default_value=n.args[0] if n.args else inspect.Signature.empty)
            domain[n.name] = None
        elif n.op == "output":
            if return_codes:
                out = fx.node.map_arg(n.args[0], lambda a: env[a.name])
            else:
                out = fx.node.map_arg(n.args[0], as_float)
            graph.output(out)
        elif n.name in chains:
            chain = chains[n.name]
            target = _install(root, f"int_{chain.anchor.name}", integer_kernel(gm, chain))
            args = (env[chain.input.name],) + ((env[chain.residual.name],) if chain.residual is not None else ())
            env[n.name] = graph.call_module(target, args)
            domain[n.name] = chain.out_quant
        elif n.name in pools:
            pool_node = pools[n.name]
            pool, rq, in_q = (gm.get_submodule(pool_node.target), gm.get_submodule(n.target),
                              gm.get_submodule(pool_node.args[0].target))
            module = IntegerGlobalAvgPool(
                pool.window, pool.keepdim, _zero_point(in_q.params), _zero_point(rq.params), rq.fmt.qmin, rq.fmt.qmax,
                rq.mode, rq.rounding, {k: getattr(rq, k).clone() for k in IntegerGlobalAvgPool.TENSORS})
            target = _install(root, f"int_{pool_node.name}", module)
            env[n.name] = graph.call_module(target, (env[pool_node.args[0].name],))
            domain[n.name] = rq
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), ExactAdd):
            add = gm.get_submodule(n.target)
            module = IntegerAdd(add.zero_points, add.qmin, add.qmax, add.mode, add.rounding,
                                {k: getattr(add, k).clone() for k in IntegerAdd.TENSORS}, add.left_shift)
            target = _install(root, f"int_{n.name}", module)
            env[n.name] = graph.call_module(target, tuple(env[a.name] for a in n.args))
            domain[n.name] = gm.get_submodule(next(iter(n.users)).target)
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), ExactMatmul):
            mm = gm.get_submodule(n.target)
            if any(domain.get(a.name) is None for a in n.args):
                raise QCompileError(f"{n.name}: an integer matmul whose inputs are not codes in the reference graph")
            module = IntegerMatmul(mm.zero_points, mm.qmin, mm.qmax, mm.mode, mm.rounding,
                                   {k: getattr(mm, k).clone() for k in IntegerMatmul.TENSORS})
            target = _install(root, f"int_{n.name}", module)
            env[n.name] = graph.call_module(target, tuple(env[a.name] for a in n.args))
            domain[n.name] = gm.get_submodule(next(iter(n.users)).target)
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), ExactScale) \
                and domain.get(n.args[0].name) is not None:
            sc = gm.get_submodule(n.target)
            module = IntegerScale(sc.zero_points, sc.qmin, sc.qmax, sc.constant < 0, sc.mode, sc.rounding,
                                  {k: getattr(sc, k).clone() for k in IntegerScale.TENSORS})
            target = _install(root, f"int_{n.name}", module)
            env[n.name] = graph.call_module(target, (env[n.args[0].name],))
            domain[n.name] = gm.get_submodule(next(iter(n.users)).target)
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), ExactEmbedding):
            target = _install(root, f"int_{n.name}", IntegerEmbedding({"table": gm.get_submodule(n.target).table.clone()}))
            env[n.name] = graph.call_module(target, (as_float(n.args[0]),))
            domain[n.name] = gm.get_submodule(next(iter(n.users)).target)
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), ExactLayerNorm) \
                and domain.get(n.args[0].name) is not None:
            ln = gm.get_submodule(n.target)
            names = IntegerLayerNorm.TENSORS + (("in_gain",) if ln.in_gain_bits else ())
            module = IntegerLayerNorm(ln.size, ln.in_zero_point, ln.eps_codes, ln.out_zero_point, ln.qmin, ln.qmax,
                                      {k: getattr(ln, k).clone() for k in names}, ln.in_gain_bits)
            target = _install(root, f"int_{n.name}", module)
            env[n.name] = graph.call_module(target, (env[n.args[0].name],))
            domain[n.name] = gm.get_submodule(next(iter(n.users)).target)
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), ExactSoftmax) \
                and domain.get(n.args[0].name) is not None:
            sm = gm.get_submodule(n.target)
            module = IntegerSoftmax(sm.dim, sm.is_causal, sm.out_zero_point, sm.qmin, sm.qmax, sm.out_multiplier,
                                    {"exp_table": sm.exp_table.clone()})
            target = _install(root, f"int_{n.name}", module)
            args = (env[n.args[0].name],) + tuple(as_float(a) for a in n.args[1:])
            env[n.name] = graph.call_module(target, args)
            domain[n.name] = gm.get_submodule(next(iter(n.users)).target)
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), ExactLUT) \
                and domain.get(n.args[0].name) is not None:
            lut = gm.get_submodule(n.target)
            target = _install(root, f"int_{n.name}", IntegerLUT(lut.in_qmin, {"table": lut.table.clone()}))
            env[n.name] = graph.call_module(target, (env[n.args[0].name],))
            domain[n.name] = gm.get_submodule(next(iter(n.users)).target)
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), FakeQuantize):
            q = gm.get_submodule(n.target)
            src = n.args[0]
            if isinstance(q.fmt, HostFloat) or q.params is None:
                env[n.name], domain[n.name] = as_float(src), None
                continue
            if domain.get(src.name) is not None and domain[src.name].group == q.group:
                env[n.name], domain[n.name] = env[src.name], q      # already this quantizer's codes
                continue
            target = _install(root, f"quant_{n.name}", Quantize(q.group, q.fmt, q.params))
            env[n.name] = graph.call_module(target, (as_float(src),))
            domain[n.name] = q
        elif _on_codes(n, domain):
            q = next(domain[a.name] for a in n.all_input_nodes)
            args = fx.node.map_arg(n.args, lambda a: env[a.name])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a.name])
            float_only = n.meta.get("op_kind") in FLOAT_ONLY_CODE_OPS
            if n.op == "call_module":
                inner = copy.deepcopy(gm.get_submodule(n.target))
                target = _install(root, n.target, OnCodes(inner) if float_only else inner)
                env[n.name] = graph.call_module(target, args, kwargs)
            elif float_only:
                raise NotExact(f"{n.name}: functional {n.meta.get('op_kind')} on codes")
            elif n.op == "call_function":
                env[n.name] = graph.call_function(n.target, args, kwargs)
            else:
                env[n.name] = graph.call_method(n.target, args, kwargs)
            domain[n.name] = q
        else:
            args = fx.node.map_arg(n.args, as_float)
            kwargs = fx.node.map_arg(n.kwargs, as_float)
            if n.op == "call_module":
                target = _install(root, n.target, copy.deepcopy(gm.get_submodule(n.target)))
                env[n.name] = graph.call_module(target, args, kwargs)
            elif n.op == "get_attr":
                value = fetch_attr(gm, n.target)
                target = n.target.replace(".", "_")
                if isinstance(value, nn.Parameter):
                    root.register_parameter(target, nn.Parameter(value.detach().clone(), requires_grad=False))
                elif isinstance(value, Tensor):
                    root.register_buffer(target, value.detach().clone())
                else:
                    setattr(root, target, copy.deepcopy(value))
                env[n.name] = graph.get_attr(target)
            elif n.op == "call_function":
                env[n.name] = graph.call_function(n.target, args, kwargs)
            else:
                env[n.name] = graph.call_method(n.target, args, kwargs)
            domain[n.name] = None
        if n.name in env:
            env[n.name].meta.update({k: n.meta[k] for k in ("op_kind", "shape", "group") if k in n.meta})
    graph.lint()
    return graph


def build_reference(simulated: fx.GraphModule, plan: Any = None, target: Any = None) -> ReferenceModule:
    """The reference backend of a simulated model (after model_requant); everything it needs is
    in the graph's modules, so the plan and target are not read."""
    root = nn.Module()
    graph = build_graph(simulated, root, return_codes=False)
    module = ReferenceModule(root, graph, class_name="ReferenceModule")
    codes_graph = build_graph(simulated, nn.Module(), return_codes=True)
    # The code graph reads the same modules: rebuild it over the reference's own root.
    code_module = fx.GraphModule(root, _retarget(codes_graph, graph), class_name="ReferenceCodes")
    code_module.graph.eliminate_dead_code()
    code_module.recompile()
    module.code_graph = code_module
    return module.eval()


def _retarget(codes_graph: fx.Graph, graph: fx.Graph) -> fx.Graph:
    """The float graph with its output replaced by the code values (same nodes, same modules)."""
    g = copy.deepcopy(graph)
    by_name = {n.name: n for n in g.nodes}
    out = next(n for n in g.nodes if n.op == "output")
    code_out = next(n for n in codes_graph.nodes if n.op == "output")
    g.erase_node(out)
    g.output(fx.node.map_arg(code_out.args[0], lambda a: by_name[a.name]))
    return g
