"""Trainable quantizers: the learned pieces of reconstruction and quantization-aware training.

Each one stands in for a frozen quantizer of the simulated model while something is optimised,
and `convert`s back to the plain integer plan (codes on the same grid, a scale in `QParams`),
so the reference backend sees nothing but ordinary integer weights and scales afterwards.

- `SoftRoundedWeight`: a kernel's integer weights with a learnable rounding direction (AdaRound's
  rectified sigmoid, Nagel et al. 2020). Every code stays floor(w / s) or floor(w / s) + 1, inside
  [qmin, qmax]; `regularizer(beta)` pushes each direction to a hard 0 or 1 as beta anneals.
- `LearnedStep`: an integer quantizer whose step size is learned (LSQ, Esser et al. 2020), per
  tensor (activations) or per channel (weights): round and clamp pass the gradient straight
  through, the step gets its gradient from both. The step is held as its logarithm (relative to
  the calibrated step, which it reproduces exactly at the start), so it stays positive, and can
  be bounded to a factor of the calibrated step; on power-of-two targets the forward uses
  2^round(log2 step), straight through. It can learn an asymmetric format's zero point (LSQ+,
  Bhalgat et al. 2020) as a float rounded straight through, and round with a requantizer's
  rounding mode. `drop` is QDrop's probability (Wei et al. 2022) of letting an element pass
  unquantized while training.

Reconstruction (`qcompiler.reconstruction`) and quantization-aware training (`qcompiler.qat`)
both build on these.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .formats import IntFormat, QParams, SCALE_EPS

# The rectified sigmoid h(V) = clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1) reaches exactly
# 0 and 1 at finite V, so a weight can settle on a rounding direction.
ZETA, GAMMA = 1.1, -0.1


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def round_ste(x: Tensor) -> Tensor:
    """round(x) forward (exactly: no x + (round(x) - x) float error), identity backward."""
    return _RoundSTE.apply(x)


class _LearnedStepQuant(torch.autograd.Function):
    """s * (clamp(round(x / s) + zp, qmin, qmax) - zp) with LSQ's gradients, in one node.

    s and zp broadcast against x (a scalar, or one value per channel). d/dx: 1 inside the range,
    0 outside (straight through the rounding). d/ds: round(x/s) - x/s inside, the clamped code
    minus zp outside. d/dzp: 0 inside, -s outside (LSQ+'s offset gradient, the zero point being
    an integer rounded straight through). Only a mask and that derivative are kept for the
    backward pass, instead of the intermediate tensors of the composed expression.
    """

    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor, zp: Tensor, qmin: int, qmax: int, rounding: str = "half_even") -> Tensor:
        xs = x / s
        q = round_mode(xs, rounding).add_(zp)
        inside = (q >= qmin) & (q <= qmax)
        q = q.clamp_(qmin, qmax).sub_(zp)
        out = q * s
        ctx.s_shape, ctx.zp_shape = s.shape, zp.shape
        ctx.save_for_backward(inside, q.sub_(xs.mul_(inside)) if ctx.needs_input_grad[1] else None,
                              s if ctx.needs_input_grad[2] else None)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        inside, ds, s = ctx.saved_tensors
        gx = grad * inside if ctx.needs_input_grad[0] else None
        gs = (grad * ds).sum_to_size(ctx.s_shape) if ds is not None else None
        gzp = (grad * ~inside * -s).sum_to_size(ctx.zp_shape) if s is not None else None
        return gx, gs, gzp, None, None, None


def round_mode(x: Tensor, rounding: str) -> Tensor:
    """x rounded to integers with a requantizer's rounding (`qcompiler.requant.ROUNDINGS`), in x's dtype."""
    if rounding == "half_even":
        return torch.round(x)
    if rounding == "half_up":
        return torch.floor(x + 0.5)
    if rounding == "half_down":
        return torch.ceil(x - 0.5)
    if rounding == "floor":
        return torch.floor(x)
    if rounding == "toward_zero":
        return torch.trunc(x)
    if rounding == "half_away_from_zero":
        return torch.copysign(torch.floor(x.abs() + 0.5), x)
    raise ValueError(f"unknown rounding {rounding!r}")


def rectified_sigmoid(v: Tensor) -> Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def rectified_sigmoid_inverse(h: Tensor) -> Tensor:
    """V with rectified_sigmoid(V) = h, for h strictly inside (0, 1)."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


def weight_grid(fmt: IntFormat, params: QParams, like: Tensor) -> tuple[Tensor, Tensor]:
    """Scale and zero point of a weight shaped to broadcast against it (output channels on dim 0)."""
    shape = (-1,) + (1,) * (like.dim() - 1) if fmt.granularity == "per_channel" else (1,) * like.dim()
    scale = params.scale.float().reshape(shape)
    zp = params.zero_point.float().reshape(shape) if params.zero_point is not None else torch.zeros_like(scale)
    return scale, zp


class SoftRoundedWeight(nn.Module):
    """w_soft = s * (clamp(floor(w / s) + zp + h(V), qmin, qmax) - zp), V learnable.

    Starts where h(V) equals the fractional part of w / s, so the soft weight is the float one.
    """

    def __init__(self, w: Tensor, fmt: IntFormat, params: QParams):
        super().__init__()
        if not isinstance(fmt, IntFormat):
            raise TypeError(f"soft rounding needs an integer format, got {type(fmt).__name__}")
        self.fmt, self.params = fmt, params
        scale, zp = weight_grid(fmt, params, w)
        scaled = w.detach().float() / scale
        self.register_buffer("scale", scale)
        self.register_buffer("zp", zp)
        self.register_buffer("floor", torch.floor(scaled) + zp)
        self.register_buffer("nearest", (torch.round(scaled) + zp).clamp(fmt.qmin, fmt.qmax))
        rest = (scaled - torch.floor(scaled)).clamp(1e-4, 1 - 1e-4)
        self.v = nn.Parameter(rectified_sigmoid_inverse(rest))
        # Where floor and floor + 1 do not both fit the grid, the direction changes nothing.
        self.register_buffer("active", (self.floor >= fmt.qmin) & (self.floor < fmt.qmax))
        # A learned gain on the scale (LSQ on the weights): the codes keep their grid, their
        # value per code moves. Never on power-of-two scales.
        self.log_gain: nn.Parameter | None = None

    def learn_scale(self) -> None:
        """Learn the weight scale too, as a gain exp(g) per channel starting at 1."""
        if self.fmt.scale_kind == "pow2":
            raise TypeError("power-of-two weight scales are not learned")
        self.log_gain = nn.Parameter(torch.zeros_like(self.scale))

    def current_scale(self) -> Tensor:
        return self.scale if self.log_gain is None else self.scale * self.log_gain.exp()

    def start_from(self, w: Tensor, margin: float) -> None:
        """Start from the hard rounding of `w` (a weight on this grid): h(V) = 1 - margin where it
        rounds up from floor, margin where it rounds down, so the direction can still change."""
        codes = torch.round(w.detach().float() / self.scale) + self.zp
        up = (codes - self.floor) > 0.5
        with torch.no_grad():
            self.v.copy_(rectified_sigmoid_inverse(torch.where(up, torch.tensor(1.0 - margin), torch.tensor(margin))))

    def h(self) -> Tensor:
        return rectified_sigmoid(self.v)

    def forward(self) -> Tensor:
        codes = (self.floor + self.h()).clamp(self.fmt.qmin, self.fmt.qmax)
        return (codes - self.zp) * self.current_scale()

    def regularizer(self, beta: float) -> Tensor:
        """Sum over the active weights of 1 - |2h - 1|^beta: 0 once every direction is hard."""
        u = (self.h() * 2.0 - 1.0)[self.active]
        return (1.0 - u.abs().pow(beta)).sum()

    def codes(self) -> Tensor:
        """The hard codes: up where h(V) >= 1/2 (float tensor of integers in [qmin, qmax])."""
        return (self.floor + (self.h() >= 0.5).float()).clamp(self.fmt.qmin, self.fmt.qmax).detach()

    def hard_weight(self) -> Tensor:
        return ((self.codes() - self.zp) * self.current_scale()).detach()

    def qparams(self) -> QParams:
        """The weight's parameters with the learned scale (the codes of hard_weight on them)."""
        return QParams(scale=self.current_scale().detach().reshape(self.params.scale.shape).clone(),
                       zero_point=self.params.zero_point, axis=self.params.axis)

    def undecided(self) -> int:
        """Active weights whose h(V) is not exactly 0 or 1 yet."""
        h = self.h().detach()[self.active]
        return int(((h > 0.0) & (h < 1.0)).sum())

    def numel_active(self) -> int:
        return int(self.active.sum())


class LearnedStep(nn.Module):
    """An integer quantizer whose step is learned (LSQ; see the module docstring).

    Per tensor (activations), or per channel along `params.axis` of an `ndim`-dimensional tensor
    (weights). `learn_zero_point`: the zero point of an asymmetric format is learned too (LSQ+'s
    offset), as a float rounded straight through, so the forward always uses an integer inside
    [qmin, qmax]. `bound`: the step stays within a factor `bound` of where it started (it can
    neither collapse to zero nor run away; the gradient stops at the bound). `rounding`: how
    values round to codes (a requantizer's mode; round-half-to-even by default).
    """

    def __init__(self, group: int, fmt: IntFormat, params: QParams, drop: float = 0.0, *,
                 ndim: int | None = None, learn_zero_point: bool = False, bound: float | None = None,
                 rounding: str = "half_even"):
        super().__init__()
        per_channel = isinstance(fmt, IntFormat) and fmt.granularity == "per_channel" and ndim is not None
        if not isinstance(fmt, IntFormat) or not (fmt.granularity == "per_tensor" or per_channel):
            raise TypeError(f"LearnedStep handles per-tensor (or, given ndim, per-channel) integer formats, "
                            f"got {getattr(fmt, 'name', fmt)}")
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"drop is a probability in [0, 1), got {drop}")
        if bound is not None and bound <= 1.0:
            raise ValueError(f"bound is a factor above 1, got {bound}")
        self.group, self.fmt, self.drop, self.rounding = group, fmt, drop, rounding
        shape: tuple[int, ...] = ()
        if per_channel:
            shape = tuple(-1 if d == (params.axis or 0) % ndim else 1 for d in range(ndim))
        base = params.scale.detach().float().reshape(shape).clamp_min(SCALE_EPS)
        # The step is base * exp(log_scale - initial): exactly the calibrated step at the start.
        self.register_buffer("base", base.clone())
        self.log_scale = nn.Parameter(base.log())
        zp = params.zero_point.float().reshape(shape) if params.zero_point is not None else torch.zeros(())
        self.zp = nn.Parameter(zp.clone(), requires_grad=bool(learn_zero_point and params.zero_point is not None))
        self.zero_point, self.scale_shape, self.axis = params.zero_point, params.scale.shape, params.axis
        self.register_buffer("initial", self.log_scale.detach().clone())
        self.bound = None if bound is None else float(torch.log(torch.tensor(bound)))
        self.generator: torch.Generator | None = None

    def reset(self) -> None:
        """Back to the calibrated step."""
        with torch.no_grad():
            self.log_scale.copy_(self.initial)

    def step(self) -> Tensor:
        moved = self.log_scale - self.initial
        if self.bound is not None:
            moved = moved.clamp(-self.bound, self.bound)
        s = self.base * moved.exp()
        if self.fmt.scale_kind == "pow2":
            return torch.exp2(round_ste(torch.log2(s)))
        return s

    def zero(self) -> Tensor:
        """The zero point the forward uses: an integer inside the format's range."""
        if not self.zp.requires_grad:
            return self.zp
        return round_ste(self.zp).clamp(self.fmt.qmin, self.fmt.qmax)

    def forward(self, x: Tensor) -> Tensor:
        # Inside the range the gradient passes straight through to x; outside it reaches only
        # the step (LSQ) and the zero point (LSQ+).
        out = _LearnedStepQuant.apply(x, self.step(), self.zero(), self.fmt.qmin, self.fmt.qmax, self.rounding)
        if self.training and self.drop > 0.0:
            keep = torch.rand(x.shape, generator=self.generator, device=x.device) < self.drop
            out = torch.where(keep, x, out)
        return out

    def qparams(self) -> QParams:
        """The learned step (and zero point) as frozen parameters (power-of-two targets get the
        power it used)."""
        s = self.step().detach().reshape(self.scale_shape)
        zp = self.zero_point
        if zp is not None and self.zp.requires_grad:
            zp = self.zero().detach().reshape(zp.shape).to(zp.dtype)
        return QParams(scale=s.clone(), zero_point=zp, axis=self.axis)
