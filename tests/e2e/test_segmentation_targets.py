"""torchvision's three segmentation models compile under every NPU target and keep float's
pixels (random weights, BatchNorm statistics of random inputs; the models of
`benchmarks/segmentation.py`, run here small: 64x64 inputs and a 2-step AdaRound).

The floors sit well under what was measured when the test was written (in parentheses) and far
above what a broken pass gives; random weights make a pixel's 21 class scores close, so pixel
agreement is a harsh measure, and a deep random network amplifies every layer's rounding noise
(fcn_resnet50 loses about 0.7 dB per layer from 37.5 dB after its stem, with no single cliff).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import qcompiler
from qcompiler.mixed_precision import output_sqnr_db

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import segmentation  # noqa: E402
from common import pipeline  # noqa: E402

SIZE = 64
# (model, target) -> (pixel agreement floor, SQNR floor in dB)
FLOORS = {
    ("lraspp_mobilenet_v3_large", "npu-int8"): (0.70, 11.0),      # (82.0 %, 14.2 dB)
    ("lraspp_mobilenet_v3_large", "npu-int4"): (0.70, 10.5),      # (80.8 %, 13.7 dB)
    ("deeplabv3_mobilenet_v3_large", "npu-int8"): (0.46, 5.0),    # (58.1 %, 7.8 dB)
    ("deeplabv3_mobilenet_v3_large", "npu-int4"): (0.46, 5.0),    # (58.5 %, 7.7 dB)
    ("fcn_resnet50", "npu-int8"): (0.32, 1.0),                    # (42.7 %, 2.9 dB)
    ("fcn_resnet50", "npu-int4"): (0.32, 1.0),                    # (43.7 %, 3.0 dB)
    # the two NPU targets added later (measured when they joined this test)
    ("lraspp_mobilenet_v3_large", "npu-int8-transformer"): (0.70, 10.5),     # (80.0 %, 13.8 dB)
    ("lraspp_mobilenet_v3_large", "npu-int8-balanced"): (0.70, 10.5),        # (81.5 %, 13.7 dB)
    ("deeplabv3_mobilenet_v3_large", "npu-int8-transformer"): (0.46, 5.0),   # (62.7 %, 8.0 dB)
    ("deeplabv3_mobilenet_v3_large", "npu-int8-balanced"): (0.46, 5.0),      # (71.0 %, 8.4 dB)
    ("fcn_resnet50", "npu-int8-transformer"): (0.32, 1.0),                   # (44.8 %, 2.4 dB)
    ("fcn_resnet50", "npu-int8-balanced"): (0.32, 1.0),                      # (43.4 %, 2.8 dB)
}


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, SIZE, SIZE, generator=g) for _ in range(3)], torch.randn(4, 3, SIZE, SIZE, generator=g)


@pytest.mark.parametrize("name", list(segmentation.MODELS))
def test_a_segmentation_model_compiles_under_every_npu_target(name, data):
    calib, held = data
    torch.manual_seed(0)
    model = segmentation.MODELS[name]().eval()
    segmentation.set_batch_norm_statistics(model, SIZE)
    with torch.no_grad():
        ref = model(held)
    for target in segmentation.NPU_TARGETS:
        compiled = qcompiler.qcompile(model, calib[0], target=target, calib_data=calib, passes=pipeline(quick=True),
                                      progress=False)
        with torch.no_grad():
            out = compiled(held)
        assert out.keys() == ref.keys() and out["out"].shape == ref["out"].shape
        agree = float((out["out"].argmax(1) == ref["out"].argmax(1)).float().mean())
        sqnr = output_sqnr_db(ref["out"].double(), out["out"].double())
        print(f"{name} {target}: {100 * agree:.1f} % {sqnr:.1f} dB")
        floor_agree, floor_sqnr = FLOORS[(name, target)]
        assert agree >= floor_agree and sqnr >= floor_sqnr, (name, target, agree, sqnr)
