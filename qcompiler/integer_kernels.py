"""Integer kernels: a converted graph's kernels swapped for what the target's hardware computes.

`make_exact` swaps a conv or linear kernel's module for an `ExactConv2d` / `ExactLinear` holding
the integer weight codes and the bias rounded to the accumulator grid, and its output
quantizer for a `KernelRequantize` with the spec's requantization constants (see
`qcompiler.exact`); `make_exact_pool` and `make_exact_add` do the same for global average pools
and adds of two quantized tensors. Each raises `NotExact` (with the reason) where a node has no
integer form here, and changes nothing then.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import QCompileError
from .exact import (
    LAYER_NORM_GAIN_BITS, LAYER_NORM_MEAN_BITS, LAYER_NORM_STD_BITS, LAYER_NORM_VALUE_BITS, LUT_MAX_BITS,
    SOFTMAX_EXP_BITS, SOFTMAX_MAX_ENTRIES, SOFTMAX_OUT_BITS, ExactAdd, ExactConv2d, ExactEmbedding, ExactLayerNorm,
    ExactLUT, ExactMatmul, ExactScale, ExactSoftmax, ExactGlobalAvgPool, ExactLinear, KernelChain, KernelRequantize,
    NotExact, global_pool_keepdim, add_left_shift, quantizer_of, softmax_mask_codes, softmax_table_entries,
)
from .formats import IntFormat
from .fx_util import fetch_attr, set_submodule
from .layers import GAIN_BITS, GainLayerNorm, ScaledAdd
from .plan import GroupPlan, Plan
from .requant import bias_fit_weight_scale, requant_constants


def _exact_module(module: nn.Module, accumulator_bits: int, float32_output: bool) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        return ExactConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                           module.padding, module.dilation, module.groups, module.bias is not None,
                           module.padding_mode, accumulator_bits=accumulator_bits,
                           float32_output=float32_output)
    return ExactLinear(module.in_features, module.out_features, module.bias is not None,
                       accumulator_bits=accumulator_bits, float32_output=float32_output)


def _zero_point(q) -> int:
    """The integer zero point of a per-tensor quantizer (0 when symmetric)."""
    return 0 if q.params.zero_point is None else int(q.params.zero_point.reshape(-1)[0])


def _output_quantizer(gm: fx.GraphModule, node: fx.Node):
    """The quantizer of a node's output: its single user (NotExact otherwise)."""
    users = list(node.users)
    if len(users) != 1:
        raise NotExact(f"{node.name}: no single output quantizer")
    return quantizer_of(gm, users[0])


def _float32_bounds(chain: KernelChain) -> bool:
    """Whether every clamp bound of the chain is a float32 number (a float32 clamp then acts on
    the accumulator exactly; see `qcompiler.exact`)."""
    bounds = [b for step, arg in chain.steps if step == "clamp" for b in arg if b is not None]
    return all(float(torch.tensor(b, dtype=torch.float32)) == b for b in bounds)


def _weight_codes(plan_group, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer codes as float32, per-output-channel scale float64) of a weight on its grid."""
    fmt, params = plan_group.format, plan_group.params
    if not isinstance(fmt, IntFormat) or fmt.granularity not in ("per_tensor", "per_channel") or params is None:
        raise NotExact(f"weights in {fmt.name} have no integer kernel here")
    if params.zero_point is not None and bool((params.zero_point != 0).any()):
        raise NotExact(f"weights in {fmt.name} have a zero point")
    if fmt.granularity == "per_channel" and params.axis not in (0, -weight.ndim):
        raise NotExact("per-channel weight scales along an axis other than 0")
    codes = fmt.quantize(weight.detach().float(), params).to(torch.float32)
    scale = params.scale.reshape(-1).to(torch.float64)
    if scale.numel() == 1:
        scale = scale.expand(weight.shape[0]).clone()
    return codes, scale


def fit_bias(group: GroupPlan, bias: torch.Tensor | None, s_in: float, bias_bits: int,
             weight: torch.Tensor | None = None, in_code_bound: float = 0.0,
             accumulator_bits: int = 32) -> tuple[GroupPlan, dict | None]:
    """The weight group with its scale raised where a bias does not fit `bias_bits`, or would
    push the accumulator past `accumulator_bits` (see `qcompiler.requant.bias_fit_weight_scale`),
    and a record of what changed (None: nothing)."""
    params = group.params
    if bias is None or params is None:
        return group, None
    old = params.scale
    pow2 = getattr(group.format, "scale_kind", "") == "pow2"
    new = bias_fit_weight_scale(bias, s_in, old, bias_bits, pow2=pow2,
                                weight=weight, in_code_bound=in_code_bound, accumulator_bits=accumulator_bits)
    if torch.equal(new, old):
        return group, None
    # The channels that asked for it: per channel, even where one per-tensor scale rose for all.
    per_channel = old.double().reshape(-1).expand(bias.numel())
    overflow = bias_fit_weight_scale(bias, s_in, per_channel, bias_bits, pow2=pow2, weight=weight,
                                     in_code_bound=in_code_bound, accumulator_bits=accumulator_bits) > per_channel
    if not bool(overflow.any()):
        # A per-tensor bound (the accumulator over whole rows) raised the scale, not one channel.
        overflow = new.double().reshape(-1).expand(bias.numel()) > per_channel
    channels = [int(c) for c in torch.nonzero(overflow).reshape(-1)]
    ratio = (new.double() / old.double()).reshape(-1)
    record = {"bias_bits": bias_bits, "channels": channels,
              "scale_factor": float(ratio.max()), "bias_max": float(bias.detach().abs()[overflow].max())}
    return dataclasses.replace(group, params=dataclasses.replace(params, scale=new)), record


def make_exact(gm: fx.GraphModule, chain: KernelChain, plan: Plan, spec) -> dict:
    """Swap the chain's kernel and output quantizer for their integer forms.

    Returns what changed: the kernel's name, whether it accumulates in float32, and the weight
    group (`"group"`) when a bias did not fit and the group's scale was raised.
    """
    anchor = chain.anchor
    original = gm.get_submodule(anchor.target)
    kind = anchor.meta["op_kind"]
    rule = spec.op_rule(kind)
    acc_bits = rule.accumulator_bits if rule is not None else 32
    bias_bits = rule.bias_bits if rule is not None else min(32, acc_bits)
    mode, rounding, mbits = spec.requant.mode, spec.requant.rounding, spec.requant.multiplier_bits
    if mode == "fixed_point" and acc_bits + (mbits or 32) > 64:
        raise QCompileError(
            f"{anchor.name}: a {acc_bits}-bit accumulator times a {mbits}-bit multiplier does not fit "
            f"64 bits; lower [ops.{kind}] accumulator_bits or [requant] multiplier_bits in the spec")
    in_q, out_q = chain.in_quant, chain.out_quant
    s_in = in_q.params.scale.reshape(()).to(torch.float32)
    fmt_in = in_q.fmt
    zp_in = _zero_point(in_q)
    in_bound = float(max(abs(fmt_in.qmin - zp_in), abs(fmt_in.qmax - zp_in)))
    wgroup, bias_fit = fit_bias(plan.group(anchor.meta["weight_group"]), original.bias, float(s_in), bias_bits,
                                weight=original.weight, in_code_bound=in_bound, accumulator_bits=acc_bits)
    codes, w_scale = _weight_codes(wgroup, original.weight)
    acc_scale = s_in.double() * w_scale                    # exact: a product of two float32
    # A residual joins on the accumulator grid in float64 arithmetic, so only chains without one
    # may carry the accumulator's value in float32.
    exact = _exact_module(original, acc_bits, chain.residual is None and _float32_bounds(chain))
    exact.train(original.training)
    with torch.no_grad():
        # The decoded weight, as convert stores it (unchanged when the weight was on its grid).
        decoded = wgroup.format.dequantize(codes.to(torch.int32), wgroup.params).to(original.weight.dtype)
        exact.weight = nn.Parameter(decoded, requires_grad=False)
        exact.in_scale.copy_(s_in)
        exact.in_code_bound.fill_(in_bound)
        exact.weight_codes.copy_(codes)
        exact.acc_scale.copy_(acc_scale)
        if original.bias is not None:
            # Exact: fit_bias made every code fit the bias width.
            bias_codes = torch.round(original.bias.detach().double() / acc_scale).to(torch.int64)
            exact.bias_codes.copy_(bias_codes)
            exact.bias = nn.Parameter((bias_codes.double() * acc_scale).to(original.bias.dtype), requires_grad=False)
    try:
        fp32 = exact.exact_in_float32()
    except ValueError as why:         # partial sums beyond float64's integers: stays float
        raise NotExact(f"{anchor.name}: {why}") from None
    set_submodule(gm, anchor.target, exact)
    if bias_fit is not None:
        anchor.meta["bias_fit"] = bias_fit

    s_out = out_q.params.scale.reshape(()).to(torch.float64)
    real = acc_scale / s_out
    if mode == "float":
        # ONNX Runtime's per-channel output scale: (s_in * s_w) / s_out in float32.
        real = (s_in * w_scale.to(torch.float32) / s_out.to(torch.float32)).double()
    multiplier, shift, float_multiplier = requant_constants(real, mode, mbits)
    requant = KernelRequantize(out_q.group, out_q.fmt, out_q.params, channels=acc_scale.numel(),
                               channel_dim=exact.channel_dim, mode=mode, rounding=rounding)
    requant.acc_scale.copy_(acc_scale)
    requant.multiplier.copy_(multiplier)
    requant.shift.copy_(shift)
    requant.float_multiplier.copy_(float_multiplier)
    set_submodule(gm, chain.output.target, requant)
    return {"kernel": anchor.name, "fp32_exact": fp32, "group": wgroup if bias_fit is not None else None}


POOL_KINDS = ("adaptive_avg_pool", "mean")


def make_exact_pool(gm: fx.GraphModule, node: fx.Node, spec) -> None:
    """A global average pool -> ExactGlobalAvgPool + KernelRequantize (sum, then one multiplier)."""
    if node.meta.get("role") != "chip" or node.meta.get("kernel", node.name) != node.name or not node.args:
        raise NotExact(f"{node.name}: not a pooling kernel of its own")
    keepdim = global_pool_keepdim(gm, node)
    src = node.args[0]
    in_q = quantizer_of(gm, src)
    out_q = _output_quantizer(gm, node)
    shape = src.meta.get("shape")
    if not isinstance(shape, tuple) or len(shape) != 4:
        raise NotExact(f"{node.name}: input shape unknown")
    channels, window = int(shape[1]), int(shape[2] * shape[3])
    s_in = in_q.params.scale.reshape(()).to(torch.float32)
    s_out = out_q.params.scale.reshape(()).to(torch.float64)
    acc_scale = torch.full((channels,), float(s_in) / window, dtype=torch.float64)
    real = acc_scale / s_out
    mode, rounding = spec.requant.mode, spec.requant.rounding
    if mode == "shift" and window & (window - 1):
        raise NotExact(f"{node.name}: a shift-only target cannot average {window} positions")
    if mode == "float":
        real = (s_in / (window * s_out.to(torch.float32))).double().expand(channels).clone()
    multiplier, shift, float_multiplier = requant_constants(real, mode, spec.requant.multiplier_bits)
    pool = ExactGlobalAvgPool(channels, window, keepdim)
    pool.in_scale.copy_(s_in)
    pool.acc_scale.copy_(acc_scale)
    target = f"exact_{node.name}"
    gm.add_submodule(target, pool)
    # The node becomes a call of the new module in place: its name and meta stay, which the
    # report, the cost model and the float graph's per-node comparison rely on.
    node.op, node.target = "call_module", target
    node.args, node.kwargs = (src,), {}
    requant = KernelRequantize(out_q.group, out_q.fmt, out_q.params, channels=channels, channel_dim=1,
                               mode=mode, rounding=rounding)
    requant.acc_scale.copy_(acc_scale)
    requant.multiplier.copy_(multiplier)
    requant.shift.copy_(shift)
    requant.float_multiplier.copy_(float_multiplier)
    set_submodule(gm, next(iter(node.users)).target, requant)


def make_exact_add(gm: fx.GraphModule, node: fx.Node, spec) -> None:
    """An add of two quantized tensors -> ExactAdd (integer rescale of each input, sum, requant).

    Float-requant targets keep the float add: ONNX Runtime's QLinearAdd computes in float, which
    the fake-quant add is already.
    """
    mode, rounding = spec.requant.mode, spec.requant.rounding
    if mode == "float":
        raise NotExact(f"{node.name}: float requantization adds in float")
    if node.meta.get("role") != "chip" or node.meta.get("kernel", node.name) != node.name:
        raise NotExact(f"{node.name}: not an add kernel of its own")
    if len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
        raise NotExact(f"{node.name}: not an add of two tensors")
    scaled = gm.get_submodule(node.target) if node.op == "call_module" else None
    if scaled is not None and not isinstance(scaled, ScaledAdd):
        raise NotExact(f"{node.name}: an add module {type(scaled).__name__}")
    q1, q2 = (quantizer_of(gm, a) for a in node.args)
    out_q = _output_quantizer(gm, node)
    shapes = [a.meta.get("shape") for a in node.args]
    try:        # the integer adder broadcasts as torch does (TFLite's ADD: up to 6-d)
        torch.broadcast_shapes(*shapes)
    except (RuntimeError, TypeError):
        raise NotExact(f"{node.name}: an add of shapes {shapes[0]} and {shapes[1]}") from None
    s1, s2 = (q.params.scale.reshape(()).to(torch.float64) for q in (q1, q2))
    s_out = out_q.params.scale.reshape(()).to(torch.float64)
    left_shift = add_left_shift(max(q1.fmt.bits, q2.fmt.bits))
    if scaled is None:
        twice_max = 2 * torch.maximum(s1, s2)
        real = torch.stack([s1 / twice_max, s2 / twice_max, twice_max / (2 ** left_shift * s_out)])
    else:       # per-channel input gains: one rescale factor per channel and input
        g1, g2 = (g.detach().to(torch.float64) * s for g, s in ((scaled.gain_a, s1), (scaled.gain_b, s2)))
        twice_max = 2 * torch.maximum(g1.max(), g2.max())
        real = torch.stack([g1 / twice_max, g2 / twice_max, (twice_max / (2 ** left_shift * s_out)).expand_as(g1)])
    if mode == "shift" and not bool((torch.frexp(real).mantissa == 0.5).all()):
        raise NotExact(f"{node.name}: rescale factors that are not powers of two (a shift-only target)")
    multiplier, shift, _ = requant_constants(real, mode, spec.requant.multiplier_bits)
    zps = tuple(_zero_point(q) for q in (q1, q2, out_q))
    add = ExactAdd(zps, out_q.fmt.qmin, out_q.fmt.qmax, mode, rounding, left_shift,
                   None if scaled is None else scaled.channels)
    if scaled is not None:
        add.gains.copy_(torch.stack([scaled.gain_a, scaled.gain_b]).float())
    add.in_scales.copy_(torch.stack([q1.params.scale.reshape(()), q2.params.scale.reshape(())]).float())
    add.out_scale.copy_(out_q.params.scale.reshape(()).float())
    add.multiplier.copy_(multiplier)
    add.shift.copy_(shift)
    target = f"exact_{node.name}"
    gm.add_submodule(target, add)
    node.op, node.target = "call_module", target


def make_exact_lut(gm: fx.GraphModule, node: fx.Node, spec) -> None:
    """An element-wise activation between two per-tensor integer quantizers -> ExactLUT: the
    activation evaluated once on every input code (as the simulation decodes it) and quantized
    by the output quantizer. Float-requant targets keep the float activation (ONNX Runtime's
    QLinear* activations compute in float, which the fake-quant activation already is)."""
    if spec.requant.mode == "float":
        raise NotExact(f"{node.name}: float requantization computes activations in float")
    if node.meta.get("role") != "chip" or node.meta.get("kernel", node.name) != node.name:
        raise NotExact(f"{node.name}: not an activation of its own")
    inputs = node.all_input_nodes
    if len(inputs) != 1 or not node.args or node.args[0] is not inputs[0]:
        raise NotExact(f"{node.name}: not an activation of one tensor")
    in_q, out_q = quantizer_of(gm, inputs[0]), _output_quantizer(gm, node)
    if max(in_q.fmt.bits, out_q.fmt.bits) > LUT_MAX_BITS:
        raise NotExact(f"{node.name}: a table over more than {LUT_MAX_BITS}-bit codes")
    z_in = _zero_point(in_q)
    z_out = _zero_point(out_q)
    s_in, s_out = in_q.params.scale.reshape(()).float(), out_q.params.scale.reshape(()).float()
    codes = torch.arange(in_q.fmt.qmin, in_q.fmt.qmax + 1, dtype=torch.float32)
    with torch.no_grad():
        x = in_q.fmt.dequantize(codes.to(torch.int32), in_q.params)   # the values the simulation decodes
        if node.op == "call_module":
            y = gm.get_submodule(node.target)(x)
        elif node.op == "call_function":
            y = node.target(x, *node.args[1:], **node.kwargs)
        else:
            y = getattr(x, node.target)(*node.args[1:], **node.kwargs)
        out_codes = out_q.fmt.quantize(y.float(), out_q.params)
    lut = ExactLUT(codes.numel(), in_q.fmt.qmin, z_in, z_out)
    lut.in_scale.copy_(s_in)
    lut.out_scale.copy_(s_out)
    lut.table.copy_(out_codes.to(torch.int32))
    target = f"exact_{node.name}"
    gm.add_submodule(target, lut)
    node.op, node.target = "call_module", target


def make_exact_softmax(gm: fx.GraphModule, node: fx.Node, spec) -> None:
    """A softmax (or masked softmax) between two per-tensor integer quantizers -> ExactSoftmax,
    on fixed-point and shift targets. A constant additive mask (a graph constant: Swin's relative
    position bias and shift mask) becomes the kernel's int64 mask weights and offsets
    (`qcompiler.exact.softmax_mask_codes`)."""
    from .attention import masked_softmax

    if spec.requant.mode == "float":
        raise NotExact(f"{node.name}: float requantization computes softmax in float")
    if node.meta.get("role") != "chip":
        raise NotExact(f"{node.name}: not a softmax of the target")
    if node.op != "call_function" or node.target not in (F.softmax, masked_softmax):
        raise NotExact(f"{node.name}: softmax spelled {node.target}")
    if node.target is F.softmax:
        x, mask, causal = node.args[0], None, False
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if set(node.kwargs) - {"dim"}:
            raise NotExact(f"{node.name}: softmax with {sorted(node.kwargs)}")
    else:
        x, mask, dim, causal = (list(node.args) + [False])[:4]
    if not isinstance(dim, int):
        raise NotExact(f"{node.name}: softmax over dim {dim!r}")
    additive = None
    if mask is not None and not (isinstance(mask, fx.Node) and mask.meta.get("dtype") == torch.bool):
        if not (isinstance(mask, fx.Node) and mask.op == "get_attr") or causal:
            raise NotExact(f"{node.name}: an additive attention mask computed in the graph, or with is_causal")
        additive = mask
    in_q, out_q = quantizer_of(gm, x), _output_quantizer(gm, node)
    if max(in_q.fmt.bits, out_q.fmt.bits) > LUT_MAX_BITS:
        raise NotExact(f"{node.name}: a table over more than {LUT_MAX_BITS}-bit codes")
    s_in = float(in_q.params.scale.reshape(()))
    s_out = float(out_q.params.scale.reshape(()))
    levels = in_q.fmt.qmax - in_q.fmt.qmin + 1
    entries = softmax_table_entries(levels, s_in, additive is not None)
    if entries > SOFTMAX_MAX_ENTRIES:
        raise NotExact(f"{node.name}: an additive mask over scores of scale {s_in:.3g} needs an exp table of "
                       f"{entries} entries")
    d = torch.arange(entries, dtype=torch.float64)
    table = torch.round(torch.exp(-d * s_in) * 2 ** SOFTMAX_EXP_BITS).to(torch.int64)
    z_out = _zero_point(out_q)
    module = ExactSoftmax(entries, dim, bool(causal), z_out, out_q.fmt.qmin, out_q.fmt.qmax,
                          round(2 ** SOFTMAX_OUT_BITS / s_out))
    module.in_scale.fill_(s_in)
    module.out_scale.copy_(out_q.params.scale.reshape(()).float())
    module.exp_table.copy_(table)
    target = f"exact_{node.name}"
    gm.add_submodule(target, module)
    inputs = (x,) if mask is None else (x, mask)
    if additive is not None:      # a constant float mask becomes the kernel's int64 weights and offsets
        codes = softmax_mask_codes(fetch_attr(gm, additive.target), dim, s_in, levels)
        inputs = (x,)
        for name, value in zip(("mask_weights", "mask_offsets"), codes):
            gm.register_buffer(f"{target}_{name}", value)
            with gm.graph.inserting_before(node):
                inputs += (gm.graph.get_attr(f"{target}_{name}"),)
            inputs[-1].meta.update(shape=tuple(value.shape), dtype=value.dtype)
    node.op, node.target = "call_module", target
    node.args, node.kwargs = inputs, {}
    if additive is not None and not additive.users:
        gm.graph.erase_node(additive)


def _layer_norm_parameters(gm: fx.GraphModule, node: fx.Node) -> tuple[int, torch.Tensor | None, torch.Tensor | None, float]:
    """(normalised size, weight, bias, eps) of a LayerNorm node (module or F.layer_norm with
    constant weights)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if not isinstance(m, nn.LayerNorm):
            raise NotExact(f"{node.name}: a {type(m).__name__}, not nn.LayerNorm")
        shape, eps = tuple(m.normalized_shape), float(m.eps)
        weight = None if m.weight is None else m.weight.detach()
        bias = None if m.bias is None else m.bias.detach()
    elif node.op == "call_function" and node.target is F.layer_norm:
        names = ("input", "normalized_shape", "weight", "bias", "eps")
        found = dict(zip(names, node.args))
        found.update(node.kwargs)
        shape, eps = tuple(found["normalized_shape"]), float(found.get("eps", 1e-5))

        def constant(a):
            if a is None:
                return None
            if isinstance(a, fx.Node) and a.op == "get_attr":
                return fetch_attr(gm, a.target).detach()
            raise NotExact(f"{node.name}: LayerNorm weights computed in the graph")
        weight, bias = constant(found.get("weight")), constant(found.get("bias"))
    else:
        raise NotExact(f"{node.name}: layer norm spelled {node.target}")
    if len(shape) != 1:
        raise NotExact(f"{node.name}: LayerNorm over {len(shape)} dimensions")
    return int(shape[0]), weight, bias, eps


def _layer_norm_input_gain(gm: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor | None, int]:
    """(integer per-channel input factors, their fractional bits) of a GainLayerNorm, (None, 0)
    for a plain LayerNorm. The factors are multiples of 2**-GAIN_BITS (`GainLayerNorm`)."""
    m = gm.get_submodule(node.target) if node.op == "call_module" else None
    if not isinstance(m, GainLayerNorm):
        return None, 0
    scaled = m.input_gain.detach().to(torch.float64) * 2 ** GAIN_BITS
    if not torch.equal(scaled, scaled.round()) or bool((scaled < 1).any()):
        raise NotExact(f"{node.name}: input factors that are not multiples of 2**-{GAIN_BITS}")
    return scaled.to(torch.int64), GAIN_BITS


def make_exact_layer_norm(gm: fx.GraphModule, node: fx.Node, spec) -> None:
    """A LayerNorm over the last dimension between two per-tensor integer quantizers ->
    ExactLayerNorm, on fixed-point and shift targets."""
    if spec.requant.mode == "float":
        raise NotExact(f"{node.name}: float requantization computes layer norm in float")
    if node.meta.get("role") != "chip":
        raise NotExact(f"{node.name}: not a layer norm of the target")
    size, weight, bias, eps = _layer_norm_parameters(gm, node)
    in_q, out_q = quantizer_of(gm, node.args[0]), _output_quantizer(gm, node)
    if in_q.fmt.bits > LUT_MAX_BITS:
        raise NotExact(f"{node.name}: inputs wider than {LUT_MAX_BITS} bits")
    in_gain, gain_bits = _layer_norm_input_gain(gm, node)
    top = 1 if in_gain is None else int(in_gain.max())
    # sum((c - m)**2), and its product with 2**(2P - 2K), must stay below 2**62.
    centred = 2 ** (in_q.fmt.bits + 1 + LAYER_NORM_MEAN_BITS) * top
    if size * centred ** 2 * 2 ** max(0, 2 * LAYER_NORM_STD_BITS - 2 * (LAYER_NORM_MEAN_BITS + gain_bits)) >= 2 ** 62:
        raise NotExact(f"{node.name}: {size} channels of {in_q.fmt.bits}-bit codes overflow the integer variance")
    s_in = float(in_q.params.scale.reshape(()))
    s_out = float(out_q.params.scale.reshape(()))
    weight = torch.ones(size, dtype=torch.float64) if weight is None else weight.to(torch.float64)
    bias = torch.zeros(size, dtype=torch.float64) if bias is None else bias.to(torch.float64)
    z_in = _zero_point(in_q)
    z_out = _zero_point(out_q)
    module = ExactLayerNorm(size, z_in, round(eps / s_in ** 2 * 2 ** (2 * LAYER_NORM_STD_BITS)), z_out,
                            out_q.fmt.qmin, out_q.fmt.qmax, eps, gain_bits)
    if in_gain is not None:
        module.in_gain.copy_(in_gain)
    module.in_scale.fill_(s_in)
    module.out_scale.copy_(out_q.params.scale.reshape(()).float())
    module.gain.copy_(torch.round(weight / s_out * 2 ** LAYER_NORM_GAIN_BITS).to(torch.int64))
    module.offset.copy_(torch.round(bias / s_out * 2 ** (LAYER_NORM_VALUE_BITS + LAYER_NORM_GAIN_BITS)).to(torch.int64))
    module.float_weight.copy_(weight.float())
    module.float_bias.copy_(bias.float())
    target = f"exact_{node.name}"
    gm.add_submodule(target, module)
    node.op, node.target, node.args, node.kwargs = "call_module", target, (node.args[0],), {}


# Data movement that keeps values on their quantizer's grid (the reference backend moves codes).
_GRID_KEEPING = ("reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "expand")


def _source_quantizer(gm: fx.GraphModule, node: fx.Node):
    """The quantizer whose grid a value lies on, through data movement of one tensor."""
    while isinstance(node, fx.Node) and node.meta.get("op_kind") in _GRID_KEEPING and len(node.all_input_nodes) == 1:
        node = node.all_input_nodes[0]
    return quantizer_of(gm, node)


def make_exact_matmul(gm: fx.GraphModule, node: fx.Node, spec) -> None:
    """A matmul of two quantized activations -> ExactMatmul (exact integer accumulation, the
    target's requantization), on fixed-point and shift targets."""
    mode, rounding = spec.requant.mode, spec.requant.rounding
    if mode == "float":
        raise NotExact(f"{node.name}: float requantization multiplies in float")
    if node.meta.get("role") != "chip" or node.op != "call_function" or len(node.args) != 2 or node.kwargs:
        raise NotExact(f"{node.name}: not a matmul of two tensors of the target")
    if not all(isinstance(a, fx.Node) for a in node.args):
        raise NotExact(f"{node.name}: a matmul with a constant")
    q1, q2 = (_source_quantizer(gm, a) for a in node.args)
    out_q = _output_quantizer(gm, node)
    inner = (node.args[0].meta.get("shape") or (None,))[-1]
    if not isinstance(inner, int):
        raise NotExact(f"{node.name}: unknown inner size")
    # Exact in float64, and the product with the multiplier within int64.
    bound = inner * 2 ** (q1.fmt.bits + q2.fmt.bits)
    if bound >= 2 ** 53 or bound * 2 ** (spec.requant.multiplier_bits or 32) >= 2 ** 63:
        raise NotExact(f"{node.name}: a {inner}-term product of {q1.fmt.bits}- and {q2.fmt.bits}-bit codes "
                       "does not fit the exact accumulator")
    s1, s2 = (q.params.scale.reshape(()).to(torch.float64) for q in (q1, q2))
    s_out = out_q.params.scale.reshape(()).to(torch.float64)
    multiplier, shift, _ = requant_constants(s1 * s2 / s_out, mode, spec.requant.multiplier_bits)
    zps = tuple(_zero_point(q) for q in (q1, q2, out_q))
    module = ExactMatmul(zps, out_q.fmt.qmin, out_q.fmt.qmax, mode, rounding)
    module.in_scales.copy_(torch.stack([q1.params.scale.reshape(()), q2.params.scale.reshape(())]).float())
    module.out_scale.copy_(out_q.params.scale.reshape(()).float())
    module.multiplier.copy_(multiplier.reshape(()))
    module.shift.copy_(shift.reshape(()))
    target = f"exact_{node.name}"
    gm.add_submodule(target, module)
    node.op, node.target = "call_module", target


def _constant_factor(node: fx.Node) -> tuple[fx.Node, float]:
    """(tensor input, constant c) of `x * c`, `c * x` or `x / c` with a Python number c."""
    kind = node.meta.get("op_kind")
    if node.op != "call_function" or len(node.args) != 2 or node.kwargs:
        raise NotExact(f"{node.name}: not a {kind} of a tensor and a number")
    a, b = node.args
    if kind == "mul" and isinstance(a, (int, float)) and isinstance(b, fx.Node):
        a, b = b, a
    if not isinstance(a, fx.Node) or isinstance(b, bool) or not isinstance(b, (int, float)):
        raise NotExact(f"{node.name}: not a {kind} of a tensor and a number")
    if kind == "div":
        if b == 0:
            raise NotExact(f"{node.name}: a division by zero")
        return a, 1.0 / float(b)
    return a, float(b)


def make_exact_scale(gm: fx.GraphModule, node: fx.Node, spec) -> None:
    """A quantized tensor times (or divided by) a constant -> ExactScale: one requantization of
    the input codes by |c| s_in / s_out, on fixed-point targets, and on shift targets where that
    factor is a power of two."""
    mode, rounding = spec.requant.mode, spec.requant.rounding
    if mode == "float":
        raise NotExact(f"{node.name}: float requantization multiplies in float")
    if node.meta.get("role") != "chip" or node.meta.get("kernel", node.name) != node.name:
        raise NotExact(f"{node.name}: not a multiply of its own")
    x, constant = _constant_factor(node)
    in_q, out_q = _source_quantizer(gm, x), _output_quantizer(gm, node)
    s_in = in_q.params.scale.reshape(()).to(torch.float64)
    s_out = out_q.params.scale.reshape(()).to(torch.float64)
    real = abs(constant) * s_in / s_out
    if mode == "shift" and float(torch.frexp(real).mantissa) != 0.5:
        raise NotExact(f"{node.name}: the factor {float(real):.6g} is not a power of two (a shift-only target)")
    multiplier, shift, _ = requant_constants(real, mode, spec.requant.multiplier_bits)
    module = ExactScale(constant, (_zero_point(in_q), _zero_point(out_q)), out_q.fmt.qmin, out_q.fmt.qmax, mode, rounding)
    module.in_scale.copy_(in_q.params.scale.reshape(()).float())
    module.out_scale.copy_(out_q.params.scale.reshape(()).float())
    module.multiplier.copy_(multiplier.reshape(()))
    module.shift.copy_(shift.reshape(()))
    target = f"exact_{node.name}"
    gm.add_submodule(target, module)
    node.op, node.target, node.args = "call_module", target, (x,)


def _embedding_table(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor]:
    """(ids, constant table) of an embedding lookup: an nn.Embedding, or F.embedding of a graph
    constant. Options that change the lookup itself (max_norm) have no integer form."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if not isinstance(m, nn.Embedding) or m.max_norm is not None or len(node.args) != 1:
            raise NotExact(f"{node.name}: not a plain nn.Embedding lookup")
        return node.args[0], m.weight.detach()
    if node.op == "call_function" and node.target is F.embedding:
        names = ("input", "weight", "padding_idx", "max_norm")
        found = dict(zip(names, node.args))
        found.update(node.kwargs)
        weight = found.get("weight")
        if found.get("max_norm") is not None or not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            raise NotExact(f"{node.name}: an embedding with max_norm or a computed table")
        return found["input"], fetch_attr(gm, weight.target).detach()
    raise NotExact(f"{node.name}: embedding spelled {node.target}")


def make_exact_embedding(gm: fx.GraphModule, node: fx.Node, spec) -> None:
    """An embedding lookup whose output is quantized to a per-tensor integer format ->
    ExactEmbedding: the table stored as output codes, the lookup a gather of codes."""
    ids, table = _embedding_table(gm, node)
    if table.dim() != 2 or not table.is_floating_point():
        raise NotExact(f"{node.name}: not a two-dimensional float table")
    out_q = _output_quantizer(gm, node)
    module = ExactEmbedding(table.shape[0], table.shape[1], _zero_point(out_q))
    with torch.no_grad():
        module.table.copy_(out_q.fmt.quantize(table.float(), out_q.params).to(torch.int32))
    module.out_scale.copy_(out_q.params.scale.reshape(()).float())
    target = f"exact_{node.name}"
    gm.add_submodule(target, module)
    node.op, node.target, node.args, node.kwargs = "call_module", target, (ids,), {}
