"""Detectors compile whole with one qcompile call: the root is split into its traceable parts
(qcompiler/partition.py), each part is a compiled graph, and the detector's own pre- and
post-processing (resize, anchors, box decoding, NMS) runs eagerly in float around them.

The detectors and measures are those of `benchmarks/detection.py`, run small here (128x128
images, a 2-step AdaRound). Floors sit well under the values measured when the test was
written (in parentheses).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import qcompiler
from qcompiler.compiled import CompiledModel
from qcompiler.errors import CaptureError, QCompileError
from qcompiler.partition import PartitionedModel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import detection  # noqa: E402
from common import pipeline  # noqa: E402

SIZE = 128


@pytest.fixture(scope="module")
def data():
    return detection.images(2, 2, SIZE, 10), detection.images(1, 2, SIZE, 20)


@pytest.mark.parametrize("name, parts, host, head_floor", [
    # single stage: backbone+FPN, and the four convs the heads share over the FPN levels (53.6 dB)
    ("retinanet_resnet50_fpn", ["backbone", "head.classification_head.conv", "head.classification_head.cls_logits",
                                "head.regression_head.conv", "head.regression_head.bbox_reg"],
     ["transform", "anchor_generator"], 40.0),
    # two stage: backbone, the region-proposal head's convs, the box head and predictor (7.8 dB;
    # random mobilenet_v3 weights amplify rounding noise layer after layer)
    ("fasterrcnn_mobilenet_v3_large_320_fpn", ["backbone", "rpn.head.conv", "rpn.head.cls_logits", "rpn.head.bbox_pred",
                                               "roi_heads.box_head", "roi_heads.box_predictor.cls_score",
                                               "roi_heads.box_predictor.bbox_pred"],
     ["transform", "rpn.anchor_generator", "roi_heads.box_roi_pool"], 4.0),
])
def test_a_detector_compiles_whole(name, parts, host, head_floor, data):
    calib, held = data
    r = detection.measure(name, SIZE, calib, held, "npu-int8", pipeline(quick=True))
    compiled = r["compiled"]
    assert isinstance(compiled, PartitionedModel)
    assert compiled.partition.parts == parts
    assert sorted(compiled.partition.host) == sorted(host)
    assert "" in compiled.partition.split                  # the root's own code (NMS, decoding) runs eagerly
    for path in parts:
        part = compiled.root.get_submodule(path)
        assert isinstance(part, CompiledModel) and compiled.parts[path] is part
        assert any(g.kind == "weight" and g.format_name == "w8" for g in part.plan.groups)
    assert r["head_sqnr_db"] >= head_floor, r["head_sqnr_db"]
    # The detections keep the model's own format, and the report shows the partition.
    model = detection.detector(name, SIZE)
    with torch.no_grad():
        out = compiled(held[0])
    assert [sorted(d) for d in out] == [["boxes", "labels", "scores"]] * 2
    assert r["boxes"] == 200 and r["matched"] > 0.1
    text = compiled.report()
    assert "compiled graph" in text and "host (float)" in text and "anchor_generator" in text
    # The user's detector is untouched: it still holds its own float modules.
    assert all(not isinstance(model.get_submodule(p), CompiledModel) for p in parts)


def test_a_compiled_part_lowers_bit_exactly_and_saves(data, tmp_path):
    calib, held = data
    model = detection.detector("retinanet_resnet50_fpn", SIZE)
    compiled = qcompiler.qcompile(model, (calib[0],), target="npu-int8", calib_data=calib,
                                  split=["head.classification_head.cls_logits", "head.regression_head.bbox_reg"],
                                  passes=pipeline(quick=True), progress=False)
    assert compiled.partition.parts == ["head.classification_head.cls_logits", "head.regression_head.bbox_reg"]
    lowered = compiled.lower("reference")
    x = torch.randn(2, 256, 16, 16)
    for path, backend in lowered.items():
        torch.testing.assert_close(backend(x), compiled.parts[path](x), rtol=0, atol=0)
    part = compiled.parts["head.regression_head.bbox_reg"]
    part.save(tmp_path / "bbox_reg")
    torch.testing.assert_close(qcompiler.load(tmp_path / "bbox_reg")(x), part(x), rtol=0, atol=0)


def test_bad_splits_are_clear_errors(data):
    calib, _ = data
    model = detection.detector("retinanet_resnet50_fpn", SIZE)
    with pytest.raises(QCompileError, match="'nope', which is not a submodule"):
        qcompiler.qcompile(model, (calib[0],), calib_data=calib, split=["nope"], progress=False)
    with pytest.raises(CaptureError, match="split part 'head' .* cannot be traced"):
        qcompiler.qcompile(model, (calib[0],), calib_data=calib, split=["head"], progress=False)
    with pytest.raises(QCompileError, match="overlap"):
        qcompiler.qcompile(model, (calib[0],), calib_data=calib, split=["backbone", "backbone.body"], progress=False)


class NoTraceablePart(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_a_model_with_nothing_to_compile_still_says_why():
    with pytest.raises(CaptureError, match="no part of NoTraceablePart"):
        qcompiler.qcompile(NoTraceablePart(), torch.randn(2, 3), calib_data=[torch.randn(2, 3)], progress=False)
