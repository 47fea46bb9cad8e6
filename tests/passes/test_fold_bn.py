"""Tests of passes/fold_bn.py and qcompiler/layers.py: BatchNorm folding and the Affine fallback.

Every BatchNorm gets random running statistics and affine parameters: with the default
(mean 0, var 1, gamma 1, beta 0) a BatchNorm is nearly the identity and wrong folds go unseen.
Errors are measured as max |folded - reference| / max |reference| over the output.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

import qcompiler
from qcompiler.context import CompileContext
from qcompiler.layers import Affine
from qcompiler.pass_manager import PassManager
from qcompiler.passes.canonicalize import canonicalize
from qcompiler.passes.fold_bn import fold_bn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(c, generator=g) * 4 - 2)
                    m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) * 2 - 1)  # includes negative gammas
                    m.bias.copy_(torch.rand(c, generator=g) * 2 - 1)
    return model


def pipeline(model: nn.Module, *inputs: torch.Tensor) -> tuple[fx.GraphModule, CompileContext]:
    """capture -> canonicalize -> fold_bn, as the compiler runs them."""
    ctx = CompileContext(model=model, example_inputs=inputs)
    gm = canonicalize(qcompiler.capture(model, inputs), ctx)
    return fold_bn(gm, ctx), ctx


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


def cloned_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} of the user's model changed"


def batch_norm_left(gm: fx.GraphModule) -> list[str]:
    """BatchNorm nodes (module or functional) and BatchNorm modules still in `gm`."""
    nodes = [n.name for n in gm.graph.nodes
             if n.target is F.batch_norm or n.meta.get("op_kind") == "batch_norm"
             or (n.op == "call_module" and isinstance(gm.get_submodule(n.target), _BatchNorm))]
    modules = [f"module {name}" for name, m in gm.named_modules() if isinstance(m, _BatchNorm)]
    return nodes + modules


class ProducerBN(nn.Module):
    def __init__(self, producer: nn.Module, bn: nn.Module):
        super().__init__()
        self.producer, self.bn = producer, bn

    def forward(self, x):
        # No activation after the BatchNorm: a ReLU could zero a whole output and hide errors.
        return self.bn(self.producer(x))


FOLD_CASES = {
    "conv1d": (nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), (2, 3, 17)),
    "conv1d_nobias_stride": (nn.Conv1d(3, 8, 5, stride=2, bias=False), nn.BatchNorm1d(8), (2, 3, 20)),
    "conv2d": (nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), (2, 3, 9, 9)),
    "conv2d_nobias": (nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), (2, 3, 9, 9)),
    "conv2d_grouped": (nn.Conv2d(6, 12, 3, groups=3, bias=False), nn.BatchNorm2d(12), (2, 6, 8, 8)),
    "conv2d_depthwise": (nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), (2, 8, 7, 7)),
    "conv2d_depthwise_multiplier": (nn.Conv2d(4, 8, 3, groups=4, bias=False), nn.BatchNorm2d(8), (1, 4, 7, 7)),
    "conv3d": (nn.Conv3d(3, 6, 3, padding=1), nn.BatchNorm3d(6), (1, 3, 5, 6, 7)),
    "conv3d_nobias_grouped": (nn.Conv3d(4, 6, 2, groups=2, bias=False), nn.BatchNorm3d(6), (1, 4, 5, 5, 5)),
    "convT1d": (nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d(6), (2, 4, 9)),
    "convT1d_grouped_nobias": (nn.ConvTranspose1d(4, 6, 4, stride=3, output_padding=1, groups=2, bias=False),
                               nn.BatchNorm1d(6), (2, 4, 9)),
    "convT2d": (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(6), (1, 4, 6, 6)),
    "convT2d_grouped_nobias": (nn.ConvTranspose2d(6, 9, 3, stride=2, output_padding=1, groups=3, bias=False),
                               nn.BatchNorm2d(9), (1, 6, 5, 5)),
    "convT2d_depthwise": (nn.ConvTranspose2d(5, 5, 2, stride=2, groups=5), nn.BatchNorm2d(5), (1, 5, 4, 4)),
    "convT3d": (nn.ConvTranspose3d(2, 4, 2, stride=2, groups=2), nn.BatchNorm3d(4), (1, 2, 3, 3, 3)),
    "linear": (nn.Linear(10, 7), nn.BatchNorm1d(7), (5, 10)),
    "linear_nobias": (nn.Linear(10, 7, bias=False), nn.BatchNorm1d(7), (5, 10)),
    "affine_false": (nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, affine=False), (2, 3, 6, 6)),
    "affine_false_linear": (nn.Linear(6, 4), nn.BatchNorm1d(4, affine=False), (3, 6)),
    "eps": (nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5, eps=0.3), (2, 3, 4, 4)),
}


@pytest.mark.parametrize("case", sorted(FOLD_CASES))
def test_batch_norm_folds_into_its_producer_with_equal_output(case):
    producer, bn, shape = FOLD_CASES[case]
    torch.manual_seed(1)
    model = randomize_bn(ProducerBN(copy.deepcopy(producer), copy.deepcopy(bn)), seed=len(case)).eval()
    before = cloned_state(model)
    x = torch.randn(shape)
    gm, ctx = pipeline(model, x)

    assert batch_norm_left(gm) == []
    assert rel_err(gm(x), model(x)) <= 1e-5
    assert_state_unchanged(model, before)
    # The producer node carries the folded module, with a bias, and its facts stay consistent.
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    folded = gm.get_submodule(node.target)
    assert type(folded) is type(model.producer) and folded is not model.producer
    assert folded.bias is not None and folded.weight.dtype == torch.float32
    assert node.meta["params"] == sum(p.numel() for p in folded.parameters())
    assert node.meta["op_kind"] in ("conv", "depthwise_conv", "conv_transpose", "linear")
    assert node.meta["shape"] == tuple(model(x).shape)
    assert not any("not folded" in note for note in ctx.notes.get("fold_bn", []))


def test_folded_weights_match_a_hand_computed_case():
    # conv: w = 2, b = 1; bn: mean 1, var 3, eps 1, gamma 3, beta 0.5 -> s = 3 / 2 = 1.5,
    # w' = 3, b' = (1 - 1) * 1.5 + 0.5 = 0.5; second channel: w = -1, no-op bn -> unchanged.
    conv = nn.Conv2d(1, 2, 1)
    bn = nn.BatchNorm2d(2, eps=1.0)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
        conv.bias.copy_(torch.tensor([1.0, 0.25]))
        bn.running_mean.copy_(torch.tensor([1.0, 0.0]))
        bn.running_var.copy_(torch.tensor([3.0, 0.0]))
        bn.weight.copy_(torch.tensor([3.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.5, 0.0]))
    model = ProducerBN(conv, bn).eval()
    gm, _ = pipeline(model, torch.randn(1, 1, 2, 2))
    folded = gm.get_submodule("producer")
    assert folded.weight.flatten().tolist() == [3.0, -1.0]
    assert folded.bias.tolist() == [0.5, 0.25]


def test_conv_transpose_fold_matches_hand_computed_grouped_case():
    # groups=2, in=2, out=4: weight [2, 2, 1]; output channel 2g + j comes from weight[g, j].
    conv = nn.ConvTranspose1d(2, 4, 1, groups=2, bias=False)
    bn = nn.BatchNorm1d(4, eps=0.0)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]]))
        bn.running_mean.zero_()
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 16.0, 64.0]))  # s = 1, 1/2, 1/4, 1/8
        bn.weight.fill_(1.0)
        bn.bias.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    gm, _ = pipeline(ProducerBN(conv, bn).eval(), torch.randn(1, 2, 3))
    folded = gm.get_submodule("producer")
    assert folded.weight.flatten().tolist() == [1.0, 1.0, 0.75, 0.5]
    assert folded.bias.tolist() == [0.0, 1.0, 2.0, 3.0]


@settings(max_examples=25, deadline=None)
@given(
    groups=st.sampled_from([1, 2, 4]), per_group_in=st.integers(1, 3), per_group_out=st.integers(1, 3),
    k=st.integers(1, 3), stride=st.integers(1, 2), transpose=st.booleans(), bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fold_property_random_conv_configurations(groups, per_group_in, per_group_out, k, stride,
                                                   transpose, bias, seed):
    torch.manual_seed(seed)
    cin, cout = groups * per_group_in, groups * per_group_out
    if transpose:
        conv = nn.ConvTranspose2d(cin, cout, k, stride=stride, groups=groups, bias=bias,
                                  output_padding=stride - 1)
    else:
        conv = nn.Conv2d(cin, cout, k, stride=stride, groups=groups, bias=bias)
    model = randomize_bn(ProducerBN(conv, nn.BatchNorm2d(cout)), seed).eval()
    x = torch.randn(2, cin, 6, 5)
    gm = fx.symbolic_trace(model)  # no facts at all: BatchNorm2d alone says the rank is 4
    out = fold_bn(gm, CompileContext(model=model, example_inputs=(x,)))
    assert batch_norm_left(out) == []
    assert rel_err(out(x), model(x)) <= 1e-5


class SecondUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + torch.sigmoid(y)


def test_batch_norm_whose_producer_has_another_user_becomes_affine_with_a_note():
    model = randomize_bn(SecondUser(), 3).eval()
    before = cloned_state(model)
    x = torch.randn(2, 3, 6, 6)
    gm, ctx = pipeline(model, x)
    assert batch_norm_left(gm) == []
    assert rel_err(gm(x), model(x)) <= 1e-5
    assert_state_unchanged(model, before)
    # The conv keeps the user's weight tensor: the sigmoid branch must see the unscaled output.
    assert gm.get_submodule("conv").weight is model.conv.weight
    (affine_node,) = [n for n in gm.graph.nodes if n.meta.get("op_kind") == "affine"]
    assert isinstance(gm.get_submodule(affine_node.target), Affine)
    assert affine_node.meta["shape"] == (2, 4, 6, 6) and affine_node.meta["params"] == 8
    notes = " ".join(ctx.notes["fold_bn"])
    assert "'bn'" in notes and "'conv'" in notes and "'sigmoid'" in notes and "also used" in notes


class BNOnInputAndAfterAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn_add = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn_in(x)
        return self.bn_add(self.conv(y) + y)


def test_batch_norm_on_the_input_and_after_an_add_become_affine():
    model = randomize_bn(BNOnInputAndAfterAdd(), 4).eval()
    x = torch.randn(2, 3, 5, 5)
    gm, ctx = pipeline(model, x)
    assert batch_norm_left(gm) == []
    assert rel_err(gm(x), model(x)) <= 1e-5
    affines = {n.target for n in gm.graph.nodes if n.meta.get("op_kind") == "affine"}
    assert affines == {"bn_in", "bn_add"}  # the user's names survive
    for name in affines:
        a, bn = gm.get_submodule(name), getattr(model, name)
        # An independent reference: the eval BatchNorm itself on a random tensor.
        t = torch.randn(3, 3, 2, 2)
        assert rel_err(a(t), bn(t)) <= 1e-6
    assert len([n for n in ctx.notes["fold_bn"] if "affine" in n and "not folded" in n]) == 2


def test_linear_on_rank3_input_is_not_folded_because_channels_are_not_features():
    # Linear(5 -> 4) on [N, 4, 5]: BatchNorm1d(4) normalises dim 1 (length 4), not the features.
    model = randomize_bn(ProducerBN(nn.Linear(5, 4), nn.BatchNorm1d(4)), 5).eval()
    x = torch.randn(2, 4, 5)
    gm, ctx = pipeline(model, x)
    assert batch_norm_left(gm) == []
    assert rel_err(gm(x), model(x)) <= 1e-5
    assert gm.get_submodule("producer").weight is model.producer.weight
    assert any("rank" in n for n in ctx.notes["fold_bn"])


def test_linear_without_recorded_shapes_is_not_folded_blindly():
    model = randomize_bn(ProducerBN(nn.Linear(6, 3), nn.BatchNorm1d(3)), 6).eval()
    x = torch.randn(4, 6)
    ctx = CompileContext(model=model, example_inputs=(x,))
    gm = fold_bn(fx.symbolic_trace(model), ctx)
    assert batch_norm_left(gm) == []
    assert rel_err(gm(x), model(x)) <= 1e-5
    assert any("unknown (run capture first)" in n for n in ctx.notes["fold_bn"])


def test_running_stats_free_batch_norm_is_left_and_reported():
    model = ProducerBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    randomize_bn(model, 7).eval()
    x = torch.randn(3, 3, 6, 6)
    gm, ctx = pipeline(model, x)
    assert batch_norm_left(gm) == ["bn", "module bn"]
    assert rel_err(gm(x), model(x)) <= 1e-6
    assert any("track_running_stats=False" in n for n in ctx.notes["fold_bn"])


def test_training_mode_batch_norm_is_folded_with_running_statistics_and_user_model_untouched():
    model = randomize_bn(ProducerBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 8).train()
    before = cloned_state(model)
    x = torch.randn(4, 3, 6, 6)
    gm, ctx = pipeline(model, x)
    assert not gm.training and model.training and model.bn.training
    assert_state_unchanged(model, before)
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(x)
    assert rel_err(gm(x), ref) <= 1e-5
    assert any("training mode" in n for n in ctx.notes["fold_bn"])


class SharedConv(nn.Module):
    """One conv module called twice; only the first call is followed by a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) - self.conv(x * 2)


def test_shared_conv_module_gets_a_new_module_for_the_folded_call_only():
    model = randomize_bn(SharedConv(), 9).eval()
    x = torch.randn(1, 3, 5, 5)
    gm, _ = pipeline(model, x)
    assert batch_norm_left(gm) == []
    assert rel_err(gm(x), model(x)) <= 1e-5
    targets = sorted(n.target for n in gm.graph.nodes if n.op == "call_module")
    assert targets == ["conv", "conv_bnfold"]
    assert gm.get_submodule("conv").weight is model.conv.weight


class WeightsReadElsewhere(nn.Module):
    """The conv's weight and the second BatchNorm's weight are also read as tensors in forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.bn_add = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn(self.conv(x)) + self.conv.weight.sum()
        return self.bn_add(y + 1) * self.bn_add.weight.sum()


def test_modules_whose_tensors_are_read_elsewhere_are_replaced_under_fresh_names():
    model = randomize_bn(WeightsReadElsewhere(), 17).eval()
    x = torch.randn(2, 3, 4, 4)
    gm, _ = pipeline(model, x)
    # No BatchNorm runs; bn_add stays only as the holder of the weight that forward reads.
    assert batch_norm_left(gm) == ["module bn_add"]
    assert rel_err(gm(x), model(x)) <= 1e-5
    calls = sorted(n.target for n in gm.graph.nodes if n.op == "call_module")
    assert calls == ["bn_add_affine", "conv_bnfold"]
    # The get_attr reads still find the user's tensors.
    assert gm.get_submodule("conv").weight is model.conv.weight
    assert gm.get_submodule("bn_add").weight is model.bn_add.weight


class ChainedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.bn2 = nn.BatchNorm1d(6, affine=False)

    def forward(self, x):
        return self.bn2(self.bn1(self.fc(x)))


def test_two_batch_norms_in_a_row_both_fold():
    model = randomize_bn(ChainedBN(), 10).eval()
    x = torch.randn(3, 5)
    gm, _ = pipeline(model, x)
    assert batch_norm_left(gm) == []
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    assert rel_err(gm(x), model(x)) <= 1e-5


class FunctionalBN(nn.Module):
    def __init__(self, training: bool = False):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.bn = nn.BatchNorm1d(4)  # only holds the tensors; called functionally
        self.training_flag = training

    def forward(self, x, var):
        # Statistics read from attributes: folds into the conv (or is left if training=True).
        y = F.batch_norm(self.conv(x), self.bn.running_mean, self.bn.running_var,
                         self.bn.weight, self.bn.bias, self.training_flag, 0.1, self.bn.eps)
        # Sliced when traced, so the statistics become constant attributes: an affine.
        z = F.batch_norm(x, self.bn.running_mean[:2], self.bn.running_var[:2], training=False)
        # A variance that is a graph input cannot be folded into anything: left and reported.
        u = F.batch_norm(x, self.bn.running_mean[2:], var, training=False)
        return y.sum(dim=1, keepdim=True) + z[:, :1, 2:] - u[:, 1:, 2:]


def test_functional_batch_norm_folds_becomes_affine_or_is_left_by_where_its_statistics_come_from():
    model = randomize_bn(FunctionalBN(), 11).eval()
    before = cloned_state(model)
    x, var = torch.randn(2, 2, 7), torch.rand(2) + 0.5
    gm, ctx = pipeline(model, x, var)
    assert batch_norm_left(gm) == ["batch_norm_2"]
    assert gm.get_submodule("conv").weight is not model.conv.weight
    assert [n.meta["op_kind"] for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "affine"]
    assert not any(n.op == "get_attr" and not n.users for n in gm.graph.nodes)
    assert rel_err(gm(x, var), model(x, var)) <= 1e-5
    assert_state_unchanged(model, before)
    notes = ctx.notes["fold_bn"]
    assert any("'batch_norm_2'" in n and "running_var is not an attribute" in n for n in notes)
    assert any("'batch_norm_1'" in n and "affine" in n for n in notes)


def test_functional_batch_norm_in_training_mode_is_left_and_reported():
    model = randomize_bn(FunctionalBN(training=True), 12).eval()
    ctx = CompileContext(model=model, example_inputs=())
    gm = fold_bn(fx.symbolic_trace(model), ctx)
    assert batch_norm_left(gm) == ["batch_norm", "batch_norm_2"]
    assert any("'batch_norm'" in n and "training=True" in n for n in ctx.notes["fold_bn"])


def test_input_graph_and_earlier_pipeline_snapshots_are_not_modified():
    model = randomize_bn(ProducerBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 13).eval()
    x = torch.randn(1, 3, 6, 6)
    run = PassManager(["capture", "canonicalize", "fold_bn"]).run(model, x)
    captured = run.graph("canonicalize")
    assert any(isinstance(m, nn.BatchNorm2d) for m in captured.modules())
    assert captured.get_submodule("producer").weight is model.producer.weight
    assert rel_err(captured(x), model(x)) <= 1e-6
    assert batch_norm_left(run.graph("fold_bn")) == []
    assert rel_err(run.gm(x), model(x)) <= 1e-5


def test_affine_matches_eval_batch_norm_for_every_rank_and_rejects_bad_shapes():
    g = torch.Generator().manual_seed(14)
    scale, shift = torch.randn(5, generator=g), torch.randn(5, generator=g)
    a = Affine(scale, shift)
    for shape in [(3, 5), (3, 5, 4), (2, 5, 3, 3), (1, 5, 2, 2, 2)]:
        x = torch.randn(shape, generator=g)
        ref = F.batch_norm(x, torch.zeros(5), torch.ones(5), scale, shift, training=False, eps=0.0)
        torch.testing.assert_close(a(x), ref)
    assert torch.equal(Affine(scale, shift, channel_dim=2)(torch.ones(1, 1, 5)).flatten(), scale + shift)
    with pytest.raises(ValueError, match="channels at dim 1"):
        a(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="same length"):
        Affine(scale, shift[:3])


def _randomized_torchvision(name: str) -> nn.Module:
    model = getattr(torchvision.models, name)(weights=None)
    return randomize_bn(model, seed=15).eval()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_fold_completely(name):
    torch.manual_seed(16)
    model = _randomized_torchvision(name)
    before = cloned_state(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        gm, ctx = pipeline(model, x)
        got = gm(x)
    assert batch_norm_left(gm) == []
    assert not any(n.meta.get("op_kind") == "affine" for n in gm.graph.nodes)
    assert rel_err(got, ref) <= 1e-4
    assert_state_unchanged(model, before)
    bn_count = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert ctx.notes["fold_bn"] == [f"folded {bn_count} BatchNorm(s); 0 became per-channel affine; 0 left as BatchNorm"]


class ConvNorm(nn.Sequential):
    """timm's ConvNorm: a Sequential of a conv and its BatchNorm."""

    def __init__(self, cin: int, cout: int, k: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)


class WindowedMixer(nn.Module):
    """Branches on the input size, as timm's LocalWindowAttention does: torch.fx cannot trace it,
    so capture keeps it as an opaque leaf whose forward runs its ConvNorms unseen by the graph."""

    def __init__(self, c: int):
        super().__init__()
        self.qkv = ConvNorm(c, c)
        self.proj = ConvNorm(c, c, 3)

    def forward(self, x):
        if x.shape[-1] > 4:
            x = x * 0.5
        return self.proj(torch.relu(self.qkv(x)))


class StemAndLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvNorm(3, 4, 3)
        self.mixer = WindowedMixer(4)

    def forward(self, x):
        y = self.stem(x)
        return y + self.mixer(y)


@pytest.mark.parametrize("how", ["opaque", "leaf_modules"])
def test_batch_norms_inside_a_leaf_module_stay_in_it_and_the_output_is_exact(how):
    # Deleting the "unused" BatchNorms of the leaf left its Sequentials running the bare convs:
    # 37 % of the output range on timm's efficientvit_m5.
    model = randomize_bn(StemAndLeaf(), 18).eval()
    x = torch.randn(2, 3, 6, 6)
    ctx = CompileContext(model=model, example_inputs=(x,))
    leaves = [WindowedMixer] if how == "leaf_modules" else []
    captured = qcompiler.capture(model, (x,), leaf_modules=leaves)
    assert ("mixer" in captured.meta["opaque_modules"]) == (how == "opaque")
    gm = fold_bn(canonicalize(captured, ctx), ctx)
    assert rel_err(gm(x), model(x)) <= 1e-5
    # The graph's own BatchNorm is folded; the leaf's two are still inside it, with their tensors.
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["stem.conv", "mixer"]
    for path in ("mixer.qkv.bn", "mixer.proj.bn"):
        bn = gm.get_submodule(path)
        assert isinstance(bn, nn.BatchNorm2d) and bn.running_var is model.get_submodule(path).running_var
    assert gm.get_submodule("mixer.proj.conv").weight is model.mixer.proj.conv.weight
    assert any("2 BatchNorm(s) inside leaf modules ('mixer.qkv.bn', 'mixer.proj.bn')" in n
               for n in ctx.notes["fold_bn"])


class LeafConvCalledDirectly(nn.Module):
    """The conv of a ConvNorm leaf is also called by the graph, followed by a BatchNorm of its own."""

    def __init__(self):
        super().__init__()
        self.block = ConvNorm(3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.block.conv(x)) - self.block(x)


def test_conv_used_inside_a_leaf_is_folded_under_a_fresh_name_only():
    model = randomize_bn(LeafConvCalledDirectly(), 19).eval()
    x = torch.randn(2, 3, 4, 4)
    ctx = CompileContext(model=model, example_inputs=(x,))
    gm = fold_bn(canonicalize(qcompiler.capture(model, (x,), leaf_modules=["block"]), ctx), ctx)
    assert rel_err(gm(x), model(x)) <= 1e-5
    calls = sorted(n.target for n in gm.graph.nodes if n.op == "call_module")
    assert calls == ["block", "block_conv_bnfold"]  # not inside the Sequential the leaf runs
    # The leaf still runs the user's conv and BatchNorm.
    assert gm.get_submodule("block.conv").weight is model.block.conv.weight
    assert isinstance(gm.get_submodule("block.bn"), nn.BatchNorm2d)


class ShapeReadingBN(nn.Module):
    """timm's BatchNormAct2d asserts `x.ndim == 4`; the reshape reads the conv output's size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        torch._assert(y.ndim == 4, "expected a 4-d input")
        return self.bn(y).reshape(y.shape[0], y.size(1), -1) * y.dim()


def test_readers_of_the_producers_shape_do_not_block_the_fold():
    model = randomize_bn(ShapeReadingBN(), 20).eval()
    x = torch.randn(2, 3, 6, 6)
    gm, ctx = pipeline(model, x)
    assert batch_norm_left(gm) == []
    assert not any(n.meta.get("op_kind") == "affine" for n in gm.graph.nodes)
    assert gm.get_submodule("conv").weight is not model.conv.weight
    assert rel_err(gm(x), model(x)) <= 1e-5
    assert not any("not folded" in n for n in ctx.notes["fold_bn"])


def test_timm_efficientvit_whose_attention_is_an_opaque_leaf_stays_exact():
    # Its LocalWindowAttention branches on the input size: capture keeps it opaque, BatchNorms inside.
    torch.manual_seed(21)
    model = randomize_bn(timm.create_model("efficientvit_m5", pretrained=False), seed=21).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        gm, ctx = pipeline(model, x)
        got = gm(x)
    assert rel_err(got, ref) <= 1e-5
    inside = sum(isinstance(m, nn.BatchNorm2d) for n, m in model.named_modules() if ".mixer.m." in n)
    assert inside > 0 and len(batch_norm_left(gm)) == inside
    assert any(f"{inside} BatchNorm(s) inside leaf modules" in n for n in ctx.notes["fold_bn"])
