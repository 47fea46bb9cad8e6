"""Confidence intervals for agreement on clustered crops (qcompiler/stats.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest, t as student_t

from qcompiler.errors import QCompileError
from qcompiler.stats import (
    agreement_interval, clopper_pearson, intraclass_correlation, paired_difference_interval,
)


def test_perfectly_clustered_photos_count_as_one_crop_each():
    # Three photos of four crops; within a photo every crop has the same outcome.
    hits = [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]
    photos = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    iv = agreement_interval(hits, photos)
    # By hand: p = 2/3; cluster residuals y_i - p m_i = 4/3, -8/3, 4/3, squares sum to 32/3;
    # variance 3/2 * (32/3) / 12^2 = 1/9; binomial variance (2/3)(1/3)/12 = 1/54; deff 6.
    assert iv.estimate == pytest.approx(2 / 3)
    assert iv.design_effect == pytest.approx(6.0)
    assert iv.n_effective == pytest.approx(2.0)
    assert iv.icc == pytest.approx(1.0)
    assert (iv.n, iv.clusters) == (12, 3)
    # Korn-Graubard: Clopper-Pearson at n_eff (t_11 / t_2)^2.
    n_kg = 2.0 * (student_t.ppf(0.975, 11) / student_t.ppf(0.975, 2)) ** 2
    assert (iv.low, iv.high) == pytest.approx(clopper_pearson(2 / 3 * n_kg, n_kg, 0.95))


def test_icc_hand_computed_and_zero_when_photos_do_not_differ():
    # Equal clusters of 2: means 0.5, 1, 0; MS between 0.5, MS within 1/6; ICC = (1/3)/(2/3).
    assert intraclass_correlation([1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 2, 2]) == pytest.approx(0.5)
    # Every photo with the same share of hits: between-photo variation is below chance (ICC < 0).
    assert intraclass_correlation([1, 0, 1, 0, 1, 0], [0, 0, 1, 1, 2, 2]) < 0


@pytest.mark.parametrize("successes, n", [(0, 10), (3, 10), (47, 50), (50, 50), (480, 500)])
def test_clopper_pearson_matches_scipy_binomtest(successes, n):
    ref = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="exact")
    assert clopper_pearson(successes, n, 0.95) == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_independent_crops_give_nearly_the_exact_binomial_interval():
    # One crop per photo: no clustering; the design effect is n/(n-1) from the k/(k-1) factor
    # and the t adjustment is 1, so the interval is Clopper-Pearson on n-1 crops.
    rng = np.random.default_rng(1)
    hits = rng.random(200) < 0.9
    iv = agreement_interval(hits, list(range(200)))
    assert iv.design_effect == pytest.approx(200 / 199)
    assert (iv.low, iv.high) == pytest.approx(clopper_pearson(hits.mean() * 199, 199, 0.95))


def test_more_correlation_widens_the_interval_at_the_same_rate():
    photos = np.repeat(np.arange(10), 20)
    spread = np.zeros(200, dtype=bool)          # 90 %: two misses in every photo
    for i in range(10):
        spread[i * 20 + 2:(i + 1) * 20] = True
    clustered = np.ones(200, dtype=bool)        # 90 %: one photo all wrong
    clustered[:20] = False
    a, b = agreement_interval(spread, photos), agreement_interval(clustered, photos)
    assert a.estimate == b.estimate == pytest.approx(0.9)
    assert a.design_effect == 1.0 and b.design_effect > 10
    assert b.high - b.low > 2 * (a.high - a.low)


def test_coverage_on_simulated_clustered_crops():
    """11 photos x 45 crops, each photo with its own agreement rate drawn from a beta law
    (intra-photo correlation 0.1): the 95 % interval covers the true mean rate in about 95 % of
    data sets, and ignoring the clustering would cover far less often."""
    rng = np.random.default_rng(0)
    p, rho, k, m = 0.9, 0.1, 11, 45
    a, b = p * (1 - rho) / rho, (1 - p) * (1 - rho) / rho
    photos = np.repeat(np.arange(k), m).tolist()
    covered = naive_covered = 0
    trials = 300
    for _ in range(trials):
        hits = (rng.random((k, m)) < rng.beta(a, b, size=k)[:, None]).ravel()
        iv = agreement_interval(hits, photos)
        covered += iv.low <= p <= iv.high
        naive = clopper_pearson(hits.sum(), hits.size, 0.95)
        naive_covered += naive[0] <= p <= naive[1]
    assert 0.90 <= covered / trials <= 0.99
    assert naive_covered / trials < 0.8


def test_paired_difference_hand_computed():
    a = [1, 1, 0, 0, 1, 0]
    b = [0, 0, 0, 0, 1, 1]
    photos = [0, 0, 1, 1, 2, 2]
    d = paired_difference_interval(a, b, photos)
    # Differences per photo sum to 2, 0, -1; mean 1/6; residuals 5/3, -1/3, -4/3;
    # variance 3/2 * (42/9) / 36 = 7/36; half-width t_2 * sqrt(7/36).
    half = student_t.ppf(0.975, 2) * math.sqrt(7 / 36)
    assert d.estimate == pytest.approx(1 / 6)
    assert (d.low, d.high) == pytest.approx((1 / 6 - half, 1 / 6 + half))
    assert not d.excludes_zero
    # A setting that wins on every photo by the same margin is clearly better.
    assert paired_difference_interval([1] * 6, [1, 0] * 3, photos).excludes_zero


@pytest.mark.parametrize("call", [
    lambda: agreement_interval([1, 0, 1], ["a", "b"]),
    lambda: agreement_interval([1, 1, 0], ["a", "a", "a"]),
    lambda: agreement_interval([1, 2, 0], ["a", "b", "c"]),
    lambda: agreement_interval([], []),
    lambda: paired_difference_interval([1, 0], [1, 0], ["a", "a"]),
])
def test_bad_input_raises(call):
    with pytest.raises(QCompileError):
        call()
