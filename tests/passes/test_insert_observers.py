"""Tests of passes/insert_observers.py: one stub per quantized tensor, one observer per group.

The places are checked against the architecture itself (which tensors of a ResNet-18 leave a
kernel on npu-int8), not only against `ctx.groups`.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import fx, nn

import qcompiler
from qcompiler import CompileContext, CompileOptions, PassManager, QCompileError
from qcompiler.observers import HistogramObserver, MinMaxObserver, MSEObserver, PercentileObserver
from qcompiler.fx_util import snapshot
from qcompiler.passes.insert_observers import insert_observers
from qcompiler.quantizers import ObserverStub
from qcompiler.targets.spec import BUILTIN_DIR, loads_target

sys.path.insert(0, str(Path(__file__).parent))
from mp_models import Branches  # noqa: E402

GROUPED = ["capture", "canonicalize", "fold_bn", "fuse", "group_quantizers"]


@functools.lru_cache(maxsize=None)
def _grouped_resnet18() -> tuple[fx.GraphModule, CompileContext, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    run = PassManager(GROUPED).run(model, x[:1], target=qcompiler.load_target("npu-int8"), progress=False)
    return run.gm, run.ctx, x


def _observe(gm: fx.GraphModule, ctx: CompileContext, observer=None) -> tuple[fx.GraphModule, CompileContext]:
    """insert_observers on a copy, so the cached grouped graph stays as it was."""
    ctx = CompileContext(model=ctx.model, example_inputs=ctx.example_inputs, target=ctx.target,
                         groups=ctx.groups, options=CompileOptions(observer=observer))
    return insert_observers(snapshot(gm), ctx), ctx


def _stubs(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ObserverStub)]


def test_resnet18_stubs_sit_after_every_tensor_that_leaves_a_kernel():
    gm, ctx, x = _grouped_resnet18()
    observed, octx = _observe(gm, ctx)
    stubs = _stubs(observed)
    # By the architecture: the input, the stem's ReLU and the max-pool after it, per basic block
    # the ReLU after its first conv and the ReLU after the residual add, the three downsample
    # convs (they feed an add outside their kernel), the average pool, the flatten and the logits.
    expected = 1 + 2 + 8 * 2 + 3 + 3
    assert len(stubs) == expected
    by_input = {s.args[0].name: s for s in stubs}
    assert len(by_input) == expected  # one stub per tensor
    kinds = sorted(s.args[0].meta["op_kind"] for s in stubs)
    assert kinds == sorted(["placeholder", "max_pool", "adaptive_avg_pool", "flatten", "linear"]
                           + ["relu"] * 17 + ["conv"] * 3)
    for stub in stubs:
        src = stub.args[0]
        assert stub.target == f"qobs_{src.name}" and len(stub.args) == 1
        assert "fused_into" not in src.meta            # never inside a fused kernel
        assert list(src.users) == [stub]               # every reader of the tensor reads the stub
        assert stub.meta["quantizes"] == src.name and stub.meta["group"] == src.meta["group"]
        assert stub.meta["shape"] == src.meta["shape"] and stub.meta["op_kind"] == "quantize"
    # The stubs are identities: the observed graph computes what the float graph computes.
    torch.testing.assert_close(observed(x), gm(x), rtol=0, atol=0)


def test_one_observer_per_group_shared_by_its_stubs_and_none_for_weights():
    gm, ctx, _ = _grouped_resnet18()
    observed, octx = _observe(gm, ctx)
    activation = [g for g in ctx.groups if g.kind == "activation" and not g.fallback]
    assert set(octx.observers) == {g.id for g in activation}
    assert len({id(o) for o in octx.observers.values()}) == len(activation)
    modules = {s.target: observed.get_submodule(s.target) for s in _stubs(observed)}
    for g in activation:
        members = [modules[f"qobs_{t}"] for t in g.tensors]
        assert all(m.group == g.id and m.observer is octx.observers[g.id] for m in members)
    # The max-pool and the flatten pass their input's quantizer through: 2 groups of 2 stubs.
    assert sorted(len(g.tensors) for g in activation).count(2) == 2
    assert len(modules) == sum(len(g.tensors) for g in activation)
    # Weights get no stub: convert quantizes them from the tensor itself.
    weight_names = {w for g in ctx.groups if g.kind == "weight" for w in g.weights}
    assert len(weight_names) == 21
    assert not any(s.args[0].op == "get_attr" for s in _stubs(observed))


def test_a_shared_scale_group_feeds_one_observer_from_all_its_tensors():
    model = Branches().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    run = PassManager(GROUPED + ["insert_observers"]).run(model, x, target=qcompiler.load_target("npu-int8"),
                                                          observer="minmax")
    gm = run.gm
    shared = [g for g in run.ctx.groups if len(g.tensors) > 1]
    assert len(shared) == 1 and [n.split("_")[0] for n in shared[0].tensors] == ["relu", "relu", "cat", "max"]
    observer = run.ctx.observers[shared[0].id]
    assert observer.batches == 0
    gm(x)
    assert observer.batches == 4  # one update per member tensor
    # Its range covers every member: the union of both ReLU outputs, the concat and the pool.
    with torch.no_grad():
        a, b = torch.relu(model.a(x)), torch.relu(model.b(x))
    lo, hi = observer.compute_range()
    assert float(lo) == 0.0 and float(hi) == float(torch.maximum(a.max(), b.max()))


def test_observer_choice_by_name_node_kind_default_and_spec():
    gm, ctx, _ = _grouped_resnet18()
    by_tensor = {}
    for g in ctx.groups:
        for t in g.tensors:
            by_tensor[t] = g
    _, octx = _observe(gm, ctx, observer="percentile")
    assert all(type(o) is PercentileObserver for o in octx.observers.values())
    # A dict: a node name beats an op kind, which beats "default".
    _, octx = _observe(gm, ctx, observer={"x": "histogram", "relu": "mse", "default": "minmax"})
    kinds = {gid: type(o) for gid, o in octx.observers.items()}
    assert kinds[by_tensor["x"].id] is HistogramObserver
    relu_groups = {g.id for g in ctx.groups if g.kind == "activation" and g.op_kind == "relu"}
    assert relu_groups and all(kinds[gid] is MSEObserver for gid in relu_groups)
    rest = set(kinds) - relu_groups - {by_tensor["x"].id}
    assert rest and all(kinds[gid] is MinMaxObserver for gid in rest)
    # No choice: the spec's observer (npu-int8 says minmax).
    assert ctx.target.observer == "minmax"
    _, octx = _observe(gm, ctx)
    assert all(type(o) is MinMaxObserver for o in octx.observers.values())


@pytest.mark.parametrize("choice,message", [
    ("minmx", "unknown observer 'minmx'; known observers: minmax"),
    ({"default": "kl"}, "unknown observer 'kl'"),
    (3, "observer must be a name or a dict of names, got int"),
])
def test_bad_observer_choice_is_a_clear_error(choice, message):
    gm, ctx, _ = _grouped_resnet18()
    with pytest.raises(QCompileError, match=message):
        _observe(gm, ctx, observer=choice)


def test_a_group_that_falls_back_to_float_gets_no_observer():
    # The sigmoid writes 16-bit codes but the conv after it reads 8-bit ones: no common format,
    # and npu-int8 runs such tensors in float on the host.
    text = (BUILTIN_DIR / "npu-int8.toml").read_text()
    text = text.replace("[formats.a8]", '[formats.a16]\ntype = "int"\nbits = 16\nsymmetric = false\n\n[formats.a8]')
    text = text.replace('sigmoid = { inputs = ["a8"] }', 'sigmoid = { inputs = ["a8"], outputs = ["a16"] }')
    spec = loads_target(text, "npu-int8 variant")
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sigmoid(), nn.Conv2d(4, 2, 1)).eval()
    run = PassManager(GROUPED + ["insert_observers"]).run(model, torch.randn(1, 3, 4, 4), target=spec)
    fallback = [g for g in run.ctx.groups if g.fallback]
    assert [g.tensors for g in fallback] == [("_1",)]  # the sigmoid's output
    assert fallback[0].id not in run.ctx.observers
    assert sorted(s.target for s in _stubs(run.gm)) == ["qobs__0", "qobs__2", "qobs_input_1"]
