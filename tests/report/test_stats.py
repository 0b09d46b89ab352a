import math

import numpy as np
import pytest

from sge_repro.report.stats import (
    gain_verdict,
    mean_std,
    paired_image_bootstrap,
    paper_verdict,
    seed_bootstrap,
    significance_label,
)


def test_mean_std_uses_sample_std_and_marks_single_values():
    mean, std = mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(1.0)
    assert mean_std([5.0]) == (5.0, None)


def test_paired_bootstrap_of_a_certain_difference_has_a_zero_width_interval():
    treated, baseline = [np.ones(50, dtype=np.uint8)], [np.zeros(50, dtype=np.uint8)]
    gain = paired_image_bootstrap(treated, baseline, samples=500, seed=0)
    assert (gain.estimate, gain.low, gain.high) == (100.0, 100.0, 100.0)
    assert gain.significant is True


def test_paired_bootstrap_matches_the_normal_approximation():
    # 2000 images: treated right / baseline wrong on 300, the reverse on 100, equal elsewhere.
    # Per-image difference d in {+1, -1, 0}: mean 0.1, var = 400/2000 - 0.1^2 = 0.19,
    # so the bootstrap mean is ~N(10, (100 * sqrt(0.19 / 2000))^2) points: 10 +- 1.910.
    n = 2000
    baseline = np.zeros(n, dtype=np.uint8)
    treated = np.zeros(n, dtype=np.uint8)
    treated[:300] = 1
    baseline[300:400] = 1
    gain = paired_image_bootstrap([treated], [baseline], samples=40_000, seed=1)
    half_width = 1.959964 * 100 * math.sqrt(0.19 / n)
    assert gain.estimate == pytest.approx(10.0)
    assert gain.low == pytest.approx(10.0 - half_width, abs=0.12)
    assert gain.high == pytest.approx(10.0 + half_width, abs=0.12)
    assert gain.units == n and "paired bootstrap over 2000 validation images" in gain.method


def test_paired_bootstrap_agrees_with_resampling_indices_and_is_seeded():
    rng = np.random.default_rng(7)
    treated = [(rng.random(300) < p).astype(np.uint8) for p in (0.7, 0.72)]
    baseline = [(rng.random(300) < 0.6).astype(np.uint8)]
    gain = paired_image_bootstrap(treated, baseline, samples=20_000, seed=3)
    again = paired_image_bootstrap(treated, baseline, samples=20_000, seed=3)
    assert (gain.low, gain.high) == (again.low, again.high)
    # Brute force: resample image indices, recompute the difference of the seed-averaged top-1.
    d = (np.mean(treated, axis=0) - np.mean(baseline, axis=0)) * 100
    picks = np.random.default_rng(11).integers(0, d.size, size=(20_000, d.size))
    low, high = np.quantile(d[picks].mean(axis=1), [0.025, 0.975])
    assert gain.estimate == pytest.approx(d.mean())
    assert gain.low == pytest.approx(low, abs=0.3) and gain.high == pytest.approx(high, abs=0.3)


def test_seed_bootstrap_paired_has_the_exact_percentile_interval():
    # Differences per seed: 1 and 2. Resampled means: 1 (p=1/4), 1.5 (1/2), 2 (1/4).
    gain = seed_bootstrap({0: 11.0, 1: 12.0}, {0: 10.0, 1: 10.0}, samples=10_000, seed=0)
    assert gain.estimate == pytest.approx(1.5)
    assert (gain.low, gain.high) == (pytest.approx(1.0), pytest.approx(2.0))
    assert gain.significant is True and gain.method == "bootstrap over 2 paired seeds"


def test_seed_bootstrap_unpaired_and_single_run():
    unpaired = seed_bootstrap({0: 3.0, 1: 3.0}, {5: 1.0, 6: 1.0}, samples=1000, seed=0)
    assert (unpaired.estimate, unpaired.low, unpaired.high) == (2.0, 2.0, 2.0)
    assert unpaired.method.startswith("unpaired")
    single = seed_bootstrap({0: 40.0}, {0: 39.0, 1: 38.0}, samples=1000, seed=0)
    assert single.estimate == pytest.approx(1.5)
    assert single.low is None and single.significant is None
    assert significance_label(single) == "single run"


def test_straddling_interval_is_not_significant():
    gain = seed_bootstrap({0: 1.0, 1: -1.0, 2: 0.5}, {0: 0.0, 1: 0.0, 2: 0.0}, samples=5000, seed=0)
    assert gain.low < 0 < gain.high
    assert gain.significant is False and significance_label(gain) == "not significant"


def test_paper_verdict_tolerance_and_signed_gap():
    assert paper_verdict(76.5, 76.384, 0.3) == "reproduced"
    assert paper_verdict(76.684, 76.384, 0.3) == "reproduced"  # exactly on the tolerance
    assert paper_verdict(77.0, 77.584, 0.3) == "-0.58 vs paper"
    assert paper_verdict(39.0, 38.6, 0.3) == "+0.40 vs paper"
    assert paper_verdict(50.0, None, 0.3) == "no paper figure"


def test_gain_verdict_compares_sign_and_size():
    positive = seed_bootstrap({0: 12.0, 1: 12.0}, {0: 10.0, 1: 10.0}, samples=100, seed=0)
    assert gain_verdict(positive, 1.0) == "same sign, 2.0x paper"
    negative = seed_bootstrap({0: 9.0}, {0: 10.0}, samples=100, seed=0)
    assert gain_verdict(negative, 1.2) == "opposite sign, single run"
    assert gain_verdict(None, 1.2) == "no baseline run"
    assert gain_verdict(positive, None) == "no paper gain to compare"


def test_a_zero_gain_is_no_gain_not_an_opposite_sign():
    zero = seed_bootstrap({0: 10.0, 1: 11.0}, {0: 10.0, 1: 11.0}, samples=100, seed=0)
    assert zero.estimate == 0.0
    assert gain_verdict(zero, 1.2) == "no gain, n.s."
    assert gain_verdict(zero, -0.5) == "no gain, n.s."
    single = seed_bootstrap({0: 10.0}, {0: 10.0}, samples=100, seed=0)
    assert gain_verdict(single, 1.2) == "no gain, single run"
