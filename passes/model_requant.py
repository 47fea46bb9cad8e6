"""model_requant: make the simulation compute the integer codes the target's hardware computes.

Before: a converted graph (fake-quantized activations, weights decoded from their codes, float
biases, possibly corrected). After: the same nodes; every conv and linear kernel whose input,
weights and output are integer formats (per-tensor activations, symmetric weights) computes the
way the chip does (see `qcompiler.exact`): its module is an `ExactConv2d`/`ExactLinear` holding
the integer weight codes and the bias rounded to the accumulator grid (int32, scale
`s_in * s_w`), and its output quantizer is a `KernelRequantize` that applies the spec's
`[requant]` (fixed-point multiplier and shift, shift only, or float32 multiply) with its rounding,
then the output zero point and saturation. Fused ReLU/ReLU6/hardtanh/clamp act on the
accumulator; a fused residual add joins it on the accumulator grid. Global average pools
(adaptive pooling to 1x1, mean over height and width) become an exact sum of codes and one
requantization that divides by the window (`ExactGlobalAvgPool`). Adds of two quantized tensors
on fixed-point and shift targets rescale each input to a common grid and requantize the sum
(`ExactAdd`). Element-wise activations (GELU, sigmoid, tanh, SiLU, hardswish, ...) between two
per-tensor integer quantizers on those targets become a table from input code to output code
(`ExactLUT`); softmaxes become an integer kernel (`ExactSoftmax`: a table of exp over code
differences, an integer sum and division; a constant additive mask enters as code offsets and
weights) and LayerNorms another (`ExactLayerNorm`: integer mean,
variance and square root); matmuls of two quantized activations accumulate their codes exactly
and requantize (`ExactMatmul`); a multiply or division by a constant (attention's softmax scale)
is one requantization of the input codes (`ExactScale`); an embedding whose output is quantized
reads a table of output codes (`ExactEmbedding`).

Everything else keeps its float fake-quant form, which the reference backend reproduces by
running the same float op between a dequantize and a quantize. It runs last: it reads the final
weights and biases, after convert, rounding optimisation and bias correction.
"""
from __future__ import annotations

import torch
from torch import fx

from ..context import CompileContext
from ..errors import QCompileError
from ..exact import LUT_KINDS, ChainIndex, KernelChain, NotExact
from ..integer_kernels import (
    POOL_KINDS, make_exact, make_exact_add, make_exact_embedding, make_exact_layer_norm, make_exact_lut, make_exact_matmul,
    make_exact_pool, make_exact_scale, make_exact_softmax,
)

STAGE = "model_requant"


def _integer_form(gm: fx.GraphModule, node: fx.Node, ctx: CompileContext, index: ChainIndex) -> str | None:
    """Swap one node for its integer form; the kind swapped ("kernel", "pool", "add") or None."""
    kind = node.meta.get("op_kind")
    dtype = node.meta.get("dtype")
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        return None         # integer arithmetic of the graph itself (positions, masks): nothing to quantize
    if kind == "add" and node.op in ("call_function", "call_module"):
        make_exact_add(gm, node, ctx.target)
        return "add"
    if kind in POOL_KINDS:
        make_exact_pool(gm, node, ctx.target)
        return "pool"
    if kind in LUT_KINDS and node.op in ("call_function", "call_method", "call_module"):
        make_exact_lut(gm, node, ctx.target)
        return "table"
    if kind == "softmax":
        make_exact_softmax(gm, node, ctx.target)
        return "softmax"
    if kind == "layer_norm":
        make_exact_layer_norm(gm, node, ctx.target)
        return "layer_norm"
    if kind == "matmul" and "weight_group" not in node.meta:
        make_exact_matmul(gm, node, ctx.target)
        return "matmul"
    if kind in ("mul", "div") and any(isinstance(a, (int, float)) for a in node.args):
        make_exact_scale(gm, node, ctx.target)
        return "scale"
    if kind == "embedding":
        make_exact_embedding(gm, node, ctx.target)
        return "embedding"
    if "weight_group" not in node.meta or node.meta.get("role") != "chip":
        return None
    group = make_exact(gm, KernelChain(gm, node, index), ctx.plan, ctx.target)["group"]
    if group is not None:       # a bias did not fit: the weight group's scale was raised
        ctx.plan = ctx.plan.with_group(group)
        fit = node.meta["bias_fit"]
        ctx.note(STAGE, f"{node.name}: the bias of output channel(s) {fit['channels']} does not fit "
                        f"{fit['bias_bits']} bits at s_in * s_w; their weight scale was raised "
                        f"up to {fit['scale_factor']:.3g}x")
    return "kernel"


def model_requant(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    if ctx.plan is None or ctx.target is None:
        raise QCompileError("model_requant runs after convert: the graph has no quantization plan yet")
    done = {"kernel": 0, "pool": 0, "add": 0, "table": 0, "softmax": 0, "layer_norm": 0, "matmul": 0, "scale": 0,
            "embedding": 0}
    kept = []
    index = ChainIndex(gm)
    for node in list(gm.graph.nodes):
        try:
            kind = _integer_form(gm, node, ctx, index)
        except NotExact as why:
            # An add fused into a kernel is the kernel's business, not a miss of its own.
            if node.meta.get("op_kind") != "add" or node.meta.get("kernel", node.name) == node.name:
                kept.append(str(why))
            continue
        if kind is not None:
            done[kind] += 1
    ctx.note(STAGE, f"{done['kernel']} kernels, {done['pool']} global pools, {done['add']} adds and "
                    f"{done['matmul']} activation matmuls compute "
                    f"with integer accumulators and {ctx.target.requant.mode} requantization; "
                    f"{done['table']} activations run as look-up tables over their input codes, "
                    f"{done['softmax']} softmaxes and {done['layer_norm']} layer norms on integers; "
                    f"{done['scale']} multiplies by a constant requantize their input codes and "
                    f"{done['embedding']} embeddings read tables of output codes")
    for why in kept:
        ctx.note(STAGE, f"float fake-quant kept: {why}")
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
