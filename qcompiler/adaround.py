"""AdaRound: each integer weight's rounding direction chosen by layer reconstruction.

Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization". For one
kernel whose weights were rounded to the nearest code of their group's format and parameters,
`round_kernel` rounds each weight up or down, whichever reconstructs the layer's float output
best over the calibration data; every code stays within one of round-to-nearest and inside
[qmin, qmax], so the plan (scales, zero points) still describes the weights exactly.

The objective for a kernel is

    || W_soft x_q - W x_f ||^2    (x_q: its input in the simulated model so far, x_f: in float)

which also absorbs the error of everything upstream ("asymmetric" reconstruction). It is a
quadratic form in the weight error D = W_soft - W, so it is evaluated from second moments of the
input patches collected once (E[x_q x_q^T] and E[(x_q - x_f) x_q^T]): each Adam step costs one
(batched) matrix product the size of the layer's weight, whatever the number of calibration rows.
Depthwise and grouped convolutions are optimised per group, batched. With bias correction (the
default) the objective ignores per-channel means (covariances instead of second moments): the
bias absorbs the mean error afterwards (`qcompiler.replay.correct_channel_bias`).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .errors import QCompileError
from .formats import IntFormat, QParams
from .plan import Plan
from .trainable import GAMMA, ZETA, rectified_sigmoid_inverse

log = logging.getLogger(__name__)

ROWS_PER_INPUT = 64
ROW_ELEMENTS = 1 << 25
CHUNK_ELEMENTS = 1 << 22
# Per-output moments (activation-weighted objective) cost rows x out x K^2 multiply-adds and
# out x K^2 memory; kernels above these bounds use the unweighted objective.
WEIGHTED_MAX_MACS = 4e9
WEIGHTED_MAX_ELEMENTS = 1 << 24



@dataclass(frozen=True)
class AdaRoundConfig:
    """Settings of the pass; the defaults are what benchmarks/effnet.md measured.

    objective: "asymmetric" reconstructs the float output from the simulated input (absorbs
        upstream error); "symmetric" uses the float input on both sides.
    correct_bias: fit the rounding to the error's covariance and remove the mean error per
        output channel by shifting the bias (see the module docstring); False fits second
        moments and leaves biases alone (for a later `correct_bias` pass).
    steps, lr: Adam iterations and learning rate per kernel whose weights are narrower than
        `wide_bits`.
    wide_bits, wide_steps, wide_lr: kernels whose weight format has at least `wide_bits` bits run
        `wide_steps` iterations at `wide_lr` instead; None: every kernel runs `steps` at `lr`.
        Rounding moves an 8-bit kernel's output by a sixteenth of what it moves a 4-bit one's:
        on the validation split 100 steps at 0.02 matched 300 at 0.01 on 8-bit weights in a third
        of the time and lost 0.4 dB on 4-bit ones (benchmarks/adaround_schedule.md).
    warmup: the fraction of steps without the rounding regulariser.
    reg_weight: weight of the regulariser against the reconstruction error, which is normalised
        so that round-to-nearest scores 1 (10, chosen on the validation split among 0.01, 0.3, 3
        and 10: benchmarks/defaults.md).
    beta: start and end of the regulariser's annealed exponent.
    max_samples: calibration samples the graph is run over (memory grows with it).
    max_rows: input rows (patches) the second moments are estimated from, per kernel.
    activation_weighted: for a kernel fused with an activation (conv + ReLU6), weight each
        output's error by the activation's squared slope at the float pre-activation, so that
        errors the activation clamps away do not count (where affordable, see
        `_weighted_moments`).
    min_rows_per_input: a kernel whose calibration data gives fewer rows than this times its
        inputs per output (K) keeps round-to-nearest: its objective is underdetermined and
        AdaRound would fit the calibration samples, not the layer (a classifier after global
        pooling sees one row per sample).
    """

    objective: Literal["asymmetric", "symmetric"] = "asymmetric"
    correct_bias: bool = True
    steps: int = 300
    lr: float = 1e-2
    wide_bits: int | None = 8
    wide_steps: int = 100
    wide_lr: float = 2e-2
    warmup: float = 0.2
    reg_weight: float = 10.0
    beta: tuple[float, float] = (20.0, 2.0)
    max_samples: int = 128
    max_rows: int = 16384
    min_rows_per_input: float = 1.0
    activation_weighted: bool = True

    def schedule(self, bits: int) -> tuple[int, float]:
        """(Adam steps, learning rate) for a kernel whose weights have `bits` bits."""
        if self.wide_bits is not None and bits >= self.wide_bits:
            return self.wide_steps, self.wide_lr
        return self.steps, self.lr

    def __post_init__(self) -> None:
        if self.objective not in ("asymmetric", "symmetric"):
            raise QCompileError(f"AdaRoundConfig.objective must be 'asymmetric' or 'symmetric', got {self.objective!r}")
        for name in ("steps", "wide_steps", "max_samples", "max_rows"):
            if getattr(self, name) < 1:
                raise QCompileError(f"AdaRoundConfig.{name} must be at least 1, got {getattr(self, name)}")
        if len(self.beta) != 2 or min(self.beta) < 2.0:
            raise QCompileError(f"AdaRoundConfig.beta is (start, end) of the regulariser's exponent, both >= 2, got {self.beta}")
        if not 0.0 <= self.warmup < 1.0:
            raise QCompileError(f"AdaRoundConfig.warmup is a fraction of the steps in [0, 1), got {self.warmup}")


@dataclass(frozen=True)
class LayerRounding:
    """What the pass did to one kernel, in units of its reconstruction objective on the calibration rows."""

    kernel: str
    nearest_error: float      # objective of round-to-nearest (weight error part only, excludes upstream error)
    rounded_error: float      # objective of the chosen rounding, same units
    changed: int              # weights whose code differs from round-to-nearest
    numel: int
    rows: int                 # calibration rows (patches) the objective was estimated from
    kept_nearest: bool        # the optimised rounding was no better, so nearest was kept
    moments_seconds: float    # collecting the input statistics
    optimize_seconds: float   # the Adam iterations


# -- layer geometry: turning a kernel's input into rows that its weight multiplies ---------------


@dataclass(frozen=True)
class _Geometry:
    """A kernel as a matrix product per group: rows of K inputs, weights [groups, out/groups, K]."""

    groups: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)   # F.pad order: left, right, top, bottom
    padding_mode: str = "zeros"
    conv: bool = False
    conv1d: bool = False


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if len(v) == 2 else (1, int(v[0]))


def _geometry(module: nn.Module) -> _Geometry | None:
    if isinstance(module, nn.Linear):
        return _Geometry(groups=1)
    if type(module) not in (nn.Conv1d, nn.Conv2d):
        return None
    conv1d = isinstance(module, nn.Conv1d)
    kernel, stride, dilation = _pair(module.kernel_size), _pair(module.stride), _pair(module.dilation)
    if isinstance(module.padding, str):
        pads = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1) if module.padding == "same" else 0
            pads.append((total // 2, total - total // 2))   # torch puts the odd pixel on the right
        (top, bottom), (left, right) = pads
    else:
        pad = _pair(module.padding)
        top, bottom, left, right = pad[0], pad[0], pad[1], pad[1]
    if conv1d:
        top = bottom = 0
    return _Geometry(groups=module.groups, kernel=kernel, stride=stride, dilation=dilation,
                     padding=(left, right, top, bottom), padding_mode=module.padding_mode,
                     conv=True, conv1d=conv1d)


def _out_size(size: int, dim: int, geo: _Geometry) -> int:
    return (size - geo.dilation[dim] * (geo.kernel[dim] - 1) - 1) // geo.stride[dim] + 1


def _padded(x: Tensor, geo: _Geometry) -> Tensor:
    """A conv input as [B, C, H, W] with the conv's own padding applied."""
    if geo.conv1d:
        x = x.unsqueeze(2)
    if not any(geo.padding):
        return x
    if geo.padding_mode == "zeros":
        return F.pad(x, geo.padding)
    if geo.conv1d:
        return F.pad(x.squeeze(2), geo.padding[:2], mode=geo.padding_mode).unsqueeze(2)
    return F.pad(x, geo.padding, mode=geo.padding_mode)


def _row_count(x: Tensor, geo: _Geometry) -> int:
    if not geo.conv:
        return x.numel() // x.shape[-1]
    h, w = x.shape[-2:] if not geo.conv1d else (1, x.shape[-1])
    h, w = h + geo.padding[2] + geo.padding[3], w + geo.padding[0] + geo.padding[1]
    return x.shape[0] * _out_size(h, 0, geo) * _out_size(w, 1, geo)


class _RowSource:
    """One calibration batch of a kernel's input, ready to hand out rows at chosen output positions.

    A row is what one output position's dot product sees: the receptive-field patch of a conv,
    the feature vector of a linear layer. Rows come as [groups, rows, K] with K ordered
    (kernel tap, input channel): gathering whole channel vectors from a channels-last copy is
    several times faster than gathering single values, and `weight_rows` orders weights to match.
    """

    def __init__(self, x: Tensor, geo: _Geometry):
        self.geo = geo
        if not geo.conv:
            self.flat = x.reshape(-1, x.shape[-1])
            self.count = self.flat.shape[0]
            self.offsets = torch.zeros(1, dtype=torch.long)
            return
        xp = _padded(x, geo)
        b, c, hp, wp = xp.shape
        self.ho, self.wo = _out_size(hp, 0, geo), _out_size(wp, 1, geo)
        self.hp, self.wp = hp, wp
        self.flat = xp.permute(0, 2, 3, 1).reshape(-1, c)
        self.count = b * self.ho * self.wo
        self.offsets = torch.tensor([i * geo.dilation[0] * wp + j * geo.dilation[1]
                                     for i in range(geo.kernel[0]) for j in range(geo.kernel[1])])

    def rows(self, index: Tensor) -> Tensor:
        geo = self.geo
        if geo.conv:
            n, rest = index // (self.ho * self.wo), index % (self.ho * self.wo)
            top_left = (n * self.hp + rest // self.wo * geo.stride[0]) * self.wp + rest % self.wo * geo.stride[1]
            index = (top_left.unsqueeze(1) + self.offsets).reshape(-1)
        taps = self.offsets.numel()
        r = self.flat.index_select(0, index).reshape(-1, taps, geo.groups, self.flat.shape[1] // geo.groups)
        return r.permute(2, 0, 1, 3).reshape(geo.groups, r.shape[0], -1).contiguous()


def weight_rows(w: Tensor, groups: int) -> Tensor:
    """A kernel weight [out, in/groups, *k] as [groups, out/groups, K], K ordered (tap, channel) like rows."""
    out, cin = w.shape[0], w.shape[1]
    return w.reshape(groups, out // groups, cin, -1).transpose(2, 3).reshape(groups, out // groups, -1)


def weight_from_rows(rows: Tensor, like: Tensor) -> Tensor:
    """The inverse of `weight_rows`: back to the shape of `like`."""
    out, cin = like.shape[0], like.shape[1]
    groups = rows.shape[0]
    taps = rows.shape[2] // cin
    # contiguous(): the reshape can return a channels-last view, and convolutions on such a
    # weight produce channels-last outputs that later kernels sum in a different order.
    return rows.reshape(groups, out // groups, taps, cin).transpose(2, 3).reshape(like.shape).contiguous()


# -- second moments of a kernel's input ---------------------------------------------------------


@dataclass(frozen=True)
class _Moments:
    """The objective's data term: E||D x_q + W (x_q - x_f)||^2 = tr(D H D^T) + 2 <D, P> + c.

    `gram` is H per group ([G, K, K]), or per output when the error is weighted per output
    ([G, out/G, K, K], see `_weighted_moments`). With fewer rows than inputs the rows themselves
    are kept instead (`rows`, [G, R, K], H = rows^T rows / R) so that H is never formed.
    """

    gram: Tensor | None
    rows: Tensor | None
    cross: Tensor            # P, [G, out/G, K]
    count: int

    def apply(self, d: Tensor) -> Tensor:
        if self.gram is not None and self.gram.ndim == 4:
            return torch.matmul(d.unsqueeze(2), self.gram).squeeze(2)
        if self.gram is not None:
            return torch.bmm(d, self.gram)
        return torch.bmm(torch.bmm(d, self.rows.transpose(1, 2)), self.rows).div_(self.count)

    def gradient(self, d: Tensor) -> Tensor:
        """H d + P (half the data term's gradient in D), in one fused product where H is shared."""
        if self.gram is not None and self.gram.ndim == 3:
            return torch.baddbmm(self.cross, d, self.gram)
        return self.apply(d).add_(self.cross)

    def error(self, d: Tensor) -> float:
        return float((d * (self.apply(d) + 2 * self.cross)).sum())


def _choose_rows(total: int, groups: int, k: int, cfg: AdaRoundConfig, gen: torch.Generator) -> Tensor:
    # A few hundred rows per input estimate a group's K x K moments well; a depthwise layer's
    # many small groups (1152 channels x 25 taps) would otherwise make gathering rows the cost.
    take = min(total, cfg.max_rows, max(ROWS_PER_INPUT * k, ROW_ELEMENTS // (groups * k)))
    return torch.randperm(total, generator=gen)[:take].sort().values if take < total else torch.arange(total)


def _chunks(chosen: Tensor, sources: list[_RowSource], rows_per_chunk: int):
    """(batch index, output positions in that batch) pieces of the chosen rows."""
    start = 0
    for i, src in enumerate(sources):
        local = chosen[(chosen >= start) & (chosen < start + src.count)] - start
        start += src.count
        for part in local.split(max(1, rows_per_chunk)):
            yield i, part


def _moments(xs_q: list[Tensor], xs_f: list[Tensor], geo: _Geometry, w: Tensor, cfg: AdaRoundConfig,
             gen: torch.Generator) -> _Moments:
    asymmetric = cfg.objective == "asymmetric"
    sources_f = [_RowSource(x, geo) for x in xs_f]
    sources_q = [_RowSource(x, geo) for x in xs_q] if asymmetric else sources_f
    groups, k = w.shape[0], w.shape[2]
    chosen = _choose_rows(sum(s.count for s in sources_f), groups, k, cfg, gen)
    take = len(chosen)
    low_rank = take < k
    sum_q = torch.zeros(groups, k, dtype=torch.float64)
    sum_d = torch.zeros(groups, k, dtype=torch.float64)
    gram = None if low_rank else torch.zeros(groups, k, k, dtype=torch.float64)
    cross = torch.zeros(groups, k, k, dtype=torch.float64)   # E[delta x_q^T], [G, K(delta), K(q)]
    kept = []
    # Bound the patch tensors' size: a depthwise layer with 1152 channels and 5x5 taps has 28,800 inputs per row.
    for i, part in _chunks(chosen, sources_f, CHUNK_ELEMENTS // (groups * k)):
        # Products in float32 per chunk, sums in float64: centring subtracts large means later.
        rq = sources_q[i].rows(part)
        sum_q += rq.sum(1)
        if asymmetric:
            rd = rq - sources_f[i].rows(part)
            sum_d += rd.sum(1)
            cross += rd.transpose(1, 2) @ rq
        if low_rank:
            kept.append(rq)
        else:
            gram += rq.transpose(1, 2) @ rq
    mean_q, mean_d = sum_q / take, sum_d / take
    cross /= take
    if cfg.correct_bias:
        # Covariances: the mean error is removed by the bias afterwards, not by rounding.
        cross -= mean_d.unsqueeze(2) * mean_q.unsqueeze(1)
    rows = None
    if low_rank:
        rows = torch.cat(kept, dim=1).double()
        if cfg.correct_bias:
            rows -= mean_q.unsqueeze(1)
        rows = rows.float()
    else:
        gram /= take
        if cfg.correct_bias:
            gram -= mean_q.unsqueeze(2) * mean_q.unsqueeze(1)
        gram = gram.float()
    p = torch.bmm(w.double(), cross).float()
    return _Moments(gram=gram, rows=rows, cross=p, count=take)


def _weighted_moments(xs_q: list[Tensor], xs_f: list[Tensor], geo: _Geometry, w: Tensor, bias: Tensor | None,
                      slope: Callable[[Tensor], Tensor], cfg: AdaRoundConfig, gen: torch.Generator) -> _Moments:
    """Moments of the error after the fused activation, to first order: each output's squared
    error weighted by the activation's squared slope at the float pre-activation.

    Where ReLU6 clamps, an error in the kernel's output changes nothing, so those rows should
    not steer the rounding (the paper's f(Wx) objective). The weight differs per output, so
    H is formed per output channel: affordable for depthwise kernels, whose groups have a
    single output anyway, and for small dense ones (the caller decides).
    """
    asymmetric = cfg.objective == "asymmetric"
    sources_f = [_RowSource(x, geo) for x in xs_f]
    sources_q = [_RowSource(x, geo) for x in xs_q] if asymmetric else sources_f
    groups, outs, k = w.shape
    chosen = _choose_rows(sum(s.count for s in sources_f), groups, k, cfg, gen)
    mass = torch.zeros(groups, outs, dtype=torch.float64)
    sum_q = torch.zeros(groups, outs, k, dtype=torch.float64)
    sum_d = torch.zeros(groups, outs, k, dtype=torch.float64)
    gram = torch.zeros(groups, outs, k, k, dtype=torch.float64)
    cross = torch.zeros(groups, outs, k, k, dtype=torch.float64)
    b = bias.reshape(groups, 1, outs) if bias is not None else 0.0
    for i, part in _chunks(chosen, sources_f, CHUNK_ELEMENTS // (groups * outs * k)):
        rf = sources_f[i].rows(part)
        m = slope(torch.bmm(rf, w.transpose(1, 2)) + b).transpose(1, 2)      # [G, out/G, r]
        rq = sources_q[i].rows(part) if asymmetric else rf
        mass += m.sum(2)
        weighted_q = m.unsqueeze(-1) * rq.unsqueeze(1)                         # [G, out/G, r, K]
        sum_q += weighted_q.sum(2)
        gram += weighted_q.transpose(2, 3) @ rq.unsqueeze(1)
        if asymmetric:
            rd = rq - rf
            weighted_d = m.unsqueeze(-1) * rd.unsqueeze(1)
            sum_d += weighted_d.sum(2)
            cross += weighted_d.transpose(2, 3) @ rq.unsqueeze(1)
    # Weighted means per output; an output that is never in the activation's live range has no
    # error that matters (all-zero moments).
    norm = mass.clamp_min(1e-12).unsqueeze(-1)
    mean_q, mean_d = sum_q / norm, sum_d / norm
    gram /= norm.unsqueeze(-1)
    cross /= norm.unsqueeze(-1)
    if cfg.correct_bias:
        gram -= mean_q.unsqueeze(-1) * mean_q.unsqueeze(-2)
        cross -= mean_d.unsqueeze(-1) * mean_q.unsqueeze(-2)
    # Scale each output by its share of live rows, so outputs keep their weight in the sum.
    share = (mass / len(chosen)).unsqueeze(-1).unsqueeze(-1)
    gram *= share
    cross *= share
    p = (w.double().unsqueeze(2) @ cross).squeeze(2).float()
    return _Moments(gram=gram.float(), rows=None, cross=p, count=len(chosen))


# -- the rounding optimisation ------------------------------------------------------------------


def _grid(fmt: IntFormat, params: QParams, groups: int) -> tuple[Tensor, Tensor]:
    """Scale and zero point shaped to broadcast against a weight viewed as [G, out/G, K]."""
    shape = (groups, -1, 1) if fmt.granularity == "per_channel" else (1, 1, 1)
    scale = params.scale.float().reshape(shape)
    zp = params.zero_point.float().reshape(shape) if params.zero_point is not None else torch.zeros_like(scale)
    return scale, zp


def adaround_weight(w: Tensor, fmt: IntFormat, params: QParams, moments: _Moments, cfg: AdaRoundConfig,
                    ) -> tuple[Tensor, Tensor, float, float]:
    """Optimise the rounding of `w` [G, out/G, K] on `moments`.

    Returns (codes, round-to-nearest codes, objective of the codes, objective of nearest); codes
    are float tensors holding integers in [qmin, qmax]. The gradient is written out by hand and
    Adam applied in place: autograd would spend twice the element-wise passes, and on big layers
    those, not the matrix product, are the cost.
    """
    scale, zp = _grid(fmt, params, w.shape[0])
    scaled = w / scale
    floor_code = torch.floor(scaled) + zp
    nearest = (torch.round(scaled) + zp).clamp(fmt.qmin, fmt.qmax)
    offset = zp * scale + w                       # weight error D = code * scale - offset
    d_nearest = nearest * scale - offset
    nearest_error = moments.error(d_nearest)
    numel = w.numel()
    # Normalised so that round-to-nearest's own error power is 1 per weight, whatever upstream does.
    power = float((d_nearest * moments.apply(d_nearest)).sum())
    if not math.isfinite(power) or power <= 0.0:
        return nearest, nearest, nearest_error, nearest_error
    # Where floor and floor + 1 do not both fit the grid, the rounding direction changes nothing:
    # there the weight error is nearest's, whatever h; elsewhere it is affine in h.
    active = (floor_code >= fmt.qmin) & (floor_code < fmt.qmax)
    slope = torch.where(active, scale, torch.zeros(()))
    base = torch.where(active, floor_code * scale - offset, d_nearest)
    # dLoss/dh = 2 (H D + P) dD/dh, normalised; dD/dh times dh/dsigmoid folded into one factor.
    factor = slope * (2.0 * numel / power * (ZETA - GAMMA))
    rest = (scaled - torch.floor(scaled)).clamp(1e-4, 1 - 1e-4)
    # Start where the soft rounding equals the weight's own fractional part: W_soft = W.
    v = rectified_sigmoid_inverse(rest)
    m1, m2 = torch.zeros_like(v), torch.zeros_like(v)
    b1, b2, eps = 0.9, 0.999, 1e-8
    steps, lr = cfg.schedule(fmt.bits)
    warm = int(cfg.warmup * steps)
    beta_hi, beta_lo = cfg.beta
    low = torch.tensor(GAMMA)
    # Each line below is one pass over the weights: on most layers the passes, not the product,
    # are the cost, so the step is written in as few as the update needs.
    for step in range(steps):
        sig = torch.sigmoid(v)
        h_raw = torch.add(low, sig, alpha=ZETA - GAMMA)
        h = h_raw.clamp(0.0, 1.0)
        g = moments.gradient(torch.addcmul(base, h, slope)).mul_(factor)
        if step >= warm:
            beta = beta_hi + (beta_lo - beta_hi) * (step - warm) / max(1, steps - warm - 1)
            # d/dh of 1 - |2h - 1|^beta is -2 beta u |u|^(beta - 2), u = 2h - 1.
            u = h.mul_(2.0).sub_(1.0)
            g.addcmul_(u.abs().pow_(beta - 2.0), u, value=-2.0 * beta * cfg.reg_weight * (ZETA - GAMMA))
        # Through the sigmoid, sig (1 - sig); zero where h is clamped at 0 or 1 (hardtanh's
        # backward is exactly that mask, in one pass).
        g = torch.ops.aten.hardtanh_backward(g.mul_(torch.addcmul(sig, sig, sig, value=-1.0)), h_raw, 0.0, 1.0)
        m1.lerp_(g, 1 - b1)
        m2.mul_(b2).addcmul_(g, g, value=1 - b2)
        t = step + 1
        root = math.sqrt(1 - b2 ** t)
        v.addcdiv_(m1, m2.sqrt().add_(eps * root), value=-lr * root / (1 - b1 ** t))
    codes = (floor_code + (v >= 0).float()).clamp_(fmt.qmin, fmt.qmax)
    rounded_error = moments.error(codes * scale - offset)
    return codes, nearest, rounded_error, nearest_error


def round_alone(module: nn.Module, inputs: list[Tensor], fmt: IntFormat, params: QParams, cfg: AdaRoundConfig,
                gen: torch.Generator) -> Tensor | None:
    """`module`'s weight on `fmt`'s grid, rounded by AdaRound on the module's own float `inputs`
    (nearest where that fits them better); None for a module that is not a Linear or Conv."""
    geo = _geometry(module)
    if geo is None:
        return None
    w_float = module.weight.detach().float()
    w = weight_rows(w_float, geo.groups)
    moments = _moments(inputs, inputs, geo, w, cfg, gen)
    codes, nearest, err, err_nearest = adaround_weight(w, fmt, params, moments, cfg)
    scale, zp = _grid(fmt, params, geo.groups)
    return weight_from_rows(((codes if err < err_nearest else nearest) - zp) * scale, w_float).to(module.weight.dtype)


# -- running the graph: simulated and float side by side ----------------------------------------


@dataclass(frozen=True)
class RoundableKernel:
    """A kernel whose integer weights AdaRound can round: its format, parameters and geometry."""

    node: str
    fmt: IntFormat
    params: QParams
    geometry: _Geometry


def roundable_kernels(gm: fx.GraphModule, plan: Plan | None,
                      float_kernels: dict[str, nn.Module]) -> tuple[dict[str, RoundableKernel], list[str]]:
    """Kernels whose rounding can be optimised, by node name, and why others were skipped."""
    kernels: dict[str, RoundableKernel] = {}
    skipped: list[str] = []
    groups = {g.id: g for g in plan.groups} if plan is not None else {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in float_kernels:
            continue
        group = groups.get(node.meta.get("weight_group"))
        if group is None or group.params is None:
            continue
        module = gm.get_submodule(node.target)
        geo = _geometry(module)
        fmt, params = group.format, group.params
        why = None
        if geo is None:
            why = f"{type(module).__name__} is not a Linear, Conv1d or Conv2d"
        elif not isinstance(fmt, IntFormat):
            why = f"format {fmt.name} is not an integer format"
        elif fmt.granularity not in ("per_tensor", "per_channel") or params.axis not in (None, 0):
            why = f"format {fmt.name} is {fmt.granularity} (axis {params.axis}); only per-tensor and output-channel scales are supported"
        elif group.weights != (f"{node.target}.weight",):
            why = f"its weight group holds {group.weights}, not just the kernel's weight"
        if why:
            skipped.append(f"{node.name}: {why}")
            continue
        kernels[node.name] = RoundableKernel(node.name, fmt, params, geo)
    return kernels, skipped


def activation_slope(node: fx.Node, geo: _Geometry, by_name: dict[str, fx.Node],
                     run_float: Callable) -> Callable[[Tensor], Tensor] | None:
    """For a kernel fused with one activation: z [G, rows, out/G] -> the activation's squared slope at z."""
    fusion, last = node.meta.get("fusion"), node.meta.get("fused_into")
    if not fusion or len(fusion) != 2 or last not in by_name:
        return None
    act = by_name[last]
    if act.all_input_nodes != [node]:
        return None
    dims = (1 if geo.conv1d else 2) if geo.conv else 0

    def slope(z: Tensor) -> Tensor:
        g, r, outs = z.shape
        # Laid out as the kernel's output would be ([rows, C, 1, 1] for a conv), so per-channel
        # activations (PReLU) broadcast as they do in the model.
        flat = z.permute(1, 0, 2).reshape(r, g * outs, *([1] * dims)).detach().requires_grad_(True)
        with torch.enable_grad():
            y = run_float(act, fx.node.map_arg(act.args, lambda _: flat.clone()),
                          fx.node.map_arg(act.kwargs, lambda _: flat.clone()))
            (grad,) = torch.autograd.grad(y.sum(), flat, allow_unused=True)
        if grad is None:
            return torch.ones_like(z)
        return grad.reshape(r, g, outs).permute(1, 0, 2).pow(2)
    return slope


def round_kernel(gm: fx.GraphModule, node: fx.Node, kernel: RoundableKernel, float_module: nn.Module,
                  xs_q: list[Tensor], xs_f: list[Tensor], slope: Callable[[Tensor], Tensor] | None,
                  cfg: AdaRoundConfig, gen: torch.Generator) -> LayerRounding | None:
    """Optimise one kernel's rounding and install it; None when its data is too thin to try."""
    module = gm.get_submodule(node.target)
    w_float = float_module.weight.detach().float()
    groups = kernel.geometry.groups
    w = weight_rows(w_float, groups)
    available = sum(_row_count(x, kernel.geometry) for x in xs_f)
    if available < cfg.min_rows_per_input * w.shape[2]:
        return None
    start = time.perf_counter()
    k = w.shape[2]
    rows = min(available, cfg.max_rows)
    if slope is not None and w.numel() * k <= WEIGHTED_MAX_ELEMENTS and rows * w.numel() * k <= WEIGHTED_MAX_MACS:
        bias = float_module.bias.detach().float() if float_module.bias is not None else None
        moments = _weighted_moments(xs_q, xs_f, kernel.geometry, w, bias, slope, cfg, gen)
    else:
        moments = _moments(xs_q, xs_f, kernel.geometry, w, cfg, gen)
    middle = time.perf_counter()
    codes, nearest, err, err_nearest = adaround_weight(w, kernel.fmt, kernel.params, moments, cfg)
    end = time.perf_counter()
    # The optimisation is judged on the objective it was fit to: never worse than nearest.
    kept = not err < err_nearest
    if kept:
        codes, err = nearest, err_nearest
    scale, zp = _grid(kernel.fmt, kernel.params, groups)
    new_w = weight_from_rows((codes - zp) * scale, w_float).to(module.weight.dtype)
    # A new Parameter: convert's module copy may share tensors with the user's model.
    module.weight = nn.Parameter(new_w, requires_grad=False)
    return LayerRounding(kernel=node.target, nearest_error=err_nearest, rounded_error=err,
                         changed=int((codes != nearest).sum()), numel=codes.numel(), rows=moments.count,
                         kept_nearest=kept, moments_seconds=middle - start, optimize_seconds=end - middle)
