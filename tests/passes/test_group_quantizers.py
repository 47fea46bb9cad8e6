"""Tests of passes/fuse.py and passes/group_quantizers.py: the spec's rules hold on real graphs."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torchvision
from torch import fx, nn

import qcompiler
from qcompiler import CompileContext, GroupingError, PassManager
from qcompiler.fx_util import snapshot
from qcompiler.passes.fuse import fuse
from qcompiler.passes.group_quantizers import group_quantizers
from qcompiler.targets import loads_target

MODELS = ("resnet18", "mobilenet_v3_large", "googlenet", "shufflenet_v2_x1_0", "densenet121", "vit_b_16")


@functools.lru_cache(maxsize=None)
def _folded(name: str) -> fx.GraphModule:
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(**kwargs).eval()
    size = 224 if name == "vit_b_16" else 64
    run = PassManager(["capture", "canonicalize", "fold_bn"]).run(model, torch.randn(1, 3, size, size))
    return run.graph("fold_bn")


def _grouped(name: str, target: str):
    gm = snapshot(_folded(name))
    ctx = CompileContext(model=gm, example_inputs=(), target=qcompiler.load_target(target))
    gm = group_quantizers(fuse(gm, ctx), ctx)
    return gm, ctx


def _nodes(gm):
    return {n.name: n for n in gm.graph.nodes}


@pytest.mark.parametrize("target", qcompiler.list_targets())
@pytest.mark.parametrize("model", MODELS)
def test_grouping_rules_hold_on_real_graphs(model, target):
    gm, ctx = _grouped(model, target)
    spec = ctx.target
    assert ctx.groups, "every model has something to quantize"
    ids = [g.id for g in ctx.groups]
    assert ids == list(range(len(ids)))
    nodes = _nodes(gm)
    for n in gm.graph.nodes:
        kind = n.meta["op_kind"]
        # No quantizer inside a fused kernel.
        if "fused_into" in n.meta:
            assert "group" not in n.meta, n.name
            assert len(n.users) == 1
        # Pass-through ops share their input's quantizer.
        if n.meta["role"] == "pass" and "group" in n.meta:
            src = next(a for a in n.args if isinstance(a, fx.Node))
            while "group" not in src.meta and src.meta["role"] == "pass":  # through split/chunk tuples
                src = next(a for a in src.args if isinstance(a, fx.Node))
            if isinstance(src.meta.get("shape"), tuple):  # a tuple from a host op starts a new group
                assert src.meta.get("group") == n.meta["group"], (n.name, kind)
        # Shared-scale ops: inputs and output are one group.
        if kind in spec.shared_scale and n.meta["role"] == "chip" and "group" in n.meta:
            for src in n.all_input_nodes:
                if "group" in src.meta:
                    assert src.meta["group"] == n.meta["group"], (n.name, src.name)
    for g in ctx.groups:
        if g.fallback:
            assert spec.unsupported.action == "host"
            continue
        assert g.default in g.candidates and g.candidates
        members = [nodes[t] for t in g.tensors]
        # Candidates are what every producer and consumer on the chip accepts.
        for m in members:
            if m.meta["role"] == "chip":
                rule = spec.op_rule(nodes[m.meta.get("kernel", m.name)].meta["op_kind"])
                assert set(g.candidates) <= set(rule.outputs)
            for user in m.users:
                if user.meta.get("role") == "chip" and g.kind == "activation":
                    rule = spec.op_rule(nodes[user.meta.get("kernel", user.name)].meta["op_kind"])
                    assert set(g.candidates) <= set(rule.inputs), (g.id, user.name)
        if g.kind == "weight":
            owner = nodes[g.owner]
            assert owner.meta["weight_group"] == g.id
            assert set(g.candidates) <= set(spec.op_rule(owner.meta["op_kind"]).weights)


@pytest.mark.parametrize("model", ("googlenet", "densenet121", "shufflenet_v2_x1_0"))
def test_every_cat_is_one_group_under_a_shared_scale_target(model):
    gm, ctx = _grouped(model, "npu-int8")
    assert "cat" in ctx.target.shared_scale
    cats = [n for n in gm.graph.nodes if n.meta["op_kind"] == "cat"]
    assert cats
    for cat in cats:
        groups = {cat.meta["group"]} | {s.meta["group"] for s in cat.all_input_nodes if "group" in s.meta}
        assert len(groups) == 1, (cat.name, groups)


def test_depthwise_convs_get_no_int4_candidate_under_npu_int4():
    gm, ctx = _grouped("mobilenet_v3_large", "npu-int4")
    nodes = _nodes(gm)
    depthwise = [g for g in ctx.groups if g.kind == "weight" and nodes[g.owner].meta["op_kind"] == "depthwise_conv"]
    regular = [g for g in ctx.groups if g.kind == "weight" and nodes[g.owner].meta["op_kind"] == "conv"]
    assert depthwise and regular
    assert all(g.format(c).bits == 8 for g in depthwise for c in g.candidates)
    assert any(g.format(c).bits == 4 for g in regular for c in g.candidates)


def test_first_and_last_layers_keep_8_bits_and_int4_requires_int8_inputs():
    gm, ctx = _grouped("resnet18", "npu-int4")
    weights = [g for g in ctx.groups if g.kind == "weight"]
    first, last = weights[0], weights[-1]
    assert first.owner == "conv1" and last.owner == "fc"
    for g in (first, last):
        assert [g.format(c).bits for c in g.candidates] == [8]
    assert any(4 in [g.format(c).bits for c in g.candidates] for g in weights[1:-1])
    requires = [t for t in ctx.ties if t.kind == "requires"]
    assert requires and all(t.weight_bits == 4 and t.activation_bits == 8 for t in requires)
    assert {t.groups[0] for t in requires} == {g.id for g in weights}


class _ResidualDenoiser(nn.Module):
    """An image-to-image net whose output is an op after its last kernel (x - residual)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x):
        return x - self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("keep_output", [False, True])
def test_min_bits_at_the_output_keeps_the_returned_tensor_wide(keep_output):
    text = (Path(__file__).resolve().parents[2] / "benchmarks" / "npu-w4a4.toml").read_text()
    line = '    { kind = "min_bits", where = "output", bits = 8, tensors = "activations" },\n'
    assert line in text
    spec = loads_target(text if keep_output else text.replace(line, ""))
    run = PassManager(["capture", "canonicalize", "fold_bn"]).run(_ResidualDenoiser().eval(), torch.randn(1, 1, 8, 8))
    gm = snapshot(run.graph("fold_bn"))
    ctx = CompileContext(model=gm, example_inputs=(), target=spec)
    gm = group_quantizers(fuse(gm, ctx), ctx)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    group = ctx.groups[out.meta["group"]]
    bits = [group.format(c).bits for c in group.candidates]
    # Without the coupling the subtraction after the last kernel may take 4 bits; with it, only 8.
    assert bits == ([8] if keep_output else [4, 8])
    inner = ctx.groups[_nodes(gm)["relu"].meta["group"]]
    assert 4 in [inner.format(c).bits for c in inner.candidates]


def test_the_output_coupling_has_no_weights():
    from qcompiler.errors import SpecError

    text = (Path(__file__).resolve().parents[2] / "benchmarks" / "npu-w4a4.toml").read_text()
    bad = text.replace('where = "output", bits = 8, tensors = "activations"', 'where = "output", bits = 8, tensors = "weights"')
    with pytest.raises(SpecError, match="outputs are activations"):
        loads_target(bad)


def test_equal_bits_ties_the_inputs_of_every_add():
    gm, ctx = _grouped("resnet18", "dsp-fixed-point")
    ties = [t for t in ctx.ties if t.kind == "equal_bits"]
    adds = [n for n in gm.graph.nodes if n.meta["op_kind"] == "add" and n.meta["role"] == "chip"]
    assert adds and len(ties) == len(adds)
    for tie in ties:
        assert len(tie.groups) == 2


CHIP = """
name = "test-chip"
version = "0.1"
description = "a chip invented for this test: int8 convs, uint8 activations, no pooling"
fusions = [["conv", "relu"]]
pass_through = ["flatten"]

[formats.w8]
type = "int"
bits = 8
granularity = "per_channel"

[formats.a8]
type = "int"
bits = 8
signed = false
symmetric = false

[formats.a16]
type = "int"
bits = 16

[ops]
conv = { weights = ["w8"], inputs = ["a8"] }
linear = { weights = ["w8"], inputs = ["a8"] }
add = { inputs = ["a16"] }

[unsupported]
action = "{action}"

[cost]
weight_memory = "weight_elems * w_bits / 8"
"""


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.relu(self.conv(x))
        return self.fc(torch.flatten(self.pool(y), 1))


class AddsConvOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_a_chip_written_from_scratch_compiles_a_model(tmp_path):
    path = tmp_path / "test-chip.toml"
    path.write_text(CHIP.replace("{action}", "host"))
    model = Small().eval()
    x = torch.randn(4, 3, 8, 8)
    compiled = qcompiler.qcompile(model, x, target=str(path), calib_data=[x], progress=False)
    plan = {g.owner: g for g in compiled.plan.groups}
    assert plan["conv"].format_name == "w8" and plan["fc"].format_name == "w8"
    # The unsupported pool runs on the host; its output is quantized for the linear that reads it.
    pool = next(n for n in compiled.simulated.graph.nodes if n.name == "pool")
    assert pool.meta["fallback"] and pool.meta["role"] == "host"
    out_group = next(g for g in compiled.plan.groups if "relu" in g.tensors)
    assert out_group.format.signed is False and out_group.params.zero_point is not None
    assert compiled.report().totals["float_fallbacks"] == 1
    torch.testing.assert_close(compiled(x), model(x), atol=0.05, rtol=0.05)


def test_unsupported_op_under_a_refusing_spec_names_the_node(tmp_path):
    spec = loads_target(CHIP.replace("{action}", "refuse"))
    with pytest.raises(GroupingError) as info:
        qcompiler.qcompile(Small().eval(), torch.randn(1, 3, 8, 8), target=spec, progress=False,
                           calib_data=[torch.randn(1, 3, 8, 8)])
    msg = str(info.value)
    assert "pool" in msg and "adaptive_avg_pool" in msg and "test_group_quantizers.py" in msg
    assert "[unsupported]" in msg


def test_conflicting_formats_fall_back_or_fail_with_the_keys():
    # conv outputs accept only a8, add inputs only a16: no common format for the conv outputs.
    x = torch.randn(1, 3, 4, 4)
    refusing = loads_target(CHIP.replace("{action}", "refuse"))
    with pytest.raises(GroupingError) as info:
        qcompiler.qcompile(AddsConvOutputs().eval(), x, target=refusing, calib_data=[x], progress=False)
    msg = str(info.value)
    assert "ops.conv.outputs" in msg and "ops.add.inputs" in msg and "a16" in msg
    hosting = loads_target(CHIP.replace("{action}", "host"))
    compiled = qcompiler.qcompile(AddsConvOutputs().eval(), x, target=hosting, calib_data=[x], progress=False)
    fallback = [g for g in compiled.plan.groups if g.fallback]
    assert {t for g in fallback for t in g.tensors} == {"a", "b"}


class AdditiveMaskAttention(nn.Module):
    """Scores with a float mask added inside the softmax (F.scaled_dot_product_attention)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x, mask):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_an_additive_attention_mask_is_not_quantized():
    # A mask of -100 where attention is barred and small offsets elsewhere: one int8 grid for both
    # would round the offsets away (the mask once got a quantizer like any tensor a softmax reads).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g)
    mask = torch.randn(2, 5, 5, generator=g) * 0.3
    mask[:, :, 3:] = -100.0
    compiled = qcompiler.qcompile(AdditiveMaskAttention().eval(), (x, mask), target="npu-int8",
                                  calib_data=[(x, mask)], progress=False)
    nodes = _nodes(compiled.graph("group_quantizers"))
    assert "group" not in nodes["mask"].meta and "group" in nodes["x"].meta
    softmax = next(n for n in compiled.simulated.graph.nodes if n.meta.get("op_kind") == "softmax")
    assert softmax.args[1].op == "placeholder"           # the mask reaches the softmax unquantized
    with torch.no_grad():
        assert torch.equal(compiled.lower("reference")(x, mask), compiled(x, mask))
