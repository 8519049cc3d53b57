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
    assert stats.verdict(r).startswith("inconclusive")


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
    n, sd = stats.seeds_needed(r, half_width=0.005), np.std(d[:, 0], ddof=1)  # Student's t at n - 1 degrees of freedom
    assert stats.t_quantile(0.975, n - 1) * sd / np.sqrt(n) <= 0.005 < stats.t_quantile(0.975, n - 2) * sd / np.sqrt(n - 1)
    assert n > math.ceil(5 * (r["se_seeds"] / (0.005 / 1.96)) ** 2)  # more than the normal quantile's answer


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


def test_seeds_needed_with_t_for_the_headline_s_noise():
    """The five-seed headline: per-seed sd 2.77 points (se 1.24 over 5 seeds), examples 0.11. With the
    normal quantile 14 seeds reach +-1.5; with t (about 16 degrees of freedom at 16 seeds) it takes 16."""
    r = dict(S=5, se_seeds=0.0124, se_examples=0.0011)
    assert stats.seeds_needed(r, 0.015) == 16
    assert stats.seeds_needed(dict(S=5, se_seeds=0.01, se_examples=0.008), 0.015) == math.inf  # 1.96 x 0.8 > 1.5


def test_holm_by_hand_and_p_values_from_t():
    # sorted 0.01 <= 0.05/3 resolved; 0.03 > 0.05/2 stops, so 0.04 is not resolved either (Bonferroni would agree here)
    assert stats.holm([0.04, 0.01, 0.03]) == [False, True, False]
    assert stats.holm([0.012, 0.02, 0.04]) == [True, True, True]  # 0.012 <= 0.0167, 0.02 <= 0.025, 0.04 <= 0.05
    r = dict(mean=0.02, se=0.01, df=4)  # t = 2 at 4 df: two-sided p 0.116 (tables)
    assert stats.p_value(r) == pytest.approx(0.1161, abs=1e-3)
    assert stats.p_value(dict(mean=0.0196, se=0.01, df=math.inf)) == pytest.approx(0.05, abs=1e-3)


def test_verdicts_say_inconclusive_and_when_the_paper_s_effect_is_excluded():
    r = dict(mean=0.01, lo=0.004, hi=0.016, half=0.006)
    assert stats.verdict(r) == "holds" and stats.verdict(r, paper=0.036) == "holds; excludes the paper's +3.6"
    assert stats.verdict(r, resolved=False) == "inconclusive (± 0.6 points)"
    assert stats.verdict(dict(r, mean=-0.01, lo=-0.016, hi=-0.004)) == "does not hold"


def test_the_choices_study_reads_best_validation_and_applies_its_declared_rule(tmp_path):
    """lab.choices --read on made-up run folders: V3's SCD+AW is 2 points better on every one
    of 8 seeds with a little spread (resolved after Holm: "better"), V1's 1 point worse on
    every seed with the same spread (resolved: "harmful"), V4's 0.6 points better with a raw p of
    0.023 (below 0.05, but Holm's third threshold is 0.05 / 3: not resolved), the others equal
    to the default (not resolved). The best stage's val_acc is what is read, not the last."""
    import json
    from lab import choices
    rng = np.random.default_rng(0)
    seeds = list(range(100, 108))
    shift = {"V1": -0.01, "V3": 0.02}
    v4 = dict(zip(seeds, [0.01, 0.012, 0.008, 0.011, 0.0, -0.004, 0.009, 0.002]))  # mean 0.006, p 0.023
    for s in seeds:
        base = 0.7 + 0.05 * rng.random()
        noise = 0.002 * rng.standard_normal()
        for v in [""] + list(choices.VARIANTS):
            for m in ("scd", "scd_aw"):
                best = base + (shift.get(v, 0.0) + noise if v and m == "scd_aw" else 0.0)
                best = base + v4[s] if v == "V4" and m == "scd_aw" else best
                folder = tmp_path / f"seed{s}" / (f"{m}_{v}" if v else m)
                folder.mkdir(parents=True)
                last = best - (0.2 if v else 0.05)  # read the last stage instead, and every variant is harmful
                (folder / "results.json").write_text(json.dumps({"val_acc": [best - 0.1, best, last]}))
    out = "\n".join(choices.read(choices.ChoicesConfig(seeds=",".join(map(str, seeds)), out_dir=str(tmp_path), read=True)))
    row = lambda v: next(line for line in out.splitlines() if line.startswith(f"| {v} ") and "| SCD+AW |" in line)
    assert row("V3").endswith("| resolved | better |") and "| 8 | +2.0 |" in row("V3")
    assert row("V1").endswith("| resolved | harmful |") and "| 8 | -1.0 |" in row("V1")
    assert row("V2").endswith("| not resolved | not resolved |") and "| 8 | " in row("V2")
    assert row("V4").endswith("| not resolved | not resolved |") and "| 8 | +0.6 |" in row("V4") and "| 0.023 |" in row("V4")
