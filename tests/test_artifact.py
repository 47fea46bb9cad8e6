"""Tests of qcompiler.artifact: save/load round trips, determinism, and rejection of bad files."""
from __future__ import annotations

import hashlib
import json
import math
import operator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import fx, nn

import qcompiler
from qcompiler import ArtifactError
from qcompiler.api import DEFAULT_PASSES
from qcompiler.compiled import CompiledModel
from qcompiler.artifact import META_KEYS, MODEL_FILE, TENSOR_FILE
from qcompiler.graph_codec import decode_value, encode_value, function_name, resolve_function
from qcompiler.layers import Affine
from qcompiler.plan import Plan
from qcompiler.targets.spec import load_target


# ---------------------------------------------------------------------------------------------
# Models and compiles shared by the tests (compiling is the slow part: do each once)
# ---------------------------------------------------------------------------------------------

class Small(nn.Module):
    """Two conv branches joined by cat, pooled, flattened and fed to two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv_b = nn.Conv2d(3, 8, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn(self.conv_a(x)))
        b = self.conv_b(x)
        y = self.pool(torch.cat([a, b], dim=1))
        y = torch.flatten(y, 1)
        return self.fc2(F.gelu(self.fc1(y)))


def _choose_every_weight_format(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    """A stage before convert that gives the i-th weight group its i-th candidate (all formats used)."""
    weight_groups = [g for g in ctx.groups if g.kind == "weight" and not g.fallback]
    for i, g in enumerate(weight_groups):
        ctx.allocation[g.id] = g.candidates[i % len(g.candidates)]
    return gm


def _passes_with_every_format() -> list:
    passes = list(DEFAULT_PASSES)
    passes.insert(passes.index("convert"), ("choose_formats", _choose_every_weight_format))
    return passes


def _small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Small()
    with torch.no_grad():  # non-trivial BatchNorm statistics so that folding matters
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def compile_small(target: str, seed: int = 0) -> CompiledModel:
    gen = torch.Generator().manual_seed(100 + seed)
    example = torch.randn(1, 3, 16, 16, generator=gen)
    calib = [torch.randn(2, 3, 16, 16, generator=gen)]
    passes = _passes_with_every_format() if target == "weight-only-4bit" else None
    return qcompiler.qcompile(_small(seed), example, target=target, calib_data=calib, progress=False,
                              passes=passes)


def compile_torchvision(name: str, target: str) -> CompiledModel:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    gen = torch.Generator().manual_seed(1)
    example = torch.randn(1, 3, 64, 64, generator=gen)
    calib = [torch.randn(2, 3, 64, 64, generator=gen)]
    return qcompiler.qcompile(model, example, target=target, calib_data=calib, progress=False)


CASES = {
    "resnet18-npu-int8": (lambda: compile_torchvision("resnet18", "npu-int8"), (1, 3, 64, 64)),
    "mobilenet_v2-cpu-x86-int8": (lambda: compile_torchvision("mobilenet_v2", "cpu-x86-int8"), (1, 3, 64, 64)),
    "small-weight-only-4bit": (lambda: compile_small("weight-only-4bit"), (3, 3, 16, 16)),
    "small-fp8": (lambda: compile_small("fp8"), (3, 3, 16, 16)),
}


@pytest.fixture(scope="module")
def compiled_cases(tmp_path_factory) -> dict:
    """name -> (compiled, loaded, input shape, save directory); each compiled and saved once."""
    out = {}
    for name, (make, shape) in CASES.items():
        compiled = make()
        path = tmp_path_factory.mktemp(name) / "model.qc"
        assert compiled.save(path) == str(path)
        out[name] = (compiled, qcompiler.load(path), shape, path)
    return out


@pytest.fixture(scope="module")
def small_save(tmp_path_factory) -> Path:
    """A saved small int8 model whose files the corruption tests copy and damage."""
    path = tmp_path_factory.mktemp("small") / "saved"
    compile_small("cpu-x86-int8").save(path)
    return path


def _copy_save(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in (MODEL_FILE, TENSOR_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _edit_json(path: Path, edit) -> None:
    doc = json.loads((path / MODEL_FILE).read_text())
    edit(doc)
    (path / MODEL_FILE).write_text(json.dumps(doc))


def _rewrite_tensors(path: Path, edit) -> None:
    """Change the tensor file and record its new checksum, as a consistent-looking forgery would."""
    tensors = st_load((path / TENSOR_FILE).read_bytes())
    edit(tensors)
    blob = st_save(tensors)
    (path / TENSOR_FILE).write_bytes(blob)
    _edit_json(path, lambda d: d["tensors"].__setitem__("sha256", hashlib.sha256(blob).hexdigest()))


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------

def assert_plans_equal(a: Plan, b: Plan) -> None:
    assert (a.target, a.target_version) == (b.target, b.target_version)
    assert len(a.groups) == len(b.groups)
    for ga, gb in zip(a.groups, b.groups):
        for field in ("id", "kind", "tensors", "weights", "owner", "op_kind", "candidates",
                      "format_name", "format", "fallback"):
            assert getattr(ga, field) == getattr(gb, field), (ga.id, field)
        assert type(ga.format) is type(gb.format)
        assert (ga.params is None) == (gb.params is None)
        if ga.params is not None:
            assert ga.params.axis == gb.params.axis
            for part in ("scale", "zero_point", "codebook"):
                ta, tb = getattr(ga.params, part), getattr(gb.params, part)
                assert (ta is None) == (tb is None), (ga.id, part)
                if ta is not None:
                    assert ta.dtype == tb.dtype and torch.equal(ta, tb), (ga.id, part)


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_gives_identical_outputs(compiled_cases, case):
    compiled, loaded, shape, _ = compiled_cases[case]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, got = compiled(x), loaded(x)
    assert torch.equal(expected, got)
    assert isinstance(loaded, CompiledModel) and not loaded.training


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_keeps_plan_graph_and_costs(compiled_cases, case):
    compiled, loaded, _, _ = compiled_cases[case]
    assert_plans_equal(compiled.plan, loaded.plan)
    # The generated code is a complete description of the graph's computation.
    assert loaded.simulated.code == compiled.simulated.code
    for n_a, n_b in zip(compiled.simulated.graph.nodes, loaded.simulated.graph.nodes):
        assert (n_a.name, n_a.op) == (n_b.name, n_b.op)
        assert {k: n_a.meta[k] for k in META_KEYS if k in n_a.meta} == dict(n_b.meta)
    assert loaded.target.name == compiled.target.name and loaded.target.text == compiled.target.text
    assert loaded.target.formats == compiled.target.formats and loaded.target.ops == compiled.target.ops
    assert loaded.weight_memory_bytes == compiled.weight_memory_bytes
    for metric in compiled.target.cost:
        assert loaded.cost(metric) == compiled.cost(metric)


@pytest.mark.parametrize("case", ["resnet18-npu-int8", "small-weight-only-4bit"])
def test_report_of_loaded_model(compiled_cases, case):
    compiled, loaded, _, _ = compiled_cases[case]
    original, restored = compiled.report(), loaded.report()
    assert restored.totals == original.totals
    assert len(restored.rows) == len(original.rows) > 0
    for ra, rb in zip(original.rows, restored.rows):
        assert (ra.node, ra.op_kind, ra.group, ra.weight_format, ra.activation_format, ra.params,
                ra.weight_bytes) == (rb.node, rb.op_kind, rb.group, rb.weight_format,
                                     rb.activation_format, rb.params, rb.weight_bytes)
        assert math.isnan(rb.sqnr_db)  # no float reference in a saved model
    assert "nan" in str(restored)


def test_the_cases_cover_the_format_families(compiled_cases):
    families = {g.format.family for c, *_ in compiled_cases.values() for g in c.plan.groups}
    assert {"int", "fp", "nf4", "lut", "float"} <= families
    asym = [g for g in compiled_cases["mobilenet_v2-cpu-x86-int8"][0].plan.groups
            if g.params is not None and g.params.zero_point is not None]
    assert asym, "cpu-x86-int8 should give asymmetric activations with zero points"


def test_saving_a_loaded_model_gives_the_same_bytes(compiled_cases, tmp_path):
    _, loaded, _, path = compiled_cases["small-weight-only-4bit"]
    again = Path(loaded.save(tmp_path / "again"))
    for name in (MODEL_FILE, TENSOR_FILE):
        assert (again / name).read_bytes() == (path / name).read_bytes()


def test_custom_spec_file_that_is_gone_still_loads(tmp_path):
    text = load_target("cpu-x86-int8").text.replace('name = "cpu-x86-int8"', 'name = "my-chip"')
    spec_file = tmp_path / "my-chip.toml"
    spec_file.write_text(text)
    compiled = qcompiler.qcompile(_small(), torch.randn(1, 3, 16, 16), target=str(spec_file),
                                  calib_data=[torch.randn(2, 3, 16, 16)], progress=False)
    compiled.save(tmp_path / "saved")
    spec_file.unlink()
    loaded = qcompiler.load(tmp_path / "saved")
    assert loaded.target.name == "my-chip" and loaded.target.text == text
    assert str(tmp_path) not in (tmp_path / "saved" / MODEL_FILE).read_text()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(compiled(x), loaded(x))


class Exotic(nn.Module):
    """Node arguments of every kind the encoder must carry, and many allowlisted modules."""

    def __init__(self) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose2d(4, 8, 3, stride=2, padding=1, output_padding=1, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.bn = nn.BatchNorm2d(8)
        self.affine = Affine(torch.linspace(0.5, 1.5, 8), torch.linspace(-1, 1, 8))
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.shuffle = nn.PixelShuffle(2)
        self.pool = nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)
        self.amax = nn.AdaptiveMaxPool2d((3, 2))
        self.prelu = nn.PReLU(8)
        self.act = nn.Hardswish()
        self.flat = nn.Flatten(1)
        self.ln = nn.LayerNorm(12)
        self.attn = nn.MultiheadAttention(12, 3, batch_first=True)
        self.emb = nn.Embedding(10, 12, padding_idx=0)
        self.register_buffer("offset", torch.arange(12.0))

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> dict:
        y = self.deconv(x[..., 1:, ::1])
        y = self.prelu(self.affine(self.bn(self.gn(y))))
        y = self.pool(self.shuffle(self.up(y)))
        y = self.act(self.amax(y.contiguous(memory_format=torch.contiguous_format)))
        y = self.ln(self.flat(y) + self.offset)
        y = torch.clamp(y, min=float("-inf"), max=float("inf")).to(torch.float32)
        seq = y.reshape(y.shape[0], -1, 12) + self.emb(idx)
        out, _ = self.attn(seq, seq, seq, need_weights=False)
        z = F.pad(out, (1, 1), value=float("nan")).nan_to_num(nan=0.25)
        return {"out": z.to(device=torch.device("cpu")), "pair": (seq.sum(dim=(1, 2)), None)}


def _trace_with_leaves(model: nn.Module, *leaves: type) -> fx.GraphModule:
    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
            return isinstance(m, leaves) or super().is_leaf_module(m, qualified_name)

    tracer = Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def test_exotic_arguments_and_modules_round_trip(tmp_path):
    torch.manual_seed(3)
    model = Exotic().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    gm = _trace_with_leaves(model, Affine)
    spec = load_target("npu-int8")
    wrapped = CompiledModel(gm, Plan(spec.name, str(spec.version), ()), spec)
    wrapped.save(tmp_path / "exotic")
    loaded = qcompiler.load(tmp_path / "exotic")
    x, idx = torch.randn(2, 4, 5, 4), torch.randint(0, 10, (2, 3))
    with torch.no_grad():
        a, b = wrapped(x, idx), loaded(x, idx)
    assert torch.equal(a["out"], b["out"]) and torch.equal(a["pair"][0], b["pair"][0])
    assert b["pair"][1] is None
    assert loaded.simulated.code == gm.code
    assert type(loaded.simulated.get_submodule("attn")) is nn.MultiheadAttention


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["weight-only-4bit", "fp8", "cpu-x86-int8"])
def test_two_compiles_save_byte_identical_files(tmp_path, target):
    first = Path(compile_small(target).save(tmp_path / "first"))
    second = Path(compile_small(target).save(tmp_path / "second"))
    for name in (MODEL_FILE, TENSOR_FILE):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    text = (first / MODEL_FILE).read_text()
    assert str(tmp_path) not in text and "/tmp" not in text
    # A different model must not give the same bytes (the comparison above can fail).
    other = Path(compile_small(target, seed=1).save(tmp_path / "other"))
    assert (other / TENSOR_FILE).read_bytes() != (first / TENSOR_FILE).read_bytes()


def test_torchvision_model_saves_deterministically(compiled_cases, tmp_path):
    _, _, _, path = compiled_cases["mobilenet_v2-cpu-x86-int8"]
    again = Path(compile_torchvision("mobilenet_v2", "cpu-x86-int8").save(tmp_path / "again"))
    for name in (MODEL_FILE, TENSOR_FILE):
        assert (again / name).read_bytes() == (path / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------
# Saving: what cannot be saved, and where saves may go
# ---------------------------------------------------------------------------------------------

class _Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: capture keeps this module opaque
            return x * 2
        return x


class _WithOpaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.gate = _Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc(x))


def test_opaque_module_cannot_be_saved(tmp_path):
    compiled = qcompiler.qcompile(_WithOpaque().eval(), torch.randn(2, 16), target="weight-only-4bit",
                                  calib_data=[torch.randn(2, 16)], progress=False)
    with pytest.raises(ArtifactError, match=r"'gate' \(_Gate\) is an opaque leaf.*Python code"):
        compiled.save(tmp_path / "m")
    assert not (tmp_path / "m" / MODEL_FILE).exists()


def test_unknown_module_class_and_function_cannot_be_saved(tmp_path):
    class Custom(nn.Linear):  # a subclass may change forward: not in the allowlist
        pass

    spec = load_target("npu-int8")
    plan = Plan(spec.name, str(spec.version), ())
    gm = _trace_with_leaves(nn.Sequential(Custom(4, 4)), Custom)
    with pytest.raises(ArtifactError, match=r"module '0'.*Custom.*cannot rebuild"):
        CompiledModel(gm, plan, spec).save(tmp_path / "a")

    def helper(x):
        return x + 1

    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(helper, (x,)))
    with pytest.raises(ArtifactError, match=r"helper.*not in the allowlist"):
        CompiledModel(fx.GraphModule(nn.Module(), graph), plan, spec).save(tmp_path / "b")


def test_refuses_non_empty_foreign_directory_but_overwrites_a_save(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    first = compile_small("fp8")
    with pytest.raises(ArtifactError, match="not empty and is not a previous qcompiler save"):
        first.save(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    target = tmp_path / "m"
    first.save(target)
    second = compile_small("fp8", seed=1)
    second.save(target)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(qcompiler.load(target)(x), second(x))
    assert not torch.equal(first(x), second(x))


# ---------------------------------------------------------------------------------------------
# Loading bad files
# ---------------------------------------------------------------------------------------------

def test_missing_directory_and_files(small_save, tmp_path):
    with pytest.raises(ArtifactError, match="no saved model here"):
        qcompiler.load(tmp_path / "nothing")
    for name in (MODEL_FILE, TENSOR_FILE):
        damaged = _copy_save(small_save, tmp_path / f"no-{name}")
        (damaged / name).unlink()
        with pytest.raises(ArtifactError, match=rf"{name}: missing"):
            qcompiler.load(damaged)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_corrupted_tensor_file(small_save, tmp_path, damage):
    path = _copy_save(small_save, tmp_path / "m")
    blob = bytearray((path / TENSOR_FILE).read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":
        blob[len(blob) - 5] ^= 0x01  # one bit of one weight: only the checksum notices
    else:
        blob = bytearray()
    (path / TENSOR_FILE).write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match=rf"{TENSOR_FILE}: .*corrupted"):
        qcompiler.load(path)


def test_unreadable_tensor_file_with_matching_checksum(small_save, tmp_path):
    path = _copy_save(small_save, tmp_path / "m")
    junk = b"\xff" * 64
    (path / TENSOR_FILE).write_bytes(junk)
    _edit_json(path, lambda d: d["tensors"].__setitem__("sha256", hashlib.sha256(junk).hexdigest()))
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        qcompiler.load(path)


@pytest.mark.parametrize("content, message", [
    ("truncate", "not valid JSON"),
    ("{", "not valid JSON"),
    ("[1, 2]", "not a saved model of qcompiler"),
    ('{"format": "qcompiler-compiled-model", "format_version": 1, "x": NaN}', "not valid JSON"),
])
def test_corrupted_model_json(small_save, tmp_path, content, message):
    path = _copy_save(small_save, tmp_path / "m")
    text = (path / MODEL_FILE).read_text()
    (path / MODEL_FILE).write_text(text[: len(text) // 2] if content == "truncate" else content)
    with pytest.raises(ArtifactError, match=rf"{MODEL_FILE}: {message}"):
        qcompiler.load(path)


def test_wrong_format_version(small_save, tmp_path):
    path = _copy_save(small_save, tmp_path / "m")
    _edit_json(path, lambda d: d.__setitem__("format_version", 99))
    with pytest.raises(ArtifactError, match="format_version is 99 but this qcompiler reads version 1"):
        qcompiler.load(path)


def _first_node(doc: dict, op: str) -> dict:
    return next(n for n in doc["graph"]["nodes"] if n["op"] == op)


@pytest.mark.parametrize("op, target", [
    ("call_function", "os.system"),
    ("call_function", "builtins.eval"),
    ("call_function", "builtins.exec"),
    ("call_function", "builtins.__import__"),
    ("call_function", "posix.system"),
    ("call_function", "torch.load"),
    ("call_function", "torch.save"),
    ("call_function", "torch.from_file"),
    ("call_function", "torch.set_num_threads"),
    ("call_function", "torch.nn.functional.os"),
    ("call_function", "torch.Tensor"),
    ("call_function", "operator.call"),
    ("call_function", "operator.methodcaller"),
    ("call_method", "__reduce_ex__"),
    ("call_method", "apply_"),
    ("call_method", "system"),
])
def test_tampered_function_names_are_rejected_without_running(small_save, tmp_path, op, target):
    path = _copy_save(small_save, tmp_path / "m")
    sentinel = tmp_path / "pwned"
    command = f"touch {sentinel}"

    def tamper(doc):
        node = _first_node(doc, "call_function")
        node["op"], node["target"] = op, target
        node["args"] = [command] if op == "call_function" else [node["args"][0], command]
        if target == "builtins.eval":
            node["args"] = [f"__import__('os').system({command!r})"]

    _edit_json(path, tamper)
    with pytest.raises(ArtifactError, match=r"graph\.nodes\[\d+\] .*not"):
        qcompiler.load(path)
    assert not sentinel.exists()


def test_getattr_of_private_attributes_is_rejected(small_save, tmp_path):
    path = _copy_save(small_save, tmp_path / "m")

    def tamper(doc):
        node = _first_node(doc, "call_function")
        node["target"], node["args"], node["kwargs"] = "builtins.getattr", [{"node": "x"}, "__class__"], []

    _edit_json(path, tamper)
    with pytest.raises(ArtifactError, match="only public attribute names are allowed"):
        qcompiler.load(path)


@pytest.mark.parametrize("class_name", ["os.system", "builtins.eval", "torch.nn.Module", "torch.nn.Sequential"])
def test_tampered_module_class_is_rejected(small_save, tmp_path, class_name):
    path = _copy_save(small_save, tmp_path / "m")

    def tamper(doc):
        target = _first_node(doc, "call_module")["target"]
        doc["graph"]["modules"][target]["class"] = class_name

    _edit_json(path, tamper)
    with pytest.raises(ArtifactError, match=rf"module class '{class_name}' is not one a saved model may contain"):
        qcompiler.load(path)


def test_forward_reference_and_unknown_tag_are_rejected(small_save, tmp_path):
    path = _copy_save(small_save, tmp_path / "m")

    def forward_ref(doc):
        nodes = doc["graph"]["nodes"]
        nodes[1]["args"] = [{"node": nodes[-1]["name"]}]

    _edit_json(path, forward_ref)
    with pytest.raises(ArtifactError, match="not defined before it"):
        qcompiler.load(path)
    path = _copy_save(small_save, tmp_path / "m2")
    _edit_json(path, lambda d: _first_node(d, "call_function").__setitem__("args", [{"pickle": "x"}]))
    with pytest.raises(ArtifactError, match="unknown value tag 'pickle'"):
        qcompiler.load(path)


def test_missing_tensor(small_save, tmp_path):
    path = _copy_save(small_save, tmp_path / "m")
    key = next(k for k in st_load((path / TENSOR_FILE).read_bytes()) if k.endswith(".weight"))
    _rewrite_tensors(path, lambda t: t.pop(key))
    with pytest.raises(ArtifactError, match=rf"{TENSOR_FILE}: tensor '{key}' .* is missing"):
        qcompiler.load(path)
    path = _copy_save(small_save, tmp_path / "m2")
    _rewrite_tensors(path, lambda t: t.pop("plan.group0.scale"))
    with pytest.raises(ArtifactError, match=r"tensor 'plan.group0.scale' \(plan.groups\[0\].scale\) is missing"):
        qcompiler.load(path)


def test_tensor_of_wrong_shape(small_save, tmp_path):
    path = _copy_save(small_save, tmp_path / "m")
    key = next(k for k in st_load((path / TENSOR_FILE).read_bytes()) if k.endswith(".weight"))
    _rewrite_tensors(path, lambda t: t.__setitem__(key, t[key].reshape(-1)[:-1].clone()))
    with pytest.raises(ArtifactError, match=rf"tensor '{key}' .* has shape \(\d+,\), expected \("):
        qcompiler.load(path)


def test_constructor_arguments_that_disagree_with_tensors(small_save, tmp_path):
    path = _copy_save(small_save, tmp_path / "m")

    def widen(doc):
        record = next(m for m in doc["graph"]["modules"].values()
                      if m["class"] in ("torch.nn.Linear", "qcompiler.exact.ExactLinear"))
        record["args"]["out_features"] += 1

    _edit_json(path, widen)
    with pytest.raises(ArtifactError, match="has shape .* expected"):
        qcompiler.load(path)


def test_plan_and_spec_tampering(small_save, tmp_path):
    path = _copy_save(small_save, tmp_path / "m")
    _edit_json(path, lambda d: d["plan"]["groups"][0]["format"]["fields"].__setitem__("bits", 1))
    with pytest.raises(ArtifactError, match=r"plan\.groups\[0\]: malformed .*2 to 16 bits"):
        qcompiler.load(path)
    path = _copy_save(small_save, tmp_path / "m2")
    _edit_json(path, lambda d: d["target"].__setitem__("toml", "name = 'x'\n[cost]\nlatency = '__import__(1)'"))
    with pytest.raises(ArtifactError, match="target: the stored target spec does not load"):
        qcompiler.load(path)


# ---------------------------------------------------------------------------------------------
# The pieces: function names and tagged values
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn, name", [
    (F.relu, "torch.nn.functional.relu"), (operator.add, "operator.add"), (getattr, "builtins.getattr"),
    (torch.flatten, "torch.flatten"), (torch.cat, "torch.cat"), (math.sqrt, "math.sqrt"),
    (F.max_pool2d, "torch.nn.functional.max_pool2d"), (torch.split, "torch.split"),
    (torch._assert, "torch._assert"), (operator.getitem, "operator.getitem"),
])
def test_function_names_round_trip(fn, name):
    assert function_name(fn) == name
    assert resolve_function(name) is fn


def test_functions_outside_the_allowlist_have_no_name():
    assert function_name(eval) is None and function_name(torch.load) is None
    assert function_name(lambda x: x) is None and function_name(operator.call) is None


def _same(a, b) -> bool:
    """Equality that also compares types (tuple vs list) and treats NaN as equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, slice):
        return _same((a.start, a.stop, a.step), (b.start, b.stop, b.step))
    return a == b


def _through_json(value):
    return decode_value(json.loads(json.dumps(encode_value(value, "test"), allow_nan=False)), {})


def test_tagged_values_by_hand():
    values = [
        None, True, 3, -2.5, float("inf"), float("-inf"), float("nan"), "s", (1, (2.0, "x")), [1, [2]],
        slice(None, 3, None), slice(1, None, -1), Ellipsis, (Ellipsis, slice(1, None)),
        torch.float16, torch.int8, torch.device("cpu"), torch.contiguous_format, torch.channels_last,
        torch.strided, torch.Size([2, 3]), {"a": 1, 2: (3,)}, [],
    ]
    for v in values:
        assert _same(_through_json(v), v), v
    assert encode_value((1, 2.0), "t") == {"tuple": [1, 2.0]}
    assert encode_value(float("inf"), "t") == {"float": "inf"}
    graph = fx.Graph()
    x = graph.placeholder("x")
    assert decode_value(encode_value([x, (x, 1)], "t"), {"x": x}) == [x, (x, 1)]
    with pytest.raises(ArtifactError, match="where only data is expected"):
        encode_value(x, "meta", nodes_ok=False)
    with pytest.raises(ArtifactError, match="cannot save a value of type"):
        encode_value(object(), "somewhere")
    for bad in ({"dtype": "load"}, {"dtype": "Tensor"}, {"float": "1e3"}, {"a": 1, "b": 2}, {"slice": [1]}):
        with pytest.raises(ValueError):
            decode_value(bad, {})


_scalars = (st.none() | st.booleans() | st.integers(-2**62, 2**62) | st.floats() | st.text(max_size=8)
            | st.sampled_from([Ellipsis, torch.float32, torch.bfloat16, torch.device("cpu"),
                               torch.preserve_format]))
_values = st.recursive(
    _scalars | st.builds(slice, st.none() | st.integers(), st.none() | st.integers(), st.none() | st.integers()),
    lambda inner: (st.lists(inner, max_size=4) | st.lists(inner, max_size=4).map(tuple)
                   | st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(_values)
def test_tagged_values_round_trip_property(value):
    assert _same(_through_json(value), value)


def test_padding_modules_round_trip(tmp_path):
    # TF-style SAME padding (EfficientNet-Lite) and reflection padding are plain modules.
    model = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(),
                          nn.ReflectionPad2d(1), nn.ConstantPad2d(1, 0.0), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = qcompiler.qcompile(model, x, target="npu-int8", calib_data=[x], progress=False)
    compiled.save(str(tmp_path / "m"))
    loaded = qcompiler.load(str(tmp_path / "m"))
    assert torch.equal(loaded(x), compiled(x))
