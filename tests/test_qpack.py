"""qpack: export -> load gives the same integer outputs; damaged or tampered files give clear errors."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import qcompiler
from qcompiler.errors import ArtifactError, QCompileError
from qcompiler.backends.qpack import GRAPH_FILE, TENSOR_FILE
from qcompiler.backends.reference import IntegerKernel

sys.path.insert(0, str(Path(__file__).parent))
from test_reference import Tiny, _compile  # noqa: E402


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    torch.manual_seed(0)
    model = Tiny().eval()
    out = {}
    for target in ("npu-int8", "dsp-fixed-point", "cpu-x86-int8"):
        compiled = _compile(model, target)
        path = tmp_path_factory.mktemp("qpack") / target
        compiled.export(path, format="qpack")
        out[target] = (compiled, path)
    return out


@pytest.mark.parametrize("target", ["npu-int8", "dsp-fixed-point", "cpu-x86-int8"])
def test_round_trip_gives_identical_codes(exports, target):
    compiled, path = exports[target]
    loaded = qcompiler.load_qpack(path)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded.codes(x), compiled.lower("reference").codes(x))
    with torch.no_grad():
        assert torch.equal(loaded(x), compiled(x))
    assert sum(isinstance(m, IntegerKernel) for m in loaded.modules()) == 4


def test_graph_json_says_what_a_toolchain_needs(exports):
    _, path = exports["npu-int8"]
    doc = json.loads((path / GRAPH_FILE).read_text())
    assert doc["target"] == {"name": "npu-int8", "version": "1.0",
                             "requant": {"mode": "fixed_point", "rounding": "half_away_from_zero",
                                         "multiplier_bits": 32}}
    kernels = [n for n in doc["nodes"] if n["op"] == "conv2d_int"]
    assert len(kernels) == 3 and all(n["attrs"]["accumulator_bits"] == 32 for n in kernels)
    tensors = st_load((path / TENSOR_FILE).read_bytes())
    k = kernels[0]
    assert tensors[k["tensors"]["weight"]].dtype == torch.int8
    assert tensors[k["tensors"]["multiplier"]].dtype == torch.int64
    assert k["out"]["dtype"] == "int32" and k["out"]["shape"] == [4, 8, 16, 16]
    m = tensors[k["tensors"]["multiplier"]]
    assert bool(((m >= 2**30) & (m < 2**31)).all())
    assert doc["tensors"]["sha256"] == hashlib.sha256((path / TENSOR_FILE).read_bytes()).hexdigest()


def _copy(path: Path, dst: Path) -> Path:
    shutil.copytree(path, dst)
    return dst


def _edit_json(path: Path, edit) -> None:
    doc = json.loads((path / GRAPH_FILE).read_text())
    edit(doc)
    (path / GRAPH_FILE).write_text(json.dumps(doc))


def _rewrite_tensors(path: Path, edit) -> None:
    """Change the tensor file and record its new checksum, as a careless tool would."""
    tensors = dict(st_load((path / TENSOR_FILE).read_bytes()))
    edit(tensors)
    blob = st_save(tensors)
    (path / TENSOR_FILE).write_bytes(blob)
    _edit_json(path, lambda d: d["tensors"].__setitem__("sha256", hashlib.sha256(blob).hexdigest()))


def _weight_key(path: Path) -> str:
    doc = json.loads((path / GRAPH_FILE).read_text())
    return next(n for n in doc["nodes"] if n["op"] == "conv2d_int")["tensors"]["weight"]


def test_tensor_of_wrong_shape(exports, tmp_path):
    path = _copy(exports["npu-int8"][1], tmp_path / "q")
    key = _weight_key(path)
    _rewrite_tensors(path, lambda t: t.__setitem__(key, t[key][:-1].clone()))
    with pytest.raises(ArtifactError, match=rf"tensor '{key}' .* has shape \(7, 3, 3, 3\), expected \(8, 3, 3, 3\)"):
        qcompiler.load_qpack(path)


def test_recorded_shape_that_disagrees_with_the_kernel(exports, tmp_path):
    path = _copy(exports["npu-int8"][1], tmp_path / "q")
    doc = json.loads((path / GRAPH_FILE).read_text())
    bias_key = next(n for n in doc["nodes"] if n["op"] == "conv2d_int")["tensors"]["bias"]
    _rewrite_tensors(path, lambda t: t.__setitem__(bias_key, t[bias_key][:-1].clone()))
    _edit_json(path, lambda d: d["tensors"]["index"][bias_key].__setitem__("shape", [7]))
    with pytest.raises(ArtifactError, match=r"IntegerKernel.bias has shape \(7,\), expected \(8,\)"):
        qcompiler.load_qpack(path)


def test_missing_tensor(exports, tmp_path):
    path = _copy(exports["npu-int8"][1], tmp_path / "q")
    key = _weight_key(path)
    _rewrite_tensors(path, lambda t: t.pop(key))
    with pytest.raises(ArtifactError, match=rf"tensor '{key}' .* is missing"):
        qcompiler.load_qpack(path)


def test_changed_tensor_file_fails_its_checksum(exports, tmp_path):
    path = _copy(exports["npu-int8"][1], tmp_path / "q")
    blob = bytearray((path / TENSOR_FILE).read_bytes())
    blob[-1] ^= 1
    (path / TENSOR_FILE).write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="do not match the SHA-256"):
        qcompiler.load_qpack(path)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"format": "onnx"}', "not a qpack"),
])
def test_bad_json(exports, tmp_path, content, message):
    path = _copy(exports["npu-int8"][1], tmp_path / "q")
    (path / GRAPH_FILE).write_text(content)
    with pytest.raises(ArtifactError, match=message):
        qcompiler.load_qpack(path)


def test_wrong_version(exports, tmp_path):
    path = _copy(exports["npu-int8"][1], tmp_path / "q")
    _edit_json(path, lambda d: d.__setitem__("format_version", 99))
    with pytest.raises(ArtifactError, match="format_version is 99 but this qcompiler reads version 1 of the qpack format"):
        qcompiler.load_qpack(path)


@pytest.mark.parametrize("field, value, message", [
    ("op", "python_eval", "unknown op 'python_eval'"),
    ("class", "builtins.exec", "not one a qpack may contain"),
])
def test_tampered_ops_are_rejected(exports, tmp_path, field, value, message):
    path = _copy(exports["npu-int8"][1], tmp_path / "q")

    def edit(doc):
        node = next(n for n in doc["nodes"] if n["op"] == "conv2d_int")
        if field == "class":
            node.update(op="module", module_args={})
        node[field] = value

    _edit_json(path, edit)
    with pytest.raises(ArtifactError, match=message):
        qcompiler.load_qpack(path)


def test_function_outside_the_allowlist_is_rejected(exports, tmp_path):
    path = _copy(exports["npu-int8"][1], tmp_path / "q")

    def edit(doc):
        next(n for n in doc["nodes"] if n["op"] == "function")["target"] = "builtins.eval"

    _edit_json(path, edit)
    with pytest.raises(ArtifactError, match="not one a saved graph may call"):
        qcompiler.load_qpack(path)


def test_missing_files_and_unknown_format(exports, tmp_path):
    with pytest.raises(ArtifactError, match="no qpack here"):
        qcompiler.load_qpack(tmp_path / "nothing")
    path = _copy(exports["npu-int8"][1], tmp_path / "q")
    (path / TENSOR_FILE).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        qcompiler.load_qpack(path)
    with pytest.raises(QCompileError, match="unknown export format 'tflite'"):
        exports["npu-int8"][0].export(tmp_path / "t", format="tflite")
