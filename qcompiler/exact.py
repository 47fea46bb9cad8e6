"""Modules of the hardware-faithful simulation: kernels that accumulate exactly, and requantizers.

`model_requant` swaps a quantized kernel's module for `ExactConv2d` / `ExactLinear` and the
fake-quantizer of the kernel's output for a `KernelRequantize`. The graph keeps every node; only
the arithmetic changes:

- the kernel recovers its input's integer codes (centred on the zero point), accumulates them
  against the integer weight codes exactly (float32 when a bound proves every partial sum is an
  integer below 2**24, float64 otherwise), adds the int32 bias and saturates to the target's
  accumulator width. It returns the accumulator times its scale `s_in * s_w` in float64, so the
  fused ops after it (ReLU, ReLU6, the residual add) see real values as before. A kernel with
  no residual add whose clamp bounds are float32 numbers (`float32_output`) returns that value in
  float32 instead whenever this call's accumulators all stay below 2**21 in magnitude (checked
  on the accumulator, one pass): float32 rounds `acc * s_acc` to within `|acc| * 2**-23` of its
  value, so the requantizer still recovers `acc` exactly, and rounding is monotone, so a clamp
  at a float32 bound acts on the accumulator exactly as in float64;
- the requantizer recovers the integer accumulator from that float64 value (exact: the
  accumulator has far fewer than 52 significant bits) and requantizes it as the spec says
  (`qcompiler.requant`), adds the output zero point and saturates.

A clamp between the two acts on the accumulator: a bound `b` becomes `round(b * (1 / s_acc))`,
the accumulator grid point nearest to it. A residual added inside the kernel joins the
accumulator as `round(r * (1 / s_acc))`, its value rounded to the accumulator grid (float64
arithmetic; the simulation's sum `acc * s_acc + r` recovers the same integer except within
2**-40 of a rounding tie). The reference backend
(`qcompiler.reference`) computes the same codes from integers alone.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import QCompileError
from .formats import Format, IntFormat, QParams, aminmax_all
from .opkinds import CLAMPS
from .quantizers import FakeQuantize
from .requant import requantize, requantize_float64

# Integers of magnitude below this are exact in float32, whatever the order of the additions.
FLOAT32_EXACT = float(2 ** 24)
FLOAT64_EXACT = float(2 ** 53)
# Accumulators below this magnitude survive a float32 round trip `acc * s_acc` -> `v / s_acc`
# (two float32 roundings, relative 2**-23 at most) within a quarter, so rounding recovers them.
FLOAT32_ROUND_TRIP = float(2 ** 21)


def accumulator_range(bits: int) -> tuple[float, float]:
    return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)


class _ExactKernel:
    """Shared by ExactConv2d and ExactLinear (the mixin keeps nn.Conv2d/nn.Linear as the base)."""

    accumulator_bits: int
    channel_dim: int

    def _init_exact(self, out_channels: int, weight_shape: torch.Size, accumulator_bits: int,
                    float32_output: bool) -> None:
        self.accumulator_bits = int(accumulator_bits)
        self.float32_output = bool(float32_output)   # its chain allows a float32 value (see module doc)
        self.register_buffer("in_scale", torch.ones((), dtype=torch.float32))
        # Largest |q_in - z_in| the input format allows: with sum|w| it bounds every partial sum.
        self.register_buffer("in_code_bound", torch.ones((), dtype=torch.float64))
        self.register_buffer("weight_codes", torch.zeros(weight_shape, dtype=torch.float32))
        self.register_buffer("bias_codes", torch.zeros(out_channels, dtype=torch.int64))
        self.register_buffer("acc_scale", torch.ones(out_channels, dtype=torch.float64))
        self._fp32_exact: bool | None = None
        self._acc_bound = 0.0
        self._split: tuple[Tensor, Tensor] | None = None
        self._saturates: bool | None = None      # whether any accumulator can reach saturation
        self._f32_scale: tuple[Tensor, ...] | None = None   # float32 (bias codes, s_acc); () if not exact

    def exact_in_float32(self) -> bool:
        """Whether the accumulation runs in float32: as one conv, or as two over split weights.

        A float32 sum of integers is exact, in any order, while every partial sum stays below
        2**24; `|q_in - z_in| * sum|w|` bounds them per output channel. When one conv could
        exceed that, the weight codes split as `w = 16 * w_hi + w_lo` (w_lo in 0..15) and two
        float32 convs whose bounds both stay below 2**24 replace one float64 conv (much slower).
        """
        if self._fp32_exact is None:
            span = float(self.in_code_bound)
            rows = self.weight_codes.double().reshape(self.weight_codes.shape[0], -1)
            bound = float(rows.abs().sum(1).max()) * span
            if bound >= FLOAT64_EXACT:
                raise ValueError(
                    f"{type(self).__name__}: partial sums can reach {bound:.3g}, beyond exact float64 "
                    "integers; lower the activation or weight bit width")
            self._acc_bound = bound
            self._split = None
            if bound >= FLOAT32_EXACT:
                hi = torch.floor(self.weight_codes / 16)
                lo = self.weight_codes - 16 * hi
                b_hi = float(hi.double().abs().reshape(hi.shape[0], -1).sum(1).max()) * span
                b_lo = float(lo.double().abs().reshape(lo.shape[0], -1).sum(1).max()) * span
                if b_hi < FLOAT32_EXACT and b_lo < FLOAT32_EXACT:
                    self._split = (hi.contiguous(), lo.contiguous())
            self._fp32_exact = bound < FLOAT32_EXACT or self._split is not None
        return self._fp32_exact

    def _float32_sum(self) -> bool:
        """Whether the accumulator, bias included, is computed exactly in float32: one float32
        conv whose partial sums, plus the largest bias code, stay below 2**24."""
        if self._f32_scale is None:
            lo, hi = accumulator_range(self.accumulator_bits)
            bias_max = float(self.bias_codes.abs().max()) if self.bias_codes.numel() else 0.0
            self._saturates = self.exact_in_float32() and self._acc_bound + bias_max > hi
            if not self.exact_in_float32() or self._split is not None or self._acc_bound + bias_max >= FLOAT32_EXACT:
                self._f32_scale = ()
            else:
                self._f32_scale = (self.bias_codes.to(torch.float32), self.acc_scale.to(torch.float32))
        return bool(self._f32_scale)

    def _view(self, t: Tensor, ndim: int) -> Tensor:
        shape = [1] * ndim
        shape[self.channel_dim] = -1
        return t.reshape(shape)

    def _accumulate(self, x: Tensor, op) -> Tensor:
        # x = (q - z) * s_in exactly rounded: x * (1 / s_in) is within 0.02 of q - z.
        codes = torch.mul(x.to(torch.float32), self.in_scale.reciprocal()).round_()
        lo, hi = accumulator_range(self.accumulator_bits)
        if self._float32_sum():
            bias, scale = self._f32_scale
            acc = op(codes, self.weight_codes).add_(self._view(bias, codes.ndim))
            if self._saturates:
                acc.clamp_(lo, hi)
            if self.float32_output:
                low, high = aminmax_all(acc)
                if max(-float(low), float(high)) < FLOAT32_ROUND_TRIP:
                    return acc.mul_(self._view(scale, acc.ndim))
            return acc.to(torch.float64).mul_(self._view(self.acc_scale, acc.ndim))
        if self._split is None and self.exact_in_float32():     # exact, but not with the bias added
            acc = op(codes, self.weight_codes).to(torch.float64)
        elif self._split is not None:
            hi_w, lo_w = self._split
            acc = op(codes, hi_w).to(torch.float64).mul_(16).add_(op(codes, lo_w).to(torch.float64))
        else:
            acc = op(codes.double(), self.weight_codes.double())
        acc.add_(self._view(self.bias_codes.to(torch.float64), acc.ndim))
        if self._saturates is None:
            self._saturates = self._acc_bound + float(self.bias_codes.abs().max()) > hi
        if self._saturates:
            acc.clamp_(lo, hi)
        return acc.mul_(self._view(self.acc_scale, acc.ndim))


class ExactConv2d(_ExactKernel, nn.Conv2d):
    """A Conv2d whose output is its exact integer accumulator times `s_in * s_w` (float64, or
    float32 where that is exact, see the module doc)."""

    channel_dim = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 accumulator_bits: int = 32, float32_output: bool = False):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                           groups, bias, padding_mode)
        self._init_exact(out_channels, self.weight.shape, accumulator_bits, float32_output)

    def forward(self, x: Tensor) -> Tensor:
        return self._accumulate(x, lambda a, w: F.conv2d(a, w, None, self.stride, self.padding,
                                                         self.dilation, self.groups))


class ExactLinear(_ExactKernel, nn.Linear):
    """A Linear whose output is its exact integer accumulator times `s_in * s_w` (float64, or
    float32 where that is exact, see the module doc)."""

    channel_dim = -1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, accumulator_bits: int = 32,
                 float32_output: bool = False):
        nn.Linear.__init__(self, in_features, out_features, bias)
        self._init_exact(out_features, self.weight.shape, accumulator_bits, float32_output)

    def forward(self, x: Tensor) -> Tensor:
        return self._accumulate(x, lambda a, w: F.linear(a, w))


class KernelRequantize(FakeQuantize):
    """The output quantizer of an exact kernel: accumulator -> requantized output code.

    Its input is the kernel's real-valued accumulator (float64 or float32, after any fused clamp
    or residual add); its output the decoded output code (float32), as a FakeQuantize gives.
    """

    def __init__(self, group: int, fmt: Format, params: QParams | None, channels: int,
                 channel_dim: int, mode: str, rounding: str):
        super().__init__(group, fmt, params)
        if not isinstance(fmt, IntFormat) or params is None or fmt.granularity != "per_tensor":
            raise ValueError(f"KernelRequantize needs a per-tensor integer output format, got {fmt.name}")
        self.channels, self.channel_dim = int(channels), int(channel_dim)
        self.mode, self.rounding = mode, rounding
        self.register_buffer("acc_scale", torch.ones(channels, dtype=torch.float64))
        self.register_buffer("multiplier", torch.zeros(channels, dtype=torch.int64))
        self.register_buffer("shift", torch.zeros(channels, dtype=torch.int64))
        self.register_buffer("float_multiplier", torch.zeros(channels, dtype=torch.float32))
        self._factor: Tensor | None = None       # M * 2**-shift and 1 / s_acc, cached at first use
        self._inverse: Tensor | None = None

    def _view(self, t: Tensor, ndim: int) -> Tensor:
        shape = [1] * ndim
        shape[self.channel_dim] = -1
        return t.reshape(shape)

    def output_codes(self, acc: Tensor) -> Tensor:
        """Requantized, offset and saturated output codes (int32) of an integer accumulator."""
        n = acc.ndim
        y = requantize(acc, self.mode, self.rounding, self._view(self.multiplier, n),
                       self._view(self.shift, n), self._view(self.float_multiplier, n))
        zp = 0 if self.params.zero_point is None else int(self.params.zero_point.reshape(-1)[0])
        return (y + zp).clamp(self.fmt.qmin, self.fmt.qmax).to(torch.int32)

    def forward(self, v: Tensor) -> Tensor:
        n = v.ndim
        if self._factor is None:
            self._inverse = self.acc_scale.reciprocal()
            self._factor = torch.ldexp(self.multiplier.to(torch.float64), -self.shift.to(torch.float64))
        # v = acc * s_acc rounded to float64 (float32 where the kernel proved that safe): v / s_acc
        # is within 2**-40 (a quarter) of acc. `acc` is a temporary of this call, so the steps
        # below overwrite it in place.
        acc = v.to(torch.float64, copy=True).mul_(self._view(self._inverse, n)).round_()
        # The float64 path is the int64 one whenever it is provably exact (qcompiler.requant),
        # and much faster; the reference backend always takes the int64 path.
        y = requantize_float64(acc, self.mode, self.rounding, self._view(self.multiplier, n),
                               self._view(self.shift, n), self._view(self.float_multiplier, n),
                               factor=self._view(self._factor, n), inplace=True)
        if y is None:
            return self.fmt.dequantize(self.output_codes(acc.to(torch.int64)), self.params)
        # dequantize(clamp(y + z, qmin, qmax)) is clamp(y, qmin - z, qmax - z) * s: the codes are
        # integers, so the float32 difference `q - z` the decoder takes is exact either way.
        zp = 0 if self.params.zero_point is None else int(self.params.zero_point.reshape(-1)[0])
        y = y.clamp_(self.fmt.qmin - zp, self.fmt.qmax - zp).to(torch.float32)
        return y.mul_(self.params.scale.to(torch.float32).reshape(()))

    def extra_repr(self) -> str:
        return f"group={self.group}, format={self.fmt.name}, requant={self.mode}/{self.rounding}"


# ---------------------------------------------------------------------------------------------
# Which kernels compute exactly: the chain from a kernel to its output quantizer.

# Fused ops that may sit between an exact kernel and its requantizer.
CLAMP_KINDS = CLAMPS
KERNEL_KINDS = ("conv", "depthwise_conv", "linear")


class NotExact(Exception):
    """A kernel that stays a float fake-quant kernel, with the reason."""


def _node_arg(node, index: int, name: str, default):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def clamp_bounds(node) -> tuple[float | None, float | None]:
    """The real bounds (lo, hi; None: open) of a canonical clamp-like node."""
    kind = node.meta.get("op_kind")
    if kind == "relu":
        return 0.0, None
    if kind == "relu6":
        return 0.0, 6.0
    if kind == "hardtanh":
        lo, hi = _node_arg(node, 1, "min_val", -1.0), _node_arg(node, 2, "max_val", 1.0)
    elif kind == "clamp":
        lo, hi = _node_arg(node, 1, "min", None), _node_arg(node, 2, "max", None)
    else:
        raise NotExact(f"{node.name}: {kind} is not a clamp")
    for b in (lo, hi):
        if b is not None and not isinstance(b, (int, float)):
            raise NotExact(f"{node.name}: clamp bounds are tensors")
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


def quantizer_of(gm, node) -> FakeQuantize:
    """The FakeQuantize module a node calls (NotExact if it is none, or not a per-tensor int one)."""
    if node is None or node.op != "call_module":
        raise NotExact(f"{getattr(node, 'name', node)} is not a quantizer")
    module = gm.get_submodule(node.target)
    if not isinstance(module, FakeQuantize):
        raise NotExact(f"{node.name} is not a quantizer")
    if not isinstance(module.fmt, IntFormat) or module.fmt.granularity != "per_tensor" or module.params is None:
        raise NotExact(f"{node.name} quantizes to {module.fmt.name}, not a per-tensor integer format")
    return module


class ChainIndex:
    """Each node by name and each kernel's fused members, read in one pass over a graph, so that
    finding the chains of all kernels costs one pass, not one per kernel (valid while the graph's
    nodes do not change; swapping modules, as `model_requant` does, keeps it valid)."""

    def __init__(self, gm):
        self.nodes: dict[str, object] = {}
        self.members: dict[str, list] = {}
        for n in gm.graph.nodes:
            self.nodes[n.name] = n
            if n.meta.get("kernel") is not None:
                self.members.setdefault(n.meta["kernel"], []).append(n)


class KernelChain:
    """A weighted kernel, its fused ops and its quantizers, as found in a converted graph."""

    def __init__(self, gm, anchor, index: ChainIndex | None = None):
        index = index if index is not None else ChainIndex(gm)
        nodes = index.nodes
        self.anchor = anchor
        kind = anchor.meta.get("op_kind")
        if kind not in KERNEL_KINDS or anchor.op != "call_module":
            raise NotExact(f"{anchor.name}: {kind} kernels run as float fake-quant")
        module = gm.get_submodule(anchor.target)
        if type(module) not in (nn.Conv2d, nn.Linear, ExactConv2d, ExactLinear):
            raise NotExact(f"{anchor.name}: {type(module).__name__} runs as float fake-quant")
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise NotExact(f"{anchor.name}: padding mode {module.padding_mode}")
        if isinstance(module, nn.Conv2d) and isinstance(module.padding, str):
            raise NotExact(f"{anchor.name}: padding={module.padding!r} pads asymmetrically")
        self.members = list(index.members.get(anchor.name, ())) or [anchor]
        last = nodes[anchor.meta.get("fused_into", anchor.name)]
        if self.members[-1] is not last:
            raise NotExact(f"{anchor.name}: its fused ops are not a chain")
        users = list(last.users)
        if len(users) != 1:
            raise NotExact(f"{last.name}: the kernel output has no single quantizer")
        self.output = users[0]
        self.out_quant = quantizer_of(gm, self.output)
        self.input = anchor.args[0] if anchor.args else None
        self.in_quant = quantizer_of(gm, self.input)
        if len(anchor.args) != 1 or anchor.kwargs:
            raise NotExact(f"{anchor.name}: extra kernel arguments")
        self.clamps: list[tuple[float | None, float | None]] = []
        self.steps: list[tuple[str, object]] = []       # ("clamp", (lo, hi)) or ("add", residual node)
        self.residual = None
        prev = anchor
        for m in self.members[1:]:
            k = m.meta.get("op_kind")
            if k in CLAMP_KINDS:
                if not m.args or m.args[0] is not prev:
                    raise NotExact(f"{m.name}: clamp of something else than the kernel")
                self.steps.append(("clamp", clamp_bounds(m)))
            elif k == "add" and self.residual is None and len(m.args) == 2 and not m.kwargs:
                others = [a for a in m.args if a is not prev]
                if len(others) != 1:
                    raise NotExact(f"{m.name}: add of the kernel with itself")
                quantizer_of(gm, others[0])
                self.residual = others[0]
                self.steps.append(("add", others[0]))
            else:
                raise NotExact(f"{m.name}: fused {k} has no exact integer form here")
            prev = m


class ExactGlobalAvgPool(nn.Module):
    """Global average pooling as integer hardware does it: the sum of the input codes over all
    positions (exact), times `s_in / window` (float64). Its `KernelRequantize` divides by the
    window and rescales in one multiplier; the window is fixed at compile time."""

    def __init__(self, channels: int, window: int, keepdim: bool = True):
        super().__init__()
        self.channels, self.window, self.keepdim = int(channels), int(window), bool(keepdim)
        self.register_buffer("in_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("acc_scale", torch.ones(channels, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        check_window(x, self.window)
        codes = torch.round(x.to(torch.float32) * self.in_scale.reciprocal())
        acc = codes.to(torch.float64).sum(dim=(2, 3), keepdim=self.keepdim)
        shape = [1, -1] + [1] * (acc.ndim - 2)
        return acc * self.acc_scale.reshape(shape)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, window={self.window}, keepdim={self.keepdim}"


def check_window(x: Tensor, window: int) -> None:
    if x.ndim != 4 or x.shape[2] * x.shape[3] != window:
        raise QCompileError(
            f"global average pooling was compiled for {window} positions per channel (its "
            f"requantization multiplier divides by it) but got an input of shape {tuple(x.shape)}; "
            "compile the model with example inputs of the size you run it at")


def global_pool_keepdim(gm, node) -> bool:
    """keepdim of a global average pool node (adaptive pool to 1x1, or mean over H and W)."""
    kind = node.meta.get("op_kind")
    if kind == "adaptive_avg_pool":
        if node.op == "call_module":
            size = gm.get_submodule(node.target).output_size
        else:
            size = _node_arg(node, 1, "output_size", None)
        if size not in (1, (1, 1), [1, 1]):
            raise NotExact(f"{node.name}: adaptive pooling to {size}, not 1x1")
        return True
    if kind == "mean" and node.op == "call_function":
        dims = _node_arg(node, 1, "dim", None)
        if not isinstance(dims, (list, tuple)) or sorted(d % 4 for d in dims) != [2, 3]:
            raise NotExact(f"{node.name}: mean over {dims}, not over height and width")
        return bool(_node_arg(node, 2, "keepdim", False))
    raise NotExact(f"{node.name}: {kind} is not a global average pool")


# ---------------------------------------------------------------------------------------------
# Element-wise add of two quantized tensors.

# Inputs are shifted left by this many bits before their rescale (gemmlowp/TFLite's add), so
# that rounding each rescaled input costs a 2**-20 fraction of an output code at most. Wider
# inputs shift less (TFLite's int16 add: 15), so that a shifted input stays within 31 bits and
# its product with a 32-bit multiplier within int64.
ADD_LEFT_SHIFT = 20


def add_left_shift(input_bits: int) -> int:
    """The left shift of an integer add's inputs of `input_bits` bits: 20, or 31 - bits when
    that is less (int16 inputs: 15)."""
    return min(ADD_LEFT_SHIFT, 31 - int(input_bits))


def add_codes(q1: Tensor, q2: Tensor, zero_points: tuple[int, int, int], qrange: tuple[int, int],
              mode: str, rounding: str, multiplier: Tensor, shift: Tensor, left_shift: int = ADD_LEFT_SHIFT) -> Tensor:
    """Integer add: each input (q - z) << left_shift is rescaled to a common grid (constants 0
    and 1), the sum is requantized to the output (constant 2), offset and saturated. int64 in,
    int64 out."""
    z1, z2, zo = zero_points
    zero = torch.zeros((), dtype=torch.float32)
    a = requantize((q1.to(torch.int64) - z1) << left_shift, mode, rounding, multiplier[0], shift[0], zero)
    b = requantize((q2.to(torch.int64) - z2) << left_shift, mode, rounding, multiplier[1], shift[1], zero)
    y = requantize(a + b, mode, rounding, multiplier[2], shift[2], zero)
    return (y + zo).clamp(*qrange)


class ExactAdd(nn.Module):
    """The sum of two quantized tensors as an integer adder computes it (see `add_codes`).

    Inputs are decoded values of their quantizers; the output is the decoded output code.
    Constants: rescale factors `s_i / (2 * max(s_1, s_2))` for the inputs and
    `2 * max(s_1, s_2) / (2**left_shift * s_out)` for the sum, in the target's requant mode.

    With `channels` (a `ScaledAdd`: per-channel gains g_i on its inputs), the constants are one
    per channel of the last dimension, shape (3, channels): `g_i s_i / G` for the inputs with
    `G = 2 * max(g_1 s_1, g_2 s_2)` over all channels, `G / (2**left_shift * s_out)` for the sum;
    `gains` keeps the float gains for exporters.
    """

    def __init__(self, zero_points: tuple[int, int, int] = (0, 0, 0), qmin: int = -128, qmax: int = 127,
                 mode: str = "fixed_point", rounding: str = "half_even", left_shift: int = ADD_LEFT_SHIFT,
                 channels: int | None = None):
        super().__init__()
        self.zero_points = tuple(int(z) for z in zero_points)
        self.qmin, self.qmax, self.mode, self.rounding = int(qmin), int(qmax), mode, rounding
        self.left_shift = int(left_shift)
        self.channels = None if channels is None else int(channels)
        shape = (3,) if channels is None else (3, int(channels))
        self.register_buffer("in_scales", torch.ones(2, dtype=torch.float32))
        self.register_buffer("out_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("multiplier", torch.zeros(shape, dtype=torch.int64))
        self.register_buffer("shift", torch.zeros(shape, dtype=torch.int64))
        if channels is not None:
            self.register_buffer("gains", torch.ones(2, int(channels), dtype=torch.float32))

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        q1 = torch.round(x1.to(torch.float32) * self.in_scales[0].reciprocal()) + self.zero_points[0]
        q2 = torch.round(x2.to(torch.float32) * self.in_scales[1].reciprocal()) + self.zero_points[1]
        c = add_codes(q1, q2, self.zero_points, (self.qmin, self.qmax), self.mode, self.rounding,
                      self.multiplier, self.shift, self.left_shift)
        return (c.to(torch.float32) - torch.tensor(float(self.zero_points[2]))) * self.out_scale

    def extra_repr(self) -> str:
        return f"zero_points={self.zero_points}, left_shift={self.left_shift}, requant={self.mode}/{self.rounding}"


# ---------------------------------------------------------------------------------------------
# Element-wise activations as look-up tables over the input codes.

# Activations an integer target runs as a table (int8 in: 256 entries; int16 in: 65,536).
LUT_KINDS = ("gelu", "sigmoid", "tanh", "silu", "hardswish", "hardsigmoid", "exp", "elu", "mish", "leaky_relu")
LUT_MAX_BITS = 16


class ExactLUT(nn.Module):
    """An element-wise activation as integer hardware runs it: a table that maps each input code
    to an output code. Entry i is the output code of input code `in_qmin + i`, built once from
    the activation in float (`qcompiler.integer_kernels.make_exact_lut`); the simulation and
    the reference backend read the same table, so they agree bit for bit.

    The input is a decoded value of the input quantizer; the output is the decoded output code.
    Extra arguments (the activation's own, such as GELU's `approximate`) are kept on the node for
    exporters and ignored here: the table already holds their effect.
    """

    def __init__(self, entries: int, in_qmin: int = -128, in_zero_point: int = 0, out_zero_point: int = 0):
        super().__init__()
        self.entries, self.in_qmin = int(entries), int(in_qmin)
        self.in_zero_point, self.out_zero_point = int(in_zero_point), int(out_zero_point)
        self.register_buffer("in_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("out_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("table", torch.zeros(self.entries, dtype=torch.int32))

    def index(self, codes: Tensor) -> Tensor:
        """Table positions of integer input codes (saturated to the table)."""
        return (codes.to(torch.int64) - self.in_qmin).clamp_(0, self.entries - 1)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        codes = torch.round(x.to(torch.float32) * self.in_scale.reciprocal()) + self.in_zero_point
        out = self.table[self.index(codes)]
        return (out.to(torch.float32) - float(self.out_zero_point)) * self.out_scale

    def extra_repr(self) -> str:
        return (f"entries={self.entries}, in_qmin={self.in_qmin}, in_zero_point={self.in_zero_point}, "
                f"out_zero_point={self.out_zero_point}")


# ---------------------------------------------------------------------------------------------
# Softmax on integer codes.

# exp(-d * s_in) for d = 0, 1, 2, ... input codes below the row's largest, in Q15 fixed point.
SOFTMAX_EXP_BITS = 15
# Fractional bits of the output multiplier 2**f / s_out.
SOFTMAX_OUT_BITS = 16
# The longest exp table (an additive mask over finely quantized scores needs more entries).
SOFTMAX_MAX_ENTRIES = 2 ** 16


def softmax_mask_codes(mask: Tensor, dim: int, in_scale: float, levels: int) -> tuple[Tensor, Tensor]:
    """A constant additive softmax mask b (Swin's relative position bias plus shift mask) for input
    codes of scale s and `levels` values, as `softmax_codes` takes it: with u = b - max(b) along
    `dim`, the int64 weights w = round(exp(u - c * s) * 2**15) and offsets c = round(u / s). The
    offsets move the codes to the nearest grid point (so the row's maximum and the table index see
    the bias); the weights (close to 2**15) carry the remainder. w = 0 (barred) where exp(u) stays
    below 2**-16 of the row's largest term whatever the scores (torchvision's -100)."""
    u = mask.detach().to(torch.float64)
    u = u - u.amax(dim=dim, keepdim=True)
    barred = u < -((levels - 1) * in_scale + math.log(2 ** (SOFTMAX_EXP_BITS + 1)))
    offsets = torch.round(u / in_scale).masked_fill(barred, 0)
    weights = torch.round(torch.exp(u - offsets * in_scale) * 2 ** SOFTMAX_EXP_BITS).masked_fill(barred, 0)
    return weights.to(torch.int64), offsets.to(torch.int64)


def softmax_table_entries(levels: int, in_scale: float, offsets: bool) -> int:
    """Entries of the exp table for inputs of `levels` codes: one per code difference, and with
    mask offsets (differences beyond the code range) until exp(-d * s) * 2**15 rounds to 0, so that
    the last entry, which larger differences read, is 0."""
    if not offsets:
        return levels
    return max(levels, math.floor(math.log(2 ** (SOFTMAX_EXP_BITS + 1)) / in_scale) + 2)


def softmax_codes(q: Tensor, mask: Tensor | None, dim: int, exp_table: Tensor, out_multiplier: int,
                  out_zero_point: int, qrange: tuple[int, int], offsets: Tensor | None = None) -> Tensor:
    """Integer softmax along `dim` of input codes `q` (int64 in, int64 out):

    l = q + c (c: the offsets of an additive mask, `softmax_mask_codes`; else 0),
    d = max(l) - l over the positions `mask` keeps,
    e = exp_table[min(d, len - 1)] (Q15 values of exp(-d * s_in); masked positions 0),
    e = floor((e * w + 2**14) / 2**15) where `mask` is int64 weights w,
    out = floor((e * M + sum(e) * 2**15) / (sum(e) * 2**16)) + z_out, saturated,

    with M = round(2**16 / s_out): the probability e / sum(e) rounded half up to the output grid.
    `mask` is None (all kept), boolean (True: kept) or int64 weights (kept where w > 0). A row with
    nothing kept gives zero probabilities."""
    q = q.to(torch.int64)
    if offsets is not None:
        q = q + offsets
    weights = None
    if mask is not None and mask.dtype != torch.bool:
        weights, mask = mask.to(torch.int64), mask > 0
    low = torch.iinfo(torch.int64).min
    kept = q if mask is None else q.masked_fill(~mask, low)
    d = kept.amax(dim=dim, keepdim=True) - q
    e = exp_table[d.clamp(0, exp_table.numel() - 1)]
    if weights is not None:
        e = torch.div(e * weights + 2 ** (SOFTMAX_EXP_BITS - 1), 2 ** SOFTMAX_EXP_BITS, rounding_mode="floor")
    if mask is not None:
        e = e.masked_fill(~mask, 0)
    total = e.sum(dim=dim, keepdim=True).clamp_min(1)
    out = torch.div(e * out_multiplier + total * 2 ** (SOFTMAX_OUT_BITS - 1), total * 2 ** SOFTMAX_OUT_BITS,
                    rounding_mode="floor")
    return (out + out_zero_point).clamp(*qrange)


class ExactSoftmax(nn.Module):
    """Softmax as integer hardware computes it (`softmax_codes`): a table of exp over code
    differences, an integer sum and one integer division per element. Input: decoded values of
    the input quantizer (and an optional boolean mask, or the int64 weights and offsets of an
    additive one); output: the decoded output code. The simulation and the reference backend run
    the same function on the same codes."""

    def __init__(self, entries: int, dim: int = -1, is_causal: bool = False, out_zero_point: int = 0,
                 qmin: int = -128, qmax: int = 127, out_multiplier: int = 1):
        super().__init__()
        self.entries, self.dim, self.is_causal = int(entries), int(dim), bool(is_causal)
        self.out_zero_point, self.qmin, self.qmax = int(out_zero_point), int(qmin), int(qmax)
        self.out_multiplier = int(out_multiplier)
        self.register_buffer("in_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("out_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("exp_table", torch.zeros(self.entries, dtype=torch.int64))

    def mask_of(self, q: Tensor, mask: Tensor | None) -> Tensor | None:
        if self.is_causal:
            rows, cols = q.shape[-2], q.shape[-1]
            causal = torch.ones(rows, cols, dtype=torch.bool, device=q.device).tril()
            mask = causal if mask is None else mask & causal
        if mask is not None and mask.dtype not in (torch.bool, torch.int64):
            raise QCompileError("an integer softmax takes a boolean mask (True: attend) or int64 weights "
                                "(softmax_mask_codes), not an additive float mask")
        return None if mask is None else mask.expand(q.shape)

    def codes(self, q: Tensor, mask: Tensor | None = None, offsets: Tensor | None = None) -> Tensor:
        return softmax_codes(q, self.mask_of(q, mask), self.dim, self.exp_table, self.out_multiplier,
                             self.out_zero_point, (self.qmin, self.qmax), offsets)

    def forward(self, x: Tensor, mask: Tensor | None = None, offsets: Tensor | None = None) -> Tensor:
        q = torch.round(x.to(torch.float32) * self.in_scale.reciprocal())   # differences need no zero point
        out = self.codes(q, mask, offsets)
        return (out.to(torch.float32) - float(self.out_zero_point)) * self.out_scale

    def extra_repr(self) -> str:
        return (f"entries={self.entries}, dim={self.dim}, is_causal={self.is_causal}, "
                f"out_zero_point={self.out_zero_point}, out_multiplier={self.out_multiplier}")


# ---------------------------------------------------------------------------------------------
# LayerNorm on integer codes.

# Fractional bits: of the mean (K), of the standard deviation (P), of the normalised value (F),
# of the per-channel output multipliers (G).
LAYER_NORM_MEAN_BITS = 4
LAYER_NORM_STD_BITS = 8
LAYER_NORM_VALUE_BITS = 16
LAYER_NORM_GAIN_BITS = 8


def isqrt(v: Tensor) -> Tensor:
    """floor(sqrt(v)) of non-negative int64 values below 2**62, exactly: the float64 root, then
    corrected until r*r <= v < (r+1)*(r+1)."""
    r = torch.sqrt(v.to(torch.float64)).floor().to(torch.int64)
    for _ in range(2):
        r = torch.where(r * r > v, r - 1, r)
        r = torch.where((r + 1) * (r + 1) <= v, r + 1, r)
    return r


def layer_norm_codes(q: Tensor, in_zero_point: int, size: int, eps_codes: int, gain: Tensor, offset: Tensor,
                     out_zero_point: int, qrange: tuple[int, int], in_gain: Tensor | None = None,
                     in_gain_bits: int = 0) -> Tensor:
    """Integer LayerNorm over the last `size` = n elements of input codes `q` (int64 in and out):

    c = (q - z_in) * 2**K;  m = round(sum(c) / n)  (half up: the mean with K fractional bits);
    v = sum((c - m)**2) * 2**(2P - 2K) // n + eps_codes;  r = isqrt(v)  (the standard deviation
    in codes with P fractional bits);  y = ((c - m) * 2**(F + P - K)) // r  (the normalised value,
    F fractional bits);  out = clamp(((y * gain + offset) + 2**(F + G - 1)) >> (F + G) + z_out,
    qmin, qmax)

    with gain = round(gamma / s_out * 2**G) and offset = round(beta / s_out * 2**(F + G)) per
    channel, and eps_codes = round(eps / s_in**2 * 2**(2P)).

    An input with per-channel factors (`GainLayerNorm`: the channel's value is s_in * r_c * (q - z_in),
    r_c = in_gain_c / 2**B, B = `in_gain_bits`) multiplies each centred code by its integer
    `in_gain_c` instead: c = (q - z_in) * in_gain_c * 2**K, and K + B takes K's place above (an
    exponent below zero divides)."""
    k, p, f, g = LAYER_NORM_MEAN_BITS, LAYER_NORM_STD_BITS, LAYER_NORM_VALUE_BITS, LAYER_NORM_GAIN_BITS
    shape = q.shape
    c = (q.to(torch.int64).reshape(-1, size) - in_zero_point) * 2 ** k
    if in_gain is not None:
        c = c * in_gain.reshape(1, -1)
        k += in_gain_bits
    m = torch.div(2 * c.sum(dim=1, keepdim=True) + size, 2 * size, rounding_mode="floor")
    centred = c - m
    squares = (centred * centred).sum(dim=1, keepdim=True)
    if 2 * p >= 2 * k:
        var = torch.div(squares * 2 ** (2 * p - 2 * k), size, rounding_mode="floor") + eps_codes
    else:
        var = torch.div(squares, size * 2 ** (2 * k - 2 * p), rounding_mode="floor") + eps_codes
    r = isqrt(var).clamp_min(1)
    y = torch.div(centred * 2 ** (f + p - k), r, rounding_mode="floor")
    total = y * gain.reshape(1, -1) + offset.reshape(1, -1)
    out = torch.bitwise_right_shift(total + 2 ** (f + g - 1), f + g) + out_zero_point
    return out.clamp(*qrange).reshape(shape)


class ExactLayerNorm(nn.Module):
    """LayerNorm as integer hardware computes it (`layer_norm_codes`): integer mean, variance and
    square root, a division per element and per-channel integer gain and offset. Input: decoded
    values of the input quantizer; output: the decoded output code."""

    def __init__(self, size: int, in_zero_point: int = 0, eps_codes: int = 0, out_zero_point: int = 0,
                 qmin: int = -128, qmax: int = 127, eps: float = 0.0, in_gain_bits: int = 0):
        super().__init__()
        self.size, self.in_zero_point, self.eps_codes = int(size), int(in_zero_point), int(eps_codes)
        self.out_zero_point, self.qmin, self.qmax = int(out_zero_point), int(qmin), int(qmax)
        self.register_buffer("in_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("out_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("gain", torch.zeros(self.size, dtype=torch.int64))
        self.register_buffer("offset", torch.zeros(self.size, dtype=torch.int64))
        # Per-channel integer input factors (2**in_gain_bits is 1) of a GainLayerNorm's input.
        self.in_gain_bits = int(in_gain_bits)
        if self.in_gain_bits:
            self.register_buffer("in_gain", torch.full((self.size,), 2 ** self.in_gain_bits, dtype=torch.int64))
        # The float LayerNorm it stands for, for exporters that compute it in float (ONNX).
        self.eps = float(eps)
        self.register_buffer("float_weight", torch.ones(self.size, dtype=torch.float32))
        self.register_buffer("float_bias", torch.zeros(self.size, dtype=torch.float32))

    def codes(self, q: Tensor) -> Tensor:
        return layer_norm_codes(q, self.in_zero_point, self.size, self.eps_codes, self.gain, self.offset,
                                self.out_zero_point, (self.qmin, self.qmax), getattr(self, "in_gain", None),
                                self.in_gain_bits)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        q = torch.round(x.to(torch.float32) * self.in_scale.reciprocal()) + self.in_zero_point
        return (self.codes(q).to(torch.float32) - float(self.out_zero_point)) * self.out_scale

    def extra_repr(self) -> str:
        return f"size={self.size}, in_zero_point={self.in_zero_point}, out_zero_point={self.out_zero_point}"


# ---------------------------------------------------------------------------------------------
# Activation x activation matmul on integer codes.

def matmul_codes(q1: Tensor, q2: Tensor, zero_points: tuple[int, int, int], qrange: tuple[int, int], mode: str,
                 rounding: str, multiplier: Tensor, shift: Tensor) -> Tensor:
    """(q1 - z1) @ (q2 - z2) accumulated exactly (float64 on integers below 2**53, which
    `make_exact_matmul` proves from the formats and the inner size), requantized by
    `s1 * s2 / s_out`, offset and saturated. int64 out."""
    z1, z2, zo = zero_points
    acc = torch.matmul(q1.to(torch.float64) - z1, q2.to(torch.float64) - z2).to(torch.int64)
    zero = torch.zeros((), dtype=torch.float32)
    return (requantize(acc, mode, rounding, multiplier, shift, zero) + zo).clamp(*qrange)


class ExactMatmul(nn.Module):
    """The product of two quantized activations as integer hardware computes it (`matmul_codes`).
    Inputs: decoded values of their quantizers (after data movement that keeps the grid); output:
    the decoded output code."""

    def __init__(self, zero_points: tuple[int, int, int] = (0, 0, 0), qmin: int = -128, qmax: int = 127,
                 mode: str = "fixed_point", rounding: str = "half_even"):
        super().__init__()
        self.zero_points = tuple(int(z) for z in zero_points)
        self.qmin, self.qmax, self.mode, self.rounding = int(qmin), int(qmax), mode, rounding
        self.register_buffer("in_scales", torch.ones(2, dtype=torch.float32))
        self.register_buffer("out_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("multiplier", torch.zeros((), dtype=torch.int64))
        self.register_buffer("shift", torch.zeros((), dtype=torch.int64))

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        q1 = torch.round(x1.to(torch.float32) * self.in_scales[0].reciprocal()) + self.zero_points[0]
        q2 = torch.round(x2.to(torch.float32) * self.in_scales[1].reciprocal()) + self.zero_points[1]
        c = matmul_codes(q1, q2, self.zero_points, (self.qmin, self.qmax), self.mode, self.rounding,
                         self.multiplier, self.shift)
        return (c.to(torch.float32) - float(self.zero_points[2])) * self.out_scale

    def extra_repr(self) -> str:
        return f"zero_points={self.zero_points}, requant={self.mode}/{self.rounding}"


# ---------------------------------------------------------------------------------------------
# Multiply by a constant (attention's softmax scale, a model's fixed gains).

def scale_codes(q: Tensor, zero_points: tuple[int, int], qrange: tuple[int, int], negate: bool, mode: str,
                rounding: str, multiplier: Tensor, shift: Tensor) -> Tensor:
    """clamp(requant(+-(q - z_in)) + z_out, qmin, qmax): codes times a constant c, requantized by
    |c| s_in / s_out (the sign of c applied to the codes first). int64 in, int64 out."""
    z_in, z_out = zero_points
    centred = q.to(torch.int64) - z_in
    if negate:
        centred = -centred
    zero = torch.zeros((), dtype=torch.float32)
    return (requantize(centred, mode, rounding, multiplier, shift, zero) + z_out).clamp(*qrange)


class ExactScale(nn.Module):
    """A quantized tensor times a constant `constant` as integer hardware computes it: one
    requantization of the input codes (`scale_codes`). Input: a decoded value of its quantizer;
    output: the decoded output code."""

    def __init__(self, constant: float = 1.0, zero_points: tuple[int, int] = (0, 0), qmin: int = -128,
                 qmax: int = 127, mode: str = "fixed_point", rounding: str = "half_even"):
        super().__init__()
        self.constant = float(constant)
        self.zero_points = tuple(int(z) for z in zero_points)
        self.qmin, self.qmax, self.mode, self.rounding = int(qmin), int(qmax), mode, rounding
        self.register_buffer("in_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("out_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("multiplier", torch.zeros((), dtype=torch.int64))
        self.register_buffer("shift", torch.zeros((), dtype=torch.int64))

    def forward(self, x: Tensor) -> Tensor:
        q = torch.round(x.to(torch.float32) * self.in_scale.reciprocal()) + self.zero_points[0]
        c = scale_codes(q, self.zero_points, (self.qmin, self.qmax), self.constant < 0, self.mode, self.rounding,
                        self.multiplier, self.shift)
        return (c.to(torch.float32) - float(self.zero_points[1])) * self.out_scale

    def extra_repr(self) -> str:
        return f"constant={self.constant}, zero_points={self.zero_points}, requant={self.mode}/{self.rounding}"


# ---------------------------------------------------------------------------------------------
# Embedding lookup from a table of output codes.

class ExactEmbedding(nn.Module):
    """An embedding whose output is quantized, as integer hardware runs it: the table is stored as
    codes of the output's format and the lookup reads them (`table[ids]`), so no arithmetic is
    left. Equal to quantizing the float lookup, since quantization acts element by element.
    Input: integer ids; output: the decoded codes."""

    def __init__(self, num_embeddings: int, embedding_dim: int, out_zero_point: int = 0):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.out_zero_point = int(out_zero_point)
        self.register_buffer("out_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("table", torch.zeros(self.num_embeddings, self.embedding_dim, dtype=torch.int32))

    def forward(self, ids: Tensor, *args, **kwargs) -> Tensor:
        return (self.table[ids].to(torch.float32) - float(self.out_zero_point)) * self.out_scale

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, out_zero_point={self.out_zero_point}"
