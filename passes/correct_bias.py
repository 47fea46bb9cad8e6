"""correct_bias: remove the mean error each quantized kernel's output carries, layer by layer.

Before: a converted graph (quantized weights, frozen activation quantizers). After: the same
graph; every conv and linear whose weights were quantized has its bias shifted so that, per
output channel and over the calibration data, the mean of its output in the simulated model
equals the mean of the same output in the float model (empirical bias correction, Nagel et al.
2019, "Data-Free Quantization", in its data-driven form).

Why: rounding a weight is a fixed error, so over the many positions of a feature map it adds a
systematic offset per channel rather than noise that averages out; quantized inputs clipped by
ReLU6 shift means too. Depthwise-heavy networks amplify such offsets: one EfficientNet-Lite0
depthwise layer with int8 weights alone takes the logits from exact to 16 dB SQNR; with its bias
corrected, 27 dB.

The correction is sequential: the graph runs node by node over all calibration samples at once,
the simulated and the float model side by side, so each kernel is corrected for the inputs it
really receives after every earlier correction. The float kernels are those `convert` replaced
(`ctx.extra["float_kernels"]`); the float side skips every fake-quantizer.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from ..context import CompileContext
from ..graph_exec import node_runner
from ..quantizers import FakeQuantize

MAX_SAMPLES = 64


def _channel_means(out: list[torch.Tensor], conv: bool) -> torch.Tensor:
    t = torch.cat(out)
    channel_dim = 1 if conv else t.ndim - 1
    reduce = [d for d in range(t.ndim) if d != channel_dim]
    return t.double().mean(reduce)


def correct_bias(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    float_kernels = {
        target: m for target, m in ctx.extra.get("float_kernels", {}).items()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    }
    if not float_kernels or not ctx.calib_batches:
        return gm
    samples: list[tuple] = []
    seen = 0
    for args in ctx.calib_batches:
        if seen >= MAX_SAMPLES:
            break
        samples.append(args)
        seen += args[0].shape[0] if isinstance(args[0], torch.Tensor) and args[0].ndim else 1

    def float_module(target: str) -> nn.Module:
        m = gm.get_submodule(target)
        if isinstance(m, FakeQuantize):
            return nn.Identity()
        return float_kernels.get(target, m)

    run_sim = node_runner(gm, gm.get_submodule)
    run_float = node_runner(gm, float_module)
    nodes = list(gm.graph.nodes)
    last_use = {}
    for i, n in enumerate(nodes):
        for src in n.all_input_nodes:
            last_use[src] = i
    sim: dict[fx.Node, list[Any]] = {}
    ref: dict[fx.Node, list[Any]] = {}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    corrected = 0
    with torch.no_grad():
        for i, node in enumerate(nodes):
            if node.op == "placeholder":
                k = placeholders.index(node)
                sim[node] = ref[node] = [s[k] for s in samples]
                continue
            if node.op == "output":
                break
            outs_sim, outs_ref = [], []
            for b in range(len(samples)):
                pick_sim = lambda a: sim[a][b]
                pick_ref = lambda a: ref[a][b]
                outs_sim.append(run_sim(node, fx.node.map_arg(node.args, pick_sim), fx.node.map_arg(node.kwargs, pick_sim)))
                outs_ref.append(run_float(node, fx.node.map_arg(node.args, pick_ref), fx.node.map_arg(node.kwargs, pick_ref)))
            if node.op == "call_module" and node.target in float_kernels:
                module = gm.get_submodule(node.target)
                conv = isinstance(module, nn.modules.conv._ConvNd)
                shift = (_channel_means(outs_sim, conv) - _channel_means(outs_ref, conv)).to(module.weight.dtype)
                bias = module.bias.detach() if module.bias is not None else torch.zeros_like(shift)
                # A new Parameter: convert's module copy may share its bias tensor with the user.
                module.bias = nn.Parameter(bias - shift, requires_grad=False)
                view = [1] * outs_sim[0].ndim
                view[1 if conv else -1] = -1
                outs_sim = [o - shift.reshape(view) for o in outs_sim]
                corrected += 1
            sim[node], ref[node] = outs_sim, outs_ref
            for src in node.all_input_nodes:
                if last_use.get(src) == i:
                    sim.pop(src, None)
                    ref.pop(src, None)
    ctx.note("correct_bias", f"corrected the biases of {corrected} kernels on {seen} samples")
    return gm
