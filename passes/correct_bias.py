"""correct_bias: remove the mean error each quantized kernel's output carries, layer by layer.

Before: a converted graph (quantized weights, frozen activation quantizers). After: the same
graph; every conv and linear whose weights were quantized has its bias shifted so that, per
output channel and over the calibration data, the mean of its output in the simulated model
equals the mean of the same output in the float model (empirical bias correction, Nagel et al.
2019, "Data-Free Quantization", in its data-driven form).

Why: rounding a weight is a fixed error, so over the many positions of a feature map it adds a
systematic offset per channel rather than noise that averages out; quantized inputs clipped by
ReLU6 shift means too. The correction is sequential (`qcompiler.replay.PairedReplay`): each
kernel is corrected for the inputs it really receives after every earlier correction.
`optimize_rounding` does the same as it goes; this pass is for pipelines without it.
"""
from __future__ import annotations

from torch import fx

from ..calibration import batch_samples, first_samples
from ..context import CompileContext
from ..replay import PairedReplay, correct_channel_bias, is_weighted_kernel

MAX_SAMPLES = 64


def correct_bias(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    kernels = {t for t, m in ctx.float_kernels.items() if is_weighted_kernel(m)}
    if not kernels or not ctx.calib_batches:
        return gm
    samples = first_samples(ctx.calib_batches, MAX_SAMPLES)
    corrected = 0
    for step in PairedReplay(gm, ctx.float_kernels, samples):
        if step.node.op == "call_module" and step.node.target in kernels:
            step.sim = correct_channel_bias(gm.get_submodule(step.node.target), step.simulate(), step.ref)
            corrected += 1
    ctx.note("correct_bias", f"corrected the biases of {corrected} kernels on "
                             f"{sum(batch_samples(s) for s in samples)} samples")
    return gm
