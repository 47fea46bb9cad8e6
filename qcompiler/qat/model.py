"""The trainable twin of a compiled model (`prepare`) and its way back (`convert`).

`prepare(compiled, method)` copies the compiled model's final graph and undoes its integer forms:
each exact kernel becomes a plain conv or linear whose weight (the decoded codes, on the plan's
grid) and bias are trainable, each activation quantizer of a group becomes that group's one
trainable quantizer (a shared-scale group learns one scale), integer adds and pools become their
float ops. BatchNorm stays folded: the graph has none left. The formats, bit-widths and
granularity are the plan's, including what a mixed-precision budget chose.

What the forward computes:

- in training mode, the fake-quant relaxation of the chip: every weight and activation is
  rounded and clamped to its group's grid in float (the method decides what is learned and how
  gradients pass), kernel outputs with the target's requantization rounding; accumulators,
  biases and the requantization's multiply are float. The chip differs by the rounding of the
  bias to int32 (under half an accumulator step) and of the fixed-point multiplier (a relative
  2**-31): a value within that of a rounding boundary lands one code apart, and the codes it
  feeds carry that on (`tests/test_qat.py` measures it on every built-in target);
- in eval mode, exactly what `convert` returns: the current parameters are converted (hard
  weight codes, frozen steps) and `model_requant` gives the integer kernels and the target's
  requantization, so evaluation and validation see the chip's numbers, bit for bit.

Methods (what each trains; weights are the latent float weights in every method):

- "ste": weights and activations fake-quantized at the compiled scales, gradients straight
  through the rounding (zero outside the range);
- "lsq": the step of every integer weight group (per channel where the plan is) and activation
  group is learned too (LSQ), as a logarithm bounded within a factor `bound` of the compiled
  step, so it neither goes negative nor collapses; power-of-two steps stay powers of two;
- "lsq+": LSQ plus a learned integer zero point for asymmetric activation formats (LSQ+'s
  offset; its initialisation is the compiled plan's MSE-searched ranges);
- "qsin": integer weights train unquantized with the sinusoidal regulariser
  sin^2(pi w / s) (`QATModule.regularizer`, added to the loss by the caller or `fit`), which pulls
  each weight onto its grid; activations as in "lsq";
- "quant_noise": as "ste", but each training forward quantizes only a random fraction `p` of
  the weights (a fresh Bernoulli mask per forward; Quant-Noise); activations are quantized as
  usual.
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import replace
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import functional_call

from ..compiled import CompiledModel
from ..context import CompileContext
from ..errors import QCompileError
from ..exact import ExactAdd, ExactConv2d, ExactGlobalAvgPool, ExactLinear, KernelRequantize
from ..formats import HostFloat, IntFormat, QParams
from ..passes.model_requant import model_requant
from ..fx_util import set_submodule
from ..plan import Plan
from ..quantizers import FakeQuantize, weight_axis
from ..trainable import LearnedStep, _LearnedStepQuant

METHODS = ("ste", "lsq", "lsq+", "qsin", "quant_noise")
LEARNS_STEP = ("lsq", "lsq+", "qsin")


def _learnable(fmt: Any, per_channel_ok: bool) -> bool:
    if not isinstance(fmt, IntFormat):
        return False
    return fmt.granularity == "per_tensor" or (per_channel_ok and fmt.granularity == "per_channel")


class FixedQuant(nn.Module):
    """A quantizer at the compiled parameters, straight-through gradient (the format's own);
    per-tensor integer formats round with `rounding` (the requantizer's mode)."""

    def __init__(self, group: int, fmt: Any, params: QParams | None, rounding: str = "half_even"):
        super().__init__()
        self.group, self.fmt, self.params, self.rounding = group, fmt, params, rounding
        if rounding != "half_even" and _learnable(fmt, False) and params is not None:
            self.register_buffer("scale", params.scale.detach().float().reshape(()))
            zp = params.zero_point
            self.register_buffer("zp", zp.float().reshape(()) if zp is not None else torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.fmt, HostFloat) or self.params is None:
            return x
        if hasattr(self, "zp"):
            return _LearnedStepQuant.apply(x, self.scale, self.zp, self.fmt.qmin, self.fmt.qmax, self.rounding)
        return self.fmt.fake_quant(x, self.params)

    def qparams(self) -> QParams | None:
        return self.params


def _quantizer(group: int, fmt: Any, params: QParams | None, learn: bool, ndim: int | None,
               learn_zero_point: bool, bound: float, rounding: str = "half_even") -> nn.Module:
    if learn and params is not None and _learnable(fmt, ndim is not None):
        return LearnedStep(group, fmt, params, ndim=ndim, learn_zero_point=learn_zero_point, bound=bound,
                           rounding=rounding)
    return FixedQuant(group, fmt, params, rounding)


def _roundings(gm: fx.GraphModule) -> dict[int, str]:
    """Activation group -> the rounding of its requantizer, for groups the chip requantizes
    (the others are quantized from float on the host: round half to even)."""
    out = {m.group: m.rounding for m in gm.modules() if isinstance(m, KernelRequantize)}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), ExactAdd):
            for user in node.users:
                q = gm.get_submodule(user.target) if user.op == "call_module" else None
                if isinstance(q, FakeQuantize):
                    out[q.group] = gm.get_submodule(node.target).rounding
    return out


class QATKernel(nn.Module):
    """A conv or linear with a trainable latent weight and bias, quantized by its group's quantizer."""

    def __init__(self, module: nn.Module, quant: nn.Module | None, method: str, p: float):
        super().__init__()
        self.module = module
        self.quant = quant
        self.method, self.p = method, p
        self.generator: torch.Generator | None = None

    def _soft(self) -> bool:
        """QSin trains the weight unquantized (integer grids only; others stay straight-through)."""
        return self.method == "qsin" and isinstance(self.quant, LearnedStep)

    def weight(self) -> Tensor:
        w = self.module.weight
        if self.quant is None or not self.training:
            return w if self.quant is None else self.quant(w)
        if self._soft():
            return w
        q = self.quant(w)
        if self.method == "quant_noise":
            mask = torch.rand(w.shape, generator=self.generator, device=w.device) < self.p
            return torch.where(mask, q, w)
        return q

    def hard_weight(self) -> Tensor:
        """The weight as the chip stores it: on the (learned) grid, no noise."""
        w = self.module.weight.detach()
        return w if self.quant is None else self.quant(w).detach()

    def regularizer(self) -> Tensor:
        """QSin's mean of sin^2(pi w / s) over the weights (0 for other methods)."""
        if not self._soft():
            return self.module.weight.new_zeros(())
        s = self.quant.step()
        return torch.sin(math.pi * self.module.weight / s).pow(2).mean()

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return functional_call(self.module, {"weight": self.weight(), "bias": self.module.bias}, args, kwargs)


def _plain_kernel(module: nn.Module) -> nn.Module:
    """A plain float conv or linear with the module's decoded weight and bias (trainable copies)."""
    if isinstance(module, ExactConv2d):
        plain: nn.Module = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                     module.padding, module.dilation, module.groups, module.bias is not None,
                                     module.padding_mode)
    elif isinstance(module, ExactLinear):
        plain = nn.Linear(module.in_features, module.out_features, module.bias is not None)
    else:
        plain = copy.deepcopy(module)
    plain.weight = nn.Parameter(module.weight.detach().float().clone())
    if module.bias is not None:
        plain.bias = nn.Parameter(module.bias.detach().float().clone())
    return plain


def _float_forms(gm: fx.GraphModule) -> None:
    """Integer adds and global pools back to their float ops (their quantizers stay)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, ExactAdd):
            node.op, node.target = "call_function", operator.add
        elif isinstance(module, ExactGlobalAvgPool):
            src = node.args[0]
            if node.meta.get("op_kind") == "mean":
                node.op, node.target = "call_function", torch.mean
                node.args, node.kwargs = (src, [2, 3], module.keepdim), {}
            else:
                node.op, node.target = "call_function", F.adaptive_avg_pool2d
                node.args, node.kwargs = (src, 1), {}
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


class QATModule(nn.Module):
    """A compiled model to train (see the module docstring): call it like the model."""

    def __init__(self, compiled: CompiledModel, method: str, p: float, bound: float, seed: int):
        super().__init__()
        if method not in METHODS:
            raise QCompileError(f"unknown QAT method {method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 < p <= 1.0:
            raise QCompileError(f"quant_noise's fraction p of weights quantized per forward is in (0, 1], got {p}")
        if bound <= 1.0:
            raise QCompileError(f"bound (how far a learned step may move, as a factor) must exceed 1, got {bound}")
        self.method, self.p, self.bound = method, p, bound
        plan = compiled.plan
        object.__setattr__(self, "_compiled", compiled)
        gm = copy.deepcopy(compiled.simulated)
        roundings = _roundings(gm)
        _float_forms(gm)
        learn = method in LEARNS_STEP
        weight_quant: dict[int, nn.Module] = {}
        act_quant: dict[int, nn.Module] = {}
        gen = torch.Generator().manual_seed(seed)
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            module = gm.get_submodule(node.target)
            if isinstance(module, FakeQuantize):
                gid = module.group
                if gid not in act_quant:
                    g = plan.group(gid)
                    act_quant[gid] = _quantizer(gid, g.format, g.params, learn, None,
                                                method == "lsq+" and not getattr(g.format, "symmetric", True), bound,
                                                roundings.get(gid, "half_even"))
                set_submodule(gm, node.target, act_quant[gid])
            elif "weight_group" in node.meta and isinstance(getattr(module, "weight", None), Tensor):
                gid = node.meta["weight_group"]
                g = plan.group(gid)
                quant = None
                if g.params is not None and not isinstance(g.format, HostFloat):
                    if gid not in weight_quant:
                        ndim = module.weight.dim() if weight_axis(module) == 0 else None
                        weight_quant[gid] = _quantizer(gid, g.format, g.params, learn, ndim, False, bound)
                    quant = weight_quant[gid]
                kernel = QATKernel(_plain_kernel(module), quant, method, p)
                kernel.generator = gen
                set_submodule(gm, node.target, kernel)
        gm.recompile()
        self.graph = gm
        self._cache: tuple[Any, CompiledModel] | None = None

    # -- training ---------------------------------------------------------------------------
    def kernels(self) -> list[QATKernel]:
        return [m for m in self.graph.modules() if isinstance(m, QATKernel)]

    def quantizers(self) -> dict[int, nn.Module]:
        """Group id -> its trainable quantizer (activations and weights)."""
        return {m.group: m for m in self.graph.modules() if isinstance(m, (LearnedStep, FixedQuant))}

    def regularizer(self) -> Tensor:
        """The method's penalty to add to the loss (QSin's; zero for the others)."""
        terms = [k.regularizer() for k in self.kernels() if k._soft()]
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).mean()

    def step_parameters(self) -> list[nn.Parameter]:
        """The learned log steps (they usually want a larger learning rate than the weights)."""
        return [q.log_scale for q in self.quantizers().values()
                if isinstance(q, LearnedStep) and q.log_scale.requires_grad]

    def zero_point_parameters(self) -> list[nn.Parameter]:
        """The learned zero points (LSQ+), in codes: they move a code at a time."""
        return [q.zp for q in self.quantizers().values() if isinstance(q, LearnedStep) and q.zp.requires_grad]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Everything else that trains: the latent weights and the biases."""
        other = {id(p) for p in self.step_parameters() + self.zero_point_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in other]

    # -- evaluation -------------------------------------------------------------------------
    def _fingerprint(self) -> tuple:
        return tuple((id(t), t._version) for t in list(self.parameters()) + list(self.buffers()))

    def converted(self) -> CompiledModel:
        """The compiled model of the current parameters (cached until a parameter changes)."""
        key = self._fingerprint()
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, convert(self))
        return self._cache[1]

    def forward(self, *args: Any) -> Any:
        if self.training:
            return self.graph(*args)
        return self.converted()(*args)


def as_batches(data: Iterable[Any], who: str = "qat.fit") -> list[tuple[Any, ...]]:
    """Training or statistics batches as tuples, refused when empty or not finite."""
    out = [b if isinstance(b, (tuple, list)) else (b,) for b in data]
    if not out:
        raise QCompileError(f"{who} got no training batches; pass an iterable of input tensors or tuples")
    for b in out:
        for t in b:
            if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise QCompileError(f"{who}: a batch holds NaN or infinite values; clean the data first")
    return [tuple(b) for b in out]


def prepare(compiled: CompiledModel, method: str = "lsq", *, p: float = 0.5, bound: float = 16.0,
            seed: int = 0) -> QATModule:
    """A trainable `nn.Module` from a compiled model (see `qcompiler.qat.model`).

    method: "ste", "lsq", "lsq+", "qsin" or "quant_noise".
    p: quant_noise's fraction of weights quantized in each training forward.
    bound: a learned step stays within this factor of the compiled one.
    seed: seeds quant_noise's masks.
    """
    if not isinstance(compiled, CompiledModel):
        raise QCompileError(f"qat.prepare takes what qcompile returns (a CompiledModel), got {type(compiled).__name__}")
    return QATModule(compiled, method, p, bound, seed)


def convert(trained: QATModule) -> CompiledModel:
    """The `CompiledModel` of a trained module: hard weight codes on the learned grids, the learned
    steps in the plan, and the target's integer kernels (`model_requant`) rebuilt on them."""
    if not isinstance(trained, QATModule):
        raise QCompileError(f"qat.convert takes what qat.prepare returns, got {type(trained).__name__}")
    compiled = trained._compiled
    gm = copy.deepcopy(trained.graph)
    plan: Plan = compiled.plan
    learned: dict[int, QParams | None] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, QATKernel):
            hard = module.module
            hard.weight = nn.Parameter(module.hard_weight(), requires_grad=False)
            if hard.bias is not None:
                hard.bias = nn.Parameter(hard.bias.detach().clone(), requires_grad=False)
            if module.quant is not None:
                learned[module.quant.group] = module.quant.qparams()
            set_submodule(gm, node.target, hard)
        elif isinstance(module, (LearnedStep, FixedQuant)):
            params = module.qparams()
            learned[module.group] = params
            set_submodule(gm, node.target, FakeQuantize(module.group, module.fmt, params))
    for gid, params in learned.items():
        if params is not None and params is not plan.group(gid).params:
            plan = plan.with_group(replace(plan.group(gid), params=params))
    gm.recompile()
    ctx = CompileContext(model=gm, example_inputs=(), target=compiled.target, plan=plan)
    with torch.no_grad():
        gm = model_requant(gm, ctx)
    gm.eval()
    return CompiledModel(gm, ctx.plan, compiled.target, compiled.groups, float_graph=compiled._float_graph,
                         calib_batches=compiled._calib_batches)
