"""Block and whole-model reconstruction: blocks found from graphs, the trainable quantizers, the
Hessian weights, hard rounding at the end, bit-exact lowering, and the accuracy it recovers."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import qcompiler
from qcompiler.adaround import roundable_kernels
from qcompiler.api import DEFAULT_PASSES, pipeline, start_run
from qcompiler.blocks import cut_segments, find_blocks
from qcompiler.errors import QCompileError
from qcompiler.formats import IntFormat, QParams
from qcompiler.options import CompileOptions
from qcompiler.reconstruction import ReconstructionConfig, float_graph
from qcompiler.sensitivity import hessian_sensitivity, hessian_weights
from qcompiler.trainable import LearnedStep, SoftRoundedWeight
from qcompiler.zoo import efficientnet_lite0

sys.path.insert(0, str(Path(__file__).parent))
from trained_models import agreement, deterministic_torch, run, train_digits  # noqa: E402

W4_SPEC = Path(__file__).parents[1] / "benchmarks" / "npu-w4a8.toml"


def _converted(model: nn.Module, size: int = 32, target: str = "npu-int8"):
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    run_ = start_run(pipeline(), model.eval(), x, target, [x], CompileOptions(progress=False), stop="convert")
    kernels, _ = roundable_kernels(run_.gm, run_.ctx.plan, run_.ctx.float_kernels)
    nodes = {n.name: n for n in run_.gm.graph.nodes}
    return run_, [nodes[k] for k in kernels]


# -- blocks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,make,expected", [
    # conv1, eight basic blocks (three with a downsample conv), fc
    ("resnet18", lambda: torchvision.models.resnet18(), 10),
    # the stem, 17 inverted-residual blocks (7 without a residual), the last 1x1 conv, the classifier
    ("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(), 20),
    # the stem, 16 MBConv blocks, the head conv, the classifier
    ("efficientnet_lite0", efficientnet_lite0, 19),
])
def test_blocks_are_the_networks_own(name, make, expected):
    torch.manual_seed(0)
    run_, kernels = _converted(make())
    blocks = find_blocks(run_.gm, kernels, "block")
    assert len(blocks) == expected
    # Every kernel in exactly one block, in graph order; every block reads one tensor (a cut).
    assert [k for b in blocks for k in b.kernels] == kernels
    assert all(len(b.inputs) == 1 for b in blocks)
    # A block's kernels share the module prefix of the network's block.
    for b in blocks[1:-1]:
        prefixes = {k.target.split(".")[:2 if name != "mobilenet_v2" else 3][1] for k in b.kernels}
        assert len(prefixes) == 1, b.name
    if name == "resnet18":
        assert [k.target for k in blocks[3].kernels] == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]
    assert len(find_blocks(run_.gm, kernels, "model")) == 1


def test_a_cut_leaves_one_value_alive():
    torch.manual_seed(0)
    run_, _ = _converted(torchvision.models.resnet18())
    order = {n: i for i, n in enumerate(run_.gm.graph.nodes)}
    segments = cut_segments(run_.gm.graph)
    for seg in segments[:-1]:
        end = order[seg[-1]]
        alive = [n for n in run_.gm.graph.nodes if order[n] <= end and n.op != "get_attr"
                 and any(order[u] > end for u in n.users)]
        assert alive == [seg[-1]]


def test_an_unknown_granularity_is_refused():
    with pytest.raises(QCompileError, match="layer, block, model"):
        CompileOptions(reconstruction="network")
    with pytest.raises(QCompileError, match="granularity"):
        ReconstructionConfig(granularity="layer")


# -- the trainable quantizers -------------------------------------------------------------------

def test_soft_rounding_starts_at_the_float_weight_and_hardens_within_one_code():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 4, 3, 3, generator=g)
    fmt = IntFormat(bits=4, granularity="per_channel")
    params = fmt.qparams_from_range(w.amin((1, 2, 3)), w.amax((1, 2, 3)), axis=0)
    soft = SoftRoundedWeight(w, fmt, params)
    # Inside the grid, the soft weight starts at the float weight (up to the clamp of the init).
    inside = soft.active
    scale = params.scale.reshape(-1, 1, 1, 1).expand_as(w)
    assert torch.allclose(soft()[inside], w[inside], atol=1e-3 * float(scale.max()))
    with torch.no_grad():
        soft.v.copy_(torch.randn(w.shape, generator=g) * 5)
    codes = soft.codes()
    nearest = torch.round(w / scale).clamp(fmt.qmin, fmt.qmax)
    assert (codes - nearest).abs().max() <= 1
    assert codes.min() >= fmt.qmin and codes.max() <= fmt.qmax
    assert torch.equal(soft.hard_weight(), codes * scale)


def test_learned_step_gradient_is_lsq():
    # LSQ: d/ds of s * clamp(round(x / s)) is round(x / s) - x / s inside the range, the clamp bound outside.
    fmt = IntFormat(bits=4, signed=True)
    s0 = 0.5
    q = LearnedStep(0, fmt, QParams(scale=torch.tensor(s0), zero_point=None, axis=None))
    x = torch.tensor([0.3, -1.1, 2.6, 100.0, -100.0])
    out = q(x)
    expected_out = torch.tensor([0.5, -1.0, 2.5, 3.5, -4.0])
    assert torch.allclose(out, expected_out)
    grads = [torch.autograd.grad(q(x[i:i + 1]).sum(), q.log_scale)[0] / s0 for i in range(5)]
    want = [1 - 0.6, -2 + 2.2, 5 - 5.2, 7.0, -8.0]       # d out / d s, by hand
    assert torch.allclose(torch.stack(grads), torch.tensor(want), atol=1e-5)


def test_learned_step_stays_a_power_of_two_on_pow2_formats():
    fmt = IntFormat(bits=8, signed=True, scale_kind="pow2")
    q = LearnedStep(0, fmt, QParams(scale=torch.tensor(0.25), zero_point=None, axis=None))
    with torch.no_grad():
        q.log_scale.add_(0.3)     # 0.25 * e^0.3 = 0.337 -> 2^-2 still (log2 0.337 = -1.57 rounds to -2)
    assert float(q.qparams().scale) == 0.25
    with torch.no_grad():
        q.log_scale.add_(0.2)     # 0.25 * e^0.5 = 0.412 -> 2^-1 (log2 = -1.28)
    assert float(q.qparams().scale) == 0.5


# -- Hessian weights -------------------------------------------------------------------------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        a = torch.relu(self.conv1(x))
        b = torch.relu(self.conv2(a)) + a
        return self.fc(b.mean((2, 3)))


def test_hessian_weights_equal_the_sensitivity_passs():
    """The sensitivity pass's hessian noise of an activation group, divided by that group's
    squared quantization error, is the Hessian weight reconstruction uses for the same tensor."""
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    calibrated = start_run(pipeline(), model, x, "npu-int4", [x], CompileOptions(progress=False), stop="calibrate")
    converted = calibrated.fork()
    from qcompiler.api import resume
    converted = resume(pipeline(), run=converted, start="convert", stop="convert")
    gm, ctx = calibrated.gm, calibrated.ctx
    acts = [g for g in ctx.groups if g.kind == "activation" and not g.fallback]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        noise, _ = hessian_sensitivity(gm, acts, ctx.observers, [(x,)], progress=False)
    stubs = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    cgm, cctx = converted.gm, converted.ctx
    fq_nodes = [n for n in cgm.graph.nodes if n.op == "call_module" and n.target in stubs and len(n.args)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        weights = hessian_weights(float_graph(cgm, cctx.float_kernels), [n.args[0].name for n in fq_nodes], [(x,)])
    checked = 0
    with torch.no_grad():
        values = {}
        interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
        out = interp.run(x)
        values = interp.env
        signal = float(out.pow(2).sum())
    for g in acts:
        nodes = [n for n in gm.graph.nodes if n.op == "call_module" and getattr(gm.get_submodule(n.target), "group", None) == g.id]
        if len(nodes) != 1:
            continue
        stub = nodes[0]
        fmt = g.formats[g.candidates[0]]
        p = ctx.observers[g.id].compute_qparams(fmt)
        err = float((fmt.fake_quant(values[stub], p) - values[stub]).pow(2).sum())
        if err == 0.0:
            continue
        from_sensitivity = noise[g.id][g.candidates[0]] * signal / err
        assert from_sensitivity == pytest.approx(weights[stub.args[0].name], rel=1e-4)
        checked += 1
    assert checked >= 3


# -- on a trained network -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return train_digits()


def _compile(trained, reconstruction, target=W4_SPEC, passes=None):
    with deterministic_torch():
        return qcompiler.qcompile(trained.model, trained.calib[:1], target=str(target),
                                  calib_data=list(trained.calib.split(64)), progress=False,
                                  reconstruction=reconstruction, passes=passes)


def _assert_reference_is_bit_exact(compiled, x) -> None:
    """The reference backend's output codes equal the simulation's on `x`."""
    ref = compiled.lower("reference")
    out_q = next(n for n in compiled.simulated.graph.nodes if n.op == "output").args[0]
    q = compiled.simulated.get_submodule(out_q.target)
    with torch.no_grad():
        assert torch.equal(ref.codes(x), q.fmt.quantize(compiled(x), q.params))


# Everything learned, from round-to-nearest: rounding, activation steps, biases, EPTQ's loss.
LEARNED = dict(start="nearest", steps=600, loss="hessian", learn_scales=True, learn_bias=True)


def test_block_reconstruction_recovers_4bit_accuracy(digits):
    """W4A8 everywhere on the trained digits network, on the held-out digits (measured): round-to-
    nearest 17.5 dB, per-layer AdaRound 25.6 dB, block reconstruction from nearest with
    everything learned 26.3 dB, model 24.4 dB."""
    nearest = _compile(digits, "layer", passes=[p for p in DEFAULT_PASSES if p != "optimize_rounding"])
    block = _compile(digits, ReconstructionConfig(granularity="block", **LEARNED))
    f = run(digits.model, digits.heldout)
    a_near, a_block = agreement(f, run(nearest.simulated, digits.heldout)), agreement(f, run(block.simulated, digits.heldout))
    assert a_block.sqnr_db >= a_near.sqnr_db + 6.0, (a_near, a_block)
    assert a_block.top1_agreement >= 0.98
    results = block._run.ctx.reconstruction
    assert results and all(r.loss <= r.nearest_loss for r in results)
    assert any(not r.kept_nearest for r in results)


def test_reconstructed_rounding_ends_hard_and_lowers_bit_exact(digits):
    compiled = _compile(digits, ReconstructionConfig(granularity="model", **LEARNED))
    results = compiled._run.ctx.reconstruction
    assert len(results) == 1 and results[0].weights > 5000
    assert sum(r.undecided for r in results) == 0, [(r.block, r.undecided) for r in results]
    # Every weight is on the plan's grid, and the reference backend is bit-exact with the simulation.
    _assert_reference_is_bit_exact(compiled, digits.heldout[:64])


def test_reconstruction_is_deterministic(digits):
    cfg = ReconstructionConfig(granularity="block", **{**LEARNED, "steps": 50}, qdrop=0.5)
    a, b = _compile(digits, cfg), _compile(digits, cfg)
    for (na, ta), (nb, tb) in zip(a.simulated.state_dict().items(), b.simulated.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na
    assert [g.describe() for g in a.plan.groups] == [g.describe() for g in b.plan.groups]


def test_pow2_targets_keep_power_of_two_steps(digits):
    compiled = _compile(digits, ReconstructionConfig(granularity="block", **{**LEARNED, "steps": 100}),
                        target="dsp-fixed-point")
    assert sum(r.steps_learned for r in compiled._run.ctx.reconstruction) > 0
    for g in compiled.plan.groups:
        if g.kind == "activation" and g.params is not None:
            s = g.params.scale.reshape(-1)
            assert torch.equal(torch.exp2(torch.round(torch.log2(s))), s), g.id


def test_learned_weight_scales_and_a_layer_start_lower_bit_exact_and_never_lose_to_layer(digits):
    """start="layer": per-layer AdaRound first, blocks refine it and are kept only where they beat
    it; learned weight scales move into the plan so every weight stays a code times its scale."""
    cfg = ReconstructionConfig(granularity="block", steps=100, start="layer", learn_weight_scales=True)
    layer, refined = _compile(digits, "layer"), _compile(digits, cfg)
    results = refined._run.ctx.reconstruction
    # "nearest" is the layer result here: a block is installed only where it beats it.
    assert all(r.loss < r.nearest_loss for r in results if not r.kept_nearest)
    assert all(r.changed == 0 for r in results if r.kept_nearest)
    before = {g.id: g.params.scale for g in layer.plan.groups if g.kind == "weight" and g.params is not None}
    moved = [g.id for g in refined.plan.groups if g.id in before and not torch.equal(g.params.scale, before[g.id])]
    kept = [r for r in results if not r.kept_nearest]
    assert bool(moved) == bool(kept)
    for g in refined.plan.groups:
        if g.id in before:
            node = next(n for n in refined.simulated.graph.nodes if n.meta.get("weight_group") == g.id)
            w = refined.simulated.get_submodule(node.target).weight.detach()
            shape = (-1,) + (1,) * (w.dim() - 1) if g.params.scale.dim() else ()
            codes = w / g.params.scale.reshape(shape)
            assert torch.allclose(codes, codes.round(), atol=1e-4), g.id
    _assert_reference_is_bit_exact(refined, digits.heldout[:64])
