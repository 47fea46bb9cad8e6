"""A sample of the timm zoo through capture, fold_bn and a full npu-int8 compile, run the way
`benchmarks/zoo_sweep.py` runs every model (random weights, BatchNorm statistics of random
inputs, 4 calibration batches, a 2-step AdaRound), so a regression of the sweep shows here.

The models are chosen for diverse ops: zero-init residual branches (resnet10t), squeeze-excite
with hard activations and timm's functional `Linear` (mobilenetv3), functional convs
(starnet), attention with optional forward arguments (deit), LayerNorm2d and 7x7 depthwise
(convnext, edgenext), cascaded group attention with its own BatchNorms (efficientvit),
re-parameterisable blocks (repghostnet, fastvit), SiLU and squeeze-excite (efficientnet),
parallel branches (hrnet), group convs (regnetx), CSP blocks (cspnext) and attention biases
memoised in a dict (levit).

SQNR against float is a guard, not an accuracy figure (random weights): each floor sits about
5 dB under the value measured at 64x64 when this test was written, far above what a broken
pass gives (the dead residual branch of resnet10t once gave 0.2 dB).
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import zoo_sweep  # noqa: E402

# model -> SQNR floor in dB (measured at 64x64 in parentheses)
FLOORS = {
    "resnet10t": 20.0,              # (26.7)
    "mobilenetv3_small_050": 4.0,   # (8.9)
    "starnet_s050": 19.0,           # (25.1)
    "deit_tiny_patch16_224": 6.0,   # (11.1)
    "convnext_atto": 24.0,          # (29.8)
    "efficientvit_m0": 7.0,         # (11.9)
    "regnetx_002": 18.0,            # (23.4)
    "efficientnet_b0": 2.0,         # (5.3)
    "hrnet_w18_small": 9.0,         # (14.5)
    "repghostnet_050": 6.0,         # (10.9)
    "fastvit_t8": 9.0,              # (14.4)
    "edgenext_xx_small": 24.0,      # (29.1)
    "cspnext_tiny": 5.0,            # (10.6)
    "levit_128s": 10.0,             # (15.2)
}


@pytest.fixture(scope="module", autouse=True)
def alarm():
    previous = signal.signal(signal.SIGALRM, zoo_sweep._alarm)
    yield
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_a_timm_model_folds_exactly_and_compiles(name):
    row = zoo_sweep.sweep_one(name, 64, max_params=30.0, seconds=300)
    assert row is not None
    assert row.passed, f"{name}: {row.status}: {row.error}"
    assert row.fold_err <= zoo_sweep.FOLD_TOLERANCE
    assert row.sqnr_db >= FLOORS[name], f"{name}: {row.sqnr_db:.1f} dB"
