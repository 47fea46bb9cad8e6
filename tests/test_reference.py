"""The reference backend: integer-only, and bit-exact with the simulation that model_requant builds."""
from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
import torchvision
from torch import nn

import qcompiler
from qcompiler.errors import QCompileError
from qcompiler.exact import ExactConv2d, ExactLinear, KernelRequantize
from qcompiler.backends.reference import Dequantize, IntegerAdd, IntegerGlobalAvgPool, IntegerKernel, Quantize

TARGETS = ("npu-int8", "npu-int4", "dsp-fixed-point", "cpu-x86-int8")


class Tiny(nn.Module):
    """conv+relu6, conv+add+relu (a residual), a standalone conv, global pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 6, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        a = torch.nn.functional.relu6(self.conv1(x))
        b = torch.relu(self.conv2(a) + a)
        c = self.conv3(b)
        return self.fc(torch.flatten(self.pool(c), 1))


def _output_quantizer(compiled):
    out = next(n for n in compiled.simulated.graph.nodes if n.op == "output").args[0]
    return compiled.simulated.get_submodule(out.target)


def _sim_codes(compiled, x):
    q = _output_quantizer(compiled)
    with torch.no_grad():
        return q.fmt.quantize(compiled(x), q.params)


def _compile(model, target, shape=(4, 3, 16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    calib = [torch.randn(shape, generator=g) for _ in range(2)]
    return qcompiler.qcompile(model, calib[0], target=target, calib_data=calib, progress=False)


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    model = Tiny().eval()
    return {t: _compile(model, t) for t in TARGETS}


@pytest.mark.parametrize("target", TARGETS)
def test_tiny_model_codes_are_identical(tiny_models, target):
    compiled = tiny_models[target]
    ref = compiled.lower("reference")
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 1.5
    codes = ref.codes(x)
    assert codes.dtype == torch.int32
    assert torch.equal(codes, _sim_codes(compiled, x))
    with torch.no_grad():
        assert torch.equal(ref(x), compiled(x))


@pytest.mark.parametrize("target", TARGETS)
def test_every_kernel_runs_on_integers(tiny_models, target):
    compiled = tiny_models[target]
    ref = compiled.lower("reference")
    kinds = [type(m) for m in ref.modules()]
    assert kinds.count(IntegerKernel) == 4            # conv1, conv2 (with its residual), conv3, fc
    assert nn.Conv2d not in kinds and nn.Linear not in kinds
    kernels = [m for m in ref.modules() if isinstance(m, IntegerKernel)]
    assert all(not m.weight.is_floating_point() for m in kernels)
    assert kinds.count(IntegerGlobalAvgPool) == 1 and nn.AdaptiveAvgPool2d not in kinds
    # A residual add fused into a kernel (conv + add); cpu-x86-int8's add + relu is not one.
    fused_add = any("add" in p and p[0] in ("conv", "depthwise_conv", "linear") for p in compiled.target.fusions)
    assert sum(m.residual_qmin is not None for m in kernels) == (1 if fused_add else 0)
    # Unfused, the add is an integer adder, except where the target requantizes in float.
    integer_add = not fused_add and compiled.target.requant.mode != "float"
    assert kinds.count(IntegerAdd) == (1 if integer_add else 0)
    if fused_add:
        # Everything runs on codes: only the input is quantized from float, only the output decoded.
        assert kinds.count(Quantize) == 1 and kinds.count(Dequantize) == 1


def _round(x: Fraction, rounding: str) -> int:
    fl = math.floor(x)
    if x - fl != Fraction(1, 2):
        return fl + (1 if x - fl > Fraction(1, 2) else 0)
    return {"half_even": fl + fl % 2, "half_up": fl + 1, "half_away_from_zero": fl + 1 if x > 0 else fl}[rounding]


@pytest.mark.parametrize("target", ["npu-int8", "dsp-fixed-point"])
def test_first_kernel_against_python_integers(tiny_models, target):
    """conv1+relu6 recomputed with Python ints and Fractions from scales, codes and the spec."""
    compiled = tiny_models[target]
    sim = compiled.simulated
    conv = sim.get_submodule("conv1")
    assert isinstance(conv, ExactConv2d)
    rq = next(m for m in sim.modules() if isinstance(m, KernelRequantize))
    in_q = sim.get_submodule("qobs_x")
    spec = compiled.target.requant
    x = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(9))
    q_in = in_q.fmt.quantize(x, in_q.params)
    z_in = 0 if in_q.params.zero_point is None else int(in_q.params.zero_point)
    z_out = 0 if rq.params.zero_point is None else int(rq.params.zero_point)
    s_in, s_out = Fraction(float(in_q.params.scale)), Fraction(float(rq.params.scale))
    wg = compiled.plan.group(next(n for n in sim.graph.nodes if n.name == "conv1").meta["weight_group"])
    w_codes = wg.format.quantize(conv.weight.detach(), wg.params)
    w_scale = wg.params.scale.reshape(-1)
    with torch.no_grad():
        ref_codes = compiled.lower("reference").int_conv1(q_in)     # the reference's kernel, alone
    for c in range(8):
        s_acc = s_in * Fraction(float(w_scale[c] if w_scale.numel() > 1 else w_scale[0]))
        bias = round(Fraction(float(conv.bias[c])) / s_acc)
        m, sh = int(rq.multiplier[c]), int(rq.shift[c])
        real = s_acc / s_out
        if spec.mode == "shift":
            assert Fraction(1, 2**sh) == real if sh >= 0 else Fraction(2**-sh) == real
        else:
            assert abs(Fraction(m, 2**sh) - real) <= real / 2**30
        hi = round(Fraction(6) / s_acc)
        for i in range(5):
            for j in range(5):
                acc = bias
                for ci in range(3):
                    for di in range(3):
                        for dj in range(3):
                            ii, jj = i + di - 1, j + dj - 1
                            if 0 <= ii < 5 and 0 <= jj < 5:
                                acc += (int(q_in[0, ci, ii, jj]) - z_in) * int(w_codes[c, ci, di, dj])
                acc = min(max(acc, 0), hi)                      # ReLU6 on the accumulator grid
                y = _round(Fraction(acc * m, 2**sh) if sh >= 0 else Fraction(acc * m * 2**-sh), spec.rounding)
                want = min(max(y + z_out, rq.fmt.qmin), rq.fmt.qmax)
                assert int(ref_codes[0, c, i, j]) == want, (c, i, j)


def test_requant_is_faithful_to_the_float_fake_quant(tiny_models):
    """Modelling the hardware moves outputs by a few codes at most against plain fake-quant."""
    compiled = tiny_models["npu-int8"]
    before = compiled.graph("optimize_rounding")
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    q = _output_quantizer(compiled)
    with torch.no_grad():
        diff = (q.fmt.quantize(before(x), q.params) - _sim_codes(compiled, x)).abs()
    assert diff.max() <= 3 and diff.float().mean() < 0.5


@pytest.fixture(scope="module")
def torchvision_models():
    torch.manual_seed(0)
    out = {}
    for name in ("resnet18", "mobilenet_v2"):
        model = getattr(torchvision.models, name)().eval()
        out[name] = _compile(model, "npu-int8", shape=(2, 3, 64, 64))
    return out


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_are_bit_exact_under_npu_int8(torchvision_models, name):
    compiled = torchvision_models[name]
    ref = compiled.lower("reference")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    assert torch.equal(ref.codes(x), _sim_codes(compiled, x))
    n_int = sum(isinstance(m, IntegerKernel) for m in ref.modules())
    assert n_int == {"resnet18": 21, "mobilenet_v2": 53}[name]


def test_save_and_load_keep_the_exact_simulation(tiny_models, tmp_path):
    compiled = tiny_models["npu-int8"]
    compiled.save(tmp_path / "m")
    loaded = qcompiler.load(tmp_path / "m")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded(x), compiled(x))
    assert torch.equal(loaded.lower("reference").codes(x), _sim_codes(compiled, x))


def test_unknown_backend_is_a_clear_error(tiny_models):
    with pytest.raises(QCompileError, match="unknown backend 'tflite'"):
        tiny_models["npu-int8"].lower("tflite")


def test_global_pool_against_python_integers(tiny_models):
    """The integer pool: sum of centred codes, one multiplier for s_in / (window * s_out)."""
    compiled = tiny_models["npu-int8"]
    ref = compiled.lower("reference")
    pool = next(m for m in ref.modules() if isinstance(m, IntegerGlobalAvgPool))
    q = torch.randint(-128, 128, (2, 6, 16, 16), generator=torch.Generator().manual_seed(2), dtype=torch.int32)
    got = pool(q)
    assert got.shape == (2, 6, 1, 1)
    for n in range(2):
        for c in range(6):
            total = sum(int(v) - pool.in_zero_point for v in q[n, c].reshape(-1).tolist())
            m, sh = int(pool.multiplier[c]), int(pool.shift[c])
            y = _round(Fraction(total * m, 2**sh), "half_away_from_zero")
            assert int(got[n, c, 0, 0]) == min(max(y + pool.out_zero_point, -128), 127)


def test_report_keeps_every_kernel_by_name(tiny_models):
    rows = {r.node: r for r in tiny_models["npu-int8"].report().rows}
    assert set(rows) == {"conv1..relu6", "conv2..relu", "conv3", "pool", "fc"}
    assert all(r.sqnr_db > 20 for r in rows.values())


def test_pool_window_is_fixed_at_compile_time(tiny_models):
    compiled = tiny_models["npu-int8"]
    with pytest.raises(QCompileError, match="compiled for 256 positions"):
        with torch.no_grad():
            compiled(torch.zeros(1, 3, 8, 8))


def test_shift_target_add_is_the_exactly_rounded_sum(tiny_models):
    """With power-of-two scales the integer add rounds once: round_half_up((s1 x1 + s2 x2) / s_out)."""
    compiled = tiny_models["dsp-fixed-point"]
    add = next(m for m in compiled.lower("reference").modules() if isinstance(m, IntegerAdd))
    sim_add = next(m for m in compiled.simulated.modules() if type(m).__name__ == "ExactAdd")
    s1, s2 = (Fraction(float(s)) for s in sim_add.in_scales)
    s_out = Fraction(float(sim_add.out_scale))
    g = torch.Generator().manual_seed(6)
    q1 = torch.randint(-128, 128, (400,), generator=g, dtype=torch.int32)
    q2 = torch.randint(-128, 128, (400,), generator=g, dtype=torch.int32)
    got = add(q1, q2).tolist()
    for a, b, c in zip(q1.tolist(), q2.tolist(), got):
        want = math.floor((s1 * a + s2 * b) / s_out + Fraction(1, 2))
        assert c == min(max(want, -128), 127)


def _kernel_output_dtypes(gm, x) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda mod, a, out: seen.append(out.dtype))
             for m in gm.modules() if isinstance(m, (ExactConv2d, ExactLinear))]
    try:
        with torch.no_grad():
            gm(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_float32_kernel_values_equal_the_float64_ones(torchvision_models, name):
    """Kernels without a residual carry acc * s_acc in float32 where that round-trips exactly;
    the outputs are bit-identical to the all-float64 simulation."""
    compiled = torchvision_models[name]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    dtypes = _kernel_output_dtypes(compiled.simulated, x)
    assert torch.float32 in dtypes                      # the fast path is taken
    if name == "resnet18":
        assert torch.float64 in dtypes                  # residual kernels keep float64
    wide = copy.deepcopy(compiled.simulated)
    for m in wide.modules():
        if isinstance(m, (ExactConv2d, ExactLinear)):
            m.float32_output = False
    assert set(_kernel_output_dtypes(wide, x)) == {torch.float64}
    with torch.no_grad():
        assert torch.equal(wide(x), compiled.simulated(x))


def test_float32_path_falls_back_per_call(tiny_models, monkeypatch):
    """Accumulators at or above the round-trip limit send that call through float64; the codes
    stay those of the reference backend."""
    compiled = tiny_models["npu-int8"]
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        fast = compiled(x)
    monkeypatch.setattr(qcompiler.exact, "FLOAT32_ROUND_TRIP", 4.0)
    assert set(_kernel_output_dtypes(compiled.simulated, x)) == {torch.float64}
    with torch.no_grad():
        assert torch.equal(compiled(x), fast)
    assert torch.equal(compiled.lower("reference").codes(x), _sim_codes(compiled, x))


def test_float32_round_trip_recovers_every_accumulator_below_the_limit():
    """The bound the float32 path rests on: round(float32(acc * float32(s)) / s) == acc for
    |acc| < 2**21, with s a product of two float32 scales (as s_in * s_w is)."""
    g = torch.Generator().manual_seed(8)
    limit = int(qcompiler.exact.FLOAT32_ROUND_TRIP)
    acc = torch.cat([torch.arange(limit - 50_000, limit), -torch.arange(limit - 50_000, limit),
                     torch.randint(-limit + 1, limit, (100_000,), generator=g)]).double()
    for _ in range(20):
        s_in, s_w = (torch.rand(2, generator=g) * 10.0 ** torch.randint(-6, 0, (2,), generator=g).float()).unbind()
        s_acc = s_in.double() * s_w.double()
        value = (acc.float() * s_acc.float())
        assert torch.equal(torch.round(value.double() * s_acc.reciprocal()), acc)


def _int16_activation_spec(tmp_path):
    """npu-int8 with 16-bit activations and no conv + add fusion: adds run on the integer adder."""
    from importlib.resources import files

    text = files("qcompiler.targets").joinpath("npu-int8.toml").read_text()
    text = text.replace('name = "npu-int8"', 'name = "npu-int8-a16"')
    text = text.replace('[formats.a8]\ntype = "int"\nbits = 8', '[formats.a8]\ntype = "int"\nbits = 16')
    text = text.replace('    ["conv", "add"], ["conv", "add", "relu"],\n', '')
    path = tmp_path / "npu-int8-a16.toml"
    path.write_text(text)
    return path


def test_an_integer_add_of_16_bit_codes_stays_within_a_code_of_the_exact_sum(tmp_path):
    """A 16-bit input shifted left by 20 bits times a 32-bit multiplier overflows int64; the add
    shifts 16-bit inputs by 15 (TFLite's int16 add) and keeps within one code over the whole range."""
    torch.manual_seed(0)
    compiled = _compile(Tiny().eval(), str(_int16_activation_spec(tmp_path)))
    ref = compiled.lower("reference")
    add = next(m for m in ref.modules() if isinstance(m, IntegerAdd))
    assert add.qmax == 2 ** 15 - 1 and add.left_shift == 15
    sim_add = next(m for m in compiled.simulated.modules() if type(m).__name__ == "ExactAdd")
    s1, s2 = (Fraction(float(s)) for s in sim_add.in_scales)
    s_out = Fraction(float(sim_add.out_scale))
    z1, z2, zo = add.zero_points
    g = torch.Generator().manual_seed(7)
    q1 = torch.randint(-2 ** 15, 2 ** 15, (300,), generator=g, dtype=torch.int32)
    q2 = torch.randint(-2 ** 15, 2 ** 15, (300,), generator=g, dtype=torch.int32)
    q1[:2], q2[:2] = torch.tensor([-2 ** 15, 2 ** 15 - 1]), torch.tensor([-2 ** 15, 2 ** 15 - 1])
    for a, b, c in zip(q1.tolist(), q2.tolist(), add(q1, q2).tolist()):
        exact = (s1 * (a - z1) + s2 * (b - z2)) / s_out + zo
        want = min(max(exact, Fraction(add.qmin)), Fraction(add.qmax))
        assert abs(c - want) <= 1, (a, b, c, float(want))
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ref.codes(x), _sim_codes(compiled, x))


class Activations(nn.Module):
    """Element-wise activations between linears: each runs as a table on an integer target."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = torch.nn.functional.gelu(self.fc1(x))
        x = torch.sigmoid(self.fc2(x)) * 2.0
        x = torch.nn.functional.silu(self.fc3(x))
        return self.fc4(torch.tanh(x))


@pytest.mark.parametrize("target", ["npu-int8", "dsp-fixed-point"])
def test_activations_run_as_tables_of_codes(target, tmp_path):
    from qcompiler.backends.reference import IntegerLUT

    torch.manual_seed(0)
    compiled = _compile(Activations().eval(), target, shape=(16, 12))
    ref = compiled.lower("reference")
    luts = [m for m in ref.modules() if isinstance(m, IntegerLUT)]
    assert len(luts) == 4                              # gelu, sigmoid, silu, tanh
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(3)) * 2
    assert torch.equal(ref.codes(x), _sim_codes(compiled, x))
    # The GELU table against GELU in float64 on the decoded input codes: the same code, or one
    # away where float32 and float64 round a near-tie differently.
    sim = compiled.simulated
    node = next(n for n in sim.graph.nodes if n.meta.get("op_kind") == "gelu")
    lut = sim.get_submodule(node.target)
    out_q = sim.get_submodule(next(iter(node.users)).target)
    codes = torch.arange(lut.in_qmin, lut.in_qmin + lut.entries, dtype=torch.float64)
    values = (codes - lut.in_zero_point) * float(lut.in_scale)
    zo = 0 if out_q.params.zero_point is None else float(out_q.params.zero_point.reshape(-1)[0])
    want = torch.round(torch.nn.functional.gelu(values) / float(out_q.params.scale.reshape(()).double()) + zo)
    want = want.clamp(out_q.fmt.qmin, out_q.fmt.qmax)
    diff = (lut.table.double() - want).abs()
    assert diff.max() <= 1 and float((diff == 0).double().mean()) >= 0.99
    # A qpack carries the tables.
    compiled.export(tmp_path / "acts.qpack", format="qpack")
    loaded = qcompiler.load_qpack(tmp_path / "acts.qpack")
    assert torch.equal(loaded.codes(x), ref.codes(x))


def test_a_float_requant_target_keeps_activations_in_float():
    from qcompiler.backends.reference import IntegerLUT

    torch.manual_seed(0)
    compiled = _compile(Activations().eval(), "cpu-x86-int8", shape=(16, 12))
    assert not any(isinstance(m, IntegerLUT) for m in compiled.lower("reference").modules())
