"""balance_residual: residual-stream tensors divided per channel by calibrated factors; the function
unchanged in float, the integer adder and LayerNorm exact against their definitions, and what it
is for: per-tensor int8 that represents outlier channels."""
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompiler
from qcompiler import PassManager
from qcompiler.fx_util import NodeOutputs
from qcompiler.exact import ExactAdd, ExactLayerNorm, add_codes, layer_norm_codes
from qcompiler.layers import GainLayerNorm, ScaledAdd
from qcompiler.mixed_precision import output_sqnr_db
from qcompiler.requant import requant_constants

TARGET = "npu-int8-balanced"
UP_TO_BALANCE = ["capture", "canonicalize", "fold_bn", "fuse", "balance_residual"]


class PostNormEncoder(nn.Module):
    """Two BERT-style post-LayerNorm blocks (attention-free: a token mixer and a feed-forward
    layer) over an embedding lookup, with a few residual channels 30x larger than the rest, and a
    head that reads those channels 30x less (as trained encoders' next layers do)."""

    def __init__(self, dim=32, vocab=40, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tokens = nn.Embedding(vocab, dim)
        self.ln0 = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            self.blocks.append(nn.ModuleDict({
                "mix": nn.Linear(dim, dim), "out": nn.Linear(dim, dim), "ln1": nn.LayerNorm(dim),
                "up": nn.Linear(dim, 4 * dim), "down": nn.Linear(4 * dim, dim), "ln2": nn.LayerNorm(dim)}))
        self.head = nn.Linear(dim, 8)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.copy_(torch.rand(dim, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(dim, generator=g) * 0.1)
                    m.weight[[3, 17]] *= 30.0           # outlier channels, as trained encoders have
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            self.head.weight[:, [3, 17]] /= 30.0

    def forward(self, ids):
        return self.encode(self.ln0(self.tokens(ids)))

    def encode(self, h):
        for b in self.blocks:
            h = b["ln1"](h + b["out"](torch.tanh(b["mix"](h))))
            h = b["ln2"](h + b["down"](F.gelu(b["up"](h))))
        return self.head(h)


def _ids(seed, n=8):
    return torch.randint(0, 40, (n, 12), generator=torch.Generator().manual_seed(seed))


def _stage(model, target, passes):
    calib = [_ids(s) for s in range(4)]
    if passes is not None:      # the float graph after these passes
        return PassManager(passes).run(model, calib[0], target=qcompiler.load_target(target), calib_data=calib,
                                       progress=False).gm
    return qcompiler.qcompile(model, calib[0], target=target, calib_data=calib, progress=False)


def test_balancing_keeps_the_function_and_evens_out_the_residual_channels():
    model = PostNormEncoder().eval()
    gm = _stage(model, TARGET, UP_TO_BALANCE)
    modules = list(gm.modules())
    assert sum(isinstance(m, ScaledAdd) for m in modules) == 4
    assert sum(isinstance(m, GainLayerNorm) for m in modules) == 4      # the LayerNorms that read a sum
    ids = _ids(9)
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), model(ids), rtol=1e-4, atol=1e-4)
        # The tensor the first residual add reads from the embedding LayerNorm: its largest
        # channel over its median channel, before and after.
        node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "ln0")
        before = model.ln0(model.tokens(ids)).abs().amax((0, 1))
        run = NodeOutputs(gm, {node.name: "ln0"})
        run.run(ids)
        after = run.values["ln0"].abs().amax((0, 1))
    assert float(before.max() / before.median()) > 10
    assert float(after.max() / after.median()) < 2
    # The user's model is untouched.
    assert not any(isinstance(m, (ScaledAdd, GainLayerNorm)) for m in model.modules())


def test_a_target_without_channel_gains_is_left_alone():
    model = PostNormEncoder().eval()
    gm = _stage(model, "npu-int8", UP_TO_BALANCE)
    assert not any(isinstance(m, (ScaledAdd, GainLayerNorm)) for m in gm.modules())


@pytest.fixture(scope="module")
def compiled():
    model = PostNormEncoder().eval()
    return model, {t: _stage(model, t, None) for t in (TARGET, "npu-int8")}


def test_balanced_int8_represents_the_outlier_channels(compiled):
    """The point of it: with 30x outlier channels, per-tensor int8 with balancing stays much closer
    to float than without."""
    model, by_target = compiled
    ids = _ids(11, n=16)
    with torch.no_grad():
        want = model(ids).double()
        balanced = output_sqnr_db(want, by_target[TARGET](ids).double())
        plain = output_sqnr_db(want, by_target["npu-int8"](ids).double())
    assert balanced >= plain + 6.0
    assert balanced >= 25.0


def test_balanced_model_runs_on_integers_and_lowers_bit_exactly(compiled, tmp_path):
    model, by_target = compiled
    c = by_target[TARGET]
    modules = list(c.simulated.modules())
    adds = [m for m in modules if isinstance(m, ExactAdd)]
    assert sum(m.channels is not None for m in adds) == 4
    assert sum(isinstance(m, ExactLayerNorm) and m.in_gain_bits > 0 for m in modules) == 4
    ids = _ids(12)
    with torch.no_grad():
        simulated = c(ids)
        ref = c.lower("reference")
        assert torch.equal(ref(ids), simulated)
        c.export(tmp_path / "enc.qpack", format="qpack")
        assert torch.equal(qcompiler.load_qpack(tmp_path / "enc.qpack").codes(ids), ref.codes(ids))
        c.save(tmp_path / "saved")
        assert torch.equal(qcompiler.load(tmp_path / "saved")(ids), simulated)
    assert "weights keep round-to-nearest" in " ".join(c._run.ctx.notes["optimize_rounding"])


def test_per_channel_integer_add_is_the_rounded_sum_within_a_code():
    g = torch.Generator().manual_seed(0)
    channels, s1, s2, s_out, zps, left = 6, 0.03, 0.011, 0.05, (4, -3, 2), 20
    g1, g2 = torch.rand(channels, generator=g) + 0.01, torch.rand(channels, generator=g) + 0.01
    a, b = g1.double() * s1, g2.double() * s2
    top = 2 * torch.maximum(a.max(), b.max())
    real = torch.stack([a / top, b / top, (top / (2 ** left * s_out)).expand(channels)])
    multiplier, shift, _ = requant_constants(real, "fixed_point", 32)
    q1 = torch.randint(-128, 128, (5, channels), generator=g)
    q2 = torch.randint(-128, 128, (5, channels), generator=g)
    got = add_codes(q1, q2, zps, (-128, 127), "fixed_point", "half_away_from_zero", multiplier, shift, left)
    for i in range(5):
        for c in range(channels):
            exact = (Fraction(float(g1[c])) * Fraction(s1) * (int(q1[i, c]) - zps[0])
                     + Fraction(float(g2[c])) * Fraction(s2) * (int(q2[i, c]) - zps[1])) / Fraction(s_out) + zps[2]
            want = min(max(exact, Fraction(-128)), Fraction(127))
            assert abs(int(got[i, c]) - want) <= 1


def test_layer_norm_with_input_gains_equals_its_definition_and_float_within_a_code():
    g = torch.Generator().manual_seed(1)
    size, s_in, s_out, z_in, z_out, bits = 16, 0.04, 0.03, 2, -1, 8
    gains = torch.randint(1, 2 ** bits + 1, (size,), generator=g)           # r = gains / 2**8
    gamma, beta = torch.rand(size, generator=g) + 0.5, torch.randn(size, generator=g) * 0.2
    gain = torch.round(gamma.double() / s_out * 2 ** 8).long()
    offset = torch.round(beta.double() / s_out * 2 ** 24).long()
    eps_codes = round(1e-5 / s_in ** 2 * 2 ** 16)
    q = torch.randint(-128, 128, (6, size), generator=g)
    got = layer_norm_codes(q, z_in, size, eps_codes, gain, offset, z_out, (-128, 127), gains, bits)
    for row, out in zip(q.tolist(), got.tolist()):
        c = [(v - z_in) * 16 * int(r) for v, r in zip(row, gains)]           # K + B = 12 fractional bits
        m = (2 * sum(c) + size) // (2 * size)
        v = sum((x - m) ** 2 for x in c) // (size * 2 ** 8) + eps_codes      # 2P - 2(K + B) = -8: a division
        r = max(math.isqrt(v), 1)
        want = [min(max((((x - m) * 2 ** 12 // r) * gg + o + 2 ** 23 >> 24) + z_out, -128), 127)
                for x, gg, o in zip(c, gain.tolist(), offset.tolist())]
        assert out == want
    x = ((q - z_in) * s_in).double() * gains.double() / 2 ** bits
    float_codes = F.layer_norm(x, (size,), gamma.double(), beta.double(), 1e-5) / s_out + z_out
    assert float((got - float_codes.clamp(-128, 127)).abs().max()) <= 1.0


class FloatInputEncoder(PostNormEncoder):
    """The same encoder reading float features through a linear instead of token ids."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)

    def forward(self, x):
        return self.encode(self.ln0(self.inp(x)))


def test_a_balanced_model_exports_to_onnx_and_agrees_with_the_simulation(tmp_path):
    import onnxruntime as ort

    g = torch.Generator().manual_seed(5)
    calib = [torch.randn(8, 12, 16, generator=g) for _ in range(4)]
    model = FloatInputEncoder().eval()
    c = qcompiler.qcompile(model, calib[0], target=TARGET, calib_data=calib, progress=False)
    assert sum(isinstance(m, ExactAdd) and m.channels is not None for m in c.simulated.modules()) == 4
    result = c.export_onnx(tmp_path / "enc.onnx")
    session = ort.InferenceSession(result.path, disabled_optimizers=["QDQS8ToU8Transformer"])
    x = torch.randn(8, 12, 16, generator=g)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        want = c(x)
        float_out = model(x)
    # ONNX Runtime computes LayerNorm and GELU in float where the simulation runs integer kernels
    # (measured 46 dB apart; without the per-channel gains the export would not compute the model).
    assert output_sqnr_db(want.double(), got.double()) >= 35.0
    assert output_sqnr_db(float_out.double(), got.double()) >= 25.0
