"""Tests of passes/fuse.py: the spec's fusion patterns, and only those, become kernels with no
quantizer inside.

The expected kernels of ResNet-18 and MobileNet-V2 are counted from the architectures (blocks,
activations, residual connections), not from the pass's own output.
"""
from __future__ import annotations

import collections
import functools

import pytest
import torch
import torchvision
from torch import fx, nn

import qcompiler
from qcompiler import CompileContext, PassManager
from qcompiler.fx_util import snapshot
from qcompiler.passes.fuse import fuse
from qcompiler.passes.group_quantizers import group_quantizers
from qcompiler.targets.spec import BUILTIN_DIR, loads_target

FOLDED = ["capture", "canonicalize", "fold_bn"]


@functools.lru_cache(maxsize=None)
def _folded_torchvision(name: str) -> fx.GraphModule:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().eval()
    return PassManager(FOLDED).run(model, torch.randn(1, 3, 64, 64)).gm


def _fused(gm: fx.GraphModule, spec) -> fx.GraphModule:
    gm = snapshot(gm)
    return fuse(gm, CompileContext(model=gm, example_inputs=(), target=spec))


def _kernels(gm: fx.GraphModule) -> collections.Counter:
    return collections.Counter(n.meta["fusion"] for n in gm.graph.nodes if "fusion" in n.meta)


def _folded(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    return PassManager(FOLDED).run(model.eval(), x).gm


def _chains_are_well_formed(gm: fx.GraphModule) -> None:
    """Each kernel is a chain of single-user nodes, annotated as fuse's docstring says."""
    nodes = {n.name: n for n in gm.graph.nodes}
    members = collections.defaultdict(list)
    for n in gm.graph.nodes:
        if "kernel" in n.meta:
            members[n.meta["kernel"]].append(n)
    assert set(members) == {n.name for n in gm.graph.nodes if "fusion" in n.meta}
    for first, chain in members.items():
        pattern = nodes[first].meta["fusion"]
        assert chain[0].name == first and [n.meta["op_kind"] for n in chain] == list(pattern)
        for a, b in zip(chain, chain[1:]):
            assert list(a.users) == [b] and a.meta["fused_into"] == chain[-1].name
        assert "fused_into" not in chain[-1].meta


def test_resnet18_fuses_every_conv_relu_and_every_residual_conv_add_relu():
    spec = qcompiler.load_target("npu-int8")
    gm = _fused(_folded_torchvision("resnet18"), spec)
    _chains_are_well_formed(gm)
    # 8 basic blocks: conv2 -> add -> relu (the longest pattern wins over conv -> add) and
    # conv1 -> relu; plus the stem's conv -> relu. The 3 downsample convs feed the add as its
    # second input, already taken: they stay alone, as does the classifier.
    assert _kernels(gm) == {("conv", "add", "relu"): 8, ("conv", "relu"): 9}
    alone = [n.target for n in gm.graph.nodes if n.meta.get("op_kind") in ("conv", "linear") and "kernel" not in n.meta]
    assert sorted(alone) == ["fc", "layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"]


def test_mobilenet_v2_fuses_relu6_after_every_conv_kind_and_the_residual_adds():
    spec = qcompiler.load_target("npu-int8")
    gm = _fused(_folded_torchvision("mobilenet_v2"), spec)
    _chains_are_well_formed(gm)
    model = torchvision.models.mobilenet_v2()
    blocks = [m for m in model.features if isinstance(m, torchvision.models.mobilenetv2.InvertedResidual)]
    residual = sum(b.use_res_connect for b in blocks)
    expanding = sum(len(b.conv) == 4 for b in blocks)       # 1x1 expand, depthwise, project, BN
    assert (len(blocks), residual, expanding) == (17, 10, 16)
    assert _kernels(gm) == {
        ("conv", "relu6"): 1 + expanding + 1,                 # stem, expansions, last 1x1 conv
        ("depthwise_conv", "relu6"): len(blocks),
        ("conv", "add"): residual,                            # projection conv into the skip add
    }
    # Every ReLU6 ends a kernel: no quantizer ever sits between a conv and its clamp.
    relu6 = [n for n in gm.graph.nodes if n.meta.get("op_kind") == "relu6"]
    assert len(relu6) == sum(isinstance(m, nn.ReLU6) for m in model.modules())
    assert all("kernel" in n.meta and "fused_into" not in n.meta for n in relu6)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_no_quantizer_inside_a_fused_kernel_and_one_at_its_end(name):
    spec = qcompiler.load_target("npu-int8")
    gm = _fused(_folded_torchvision(name), spec)
    ctx = CompileContext(model=gm, example_inputs=(), target=spec)
    gm = group_quantizers(gm, ctx)
    inside = [n for n in gm.graph.nodes if "fused_into" in n.meta]
    assert inside and all("group" not in n.meta for n in inside)
    ends = [n for n in gm.graph.nodes if "kernel" in n.meta and "fused_into" not in n.meta]
    assert ends and all("group" in n.meta for n in ends)


class Chains(nn.Module):
    """Chains that match npu-int8's patterns, and near misses that must not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_clamp = nn.Conv2d(3, 8, 3, padding=1)
        self.dw_hardtanh = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv_shared = nn.Conv2d(8, 8, 1)         # its output has two readers: no fusion
        self.conv_sigmoid = nn.Conv2d(8, 8, 1)        # conv -> sigmoid is no pattern of npu-int8
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)  # conv_transpose -> relu neither
        self.a = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.clamp(self.conv_clamp(x), 0.0, 6.0)
        y = nn.functional.hardtanh(self.dw_hardtanh(y), -1.0, 1.0)  # (0, 6) would be ReLU6
        s = self.conv_shared(y)
        y = torch.relu(s) + s
        y = torch.sigmoid(self.conv_sigmoid(y))
        y = torch.relu(self.up(y))
        y = torch.relu(self.a(y) + self.b(y))         # a (earlier) takes the add and the relu
        return torch.relu(self.fc(y.mean((2, 3))))


def test_patterns_match_only_single_user_chains_of_the_spec():
    spec = qcompiler.load_target("npu-int8")
    x = torch.randn(2, 3, 8, 8)
    folded = _folded(Chains(), x)
    gm = _fused(folded, spec)
    _chains_are_well_formed(gm)
    fusion = {n.target: n.meta["fusion"] for n in gm.graph.nodes if "fusion" in n.meta}
    assert fusion == {
        "conv_clamp": ("conv", "clamp"),
        "dw_hardtanh": ("depthwise_conv", "hardtanh"),
        "a": ("conv", "add", "relu"),
        "fc": ("linear", "relu"),
    }
    for unfused in ("conv_shared", "conv_sigmoid", "up", "b"):
        node = gm.graph.find_nodes(op="call_module", target=unfused)[0]
        assert "kernel" not in node.meta, unfused
    # Annotated, not rewritten: the same nodes compute the same values.
    assert [n.name for n in gm.graph.nodes] == [n.name for n in folded.graph.nodes]
    assert torch.equal(gm(x), folded(x))


def test_a_pattern_the_spec_adds_fuses_and_one_it_drops_does_not():
    text = (BUILTIN_DIR / "npu-int8.toml").read_text()
    assert '["conv", "add"], ["conv", "add", "relu"],' in text
    spec = loads_target(text.replace('["conv", "add"], ["conv", "add", "relu"],', '["conv", "sigmoid"],'),
                        "npu-int8 variant")
    gm = _fused(_folded(Chains(), torch.randn(2, 3, 8, 8)), spec)
    fusion = {n.target: n.meta["fusion"] for n in gm.graph.nodes if "fusion" in n.meta}
    assert fusion["conv_sigmoid"] == ("conv", "sigmoid")
    assert "a" not in fusion and "b" not in fusion            # no add patterns any more


def test_without_a_target_nothing_is_fused():
    folded = _folded(Chains(), torch.randn(2, 3, 8, 8))
    gm = fuse(snapshot(folded), CompileContext(model=folded, example_inputs=()))
    assert not any(k in n.meta for n in gm.graph.nodes for k in ("fusion", "kernel", "fused_into"))


def test_a_node_joins_one_kernel_and_the_earlier_chain_keeps_it():
    # With conv -> add and add -> relu both in the spec, a -> add -> relu is claimed from its
    # first node: the add belongs to a's kernel and cannot start another one.
    text = (BUILTIN_DIR / "npu-int8.toml").read_text()
    spec = loads_target(text.replace('["conv", "add"], ["conv", "add", "relu"],', '["conv", "add"], ["add", "relu"],'),
                        "npu-int8 variant")
    gm = _fused(_folded(Chains(), torch.randn(2, 3, 8, 8)), spec)
    _chains_are_well_formed(gm)
    a = gm.graph.find_nodes(op="call_module", target="a")[0]
    add = next(iter(a.users))
    relu = next(iter(add.users))
    assert a.meta["fusion"] == ("conv", "add") and add.meta["kernel"] == a.name
    assert "fusion" not in add.meta and "kernel" not in relu.meta
    assert ("add", "relu") not in _kernels(gm)
