"""sensitivity: the cached, downstream-only SQNR measurement equals a direct measurement of the
model with one group quantized; the Hutchinson trace matches the exact Jacobian norm; the Hessian
estimate orders formats like the measurement does."""
from __future__ import annotations

import math

import pytest
import torch
from torch import fx, nn
from torch.func import functional_call

from mp_models import calib_batches, npu_a4_spec, small_net
from qcompiler.context import CompileContext
from qcompiler.options import CompileOptions
from qcompiler.pass_manager import PassManager
from qcompiler.sensitivity import hutchinson_traces, quantized_weights, rounded_weights
from qcompiler.quantizers import FakeQuantize, ObserverStub

PREFIX = ["capture", "canonicalize", "fold_bn", "fuse", "group_quantizers", "insert_observers", "calibrate"]


def _run(spec, method):
    batches = calib_batches()
    model = small_net()
    ctx = CompileContext(model=model, example_inputs=(batches[0][:1],), target=spec, calib_data=batches,
                         options=CompileOptions(progress=False, sensitivity=method))
    return PassManager(PREFIX + ["sensitivity"]).run(model, ctx=ctx)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    spec = npu_a4_spec(tmp_path_factory.mktemp("spec"))
    return {m: _run(spec, m) for m in ("sqnr", "hessian", "adaround")}


def _direct_noise(gm: fx.GraphModule, group, fmt_name: str, observers, batches, weights=None) -> float:
    """Quantize one group in a copy of the graph and run it whole: noise power / output power."""
    import copy

    q = copy.deepcopy(gm)
    for m in q.modules():
        if isinstance(m, ObserverStub):
            m.enabled = False
    fmt = group.formats[fmt_name]
    if group.kind == "weight":
        node = next(n for n in q.graph.nodes if n.name == group.owner)
        module = q.get_submodule(node.target)
        for local, w in (weights or quantized_weights(gm, group, fmt)).items():
            owner, _, leaf = local.rpartition(".")
            setattr(module.get_submodule(owner) if owner else module, leaf, nn.Parameter(w))
    else:
        params = observers[group.id].compute_qparams(fmt)
        for name, m in list(q.named_modules()):
            if isinstance(m, ObserverStub) and m.group == group.id:
                parent, _, leaf = name.rpartition(".")
                setattr(q.get_submodule(parent) if parent else q, leaf, FakeQuantize(group.id, fmt, params))
    noise = signal = 0.0
    with torch.no_grad():
        for (x,) in batches:
            ref, out = gm(x), q(x)
            noise += float((out - ref).pow(2).sum())
            signal += float(ref.pow(2).sum())
    return noise / signal


def test_sqnr_equals_direct_single_group_measurement(runs):
    run = runs["sqnr"]
    table = run.ctx.sensitivity
    assert table.method == "sqnr" and table.samples == 8
    groups = [g for g in run.ctx.groups if g.id in table.measured]
    kinds = {g.kind for g in groups}
    assert kinds == {"weight", "activation"}
    for m in run.gm.modules():
        if isinstance(m, ObserverStub):
            assert m.enabled  # switched back on after measuring
    for g in groups:
        for c in g.candidates:
            direct = _direct_noise(run.gm, g, c, run.ctx.observers, run.ctx.calib_batches)
            assert table.of(g.id, c) == pytest.approx(direct, rel=1e-4, abs=1e-12), (g.id, c)


def test_fewer_bits_more_noise(runs):
    for method, run in runs.items():
        table = run.ctx.sensitivity
        for g in run.ctx.groups:
            if g.id in table.measured:
                by_bits = sorted(g.candidates, key=lambda c: g.formats[c].bits)
                assert table.of(g.id, by_bits[0]) > table.of(g.id, by_bits[-1]) > 0, (method, g.id)


def test_adaround_candidates_stay_on_their_grid_and_fit_their_layer_no_worse_than_nearest(runs):
    from qcompiler.quantizers import weight_qparams

    run = runs["adaround"]
    gm, batches = run.gm, run.ctx.calib_batches
    groups = [g for g in run.ctx.groups if g.id in run.ctx.sensitivity.measured and g.kind == "weight"]
    rounded = rounded_weights(gm, groups, batches)
    assert {k for k in rounded} == {(g.id, c) for g in groups for c in g.candidates}
    changed = 0
    for g in groups:
        node = next(n for n in gm.graph.nodes if n.name == g.owner)
        module = gm.get_submodule(node.target)
        w = module.weight.detach()
        # The kernel's float inputs on the samples the rounding was fitted to.
        inputs = []
        hook = module.register_forward_hook(lambda m, a, o: inputs.append(a[0].detach()))
        stubs = [m for m in gm.modules() if isinstance(m, ObserverStub)]
        for m in stubs:
            m.enabled = False   # the observers must not see these batches twice
        with torch.no_grad():
            for (x,) in batches:
                gm(x)
        for m in stubs:
            m.enabled = True
        hook.remove()
        for c in g.candidates:
            fmt = g.formats[c]
            params = weight_qparams(fmt, w, 0)
            shape = (-1,) + (1,) * (w.dim() - 1) if fmt.granularity == "per_channel" else ()
            scale = params.scale.reshape(shape)
            zp = params.zero_point.reshape(shape).float() if params.zero_point is not None else 0.0
            codes = rounded[(g.id, c)]["weight"] / scale + zp
            assert torch.allclose(codes, codes.round(), atol=1e-3), (g.id, c)
            assert codes.round().min() >= fmt.qmin and codes.round().max() <= fmt.qmax
            exact = w / scale + zp
            assert bool(((codes.round() - torch.floor(exact)).abs() <= 1).all())   # floor or floor + 1
            nearest = quantized_weights(gm, g, fmt)["weight"]
            changed += int((nearest != rounded[(g.id, c)]["weight"]).sum())

            def err(q):
                with torch.no_grad():
                    return sum(float((functional_call(module, {"weight": q}, (x,)) - module(x)).pow(2).sum())
                               for x in inputs)
            assert err(rounded[(g.id, c)]["weight"]) <= err(nearest) * (1 + 1e-4), (g.id, c)
    assert changed > 0   # the rounding did something


def test_adaround_sensitivity_is_the_measured_noise_of_the_rounded_candidates(runs):
    run = runs["adaround"]
    table = run.ctx.sensitivity
    assert table.method == "adaround"
    groups = [g for g in run.ctx.groups if g.id in table.measured]
    rounded = rounded_weights(run.gm, [g for g in groups if g.kind == "weight"], run.ctx.calib_batches)
    for g in groups:
        for c in g.candidates:
            direct = _direct_noise(run.gm, g, c, run.ctx.observers, run.ctx.calib_batches, rounded.get((g.id, c)))
            assert table.of(g.id, c) == pytest.approx(direct, rel=1e-4, abs=1e-12), (g.id, c)


def test_hessian_ranks_groups_like_the_measurement(runs):
    """Spearman correlation of the 4-bit sensitivities of the two methods is clearly positive."""
    sq, he = runs["sqnr"].ctx.sensitivity, runs["hessian"].ctx.sensitivity
    keys = [(g.id, min(g.candidates, key=lambda c: g.formats[c].bits)) for g in runs["sqnr"].ctx.groups
            if g.id in sq.measured]
    a = torch.tensor([sq.of(*k) for k in keys]).argsort().argsort().float()
    b = torch.tensor([he.of(*k) for k in keys]).argsort().argsort().float()
    rho = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert rho > 0.5
    # and the estimate is an estimate of the same quantity: within an order of magnitude in total
    total_sq = sum(sq.of(*k) for k in keys)
    total_he = sum(he.of(*k) for k in keys)
    assert 0.1 < total_he / total_sq < 10


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(6, 5)
        self.l2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


def test_hutchinson_trace_matches_exact_jacobian_norm():
    torch.manual_seed(0)
    model = MLP().eval()
    gm = fx.symbolic_trace(model)
    nodes = {n.name: n for n in gm.graph.nodes}
    x = torch.randn(4, 6)
    probes = 4000
    traces, values, _ = hutchinson_traces(gm, (x,), [nodes["relu"], nodes["l1"]], probes,
                                          torch.Generator().manual_seed(0))
    w2 = model.l2.weight.detach()
    # d out / d relu = W2 for every sample: tr(J^T J) = batch * ||W2||_F^2
    exact_relu = x.shape[0] * float(w2.pow(2).sum())
    # d out / d l1 = W2 diag(l1 > 0): the columns of W2 where the unit is active
    mask = (values[nodes["l1"]] > 0).float()
    exact_l1 = float((w2.pow(2).sum(0) * mask).sum())
    assert traces[nodes["relu"]] == pytest.approx(exact_relu, rel=0.05)
    assert traces[nodes["l1"]] == pytest.approx(exact_l1, rel=0.05)
    # exact reference a second way: autograd Jacobian of the tail
    jac = torch.autograd.functional.jacobian(lambda h: model.l2(h), values[nodes["relu"]])
    assert float(jac.pow(2).sum()) == pytest.approx(exact_relu, rel=1e-5)


def test_unknown_method_is_refused(runs, tmp_path):
    from qcompiler import QCompileError, qcompile

    with pytest.raises(QCompileError, match="choose one of sqnr, hessian, adaround"):
        qcompile(small_net(), torch.randn(1, 3, 16, 16), target="npu-int4", budget={"weight_memory": 0.9},
                 sensitivity="fisher", progress=False)
