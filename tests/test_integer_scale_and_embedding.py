"""Multiplies by a constant and embedding lookups on integers (`ExactScale`, `ExactEmbedding`):
each against its definition, and bit-exact between the simulation, the reference backend and a
qpack."""
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompiler
from qcompiler.exact import ExactEmbedding, ExactScale, scale_codes
from qcompiler.requant import requant_constants


def _round_half_away(v: Fraction) -> int:
    n = abs(v.numerator) * 2 + v.denominator
    return (1 if v >= 0 else -1) * (n // (2 * v.denominator))


@pytest.mark.parametrize("constant", [0.125, 1 / 3, -0.7, 2.5])
def test_scale_codes_are_the_rounded_product_with_the_constant(constant):
    s_in, s_out, z_in, z_out = 0.043, 0.021, -3, 5
    real = torch.tensor(abs(constant) * s_in / s_out, dtype=torch.float64)
    multiplier, shift, _ = requant_constants(real, "fixed_point", 32)
    q = torch.arange(-128, 128)
    got = scale_codes(q, (z_in, z_out), (-128, 127), constant < 0, "fixed_point", "half_away_from_zero",
                      multiplier, shift).tolist()
    m, sh = int(multiplier), int(shift)
    for code, out in zip(q.tolist(), got):
        x = (code - z_in) * (-1 if constant < 0 else 1)
        # The definition with the hardware's multiplier, in Python integers ...
        want = min(max(_round_half_away(Fraction(x * m, 2 ** sh)) + z_out, -128), 127)
        assert out == want
        # ... and within half a code (plus the multiplier's 2**-31 relative error) of the real product.
        exact = Fraction(constant) * Fraction(s_in) / Fraction(s_out) * (code - z_in) + z_out
        if -128 <= exact <= 127:
            assert abs(out - exact) <= Fraction(1, 2) + Fraction(1, 10 ** 6)


class Lookup(nn.Module):
    """Token and position embeddings (module and functional), a broadcasting add, a linear and
    the constant multiplies attention uses."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tokens = nn.Embedding(50, 16)
        self.register_buffer("positions", torch.randn(8, 16, generator=g))
        self.proj = nn.Linear(16, 16)

    def forward(self, ids):
        h = self.tokens(ids) + F.embedding(ids % 8, self.positions)
        h = self.proj(h) * 0.125
        return (h * (1 / 3)) * -2.0


def _ids(n=6, seed=0):
    return torch.randint(0, 50, (n, 8), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model = Lookup().eval()
    calib = [_ids(seed=s) for s in range(4)]
    return model, {t: qcompiler.qcompile(model, calib[0], target=t, calib_data=calib, progress=False, effort="fast")
                   for t in ("npu-int8", "dsp-fixed-point", "cpu-x86-int8")}


def test_constant_multiplies_and_embeddings_run_on_integers_and_lower_bit_exactly(compiled, tmp_path):
    from qcompiler.backends.reference import IntegerEmbedding, IntegerScale

    model, by_target = compiled
    c = by_target["npu-int8"]
    modules = list(c.simulated.modules())
    assert sum(isinstance(m, ExactScale) for m in modules) == 3
    assert sum(isinstance(m, ExactEmbedding) for m in modules) == 2
    ref = c.lower("reference")
    assert sum(isinstance(m, IntegerScale) for m in ref.modules()) == 3
    assert sum(isinstance(m, IntegerEmbedding) for m in ref.modules()) == 2
    ids = _ids(seed=9)
    with torch.no_grad():
        simulated, reference, want = c(ids), ref(ids), model(ids)
    assert torch.equal(simulated, reference)
    c.export(tmp_path / "lookup.qpack", format="qpack")
    assert torch.equal(qcompiler.load_qpack(tmp_path / "lookup.qpack").codes(ids), ref.codes(ids))
    c.save(tmp_path / "saved")
    assert torch.equal(qcompiler.load(tmp_path / "saved")(ids), simulated)
    # Integer arithmetic, not a different function: within a few output codes of float.
    out_scale = max(m.out_scale for m in modules if isinstance(m, ExactScale))
    assert float((simulated - want).abs().max()) <= 4 * float(out_scale)


def test_a_shift_target_multiplies_on_integers_only_by_a_power_of_two(compiled):
    """dsp-fixed-point requantizes by shifts alone and its scales are powers of two: x * 0.125
    stays a shift, x * (1/3) cannot be one and keeps its float multiply (noted)."""
    _, by_target = compiled
    c = by_target["dsp-fixed-point"]
    constants = sorted(m.constant for m in c.simulated.modules() if isinstance(m, ExactScale))
    assert constants == [-2.0, 0.125]
    notes = c._run.ctx.notes["model_requant"]
    assert any("is not a power of two" in n for n in notes)
    assert not any(isinstance(m, ExactScale) for m in by_target["cpu-x86-int8"].simulated.modules())


def test_an_integer_multiply_by_a_constant_exports_to_onnx(compiled, tmp_path):
    import onnxruntime as ort

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)

        def forward(self, x):
            return self.proj(x) * 0.3

    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 16, generator=g) for _ in range(4)]
    c = qcompiler.qcompile(Scaled().eval(), calib[0], target="npu-int8", calib_data=calib, progress=False,
                           effort="fast")
    assert sum(isinstance(m, ExactScale) for m in c.simulated.modules()) == 1
    result = c.export_onnx(tmp_path / "scaled.onnx")
    session = ort.InferenceSession(result.path)
    x = torch.randn(4, 16, generator=g)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        want = c(x)
    scale = next(m.out_scale for m in c.simulated.modules() if isinstance(m, ExactScale))
    assert float((got - want).abs().max()) <= 2 * float(scale)
