"""BatchNorm re-estimation for a model whose BatchNorm is folded (`reestimate_statistics`).

During QAT the integer weights oscillate around rounding boundaries, and where a BatchNorm
follows a conv its statistics no longer describe the conv's quantized output: in networks with
depthwise convs at 4 bits this costs accuracy that re-estimating the statistics on data wins
back (Nagel et al., "Overcoming Oscillations in Quantization-Aware Training", 2022). Here every
BatchNorm is folded into its kernel, so the statistics live in the kernel itself: its output
channel c should have, over the data, the mean m_f and standard deviation s_f that the float
model's (folded) kernel output has.

For each quantized kernel the quantized model's output channel has mean m_q and deviation s_q;
with a = s_f / s_q the kernel becomes

    W_c <- a W_c,   step_c <- a step_c,   b_c <- a b_c + (m_f - a m_q),

so its output is a (y - m_q) + m_f: the float moments, while the integer weight codes stay
exactly what they were (the weight and its step scale together). Where the weight's step cannot
take a per-channel factor (per-tensor or power-of-two steps) only the mean is corrected (a = 1).
Correcting one kernel moves the moments of those after it, so kernels are measured and
corrected in graph order, each on inputs that carry every earlier correction.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable

import torch
from torch import Tensor, fx, nn

from ..errors import QCompileError
from ..trainable import LearnedStep
from .model import FixedQuant, QATKernel, QATModule, as_batches

FACTOR_LIMIT = 4.0     # a per-channel factor stays within [1/4, 4]: beyond that the data, not the weights, are off


@dataclass(frozen=True)
class Correction:
    """What re-estimation did to one kernel: the largest |log a| and |mean shift| over its channels."""

    kernel: str
    largest_factor: float
    largest_shift: float
    scaled: bool          # False: only the mean was corrected (per-tensor or power-of-two steps)


def _channel_sums(values: Iterable[Tensor], axis: int, sums: list[Tensor] | None = None) -> list[Tensor]:
    """[sum, sum of squares, count] per channel along `axis` over all of `values` (added to
    `sums`, from an earlier call), in float64."""
    sums = sums or []
    for v in values:
        y = v.detach().double().movedim(axis, 0).reshape(v.shape[axis], -1)
        s = [y.sum(1), y.pow(2).sum(1), torch.tensor(float(y.shape[1]), dtype=torch.float64)]
        sums = s if not sums else [a + b for a, b in zip(sums, s)]
    return sums


def _mean_var(sums: list[Tensor]) -> tuple[Tensor, Tensor]:
    s, s2, n = sums
    mean = s / n
    return mean, (s2 / n - mean.pow(2)).clamp_min(0.0)


class _Moments(fx.Interpreter):
    """Per-channel sums and sums of squares of the named nodes' outputs over the batches run."""

    def __init__(self, gm: fx.GraphModule, axes: dict[str, int]):
        super().__init__(gm)
        self.axes = axes
        self.sums: dict[str, list[Tensor]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        axis = self.axes.get(n.name)
        if axis is not None and isinstance(out, Tensor):
            self.sums[n.name] = _channel_sums([out], axis, self.sums.get(n.name))
        return out

    def moments(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {name: _mean_var(sums) for name, sums in self.sums.items()}


def _moments(gm: fx.GraphModule, axes: dict[str, int], batches: list[tuple[Any, ...]]) -> dict[str, tuple[Tensor, Tensor]]:
    run = _Moments(gm, axes)
    with torch.no_grad():
        for b in batches:
            run.run(*b)
    return run.moments()


def _channel_axis(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


def _scalable(quant: nn.Module | None, channels: int) -> bool:
    """Whether the weight's step takes one factor per output channel."""
    if isinstance(quant, LearnedStep):
        return quant.base.numel() == channels and quant.fmt.scale_kind != "pow2"
    if isinstance(quant, FixedQuant) and quant.params is not None and not hasattr(quant, "zp"):
        return quant.params.scale.numel() == channels and getattr(quant.fmt, "scale_kind", "") != "pow2"
    return False


def _scale_step(quant: nn.Module | None, a: Tensor) -> None:
    if isinstance(quant, LearnedStep):
        quant.base.mul_(a.reshape(quant.base.shape).to(quant.base.dtype))
    elif isinstance(quant, FixedQuant):
        p = quant.params
        quant.params = replace(p, scale=(p.scale.double() * a.reshape(p.scale.shape)).to(p.scale.dtype))


def _correct(kernel: QATKernel, target: tuple[Tensor, Tensor], measured: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, bool]:
    """Scale and shift the kernel so its output has the target moments; returns (a, shift, scaled)."""
    (m_f, v_f), (m_q, v_q) = target, measured
    module = kernel.module
    channels = module.weight.shape[0]
    scaled = _scalable(kernel.quant, channels)
    a = torch.ones_like(m_q)
    if scaled:
        ok = (v_q > 1e-12) & (v_f > 1e-12)
        a = torch.where(ok, (v_f / v_q.clamp_min(1e-30)).sqrt(), a).clamp(1 / FACTOR_LIMIT, FACTOR_LIMIT)
    shift = m_f - a * m_q
    with torch.no_grad():
        w = module.weight
        w.mul_(a.reshape(-1, *[1] * (w.dim() - 1)).to(w.dtype))
        _scale_step(kernel.quant, a)
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(channels, dtype=w.dtype))
        module.bias.mul_(a.to(w.dtype)).add_(shift.to(w.dtype))
    return a, shift, scaled


def reestimate_statistics(qat: QATModule, data: Iterable[Any], teacher: nn.Module | None = None) -> list[Correction]:
    """Correct every quantized kernel of `qat` so its output channels have the float model's
    mean and deviation on `data` (see the module docstring); returns what was changed.

    The quantized graph runs node by node over all of `data` at once, so each kernel is measured
    on inputs that already carry the corrections before it, and the result is exact in one pass
    (every batch's live values are held together: give a few hundred samples, not a data set).
    teacher: the float graph whose kernel outputs give the target moments (default: the float
    graph of the compile `qat` was prepared from); its kernel nodes carry the same names.
    """
    if not isinstance(qat, QATModule):
        raise QCompileError(f"reestimate_statistics takes what qat.prepare returns, got {type(qat).__name__}")
    teacher = teacher if teacher is not None else qat._compiled._float_graph
    if not isinstance(teacher, fx.GraphModule):
        raise QCompileError("reestimate_statistics compares with the compile's float graph, which a loaded model does "
                            "not keep: pass teacher= (the float model captured as a torch.fx GraphModule)")
    batches = as_batches(data, "reestimate_statistics")
    gm = qat.graph
    teacher_names = {n.name for n in teacher.graph.nodes}
    kernels: dict[str, QATKernel] = {}
    axes: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.name in teacher_names:
            module = gm.get_submodule(node.target)
            if isinstance(module, QATKernel) and module.quant is not None:
                kernels[node.name] = module
                axes[node.name] = _channel_axis(module.module)
    if not kernels:
        raise QCompileError("reestimate_statistics found no quantized conv or linear shared with the float graph")
    target = _moments(teacher.eval(), axes, batches)
    training = qat.training
    gm.eval()                          # hard weights, no Quant-Noise masks
    run = fx.Interpreter(gm)
    last_use = {}
    for node in gm.graph.nodes:
        for src in node.all_input_nodes:
            last_use[src] = node
    env: dict[fx.Node, list[Any]] = {}
    placeholders = iter(range(len(batches[0])))
    done: list[Correction] = []
    try:
        with torch.no_grad():
            for node in gm.graph.nodes:
                if node.op == "output":
                    break
                if node.op == "placeholder":
                    i = next(placeholders)
                    env[node] = [b[i] for b in batches]
                elif node.op == "get_attr":
                    value = run.get_attr(node.target, (), {})
                    env[node] = [value] * len(batches)
                else:
                    op = getattr(run, node.op)

                    def compute() -> list[Any]:
                        return [op(node.target, fx.node.map_arg(node.args, lambda a: env[a][k]),
                                   fx.node.map_arg(node.kwargs, lambda a: env[a][k])) for k in range(len(batches))]

                    env[node] = compute()
                    if node.name in kernels and node.name in target:
                        measured = _mean_var(_channel_sums(env[node], axes[node.name]))
                        if measured[0].numel() == kernels[node.name].module.weight.shape[0]:
                            a, shift, scaled = _correct(kernels[node.name], target[node.name], measured)
                            env[node] = compute()
                            done.append(Correction(node.name, float(a.log().abs().max()), float(shift.abs().max()),
                                                   scaled))
                for src in node.all_input_nodes:
                    if last_use.get(src) is node:
                        env.pop(src, None)
    finally:
        gm.train(training)
    return done
