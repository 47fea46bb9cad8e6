"""balance_residual: give each residual-stream tensor (and each LayerNorm output) channels of one
size, so that one scale per tensor fits them all.

Before: a fused float graph. After: the same function (exact in real arithmetic; float32
rounding aside), with residual adds, their inputs and outputs divided channel by channel by a
factor `r` (the channel's calibrated magnitude over the tensor's largest, in steps of 2**-8;
powers of two on shift-only targets), so that per-tensor activation quantizers see no outlier
channels. A transformer's residual stream has a few channels tens of times larger than the rest
(LayerNorm gains, feed-forward outputs); one int8 scale per tensor represents those poorly, and
this is what breaks W8A8 on BERT-like encoders (RepQ-ViT reparameterises LayerNorm outputs the
same way, Bondarenko et al. quantize the stream per embedding group).

The tensors considered are the residual adds' inputs and outputs and every LayerNorm's output. A
tensor `t` is balanced when every node that makes or reads it can carry the factor exactly:
- made by a linear (its weight rows and bias divided by `r_t`), a LayerNorm with its own gain and
  offset (both divided), an embedding lookup (its table's columns divided) or a residual add;
- read by linears (weight columns multiplied by `r_t`), LayerNorms (a per-channel input gain
  `r_t`: `GainLayerNorm`) or residual adds.
A residual add of balanced tensors becomes `ScaledAdd(a, b) = a * r_a / r_s + b * r_b / r_s`:
an integer adder applies these gains as per-channel rescale multipliers, and an integer
LayerNorm its input gain as per-channel integer multipliers (`qcompiler.exact`). Anything else
(a graph output, a conv, an add fused into a kernel) leaves its tensor as it is.
"""
from __future__ import annotations

import math
import operator
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..calibration import ensure_calibration_batches, first_samples
from ..context import CompileContext
from ..fx_util import NodeOutputs, copy_sharing_tensors, fetch_attr, set_submodule
from ..layers import GAIN_BITS, GainLayerNorm, ScaledAdd

STAGE = "balance_residual"
# Samples whose channel magnitudes set the factors.
SAMPLES = 64


def _is_residual_add(node: fx.Node) -> bool:
    if node.meta.get("op_kind") != "add" or node.op != "call_function" or node.target not in (operator.add, torch.add):
        return False
    if len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    if node.meta.get("kernel", node.name) != node.name or "fusion" in node.meta:
        return False
    shapes = [a.meta.get("shape") for a in node.args]
    out, dtype = node.meta.get("shape"), node.meta.get("dtype")
    if not all(isinstance(s, tuple) and len(s) >= 2 for s in shapes) or not isinstance(out, tuple):
        return False
    try:
        broadcast = tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        return False
    return (broadcast == out and shapes[0][-1] == shapes[1][-1] == out[-1]
            and isinstance(dtype, torch.dtype) and dtype.is_floating_point)


class _Stream:
    """The residual adds of a graph and which of their tensors can carry factors."""

    def __init__(self, gm: fx.GraphModule, layer_norm: bool):
        self.gm, self.layer_norm = gm, layer_norm
        self.adds = [n for n in gm.graph.nodes if _is_residual_add(n)]
        self.calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        add_set = set(self.adds)
        # The adds' inputs and outputs, and every LayerNorm output (pre-LayerNorm blocks read
        # their LayerNorm's output with linears only: RepQ-ViT's case).
        layer_norms = {n for n in gm.graph.nodes if self._module(n, nn.LayerNorm) is not None}
        tensors = {a for n in self.adds for a in n.args} | add_set | layer_norms
        self.tensors = [t for t in gm.graph.nodes if t in tensors and self._balanced(t, add_set)]

    def _module(self, node: fx.Node, cls: type[nn.Module]) -> nn.Module | None:
        if node.op != "call_module" or self.calls.get(node.target) != 1 or node.meta.get("opaque"):
            return None
        m = self.gm.get_submodule(node.target)
        return m if isinstance(m, cls) else None

    def table(self, t: fx.Node) -> fx.Node | nn.Embedding | None:
        """The table of an embedding lookup that only this lookup reads: an nn.Embedding, or the
        get_attr node of F.embedding's weight."""
        if (m := self._module(t, nn.Embedding)) is not None and m.max_norm is None:
            return m
        if t.op == "call_function" and t.target is F.embedding and len(t.args) >= 2 and not t.kwargs:
            weight = t.args[1]
            if isinstance(weight, fx.Node) and weight.op == "get_attr" and len(weight.users) == 1:
                return weight
        return None

    def _balanced(self, t: fx.Node, adds: set[fx.Node]) -> bool:
        channels = t.meta["shape"][-1]
        if "fused_into" in t.meta or "fusion" in t.meta and t not in adds:
            return False
        made = t in adds or self.table(t) is not None
        if not made and (m := self._module(t, nn.Linear)) is not None:
            made = m.out_features == channels
        if not made and (m := self._module(t, nn.LayerNorm)) is not None:
            made = m.elementwise_affine and m.bias is not None and tuple(m.normalized_shape) == (channels,)
        if not made:
            return False
        for user in t.users:
            if user in adds:
                continue
            if len(user.all_input_nodes) != 1 or user.args[0] is not t or user.kwargs:
                return False
            if (m := self._module(user, nn.Linear)) is not None and m.in_features == channels:
                continue
            if self.layer_norm and (m := self._module(user, nn.LayerNorm)) is not None \
                    and tuple(m.normalized_shape) == (channels,):
                continue
            return False
        return bool(t.users)


def _magnitudes(gm: fx.GraphModule, names: set[str], batches: list) -> dict[str, torch.Tensor]:
    """Per-channel max |value| (last dimension) of the named nodes over the batches."""
    seen: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for args in batches:
            run = NodeOutputs(gm, {n: n for n in names})
            run.run(*args)
            for name, value in run.values.items():
                m = value.abs().reshape(-1, value.shape[-1]).amax(0).float()
                seen[name] = m if name not in seen else torch.maximum(seen[name], m)
    return seen


def _factor(magnitude: torch.Tensor, pow2: bool) -> torch.Tensor:
    """r = magnitude / its largest, rounded up to a multiple of 2**-GAIN_BITS (to a power of two
    when `pow2`), at least 2**-GAIN_BITS."""
    top = float(magnitude.max())
    if not math.isfinite(top) or top <= 0:
        return torch.ones_like(magnitude)
    r = (magnitude / top).clamp(min=2.0 ** -GAIN_BITS, max=1.0)
    if pow2:
        return torch.exp2(torch.ceil(torch.log2(r)))
    return torch.ceil(r * 2 ** GAIN_BITS) / 2 ** GAIN_BITS


class _Rewriter:
    """Copies of the modules it changes (the user's modules and tensors are never touched)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm, self.copied = gm, {}

    def module(self, node: fx.Node, input_gain: bool = False) -> nn.Module:
        """The node's own copy of its module; a LayerNorm whose input is balanced (`input_gain`)
        becomes a GainLayerNorm."""
        m = self.copied.get(node.target)
        if m is None:
            m = copy_sharing_tensors(self.gm.get_submodule(node.target))
        if input_gain and isinstance(m, nn.LayerNorm) and not isinstance(m, GainLayerNorm):
            m = _with_gain(m)
        if self.copied.get(node.target) is not m:
            set_submodule(self.gm, node.target, m)
            self.copied[node.target] = m
        return m

    @staticmethod
    def set(m: nn.Module, name: str, value: torch.Tensor) -> None:
        setattr(m, name, nn.Parameter(value.detach().clone(), requires_grad=False))


def _with_gain(ln: nn.LayerNorm) -> GainLayerNorm:
    out = GainLayerNorm(ln.normalized_shape[-1], eps=ln.eps, elementwise_affine=ln.elementwise_affine,
                        bias=ln.bias is not None)
    if ln.elementwise_affine:
        out.weight = ln.weight
        if ln.bias is not None:
            out.bias = ln.bias
    return out.to(next(iter(ln.parameters()), torch.zeros(())).device)


def balance_residual(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    gains = () if ctx.target is None else ctx.target.channel_gains
    if "add" not in gains:
        return gm           # the target's adders take one scale per input
    stream = _Stream(gm, layer_norm="layer_norm" in gains)
    if not stream.tensors:
        return gm
    batches = first_samples(ensure_calibration_batches(gm, ctx), SAMPLES)
    magnitudes = _magnitudes(gm, {t.name for t in stream.tensors}, batches)
    pow2 = ctx.target is not None and ctx.target.requant.mode == "shift"
    factors = {t.name: _factor(magnitudes[t.name], pow2) for t in stream.tensors}
    rw = _Rewriter(gm)
    with torch.no_grad():
        for t in stream.tensors:
            r = factors[t.name]
            table = stream.table(t)
            if isinstance(table, fx.Node):       # F.embedding of a graph constant: a divided copy
                name = f"balanced_{table.target.replace('.', '_')}"
                gm.register_buffer(name, fetch_attr(gm, table.target) / r)
                table.target = name
            elif t.op == "call_module":          # made by a linear, LayerNorm or embedding: divide its output
                m = rw.module(t)
                if isinstance(m, nn.Linear):
                    rw.set(m, "weight", m.weight / r.to(m.weight).unsqueeze(1))
                if isinstance(m, nn.Embedding):
                    rw.set(m, "weight", m.weight / r.to(m.weight))
                if isinstance(m, nn.LayerNorm):
                    rw.set(m, "weight", m.weight / r.to(m.weight))
                if getattr(m, "bias", None) is not None:
                    rw.set(m, "bias", m.bias / r.to(m.bias))
            for user in t.users:
                if user.op != "call_module":
                    continue                     # a residual add: its gains below
                m = rw.module(user, input_gain=True)
                if isinstance(m, GainLayerNorm):
                    m.input_gain = m.input_gain * r.to(m.input_gain)
                else:
                    rw.set(m, "weight", m.weight * r.to(m.weight).unsqueeze(0))
        for add in stream.adds:
            one = torch.ones(add.meta["shape"][-1])
            r_a, r_b, r_s = (factors.get(n.name, one) for n in (add.args[0], add.args[1], add))
            if all(torch.equal(r, one) for r in (r_a, r_b, r_s)):
                continue
            target = f"balanced_{add.name}"
            gm.add_submodule(target, ScaledAdd(r_a / r_s, r_b / r_s))
            add.op, add.target = "call_module", target
    gm.recompile()
    ratios = [float(factors[t.name].min()) for t in stream.tensors]
    ctx.note(STAGE, f"{len(stream.tensors)} residual tensors over {len(stream.adds)} adds balanced; "
                    f"smallest channel factor {min(ratios):.4g} (median over tensors "
                    f"{sorted(ratios)[len(ratios) // 2]:.4g})")
    return gm
