"""Accuracy guard: on a network with trained weights, every built-in target agrees with float.

The structural end-to-end tests run random weights, whose near-zero logit margins make accuracy
meaningless; a pass that silently breaks numerics (a rounding mode, a folded bias, a scale) would
pass them. Here a small CNN is trained on scikit-learn's digits once per session
(`tests/trained_models.py`, deterministic), compiled for every built-in target, and compared with
the float model on 600 held-out digits that were never trained or calibrated on: top-1
agreement, output SQNR and labelled accuracy against float's.

Thresholds come from `python tests/trained_models.py --seeds 0 1 2`. The tests train with seed
0, and training is deterministic (one thread, deterministic algorithms; two runs give identical
figures), so the agreement floors sit a stated margin below seed 0's figures: tight enough that
the numerical breakages tried against them fail (a requantizer that floors instead of rounding,
a BatchNorm folded without its bias, activation scales 1.5x too large), loose enough for the
move seen when training merely sums in another order. Seeds 1 and 2 train another network on
another split; they show how much of a figure is the network, not the compiler. The offset test
holds for every seed: bias correction removes the mean error whatever the network.

A requantizer that breaks a tie the wrong way moves no accuracy figure; the check that every
requantizer computes the spec's rounding of its own accumulator catches it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from trained_models import (  # noqa: E402
    TrainedDigits, agreement, calib_offset_codes, compile_digits, output_quantizer, run, train_digits,
)

import qcompiler  # noqa: E402
from qcompiler.exact import ExactAdd, KernelRequantize, add_codes  # noqa: E402
from qcompiler.requant import requantize  # noqa: E402

TARGETS = qcompiler.list_targets()
# Targets whose activations are integer codes: their simulation lowers to the reference backend.
INTEGER_TARGETS = ("npu-int8", "npu-int4", "cpu-x86-int8", "dsp-fixed-point", "npu-int8-transformer", "npu-int8-balanced")


@dataclass(frozen=True)
class Floor:
    """The least a target must reach on the 600 held-out digits (one digit is 0.17 points)."""

    top1_agreement: float   # fraction of held-out digits whose top-1 class equals float's
    sqnr_db: float          # output (logit) SQNR against float
    accuracy_drop: float    # labelled accuracy may fall at most this far below float's (96.17 %)


# Measured with `python tests/trained_models.py --seeds 0` (seed 0 is what the tests train; two runs
# gave identical figures). Margins: 2 dB of SQNR and 1 point of agreement (1.5 where the format
# is coarse). The largest move seen when only the float summation order of training changed
# (training on two threads, a perturbation like another CPU's) was 0.95 dB and 0.67 points.
FLOORS = {
    # measured 99.83 % agreement, 38.89 dB, accuracy 96.33 %; threshold 98.8 %, 36.8 dB, drop <= 1 pt
    "npu-int8": Floor(0.988, 36.8, 0.010),
    # measured 100.00 %, 39.11 dB, 96.17 %; threshold 99.0 %, 37.2 dB, drop <= 1 pt
    "npu-int4": Floor(0.990, 37.2, 0.010),
    # measured 99.83 %, 37.85 dB, 96.33 %; threshold 98.5 %, 35.8 dB, drop <= 1 pt
    "cpu-x86-int8": Floor(0.985, 35.8, 0.010),
    # measured 98.83 %, 30.45 dB, 96.67 %; threshold 97.8 %, 28.2 dB, drop <= 1 pt
    "dsp-fixed-point": Floor(0.978, 28.2, 0.010),
    # measured 99.83 %, 38.68 dB, 96.83 % (seeds 1, 2: 99.50 %, 99.83 %); threshold 98.8 %, 36.6 dB, drop <= 1 pt
    "npu-int8-transformer": Floor(0.988, 36.6, 0.010),
    # measured 99.50 %, 34.89 dB, 96.50 % (seeds 1, 2: 99.33 %, 31.23 dB; 99.83 %, 35.35 dB); below
    # npu-int8 because this target keeps round-to-nearest weights and mse ranges (chosen on MiniLM)
    # and a CNN has no residual stream to balance; threshold 98.5 %, 32.9 dB, drop <= 1 pt.
    # No offset limit: without bias correction the logits keep their rounding offset (0.96 codes).
    "npu-int8-balanced": Floor(0.985, 32.9, 0.010),
    # measured 98.33 %, 24.78 dB, 96.33 %; threshold 96.8 %, 22.8 dB, drop <= 1.5 pt
    # (before bias correction ran on kernels without integer weights: 97.33 %, 21.44 dB)
    "fp8": Floor(0.968, 22.8, 0.015),
    # measured 98.33 %, 20.67 dB, 96.50 %; threshold 96.8 %, 18.7 dB, drop <= 1.5 pt
    # (before bias correction ran on kernels without integer weights: 97.67 %, 16.74 dB)
    "weight-only-4bit": Floor(0.968, 18.7, 0.015),
}

# Bias correction (inside `optimize_rounding`) sets each kernel's bias so that its mean output over
# the calibration samples it used (the first 128) equals the float model's. What is left of the
# output's mean error is rounding: the int32 bias, requantization and the output quantizer.
# Largest |mean(q - f)| over the ten logits, in output codes, from
# `python tests/trained_models.py --seeds 0 1 2` (column "calib offset"):
OFFSET_LIMITS = {
    # seed 0: 0.043 codes (at most 0.078 over seeds 0-2 with AdaRound weight 3); 0.32-1.06 without bias correction
    "npu-int8": 0.2,
    # seed 0: 0.057 (at most 0.069 over seeds 0-2 with AdaRound weight 3)
    "npu-int4": 0.2,
    # seed 0: 0.055 (at most 0.061 over seeds 0-2 with AdaRound weight 3)
    "cpu-x86-int8": 0.2,
    # The DSP rounds ties up in every shift (its spec's half_up), a bias that bias correction, which
    # runs before requantization is modelled, cannot see: measured 1.233 (seed 0; 0.32-1.18 over
    # seeds 0-2 with AdaRound weight 3), 2.35 without bias correction. Threshold 1.7.
    "dsp-fixed-point": 1.7,
    # The logits are int16 codes here (256 to an int8 code): seed 0: 10.6 (4.1-10.6 over seeds
    # 0-2), 0.04 of an int8 code. Threshold 40.
    "npu-int8-transformer": 40.0,
}


@pytest.fixture(scope="session")
def digits() -> TrainedDigits:
    return train_digits()


@pytest.fixture(scope="session")
def float_logits(digits) -> torch.Tensor:
    return run(digits.model, digits.heldout)


@pytest.fixture(scope="session")
def compiled(digits):
    """target -> the trained model compiled for it; each target compiles once per session."""
    cache: dict[str, qcompiler.CompiledModel] = {}

    def get(target: str) -> qcompiler.CompiledModel:
        if target not in cache:
            cache[target] = compile_digits(digits, target)
        return cache[target]
    return get


def test_every_built_in_target_has_a_floor():
    assert sorted(FLOORS) == sorted(TARGETS)


def test_float_model_learned_the_digits(digits):
    # measured 96.2 % (seed 0), 95.5-96.2 % over seeds 0-2; floor 94 %
    assert digits.float_accuracy >= 0.94


@pytest.mark.parametrize("target", TARGETS)
def test_compiled_model_agrees_with_float(target, digits, float_logits, compiled):
    floor = FLOORS[target]
    got = agreement(float_logits, run(compiled(target), digits.heldout), digits.heldout_labels)
    assert got.top1_agreement >= floor.top1_agreement, f"{target}: {got}"
    assert got.sqnr_db >= floor.sqnr_db, f"{target}: {got}"
    assert got.accuracy >= digits.float_accuracy - floor.accuracy_drop, \
        f"{target}: {got}, float accuracy {digits.float_accuracy:.4f}"


@pytest.mark.parametrize("target", sorted(OFFSET_LIMITS))
def test_outputs_carry_no_systematic_offset(target, digits, compiled):
    """On the samples bias correction was fitted to, no logit is shifted by more than rounding explains."""
    offset = calib_offset_codes(digits, compiled(target))
    assert offset <= OFFSET_LIMITS[target], f"{target}: a logit is off by {offset:.3f} codes on average"


@pytest.mark.parametrize("target", INTEGER_TARGETS)
def test_reference_backend_is_bit_exact_on_trained_weights(target, digits, compiled):
    """The integer-only lowering computes the simulation's output codes, every one."""
    model = compiled(target)
    ref = model.lower("reference")
    quantizer = output_quantizer(model)
    sim_codes = quantizer.fmt.quantize(run(model, digits.heldout), quantizer.params)
    with torch.no_grad():
        ref_codes = ref.codes(digits.heldout)
    assert ref_codes.dtype == torch.int32
    assert torch.equal(ref_codes, sim_codes)


@pytest.mark.parametrize("target", INTEGER_TARGETS)
def test_requantization_rounds_as_the_spec_says(target, digits, compiled):
    """Every requantizer of the simulation, on the trained weights, gives the codes the spec's
    `[requant]` mode and rounding give for its accumulator; its multiplier is its scale ratio."""
    model = compiled(target)
    spec = model.target.requant
    seen: list[tuple[torch.nn.Module, tuple, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append((m, args, out)))
             for m in model.simulated.modules() if isinstance(m, (KernelRequantize, ExactAdd))]
    try:
        run(model, digits.heldout[:32])
    finally:
        for h in hooks:
            h.remove()
    assert sum(isinstance(m, KernelRequantize) for m, _, _ in seen) >= 4, "fewer exact kernels than the model has"
    for m, args, out in seen:
        if isinstance(m, ExactAdd):
            codes = [torch.round(x.float() / s) + z for x, s, z in zip(args, m.in_scales, m.zero_points)]
            want = add_codes(*codes, m.zero_points, (m.qmin, m.qmax), spec.mode, spec.rounding, m.multiplier, m.shift)
            got = torch.round(out / m.out_scale) + m.zero_points[2]
            assert torch.equal(got.to(torch.int64), want), f"{target}: an integer add rounds unlike the spec"
            continue
        shape = [1] * args[0].ndim
        shape[m.channel_dim] = -1
        acc = torch.round(args[0].double() / m.acc_scale.reshape(shape)).to(torch.int64)
        y = requantize(acc, spec.mode, spec.rounding, m.multiplier.reshape(shape), m.shift.reshape(shape),
                       m.float_multiplier.reshape(shape))
        zp = 0 if m.params.zero_point is None else int(m.params.zero_point.reshape(-1)[0])
        want = (y + zp).clamp(m.fmt.qmin, m.fmt.qmax)
        assert torch.equal(m.fmt.quantize(out, m.params).to(torch.int64), want), \
            f"{target}: a requantizer rounds unlike the spec ({spec.mode}/{spec.rounding})"
        real = m.acc_scale / m.params.scale.reshape(()).double()
        if spec.mode == "float":
            assert torch.allclose(m.float_multiplier.double(), real, rtol=1e-6, atol=0)
        else:
            factor = torch.ldexp(m.multiplier.double(), -m.shift.double())
            assert torch.allclose(factor, real, rtol=2.0 ** -29, atol=0)


def test_compile_is_deterministic(digits, compiled):
    """The same model, data and seed give the same simulation, bit for bit."""
    again = compile_digits(digits, "npu-int8")
    assert torch.equal(run(again, digits.heldout), run(compiled("npu-int8"), digits.heldout))
