"""Replaying a converted graph node by node: the simulated model and its float twin side by side.

Passes that fit the quantized model to the float one (AdaRound in `optimize_rounding`, bias
correction in `correct_bias`) need, at every kernel, the values its input takes in the
simulated model as built so far and in the float model, over the calibration samples.
`PairedReplay` walks the graph in order and keeps both for every live node: the float side runs
each kernel `convert` replaced (`ctx.float_kernels`) and skips every fake-quantizer. At each node
the caller sees the float outputs and the inputs on both sides, may change the node's module
(new rounding), then computes the simulated outputs and may correct them (new bias); what it
leaves is what later nodes receive.

`torch.fx.Interpreter` runs whole graphs only, hence `node_runner`, which runs one node on given
argument values with a choice of module per target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, fx, nn

from .fx_util import fetch_attr
from .quantizers import FakeQuantize

NodeRunner = Callable[[fx.Node, tuple, dict], Any]


def node_runner(gm: fx.GraphModule, module_of: Callable[[str], nn.Module]) -> NodeRunner:
    """run(node, args, kwargs): the node's output, calling `module_of(target)` for call_module."""
    def run(node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "call_module":
            return module_of(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            return fetch_attr(gm, node.target)
        raise ValueError(f"cannot run node {node.name} (op {node.op!r}) on its own")
    return run


@dataclass
class ReplayStep:
    """One node of a replay: its float outputs (one per sample batch) and, once computed, the
    simulated ones. Setting `sim` replaces what later nodes receive."""

    node: fx.Node
    ref: list[Any]
    _simulate: Callable[[], list[Any]] = field(repr=False)
    sim: list[Any] | None = None

    def simulate(self) -> list[Any]:
        """The node's simulated outputs, with its module as it is now."""
        self.sim = self._simulate()
        return self.sim


class PairedReplay:
    """Iterate over the nodes of `gm` with both models' values (see the module docstring).

    `sim[node]` and `ref[node]` hold, per sample batch, the values of every node whose users
    have not all run yet.
    """

    def __init__(self, gm: fx.GraphModule, float_kernels: dict[str, nn.Module], samples: list[tuple[Any, ...]]):
        self.gm, self.float_kernels, self.samples = gm, float_kernels, samples
        self.run_sim = node_runner(gm, gm.get_submodule)
        self.run_float = node_runner(gm, self.float_module)
        self.sim: dict[fx.Node, list[Any]] = {}
        self.ref: dict[fx.Node, list[Any]] = {}

    def float_module(self, target: str) -> nn.Module:
        module = self.gm.get_submodule(target)
        return nn.Identity() if isinstance(module, FakeQuantize) else self.float_kernels.get(target, module)

    def _outputs(self, node: fx.Node, run: NodeRunner, values: dict[fx.Node, list[Any]]) -> list[Any]:
        return [run(node, fx.node.map_arg(node.args, lambda a: values[a][b]),
                    fx.node.map_arg(node.kwargs, lambda a: values[a][b])) for b in range(len(self.samples))]

    def __iter__(self) -> Iterator[ReplayStep]:
        nodes = list(self.gm.graph.nodes)
        last_use: dict[fx.Node, int] = {}
        for i, n in enumerate(nodes):
            for src in n.all_input_nodes:
                last_use[src] = i
        placeholders = [n for n in nodes if n.op == "placeholder"]
        with torch.no_grad():
            for i, node in enumerate(nodes):
                if node.op == "placeholder":
                    k = placeholders.index(node)
                    self.sim[node] = self.ref[node] = [s[k] for s in self.samples]
                    continue
                if node.op == "output":
                    break
                step = ReplayStep(node, self._outputs(node, self.run_float, self.ref),
                                  lambda n=node: self._outputs(n, self.run_sim, self.sim))
                yield step
                self.sim[node] = step.sim if step.sim is not None else step.simulate()
                self.ref[node] = step.ref
                for src in node.all_input_nodes:
                    if last_use.get(src) == i:
                        self.sim.pop(src, None)
                        self.ref.pop(src, None)


def is_weighted_kernel(module: nn.Module | None) -> bool:
    """A conv or linear: a kernel whose bias can absorb a mean error per output channel."""
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))


def correct_channel_bias(module: nn.Module, outs_sim: list[Tensor], outs_ref: list[Tensor]) -> list[Tensor]:
    """Shift a kernel's bias so that its mean output per channel over the samples equals the
    float model's (empirical bias correction, Nagel et al. 2019); returns the shifted outputs."""
    channel = 1 if isinstance(module, nn.modules.conv._ConvNd) else outs_sim[0].ndim - 1

    def means(outs: list[Tensor]) -> Tensor:
        # Per-batch sums in float32 (torch sums pairwise), the total in float64.
        total = sum(o.sum([d for d in range(o.ndim) if d != channel]).double() for o in outs)
        count = sum(o.numel() // o.shape[channel] for o in outs)
        return total / count

    shift = (means(outs_sim) - means(outs_ref)).to(module.weight.dtype)
    bias = module.bias.detach() if module.bias is not None else torch.zeros_like(shift)
    # A new Parameter: convert's module copy may share its bias tensor with the user's model.
    module.bias = nn.Parameter(bias - shift, requires_grad=False)
    view = [1] * outs_sim[0].ndim
    view[channel] = -1
    return [o - shift.reshape(view) for o in outs_sim]
