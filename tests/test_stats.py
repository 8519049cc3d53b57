"""The report's interval on cases whose answer is known."""
import math

import numpy as np
import pytest

from lab import stats


def test_identical_students_differ_by_exactly_zero_and_resolve_nothing():
    rng = np.random.default_rng(0)
    a = (rng.random((5, 1000)) < 0.6).astype(float)
    r = stats.paired_interval(a, a.copy())
    assert r["mean"] == r["lo"] == r["hi"] == 0.0
    assert stats.verdict(r).startswith("not resolved")


def test_two_unrelated_students_of_equal_skill_give_an_interval_around_zero():
    rng = np.random.default_rng(1)
    a, b = (rng.random((2, 20, 2000)) < 0.7).astype(float)
    r = stats.paired_interval(a, b, seed=3)
    assert r["lo"] < 0 < r["hi"] and abs(r["mean"]) < 0.02
    # each seed's difference has sd sqrt(2 * 0.7 * 0.3 / 2000) = 0.0145, independently on every seed: the mean of 20
    # has se 0.0032, all of it the seeds' (no example is harder than another here, for both students alike)
    assert r["se"] == pytest.approx(np.sqrt(2 * 0.21 / 2000 / 20), rel=0.3)
    assert r["se_examples"] < r["se_seeds"]


def test_ten_more_right_answers_in_a_thousand_on_every_seed_is_one_point():
    b = np.zeros((5, 1000))
    b[:, :500] = 1
    a = b.copy()
    a[:, 500:510] = 1  # right on 10 more examples, the same ones on every seed
    r = stats.paired_interval(a, b)
    assert r["mean"] == pytest.approx(0.01)
    assert r["se_seeds"] == 0  # every seed gives the same difference
    # the examples' share: a difference that is 1 on 10 of 1,000 examples has se sqrt(0.01 * 0.99 / 1000) = 0.0031,
    # the same on every seed (one test set), so five seeds do not shrink it
    assert r["se_examples"] == pytest.approx(np.sqrt(0.01 * 0.99 / 1000), rel=0.15)
    assert r["half"] == pytest.approx(1.96 * r["se_examples"], rel=1e-3) and 0 < r["lo"] < 0.01 < r["hi"] < 0.02
    assert stats.verdict(r) == "holds" and stats.verdict(stats.paired_interval(b, a))  == "does not hold"


def test_seed_noise_alone_is_the_spread_of_the_seed_means():
    d = np.array([0.02, 0.02, 0.02, -0.02, -0.02])[:, None] * np.ones((5, 400))  # a constant shift per seed
    r = stats.paired_interval(d, np.zeros_like(d))
    assert r["mean"] == pytest.approx(0.004) and r["se_examples"] == pytest.approx(0, abs=1e-9)
    assert r["se_seeds"] == pytest.approx(np.std(d[:, 0], ddof=1) / np.sqrt(5))  # the usual standard error of 5 means
    assert r["half"] == pytest.approx(2.776 * r["se"], rel=1e-3)  # t with 4 degrees of freedom
    assert stats.seeds_needed(r, half_width=0.005) == math.ceil(5 * (r["se_seeds"] / (0.005 / 1.96)) ** 2)


def test_t_quantiles_match_the_tables():
    assert stats.t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-3)
    assert stats.t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-3)
    assert stats.t_quantile(0.975, math.inf) == pytest.approx(1.95996, abs=1e-4)


def test_groups_are_a_macro_average_and_a_subset_is_a_mean_over_its_examples():
    a = np.zeros((2, 1000))
    a[:, :100] = 1  # right on all of group 0 (100 examples), on none of group 1 (900)
    groups = np.array([0] * 100 + [1] * 900)
    assert stats.paired_interval(a, np.zeros_like(a), groups=groups)["mean"] == pytest.approx(0.5)
    assert stats.paired_interval(a, np.zeros_like(a))["mean"] == pytest.approx(0.1)
    subset = np.zeros((2, 1000), dtype=bool)
    subset[0, 50:150], subset[1, 90:100] = True, True  # seed 0: half right; seed 1: all right
    r = stats.paired_interval(a, np.zeros_like(a), subset=subset)
    assert r["per_seed"] == pytest.approx([0.5, 1.0]) and r["mean"] == pytest.approx(0.75)
