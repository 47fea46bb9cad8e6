"""Tests of passes/optimize_rounding.py: AdaRound for integer weights.

References are independent of the pass: layer errors are recomputed with F.conv2d / F.linear on
the inputs the final simulated model really gives each layer (captured with forward hooks), the
round-to-nearest weights come from the format's own `fake_quant`, the row extraction is checked
against `F.conv2d` itself, and the optimiser against brute force over every rounding choice.
"""
from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import qcompiler
from qcompiler import PassManager
from qcompiler.api import DEFAULT_PASSES
from qcompiler.formats import IntFormat, qparams_from_tensor
from qcompiler import adaround as orr
from qcompiler.adaround import AdaRoundConfig
from qcompiler.passes.optimize_rounding import optimize_rounding
from qcompiler.quantizers import FakeQuantize

KERNELS = ("stem", "dw", "pw", "fc")


class Small(nn.Module):
    """conv, depthwise conv, pointwise conv and a linear layer: every kind the pass handles."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            for m in (self.stem, self.dw, self.pw, self.fc):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.4)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem(x))
        x = F.relu6(self.dw(x))
        x = self.pw(x)
        return self.fc(x.mean((2, 3)))


def calib_batches(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 12, 12, generator=g) for _ in range(3)]


def force_int4(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    """A stage before convert: every weight group that may take 4 bits takes them."""
    for group in ctx.groups:
        if group.kind == "weight" and "w4" in group.candidates:
            ctx.allocation[group.id] = "w4"
    return gm


def compile_small(config: AdaRoundConfig | None = None, *, target: str = "npu-int4", seed: int = 0,
                  with_pass: bool = True, calib_seed: int = 0):
    # The pass under test on the fake-quant graph: model_requant would swap the kernels.
    pm = PassManager([p for p in DEFAULT_PASSES if p not in ("correct_bias", "optimize_rounding", "model_requant")])
    pm.insert(("force_int4", force_int4), before="convert")
    if with_pass:
        pm.insert(("optimize_rounding", functools.partial(optimize_rounding, config=config)), after="convert")
    batches = calib_batches(calib_seed)
    return qcompiler.qcompile(Small().eval(), batches[0][:1], target=target, calib_data=batches,
                              passes=pm, progress=False, seed=seed)


def weight_plan(compiled, kernel: str):
    gid = next(n for n in compiled.simulated.graph.nodes if n.target == kernel).meta["weight_group"]
    return compiled.plan.group(gid)


def kernel_io(gm: fx.GraphModule, float_kernels: dict[str, nn.Module], batches: list[torch.Tensor],
              simulated: bool) -> dict[str, torch.Tensor]:
    """Each kernel's input over all batches, in the simulated graph or its float twin."""
    seen: dict[str, list[torch.Tensor]] = {k: [] for k in KERNELS}
    model = gm
    if not simulated:
        model = fx.GraphModule(gm, gm.graph)
        for name, m in list(model.named_modules()):
            if isinstance(m, FakeQuantize):
                model.set_submodule(name, nn.Identity())
        for name in KERNELS:
            model.set_submodule(name, float_kernels[name])
    hooks = [model.get_submodule(k).register_forward_hook(
        lambda mod, args, out, k=k: seen[k].append(args[0].detach())) for k in KERNELS]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def apply(kernel: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(kernel, nn.Linear):
        return F.linear(x, weight, kernel.bias)
    return F.conv2d(x, weight, kernel.bias, kernel.stride, kernel.padding, kernel.dilation, kernel.groups)


@functools.lru_cache(maxsize=None)
def _compiled(objective: str, correct_bias: bool):
    # Unweighted objective: the tests below measure the plain layer output error.
    cfg = AdaRoundConfig(objective=objective, correct_bias=correct_bias, activation_weighted=False)
    return compile_small(cfg)


@pytest.mark.parametrize("objective", ["asymmetric", "symmetric"])
def test_layer_reconstruction_no_worse_than_nearest(objective):
    compiled = _compiled(objective, False)
    ctx = compiled._run.ctx
    float_kernels = ctx.float_kernels
    batches = calib_batches()
    x_q = kernel_io(compiled.simulated, float_kernels, batches, simulated=True)
    x_f = kernel_io(compiled.simulated, float_kernels, batches, simulated=False)
    improved = 0
    for name in KERNELS:
        plan = weight_plan(compiled, name)
        float_k = float_kernels[name]
        nearest = plan.format.fake_quant(float_k.weight.detach(), plan.params)
        rounded = compiled.simulated.get_submodule(name).weight.detach()
        x_in = x_q[name] if objective == "asymmetric" else x_f[name]
        target = apply(float_k, float_k.weight.detach(), x_f[name])
        err_nearest = (apply(float_k, nearest, x_in) - target).pow(2).sum().item()
        err_rounded = (apply(float_k, rounded, x_in) - target).pow(2).sum().item()
        assert err_rounded <= err_nearest * (1 + 1e-5), (name, err_rounded, err_nearest)
        improved += err_rounded < 0.99 * err_nearest
        # The pass's own bookkeeping agrees in direction with the independent measurement.
        record = ctx.rounding[name]
        assert record.rounded_error <= record.nearest_error
    # (With a regulariser too weak to make the soft rounding binary, 3 of these 4 kept nearest.)
    assert improved >= 3, "AdaRound should beat round-to-nearest by at least 1 % on most layers"


def test_codes_stay_on_grid_and_within_one_of_nearest():
    compiled = _compiled("asymmetric", True)
    float_kernels = compiled._run.ctx.float_kernels
    changed = 0
    for name in KERNELS:
        plan = weight_plan(compiled, name)
        fmt, params = plan.format, plan.params
        assert isinstance(fmt, IntFormat)
        weight = compiled.simulated.get_submodule(name).weight.detach()
        codes = fmt.quantize(weight, params)
        # The installed weight is exactly a grid point: decoding its codes gives it back.
        assert torch.equal(fmt.dequantize(codes, params), weight)
        assert int(codes.min()) >= fmt.qmin and int(codes.max()) <= fmt.qmax
        nearest = fmt.quantize(float_kernels[name].weight.detach(), params)
        assert int((codes - nearest).abs().max()) <= 1
        changed += int((codes != nearest).sum())
    assert changed > 0
    # Scales and zero points are the plan's: nothing the plan records was changed.
    assert compiled.plan.group(weight_plan(compiled, "pw").id).params is weight_plan(compiled, "pw").params


def test_bias_correction_matches_float_means():
    compiled = _compiled("asymmetric", True)
    float_kernels = compiled._run.ctx.float_kernels
    batches = calib_batches()
    x_q = kernel_io(compiled.simulated, float_kernels, batches, simulated=True)
    x_f = kernel_io(compiled.simulated, float_kernels, batches, simulated=False)
    for name in KERNELS:
        sim_k, float_k = compiled.simulated.get_submodule(name), float_kernels[name]
        out_sim = sim_k(x_q[name]).double()
        out_ref = float_k(x_f[name]).double()
        dims = [d for d in range(out_sim.ndim) if d != (1 if out_sim.ndim == 4 else out_sim.ndim - 1)]
        shift = (out_sim.mean(dims) - out_ref.mean(dims)).abs().max().item()
        assert shift < 1e-4 * out_ref.abs().max().item(), name


def test_deterministic_for_a_seed():
    cfg = AdaRoundConfig(steps=60, max_rows=200)   # row subsampling makes the seed matter
    a, b = compile_small(cfg, seed=3), compile_small(cfg, seed=3)
    for name in KERNELS:
        assert torch.equal(a.simulated.get_submodule(name).weight, b.simulated.get_submodule(name).weight)
        assert torch.equal(a.simulated.get_submodule(name).bias, b.simulated.get_submodule(name).bias)


def test_without_calibration_data_weights_keep_nearest():
    compiled = compile_small(with_pass=False)
    gm, ctx = compiled._run.gm, compiled._run.ctx
    before = {k: gm.get_submodule(k).weight for k in KERNELS}
    ctx.calib_batches = None
    out = optimize_rounding(gm, ctx, AdaRoundConfig(steps=10))
    for name in KERNELS:
        assert out.get_submodule(name).weight is before[name]
        plan = weight_plan(compiled, name)
        nearest = plan.format.fake_quant(ctx.float_kernels[name].weight.detach(), plan.params)
        assert torch.equal(out.get_submodule(name).weight.detach(), nearest)
    assert any("no calibration data" in n for n in ctx.notes["optimize_rounding"])


def test_thin_data_keeps_nearest_and_says_so():
    # One sample gives the linear layer one row for 16 inputs: underdetermined, left alone.
    compiled = compile_small(with_pass=False)
    gm, ctx = compiled._run.gm, compiled._run.ctx
    before = gm.get_submodule("fc").weight
    optimize_rounding(gm, ctx, AdaRoundConfig(steps=10, max_samples=1))
    assert gm.get_submodule("fc").weight is before
    assert "fc" not in ctx.rounding
    assert any("fc" in n and "fewer calibration rows" in n for n in ctx.notes["optimize_rounding"])


# -- pieces, against independent references ---------------------------------------------------


@pytest.mark.parametrize("conv", [
    nn.Conv2d(6, 4, 3, stride=2, padding=1),
    nn.Conv2d(6, 6, (3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1), groups=3),
    nn.Conv2d(4, 4, 5, padding="same", groups=4, padding_mode="reflect"),
    nn.Conv2d(4, 8, 4, padding="same", padding_mode="circular", groups=2),
    nn.Conv1d(4, 6, 3, stride=2, padding=2, groups=2),
    nn.Conv2d(5, 5, 3, stride=2, padding=1, groups=5),
    nn.Conv2d(3, 6, 3, padding=1, groups=3),
    nn.Conv1d(4, 4, 5, padding=2, groups=4),
])
def test_rows_times_weight_rows_is_the_convolution(conv):
    torch.manual_seed(0)
    x = torch.randn(3, conv.in_channels, *((9, 11) if isinstance(conv, nn.Conv2d) else (13,)))
    geo = orr._geometry(conv)
    source = orr._RowSource(x, geo)
    with torch.no_grad():
        out = conv(x) - conv.bias.reshape(1, -1, *([1] * (x.ndim - 2)))
    assert source.count == out.shape[0] * out[0, 0].numel() == orr._row_count(x, geo)
    index = torch.arange(source.count)
    rows = source.rows(index)                                        # [G, R, K]
    w = orr.weight_rows(conv.weight.detach(), conv.groups)           # [G, out/G, K]
    got = torch.bmm(rows, w.transpose(1, 2))                         # [G, R, out/G]
    expect = out.reshape(out.shape[0], conv.out_channels, -1).permute(0, 2, 1).reshape(-1, conv.groups, conv.out_channels // conv.groups)
    assert torch.allclose(got.transpose(0, 1), expect, atol=1e-5)
    assert torch.equal(orr.weight_from_rows(w, conv.weight), conv.weight.detach())


@pytest.mark.parametrize("conv", [
    nn.Conv2d(5, 5, 3, stride=2, padding=1, groups=5),
    nn.Conv2d(4, 4, (5, 3), padding=(2, 1), dilation=(1, 2), groups=4),
    nn.Conv2d(6, 4, 3, padding=1),
])
def test_rows_are_the_unfolded_patches_exactly(conv):
    # Gathering copies values, so the rows equal unfold's patches bit for bit, in any layout.
    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, 9, 10)
    geo = orr._geometry(conv)
    source = orr._RowSource(x, geo)
    index = torch.randperm(source.count)[:17]
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    patches = cols.transpose(1, 2).reshape(-1, conv.in_channels, conv.kernel_size[0] * conv.kernel_size[1])
    g, per = conv.groups, conv.in_channels // conv.groups
    expect = patches[index].reshape(len(index), g, per, -1).permute(1, 0, 3, 2).reshape(g, len(index), -1)
    assert torch.equal(source.rows(index), expect)


def test_low_rank_moments_equal_gram_moments():
    torch.manual_seed(0)
    rows = torch.randn(2, 5, 7)
    gram = rows.transpose(1, 2) @ rows / 5
    cross = torch.randn(2, 3, 7)
    d = torch.randn(2, 3, 7)
    a = orr._Moments(gram=gram, rows=None, cross=cross, count=5)
    b = orr._Moments(gram=None, rows=rows, cross=cross, count=5)
    assert torch.allclose(a.apply(d), b.apply(d), atol=1e-5)
    assert a.error(d) == pytest.approx(b.error(d), rel=1e-5)


@pytest.mark.parametrize("fmt", [
    IntFormat(4, granularity="per_channel"),
    IntFormat(3, symmetric=False, granularity="per_tensor"),
])
def test_adaround_finds_the_best_rounding_of_tiny_problems(fmt):
    """Three weights per output: all 8 up/down choices enumerated, the quadratic minimised exactly."""
    cfg = AdaRoundConfig(steps=400, lr=5e-2, reg_weight=0.01)
    hits = 0
    for trial in range(6):
        g = torch.Generator().manual_seed(trial)
        w = torch.randn(1, 2, 3, generator=g)
        params = qparams_from_tensor(fmt, w.reshape(2, 3), 0 if fmt.granularity == "per_channel" else None)
        x = torch.randn(1, 40, 3, generator=g) + torch.randn(1, 1, 3, generator=g)
        gram = x.transpose(1, 2) @ x / 40
        cross = torch.randn(1, 2, 3, generator=g) * 0.02
        moments = orr._Moments(gram=gram, rows=None, cross=cross, count=40)
        codes, nearest, err, err_nearest = orr.adaround_weight(w, fmt, params, moments, cfg)
        scale, zp = orr._grid(fmt, params, 1)
        floor = torch.floor(w / scale) + zp
        best = min(
            moments.error((floor + torch.tensor(bits).reshape(1, 2, 3)).clamp(fmt.qmin, fmt.qmax) * scale - zp * scale - w)
            for bits in itertools.product((0.0, 1.0), repeat=6)
        )
        assert err == pytest.approx(moments.error(codes * scale - zp * scale - w))
        assert ((codes - nearest).abs() <= 1).all()
        assert err_nearest >= best - 1e-6 * abs(best)
        hits += err <= best + 1e-6 * abs(best) + 1e-9
    assert hits >= 5, "AdaRound should find the exact optimum of nearly all tiny problems"


def test_config_is_checked():
    with pytest.raises(qcompiler.QCompileError, match="objective"):
        AdaRoundConfig(objective="both")
    with pytest.raises(qcompiler.QCompileError, match="beta"):
        AdaRoundConfig(beta=(20.0, 1.0))


@pytest.mark.parametrize("correct_bias", [True, False])
def test_weighted_moments_with_unit_slope_equal_plain_moments(correct_bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    geo = orr._geometry(conv)
    xs_f = [torch.randn(2, 4, 5, 5) + 1.0 for _ in range(2)]
    xs_q = [x + 0.05 * torch.randn_like(x) for x in xs_f]
    w = orr.weight_rows(conv.weight.detach(), 2)
    cfg = AdaRoundConfig(correct_bias=correct_bias)
    plain = orr._moments(xs_q, xs_f, geo, w, cfg, torch.Generator().manual_seed(0))
    weighted = orr._weighted_moments(xs_q, xs_f, geo, w, conv.bias.detach(), torch.ones_like, cfg,
                                     torch.Generator().manual_seed(0))
    d = torch.randn_like(w)
    assert torch.allclose(plain.apply(d), weighted.apply(d), atol=1e-4)
    assert torch.allclose(plain.cross, weighted.cross, atol=1e-5)


def test_weighted_objective_ignores_rows_the_activation_clamps():
    """A ReLU that is dead on half the rows: the weighted objective equals the plain one on the live half."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
    x = torch.randn(400, 3)
    geo = orr._geometry(lin)
    w = orr.weight_rows(lin.weight.detach(), 1)
    cfg = AdaRoundConfig(objective="symmetric", correct_bias=False)
    relu_slope = lambda z: (z > 0).float()
    weighted = orr._weighted_moments([x], [x], geo, w, None, relu_slope, cfg, torch.Generator())
    live = x[x[:, 0] > 0]
    plain_live = orr._moments([live], [live], geo, w, cfg, torch.Generator())
    d = torch.randn_like(w)
    share = len(live) / len(x)
    assert weighted.error(d) == pytest.approx(share * plain_live.error(d), rel=1e-4)
