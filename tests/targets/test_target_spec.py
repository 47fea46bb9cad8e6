"""Tests of targets/spec.py: loading built-in and custom target specs, and rejecting bad ones."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from qcompiler.errors import SpecError
from qcompiler.formats import FloatFormat, HostFloat, IntFormat, LUTFormat, NF4Format
from qcompiler.opkinds import ALL_OP_KINDS, WEIGHTED
from qcompiler.targets import (
    EqualBits, MinBits, RequiresBits, TargetSpec, list_targets, load_target, loads_target,
)
from qcompiler.targets import spec as spec_module

BUILTINS = ("cpu-x86-int8", "dsp-fixed-point", "fp8", "npu-int4", "npu-int8", "npu-int8-balanced", "npu-int8-transformer",
            "weight-only-4bit")
TARGETS_DIR = Path(__file__).resolve().parents[2] / "targets"


# ---------------------------------------------------------------------------------------------
# Built-in targets
# ---------------------------------------------------------------------------------------------

def test_list_targets_names_every_builtin():
    assert list_targets() == sorted(BUILTINS)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads_and_is_consistent(name):
    spec = load_target(name)
    assert isinstance(spec, TargetSpec)
    assert spec.name == name and spec.version and spec.description
    assert Path(spec.source).name == f"{name}.toml"
    assert TARGETS_DIR.joinpath(f"{name}.toml").read_text().startswith(f"# {name}:")  # header
    assert {"weight_memory", "bops"} <= set(spec.cost)
    for kind, rule in spec.ops.items():
        assert kind in ALL_OP_KINDS and rule.kind == kind
        assert rule.inputs and rule.outputs
        for role in ("weights", "inputs", "outputs"):
            names = rule.candidates(role)
            assert all(n in spec.formats for n in names)
            # A role with candidates has one of them as its default; a role without has none.
            assert rule.default(role) in names if names else rule.default(role) is None
        assert bool(rule.weights) == (kind in WEIGHTED)
    assert not set(spec.shared_scale) & set(spec.pass_through)
    assert all(spec.supports(k) for k in spec.pass_through)


def test_some_builtin_has_a_latency_model():
    assert sum("latency" in load_target(n).cost for n in BUILTINS) >= 1


def test_builtin_cost_formula_matches_hand_computation():
    # 3x3 conv 64->64 with bias on npu-int8: 36864 int8 weights + 64 int32 biases.
    f = load_target("npu-int8").cost["weight_memory"]
    assert f.evaluate(weight_elems=36864, params=36928, w_bits=8) == 36864 + 64 * 4
    # Same layer with int4 weights on npu-int4: half the weight bytes, same bias bytes.
    f4 = load_target("npu-int4").cost["weight_memory"]
    assert f4.evaluate(weight_elems=36864, params=36928, w_bits=4) == 36864 / 2 + 64 * 4
    # npu-int4 latency: 1e6 MACs at 256/cycle (int8) vs 512/cycle (int4), 1 GHz -> us.
    lat = load_target("npu-int4").cost["latency"]
    common = dict(in_elems=0, out_elems=0, weight_elems=0, a_bits=8, out_bits=8)
    assert lat.evaluate(macs=1_024_000, w_bits=8, **common) == pytest.approx(4.0)
    assert lat.evaluate(macs=1_024_000, w_bits=4, **common) == pytest.approx(2.0)


def test_npu_int8_facts():
    spec = load_target("npu-int8")
    w = spec.default_format("conv", "weights")
    a = spec.default_format("conv", "inputs")
    assert isinstance(w, IntFormat) and (w.bits, w.signed, w.symmetric, w.granularity) == (8, True, True, "per_channel")
    assert isinstance(a, IntFormat) and a.bits == 8 and not a.symmetric
    assert all(r.accumulator_bits == 32 for r in spec.ops.values())
    assert (spec.requant.mode, spec.requant.multiplier_bits) == ("fixed_point", 32)
    assert spec.unsupported.action == "host" and "latency" in spec.unsupported.host_cost
    for producer in ("conv", "depthwise_conv", "linear"):
        for act in ("relu", "relu6", "hardtanh", "clamp"):
            assert (producer, act) in spec.fusions
    assert ("conv", "add") in spec.fusions and ("conv", "add", "relu") in spec.fusions
    assert "cat" in spec.shared_scale and "max_pool" in spec.pass_through
    needed = ("conv", "depthwise_conv", "conv_transpose", "linear", "matmul", "add", "mul", "cat",
              "avg_pool", "relu", "relu6", "hardswish", "hardsigmoid", "sigmoid", "silu", "gelu",
              "softmax", "layer_norm", "affine", "mean")
    assert all(spec.supports(k) for k in needed) and spec.supports("max_pool")
    assert not spec.supports("embedding")


def test_npu_int4_facts():
    spec = load_target("npu-int4")
    assert [f.bits for f in spec.candidates("conv", "weights")] == [8, 4]
    assert [f.bits for f in spec.candidates("linear", "weights")] == [8, 4]
    assert spec.default_format("conv", "weights").bits == 8
    assert all(f.bits >= 8 for f in spec.candidates("depthwise_conv", "weights"))
    for f in spec.candidates("conv", "weights"):
        assert f.symmetric and f.granularity == "per_channel"
    assert {f.bits for k in spec.ops for f in spec.candidates(k, "inputs")} == {8}
    assert {"cat", "add"} <= set(spec.shared_scale)
    assert MinBits("first", 8) in spec.couplings and MinBits("last", 8) in spec.couplings
    assert RequiresBits(4, 8) in spec.couplings
    assert spec.unsupported.action == "host"


def test_cpu_x86_int8_facts():
    spec = load_target("cpu-x86-int8")
    for kind in spec.ops:
        for f in spec.candidates(kind, "inputs") + spec.candidates(kind, "outputs"):
            assert isinstance(f, IntFormat) and f.bits == 8 and not f.signed and not f.symmetric
    for kind in ("conv", "linear", "depthwise_conv"):
        (w,) = spec.candidates(kind, "weights")
        assert w.signed and w.symmetric and w.granularity == "per_channel" and w.bits == 8
    assert spec.requant.mode == "float"


def test_dsp_fixed_point_facts():
    spec = load_target("dsp-fixed-point")
    assert all(isinstance(f, IntFormat) and f.scale_kind == "pow2" for f in spec.formats.values())
    assert spec.requant.mode == "shift" and spec.requant.multiplier_bits is None
    assert [f.bits for f in spec.candidates("conv", "weights")] == [8, 16]
    assert [f.bits for f in spec.candidates("conv", "inputs")] == [8, 16]
    assert spec.default_format("conv", "inputs").bits == 8
    assert EqualBits(("add", "sub")) in spec.couplings


def test_fp8_facts():
    spec = load_target("fp8")
    (w,) = spec.candidates("linear", "weights")
    assert isinstance(w, FloatFormat) and w.kind == "e4m3" and w.granularity == "per_channel"
    kinds = [f.kind for f in spec.candidates("linear", "inputs")]
    assert kinds == ["e4m3", "e5m2"] and spec.default_format("linear", "inputs").kind == "e4m3"
    assert spec.requant.mode == "float"


def test_weight_only_4bit_facts():
    spec = load_target("weight-only-4bit")
    for kind in ("linear", "conv"):
        ws = spec.candidates(kind, "weights")
        groups = {f.group_size for f in ws if isinstance(f, IntFormat)}
        assert groups == {32, 64} and all(f.bits == 4 for f in ws if isinstance(f, IntFormat))
        assert any(isinstance(f, NF4Format) for f in ws)
        assert any(isinstance(f, LUTFormat) and 2 ** f.bits == 16 for f in ws)
    for kind in spec.ops:   # activations are never quantized
        assert all(isinstance(f, HostFloat) for f in spec.candidates(kind, "inputs"))
        assert all(isinstance(f, HostFloat) for f in spec.candidates(kind, "outputs"))


# ---------------------------------------------------------------------------------------------
# A spec written from scratch
# ---------------------------------------------------------------------------------------------

INVENTED_CHIP = """\
# ferret-6: an invented edge chip with 6-bit weights, for this test only.
name = "ferret-6"
version = "0.3"
description = "6/8-bit weights, uint8 activations, 24-bit accumulators"
observer = "percentile"
fusions = [["conv", "relu6"]]
shared_scale = ["cat"]
pass_through = ["max_pool", "flatten"]
couplings = [
    { kind = "requires", if_weight_bits_at_most = 6, then_activation_bits = 8, ops = ["conv"] },
    { kind = "min_bits", where = "last", bits = 8, tensors = "weights" },
]

[formats.w6]
type = "int"
bits = 6
narrow_range = true
granularity = "per_channel"

[formats.w8]
type = "int"
bits = 8
granularity = "per_channel"

[formats.u8]
type = "int"
bits = 8
signed = false
symmetric = false

[formats.fp4]
type = "fp"
kind = "e2m1"
granularity = "per_group"
group_size = 16

[ops.conv]
weights = ["w8", "w6", "fp4"]
default_weights = "w6"
inputs = ["u8"]
accumulator_bits = 24

[ops.linear]
weights = ["w8"]
inputs = ["u8"]
outputs = ["u8"]

[ops]
relu6 = { inputs = ["u8"] }
cat = { inputs = ["u8"] }

[requant]
mode = "fixed_point"
multiplier_bits = 16
rounding = "half_up"

[unsupported]
action = "refuse"

[cost]
weight_memory = "weight_elems * w_bits / 8 + w_scales * 2"
bops = "macs * w_bits * a_bits"
energy = "macs * w_bits * a_bits * 0.002 + (in_elems + out_elems) * 0.5"
"""


def test_invented_chip_written_from_scratch_loads(tmp_path):
    path = tmp_path / "ferret-6.toml"
    path.write_text(INVENTED_CHIP)
    spec = load_target(path)
    assert spec == load_target(str(path))
    assert (spec.name, spec.version, spec.observer, spec.source) == ("ferret-6", "0.3", "percentile", str(path))
    assert spec.format("w6") == IntFormat(bits=6, narrow_range=True, granularity="per_channel")
    assert spec.format("fp4") == FloatFormat("e2m1", granularity="per_group", group_size=16)
    conv = spec.op_rule("conv")
    assert conv.weights == ("w8", "w6", "fp4") and conv.default_weights == "w6"
    assert conv.outputs == ("u8",) and conv.default_outputs == "u8"   # outputs default to inputs
    assert conv.accumulator_bits == 24 and spec.op_rule("linear").accumulator_bits == 32
    assert spec.op_rule("add") is None and not spec.supports("add") and spec.supports("max_pool")
    assert spec.couplings == (RequiresBits(6, 8, ("conv",)), MinBits("last", 8, "weights"))
    assert (spec.requant.mode, spec.requant.multiplier_bits, spec.requant.rounding) == ("fixed_point", 16, "half_up")
    assert spec.unsupported.action == "refuse" and not spec.unsupported.host_cost
    assert spec.metrics == ("weight_memory", "bops", "energy")
    # 1000 MACs at w6/a8 and 300 elements moved: 1000*48*0.002 + 300*0.5
    assert spec.cost["energy"].evaluate(macs=1000, w_bits=6, a_bits=8, in_elems=200, out_elems=100) == pytest.approx(246.0)
    assert spec.text == INVENTED_CHIP


def test_spec_objects_are_immutable():
    spec = load_target("npu-int8")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"
    with pytest.raises(TypeError):
        spec.ops["conv"] = None
    with pytest.raises(TypeError):
        spec.formats["w9"] = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.ops["conv"].weights = ()
    assert isinstance(spec.fusions, tuple) and all(isinstance(p, tuple) for p in spec.fusions)


def test_same_text_gives_equal_specs():
    text = TARGETS_DIR.joinpath("npu-int4.toml").read_text()
    assert loads_target(text, "a") == loads_target(text, "a")
    assert load_target("npu-int4") is load_target("npu-int4")   # built-ins are cached
    assert load_target(load_target("fp8")) is load_target("fp8")


def test_cost_of_device_and_host_nodes():
    spec = load_target("npu-int8")
    conv = dict(params=36928, weight_elems=36864, macs=0, w_bits=8, a_bits=8, out_bits=8,
                in_elems=100, out_elems=100, groups=1, w_scales=64)
    assert spec.cost_of("weight_memory", **conv) == 36864 + 64 * 4
    # On the host npu-int8 names its own weight_memory: float32 for every parameter.
    assert spec.cost_of("weight_memory", on_host=True, **conv) == 36928 * 4
    # fp8 has no host_cost: its [cost] formula is used with 32-bit widths and no scales.
    fp8 = load_target("fp8")
    assert fp8.cost_of("weight_memory", on_host=True, **conv) == 36864 * 4 + 64 * 4
    assert fp8.cost_of("activation_memory", on_host=True, **conv) == 100 * 4
    relu = dict(conv, params=0, weight_elems=0, w_bits=0, w_scales=0)
    assert fp8.cost_of("weight_memory", on_host=True, **relu) == 0
    with pytest.raises(SpecError, match="no cost metric 'energy'.*weight_memory"):
        spec.cost_of("energy", **conv)


def test_specs_are_hashable():
    a, b = load_target("npu-int4"), loads_target(load_target("npu-int4").text, load_target("npu-int4").source)
    assert a == b and hash(a) == hash(b) and len({a, b, load_target("fp8")}) == 2


def test_spec_accessors():
    spec = load_target("npu-int4")
    assert spec.op_rule("nonexistent") is None and spec.candidates("embedding", "weights") == ()
    with pytest.raises(SpecError, match="defines no format 'w5'.*w4"):
        spec.format("w5")
    with pytest.raises(ValueError, match="role"):
        spec.candidates("conv", "bias")


def test_unknown_builtin_name_lists_known_targets():
    with pytest.raises(SpecError) as info:
        load_target("npu-int9")
    message = str(info.value)
    assert "did you mean 'npu-int8'" in message
    assert all(name in message for name in BUILTINS)


def test_missing_file_and_bad_encoding(tmp_path):
    with pytest.raises(SpecError, match="no such target spec file"):
        load_target(tmp_path / "nope.toml")
    with pytest.raises(SpecError, match="write 'npu-int8' without .toml"):
        load_target("npu-int8.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('name = "caf\xe9"'.encode("latin-1"))
    with pytest.raises(SpecError, match="UTF-8"):
        load_target(bad)
    with pytest.raises(SpecError, match="built-in name or a path"):
        load_target(42)


def test_all_problems_are_collected_with_key_paths():
    text = BASE.replace('bits = 8\ngranularity = "per_channel"', 'bits = 1\ngranularity = "per_channel"') \
               .replace('inputs = ["a8"]\n\n[ops.cat]', 'inputs = ["a9"]\n\n[ops.cat]')
    with pytest.raises(SpecError) as info:
        loads_target(text, "toy.toml")
    assert "2 problems" in str(info.value)
    paths = [p for p, _ in info.value.problems]
    assert paths == ["formats.w8.bits", "ops.relu.inputs[0]"]


# ---------------------------------------------------------------------------------------------
# Malformed specs
# ---------------------------------------------------------------------------------------------

BASE = """\
name = "toy"
version = "1"
fusions = [["conv", "relu"]]
shared_scale = ["cat"]
pass_through = ["reshape"]

[formats.w8]
type = "int"
bits = 8
granularity = "per_channel"

[formats.a8]
type = "int"
bits = 8
symmetric = false

[ops.conv]
weights = ["w8"]
inputs = ["a8"]

[ops.relu]
inputs = ["a8"]

[ops.cat]
inputs = ["a8"]

[ops.add]
inputs = ["a8"]

[requant]
mode = "fixed_point"

[unsupported]
action = "host"

[cost]
weight_memory = "params * w_bits / 8"
"""

W8 = 'bits = 8\ngranularity = "per_channel"'
REQUANT = 'mode = "fixed_point"'
COST = 'weight_memory = "params * w_bits / 8"'
TOP = 'version = "1"'


def _cost(formula: str) -> tuple[str, str]:
    return COST, f"weight_memory = {formula!r}" if '"' in formula else f'weight_memory = "{formula}"'


# (id, text to replace in BASE, replacement, key path the message must name, another fragment)
MALFORMED = [
    ("unknown top-level key", TOP, TOP + '\nnmae = "x"', "nmae", "did you mean 'name'"),
    ("unknown format key", W8, 'bits = 8\ngranularty = "per_channel"', "formats.w8.granularty", "did you mean 'granularity'"),
    ("unknown op rule key", 'weights = ["w8"]', 'weights = ["w8"]\nweigths = ["w8"]', "ops.conv.weigths", "did you mean 'weights'"),
    ("unknown requant key", REQUANT, REQUANT + "\nmultiplier = 32", "requant.multiplier", "did you mean 'multiplier_bits'"),
    ("wrong type bits", W8, 'bits = "8"\ngranularity = "per_channel"', "formats.w8.bits", "expected an integer, got a string"),
    ("wrong type boolean", "symmetric = false", 'symmetric = "no"', "formats.a8.symmetric", "expected a boolean"),
    ("wrong type list", 'fusions = [["conv", "relu"]]', 'fusions = "conv+relu"', "fusions", "expected a list"),
    ("wrong type inputs", '[ops.relu]\ninputs = ["a8"]', '[ops.relu]\ninputs = "a8"', "ops.relu.inputs", "expected a list of format names"),
    ("wrong type version", TOP, "version = 1", "version", "expected a string"),
    ("int1", W8, 'bits = 1\ngranularity = "per_channel"', "formats.w8.bits", "2 to 16 bits"),
    ("int17", W8, 'bits = 17\ngranularity = "per_channel"', "formats.w8.bits", "2 to 16 bits"),
    ("fp8 e9m9", "[ops.conv]", '[formats.f8]\ntype = "fp"\nkind = "e9m9"\n\n[ops.conv]', "formats.f8.kind", "e4m3"),
    ("lut9", "[ops.conv]", '[formats.l9]\ntype = "lut"\nbits = 9\n\n[ops.conv]', "formats.l9.bits", "bits 1 to 8"),
    ("unknown format type", "[ops.conv]", '[formats.x]\ntype = "integer"\nbits = 8\n\n[ops.conv]', "formats.x.type", "expected one of int, fp, nf4, lut, host"),
    ("missing name", 'name = "toy"\n', "", "name", "missing required key 'name'"),
    ("missing bits", W8, 'granularity = "per_channel"', "formats.w8.bits", "missing required key 'bits'"),
    ("missing format type", "[ops.conv]", "[formats.x]\nbits = 8\n\n[ops.conv]", "formats.x.type", "missing required key 'type'"),
    ("missing inputs", '[ops.relu]\ninputs = ["a8"]', "[ops.relu]\naccumulator_bits = 32", "ops.relu.inputs", "missing required key"),
    ("bad formula syntax", *_cost("params * * 8"), "cost.weight_memory", "not a valid formula"),
    ("formula unknown variable", *_cost("paramz * w_bits"), "cost.weight_memory", "unknown variable 'paramz'"),
    ("formula non-whitelisted call", *_cost("abs(params)"), "cost.weight_memory", "call 'abs(params)'"),
    ("formula attribute access", *_cost("params.bit_length()"), "cost.weight_memory", "call"),
    ("formula attribute", *_cost("w_bits.real"), "cost.weight_memory", "attribute access"),
    ("formula subscript", *_cost("params[0]"), "cost.weight_memory", "subscript"),
    ("formula import", *_cost("__import__('os').system('touch X')"), "cost.weight_memory", "__import__"),
    ("formula lambda", *_cost("lambda: 0"), "cost.weight_memory", "lambda"),
    ("formula string literal", *_cost("params * 'x'"), "cost.weight_memory", "string literal"),
    ("formula wrong type", COST, "weight_memory = true", "cost.weight_memory", "expected a formula"),
    ("undefined format", '[ops.relu]\ninputs = ["a8"]', '[ops.relu]\ninputs = ["a9"]', "ops.relu.inputs[0]", "use one of: w8, a8"),
    ("undefined weight format", 'weights = ["w8"]', 'weights = ["w8", "w4"]', "ops.conv.weights[1]", "undefined format 'w4'"),
    ("default not in list", 'weights = ["w8"]', 'weights = ["w8"]\ndefault_weights = "a8"', "ops.conv.default_weights", "not in its weights list"),
    ("default output not in list", '[ops.relu]\ninputs = ["a8"]', '[ops.relu]\ninputs = ["a8"]\noutputs = ["a8"]\ndefault_outputs = "w8"', "ops.relu.default_outputs", "not in its outputs list"),
    ("unknown op kind in ops", "[ops.relu]", "[ops.rleu]", "ops.rleu", "did you mean 'relu'"),
    ("unknown op kind in fusions", 'fusions = [["conv", "relu"]]', 'fusions = [["conv", "reluu"]]', "fusions[0][1]", "did you mean 'relu'"),
    ("unknown op kind in shared_scale", 'shared_scale = ["cat"]', 'shared_scale = ["concat"]', "shared_scale[0]", "unknown op kind 'concat'"),
    ("unknown op kind in pass_through", 'pass_through = ["reshape"]', 'pass_through = ["view"]', "pass_through[0]", "unknown op kind 'view'"),
    ("single-op fusion", 'fusions = [["conv", "relu"]]', 'fusions = [["conv"]]', "fusions[0]", "at least 2"),
    ("shared_scale and pass_through", 'pass_through = ["reshape"]', 'pass_through = ["reshape", "cat"]', "shared_scale[0]", "both in shared_scale and in pass_through"),
    ("shared_scale without rule", 'shared_scale = ["cat"]', 'shared_scale = ["cat", "mul"]', "shared_scale[1]", "no [ops.mul] rule"),
    ("pass_through weighted op", 'pass_through = ["reshape"]', 'pass_through = ["reshape", "linear"]', "pass_through[1]", "has weights"),
    ("invalid requant mode", REQUANT, 'mode = "fixedpoint"', "requant.mode", "did you mean 'fixed_point'"),
    ("invalid rounding", REQUANT, REQUANT + '\nrounding = "nearest"', "requant.rounding", "half_even"),
    ("multiplier_bits without fixed_point", REQUANT, 'mode = "float"\nmultiplier_bits = 16', "requant.multiplier_bits", "only applies to mode"),
    ("shift requant with float scales", REQUANT, 'mode = "shift"', "formats.w8.scale", "pow2"),
    ("invalid coupling kind", TOP, TOP + '\ncouplings = [{ kind = "equal_bit", ops = ["add"] }]', "couplings[0].kind", "did you mean 'equal_bits'"),
    ("coupling missing key", TOP, TOP + '\ncouplings = [{ kind = "min_bits", where = "first" }]', "couplings[0].bits", "missing required key 'bits'"),
    ("coupling unknown key", TOP, TOP + '\ncouplings = [{ kind = "min_bits", where = "first", bits = 8, layer = 0 }]', "couplings[0].layer", "unknown key"),
    ("coupling bad where", TOP, TOP + '\ncouplings = [{ kind = "min_bits", where = "middle", bits = 8 }]', "couplings[0].where", "first, last"),
    ("coupling op without rule", TOP, TOP + '\ncouplings = [{ kind = "equal_bits", ops = ["add", "mul"] }]', "couplings[0].ops[1]", "no [ops.mul] rule"),
    ("coupling unknown op kind", TOP, TOP + '\ncouplings = [{ kind = "equal_bits", ops = ["addd"] }]', "couplings[0].ops[0]", "did you mean 'add'"),
    ("requires on op without weights", TOP, TOP + '\ncouplings = [{ kind = "requires", if_weight_bits_at_most = 4, then_activation_bits = 8, ops = ["relu"] }]', "couplings[0].ops[0]", "has no weights"),
    ("requires unsatisfiable", TOP, TOP + '\ncouplings = [{ kind = "requires", if_weight_bits_at_most = 4, then_activation_bits = 16 }]', "couplings[0].then_activation_bits", "16-bit inputs"),
    ("min_bits unsatisfiable", TOP, TOP + '\ncouplings = [{ kind = "min_bits", where = "last", bits = 16 }]', "couplings[0].bits", "widest: 8"),
    ("group_size without per_group", W8, 'bits = 8\ngranularity = "per_channel"\ngroup_size = 32', "formats.w8.group_size", "only then"),
    ("per_group without group_size", W8, 'bits = 8\ngranularity = "per_group"', "formats.w8.group_size", "required with granularity"),
    ("group_size zero", W8, 'bits = 8\ngranularity = "per_group"\ngroup_size = 0', "formats.w8.group_size", "at least 1"),
    ("conv without weights", 'weights = ["w8"]\n', "", "ops.conv.weights", "conv has weights"),
    ("relu with weights", '[ops.relu]\ninputs = ["a8"]', '[ops.relu]\nweights = ["w8"]\ninputs = ["a8"]', "ops.relu.weights", "relu has no weights"),
    ("nf4 activation", '[ops.relu]\ninputs = ["a8"]', '[ops.relu]\ninputs = ["a8", "nf"]\n\n[formats.nf]\ntype = "nf4"', "ops.relu.inputs[1]", "weights only"),
    ("placeholder is no kernel", "[ops.relu]", '[ops.placeholder]\ninputs = ["a8"]\n\n[ops.relu]', "ops.placeholder", "not a kernel"),
    ("duplicate list item", '[ops.relu]\ninputs = ["a8"]', '[ops.relu]\ninputs = ["a8", "a8"]', "ops.relu.inputs[1]", "duplicate of item [0]"),
    ("accumulator too narrow", 'weights = ["w8"]', 'weights = ["w8"]\naccumulator_bits = 4', "ops.conv.accumulator_bits", "at least 8"),
    ("invalid observer", TOP, TOP + '\nobserver = "minmaxx"', "observer", "did you mean 'minmax'"),
    ("invalid target name", 'name = "toy"', 'name = "my toy!"', "name", "not a valid name"),
    ("host_cost with refuse", 'action = "host"', 'action = "refuse"\nhost_cost = { weight_memory = "params * 4" }', "unsupported.host_cost", "only applies to action"),
    ("host_cost unknown metric", 'action = "host"', 'action = "host"\nhost_cost = { latency = "10" }', "unsupported.host_cost.latency", "not a [cost] metric"),
    ("invalid unsupported action", 'action = "host"', 'action = "cpu"', "unsupported.action", "host, refuse"),
    ("top-level key below a table", COST, COST + '\ncouplings = []', "cost.couplings", "move it above the first [table]"),
    ("no formats", "[formats.a8]\ntype = \"int\"\nbits = 8\nsymmetric = false\n", "", "ops.conv.inputs[0]", "undefined format 'a8'"),
]


@pytest.mark.parametrize("old,new,path,fragment", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_spec_is_rejected_with_key_path(old, new, path, fragment):
    assert old in BASE
    text = BASE.replace(old, new, 1)
    with pytest.raises(SpecError) as info:
        loads_target(text, "toy.toml")
    message = str(info.value)
    assert message.startswith("toy.toml: ")
    assert f"{path}: " in message, message
    assert fragment in message, message
    assert "Traceback" not in message


def test_base_of_malformed_cases_is_valid():
    spec = loads_target(BASE, "toy.toml")
    assert spec.name == "toy" and spec.requant.multiplier_bits == 32


def test_there_are_at_least_25_malformed_cases():
    assert len(MALFORMED) >= 25 and len({m[0] for m in MALFORMED}) == len(MALFORMED)


def test_invalid_toml_names_file_and_line():
    with pytest.raises(SpecError, match=r"toy.toml: not valid TOML: .*line 3"):
        loads_target('name = "x"\nversion = "1"\nfusions = = []\n', "toy.toml")


def test_formula_injection_in_a_spec_file_creates_nothing(tmp_path):
    marker = tmp_path / "X"
    spec_file = tmp_path / "evil.toml"
    spec_file.write_text(BASE.replace(COST, f"weight_memory = \"__import__('os').system('touch {marker}')\""))
    with pytest.raises(SpecError, match="cost.weight_memory"):
        load_target(spec_file)
    assert not marker.exists()
    assert list(tmp_path.iterdir()) == [spec_file]


# ---------------------------------------------------------------------------------------------
# Python 3.10: no tomllib in the standard library, tomli instead
# ---------------------------------------------------------------------------------------------

def _loader_without_tomllib(monkeypatch) -> object:
    """A fresh copy of targets/spec.py imported as on Python 3.10, where `import tomllib` fails."""
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` now raises ModuleNotFoundError
    name = "qcompiler.targets._spec_without_tomllib"
    found = importlib.util.spec_from_file_location(name, spec_module.__file__)
    module = importlib.util.module_from_spec(found)
    monkeypatch.setitem(sys.modules, name, module)
    found.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", BUILTINS)
def test_loader_parses_with_tomli_where_tomllib_is_missing(monkeypatch, name):
    import tomli

    loader = _loader_without_tomllib(monkeypatch)
    assert loader.tomllib is tomli
    text = TARGETS_DIR.joinpath(f"{name}.toml").read_text()
    via_tomli, via_tomllib = loader.loads_target(text, name), loads_target(text, name)
    # The copy has its own classes, so compare field by field.
    for f in dataclasses.fields(via_tomllib):
        assert repr(getattr(via_tomli, f.name)) == repr(getattr(via_tomllib, f.name)), f.name
    with pytest.raises(SpecError, match=r"toy.toml: not valid TOML: .*line 3"):
        loader.loads_target('name = "x"\nversion = "1"\nfusions = = []\n', "toy.toml")
