"""model_requant: int32 biases on the accumulator grid, integer kernels, the spec's requantization.

The bit-exactness of the integer kernels against Python integers is tested in
tests/test_reference.py; here: the pass's own contract, biases that would overflow their
integer width, and the `bias_bits` spec key.
"""
from __future__ import annotations

import math
from importlib import resources

import pytest
import torch
from torch import nn

import qcompiler
from qcompiler.errors import SpecError
from qcompiler.exact import ExactConv2d, ExactLinear, KernelRequantize
from qcompiler.requant import bias_fit_weight_scale


class TwoConvs(nn.Module):
    """conv + relu, then a conv whose output channel 0 has negligible weights and a bias of -5:
    a BatchNorm with a tiny gamma folded in looks like this."""

    def __init__(self, dead_weight: float = 1e-6):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)
        with torch.no_grad():
            self.c2.weight[0].mul_(dead_weight)
            self.c2.bias[0] = -5.0

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        return y, self.fc(torch.flatten(y, 1))


def _data(n=16, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _compile(model, target="npu-int8", seed=0):
    x = _data(seed=seed)
    return qcompiler.qcompile(model, x[:1], target=target, calib_data=[x], progress=False)


def _output_step(compiled, index=0):
    out = next(n for n in compiled.simulated.graph.nodes if n.op == "output").args[0][index]
    return float(compiled.simulated.get_submodule(out.target).params.scale)


def test_kernels_become_integer_kernels_with_their_requantizers():
    compiled = _compile(TwoConvs())
    sim = compiled.simulated
    assert isinstance(sim.get_submodule("c1"), ExactConv2d)
    assert isinstance(sim.get_submodule("c2"), ExactConv2d)
    assert isinstance(sim.get_submodule("fc"), ExactLinear)
    requants = [m for m in sim.modules() if isinstance(m, KernelRequantize)]
    assert len(requants) == 3 and all(r.mode == "fixed_point" for r in requants)
    assert all(r.rounding == compiled.target.requant.rounding for r in requants)


def test_biases_sit_on_the_accumulator_grid_within_half_a_step():
    compiled = _compile(TwoConvs())
    before = compiled.graph("optimize_rounding").get_submodule("c1").bias   # after bias correction
    conv = compiled.simulated.get_submodule("c1")
    step = conv.acc_scale                                    # s_in * s_w per output channel
    assert torch.equal(conv.bias.double(), (conv.bias_codes.double() * step).float().double())
    assert (conv.bias.double() - before.double()).abs().le(step / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("target", ["npu-int8", "npu-int4", "cpu-x86-int8"])
def test_a_bias_beyond_int32_matches_float(target):
    """Channel 0's bias would need ~2^37 steps of s_in * s_w: clamping it to int32 gave 0.0
    where float gives -5.0. Its weight scale is raised until the bias fits instead."""
    model = TwoConvs().eval()
    compiled = _compile(model, target)
    x = _data(8, seed=1)
    with torch.no_grad():
        ref, _ = model(x)
        sim, _ = compiled(x)
        integer, _ = compiled.lower("reference")(x)
    step = _output_step(compiled)
    assert (sim[:, 0] - ref[:, 0]).abs().max() <= step / 2 + 1e-6
    assert torch.equal(sim, integer)
    conv = compiled.simulated.get_submodule("c2")
    assert conv.bias_codes.abs().max() < 2**31 - 1
    # Only channel 0 moved; its weights round to (almost) nothing at the new scale.
    fits = compiled.report().bias_fits
    assert [(f.node, f.channels) for f in fits] == [("c2", (0,))]
    assert "c2: channels 0" in compiled.report().to_markdown()


def test_only_the_overflowing_channels_change():
    plain = _compile(TwoConvs(dead_weight=1.0))       # nothing overflows: the reference plan
    fitted = _compile(TwoConvs())
    gid = next(n for n in fitted.simulated.graph.nodes if n.name == "c2").meta["weight_group"]
    before = plain.plan.group(gid).params.scale.reshape(-1)
    after = fitted.plan.group(gid).params.scale.reshape(-1)
    assert torch.equal(before[1:], after[1:])
    # The new scale puts the bias just inside int32.
    s_in = float(fitted.simulated.get_submodule("c2").in_scale)
    assert 2**31 * 0.999 < 5.0 / (s_in * float(after[0])) < 2**31
    assert not plain.report().bias_fits


def test_a_per_tensor_power_of_two_scale_stays_a_power_of_two():
    """dsp-fixed-point: one Q-format for the whole weight tensor, so a bias that does not fit
    raises the scale of every channel, to the next power of two."""
    model = TwoConvs(dead_weight=1.0).eval()
    with torch.no_grad():
        model.c2.weight.mul_(1e-7)
        model.c2.bias.zero_()
        model.c2.bias[0] = -300.0
    compiled = _compile(model, "dsp-fixed-point")
    gid = next(n for n in compiled.simulated.graph.nodes if n.name == "c2").meta["weight_group"]
    scale = float(compiled.plan.group(gid).params.scale.reshape(-1)[0])
    assert math.log2(scale) == int(math.log2(scale))
    x = _data(8, seed=2)
    with torch.no_grad():
        ref, _ = model(x)
        sim, _ = compiled(x)
    assert (sim[:, 0] - ref[:, 0]).abs().max() <= _output_step(compiled) / 2 + 1e-6
    assert compiled.report().bias_fits[0].channels == (0,)


def test_bias_fit_weight_scale_hand_worked():
    # s_in = 0.5, int8 bias: the largest code 127, kept a 2^-20 fraction and half a step inside,
    # L = 127 * (1 - 2^-20) - 0.5; a bias of 64 needs a weight scale of 64 / (0.5 * L).
    scale = torch.tensor([0.25, 2.0, 0.01], dtype=torch.float64)
    bias = torch.tensor([64.0, 64.0, 0.5])
    out = bias_fit_weight_scale(bias, 0.5, scale, bias_bits=8)
    limit = 127 * (1 - 2**-20) - 0.5
    assert out[0].item() == pytest.approx(64 / (0.5 * limit), rel=1e-12)
    assert out[1].item() == 2.0 and out[2].item() == 0.01       # these fit already
    pow2 = bias_fit_weight_scale(bias, 0.5, scale, bias_bits=8, pow2=True)
    assert pow2[0].item() == 2.0                                 # next power of two above 1.0118
    per_tensor = bias_fit_weight_scale(bias, 0.5, torch.tensor([0.25]), bias_bits=8)
    assert per_tensor.shape == (1,) and per_tensor.item() == pytest.approx(64 / (0.5 * limit))


def test_a_zero_bias_never_raises_a_power_of_two_weight_scale():
    """A zero bias needs no scale; the smallest power of two above 0 is not 1 (that raised every
    weight scale of a zero-bias layer to 1 on dsp-fixed-point, rounding its weights to zero)."""
    scale = torch.tensor([2.0 ** -9, 2.0 ** -7], dtype=torch.float64)
    weight = torch.randn(2, 16, generator=torch.Generator().manual_seed(0)) * 0.05
    for w in (None, weight):
        out = bias_fit_weight_scale(torch.zeros(2), 0.01, scale, bias_bits=32, pow2=True, weight=w,
                                    in_code_bound=128.0, accumulator_bits=40)
        assert torch.equal(out, scale)
    per_tensor = bias_fit_weight_scale(torch.zeros(2), 0.01, torch.tensor([2.0 ** -9]), bias_bits=32, pow2=True)
    assert per_tensor.item() == 2.0 ** -9




def test_bias_fit_leaves_the_products_room_in_the_accumulator():
    # A 12-bit accumulator (limit A = 2047 (1 - 2^-20) - 0.5), 8-bit bias (L as above), s_in = 1,
    # inputs up to 10 codes from their zero point, two weights per channel.
    # Channel 0: bias 300 dominates its products (10 * 0.5 = 5 < 300). For int8 alone it needs
    # s >= 300 / L; with the products the scale must satisfy 300 / s + 10 * (0.5 / s + 2 / 2) <= A,
    # i.e. s >= 305 / (A - 10) (0.15: at 0.1 the worst case would reach 3000 + 60).
    # Channel 1: weights 30 outweigh its bias 1: the accumulator rule leaves it alone.
    bias = torch.tensor([300.0, 1.0])
    weight = torch.tensor([[0.25, -0.25], [15.0, -15.0]])
    scale = torch.tensor([0.1, 0.5], dtype=torch.float64)
    acc = 2047 * (1 - 2**-20) - 0.5
    bias_only = bias_fit_weight_scale(bias, 1.0, scale, bias_bits=8)
    assert bias_only[0].item() == pytest.approx(300 / (127 * (1 - 2**-20) - 0.5), rel=1e-12)
    # A bias that fits int8 but not the 12-bit accumulator with its products: only the room rule acts.
    out = bias_fit_weight_scale(bias, 1.0, scale, bias_bits=16, weight=weight, in_code_bound=10.0,
                                accumulator_bits=12)
    assert out[0].item() == pytest.approx(305 / (acc - 10), rel=1e-12)
    assert out[1].item() == 0.5
    # The worst case at that scale stays inside the accumulator: |b| / s + 10 * sum(|round(w / s)|).
    s = out[0].item()
    assert 300 / s + 10 * sum(abs(round(w / s)) for w in (0.25, -0.25)) <= 2047
    # Both rules: the larger scale wins.
    both = bias_fit_weight_scale(bias, 1.0, scale, bias_bits=8, weight=weight, in_code_bound=10.0,
                                 accumulator_bits=12)
    assert both[0].item() == pytest.approx(max(300 / (127 * (1 - 2**-20) - 0.5), 305 / (acc - 10)), rel=1e-12)

def _spec_with(tmp_path, extra: str):
    """npu-int8 with `extra` keys added to its conv rule, written as a user's own spec file."""
    base = resources.files("qcompiler.targets").joinpath("npu-int8.toml").read_text(encoding="utf-8")
    base = base.replace('name = "npu-int8"', 'name = "npu-int8-narrow-bias"')
    rule = 'conv = { weights = ["w8"], inputs = ["a8"] }'
    assert rule in base
    path = tmp_path / "chip.toml"
    path.write_text(base.replace(rule, rule[:-2] + extra + " }"), encoding="utf-8")
    return path


def test_a_narrow_bias_width_from_the_spec_is_respected(tmp_path):
    """A chip with 16-bit biases: every bias code fits 16 bits after the pass, and the output
    still matches float where the bias dominates."""
    model = TwoConvs().eval()
    with torch.no_grad():
        model.c2.bias[0] = -0.5
    compiled = _compile(model, str(_spec_with(tmp_path, ", bias_bits = 16")))
    conv = compiled.simulated.get_submodule("c2")
    assert conv.bias_codes.abs().max() < 2**15
    assert compiled.report().bias_fits and all(f.bias_bits == 16 for f in compiled.report().bias_fits)
    x = _data(8, seed=3)
    with torch.no_grad():
        ref, _ = model(x)
        sim, _ = compiled(x)
        integer, _ = compiled.lower("reference")(x)
    assert torch.equal(sim, integer)
    assert (sim[:, 0] - ref[:, 0]).abs().max() <= _output_step(compiled) / 2 + 1e-6


def test_a_bias_wider_than_the_accumulator_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match=r"ops\.conv\.bias_bits"):
        qcompiler.load_target(str(_spec_with(tmp_path, ", accumulator_bits = 24, bias_bits = 32")))


def test_the_adjustment_survives_save_and_load(tmp_path):
    compiled = _compile(TwoConvs())
    compiled.save(str(tmp_path / "m"))
    loaded = qcompiler.load(str(tmp_path / "m"))
    x = _data(4, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], compiled(x)[0])
    assert loaded.report().bias_fits == compiled.report().bias_fits


class ZeroInitResidual(nn.Module):
    """A residual block whose last BatchNorm has gamma = 0 (timm's zero_init_last, common in
    ResNets): the branch's folded weights are all zero, the block passes its shortcut through."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.bn.weight.zero_()
            self.bn.weight[:2] = 1.0          # two live channels; six dead ones

    def forward(self, x):
        y = self.stem(x)
        return self.head(torch.relu(self.bn(self.conv(y)) + y))


def test_weights_of_all_zero_channels_take_the_largest_live_scale():
    from qcompiler.quantizers import weight_qparams

    w = torch.zeros(3, 2, 1, 1)
    w[0] = 0.5
    w[2] = -1.27
    spec = qcompiler.load_target("npu-int8")
    fmt = spec.formats["w8"]
    params = weight_qparams(fmt, w, 0)
    live = params.scale.reshape(-1)[[0, 2]]
    assert float(params.scale.reshape(-1)[1]) == float(live.max())
    assert torch.equal(fmt.fake_quant(w, params), fmt.fake_quant(w, params) * (w != 0))   # zeros stay zeros
    everything_zero = weight_qparams(fmt, torch.zeros(3, 2, 1, 1), 0)
    assert torch.all(everything_zero.scale == 1.0)


@pytest.mark.parametrize("target", ["npu-int8", "dsp-fixed-point"])
def test_a_dead_branch_keeps_its_residual_through_the_integer_kernel(target):
    # The zero channels used to get the smallest scale (2**-32): the fused residual, joined on
    # their accumulator grid s_in * s_w, underflowed the requantization factor to 0 and the
    # block's output lost its shortcut (0.2 dB on timm's resnet10t).
    model = ZeroInitResidual().eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(4)]
    compiled = qcompiler.qcompile(model, calib[0], target=target, calib_data=calib, progress=False)
    assert any(isinstance(m, KernelRequantize) for m in compiled.simulated.modules())
    x = torch.randn(8, 3, 8, 8, generator=g)
    with torch.no_grad():
        ref, out = model(x), compiled(x)
    from qcompiler.mixed_precision import output_sqnr_db
    assert output_sqnr_db(ref.double(), out.double()) > 25
    torch.testing.assert_close(compiled.lower("reference")(x), out, rtol=0, atol=0)
