"""reports.stats against hand-computed values, planted effects and planted nulls."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from reports.stats import (
    ablation_table,
    cohen_dz,
    holm,
    min_p_wilcoxon,
    paired_comparison,
    snap_ties,
    summarize,
)

T975_DF4 = 2.7764451  # t_{0.975, 4}, from tables


def _t_two_sided_p_df4(t: float) -> float:
    """Closed form for df=4 (even df): p = 1 - sin(th) * (1 + cos(th)^2 / 2), th = atan(t / 2)."""
    sin = abs(t) / math.sqrt(t * t + 4.0)
    cos2 = 4.0 / (t * t + 4.0)
    return 1.0 - sin * (1.0 + cos2 / 2.0)


# --- summarize -----------------------------------------------------------------------------------------------


def test_summarize_hand_computed():
    s = summarize([0.80, 0.82, 0.84, 0.86, 0.88])
    # deviations -0.04..0.04 step 0.02: sum of squares 0.004, variance 0.004 / 4 = 0.001
    half = T975_DF4 * math.sqrt(0.001 / 5)
    assert s["n"] == 5
    assert s["mean"] == pytest.approx(0.84)
    assert s["std"] == pytest.approx(math.sqrt(0.001))
    assert s["ci_low"] == pytest.approx(0.84 - half, abs=1e-7)
    assert s["ci_high"] == pytest.approx(0.84 + half, abs=1e-7)


def test_summarize_small_n_gives_nan_spread():
    one = summarize([0.8])
    assert one["n"] == 1 and one["mean"] == 0.8
    assert math.isnan(one["std"]) and math.isnan(one["ci_low"]) and math.isnan(one["ci_high"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = summarize([])
    assert empty["n"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["std"])


def test_summarize_constant_values_give_point_interval():
    s = summarize([0.5, 0.5, 0.5])
    assert s["std"] == 0.0 and s["ci_low"] == 0.5 and s["ci_high"] == 0.5


def test_summarize_rejects_nan():
    with pytest.raises(ValueError, match="non-finite"):
        summarize([0.8, float("nan")])


# --- paired_comparison ---------------------------------------------------------------------------------------


def test_paired_comparison_hand_computed_and_drops_unpaired_seeds():
    baseline = {0: 0.80, 1: 0.82, 2: 0.84, 3: 0.86, 4: 0.88, 5: 0.90}  # seed 5 has no variant run
    variant = {0: 0.81, 1: 0.84, 2: 0.87, 3: 0.90, 4: 0.83, 9: 0.99}  # seed 9 has no baseline run
    r = paired_comparison(baseline, variant)
    # differences 0.01, 0.02, 0.03, 0.04, -0.05: mean 0.01, deviations 0, .01, .02, .03, -.06 -> SS 0.005, var 0.00125
    sd = math.sqrt(0.00125)
    sem = sd / math.sqrt(5)
    assert r["n_pairs"] == 5
    assert r["delta"] == pytest.approx(0.01)
    assert r["delta_ci_low"] == pytest.approx(0.01 - T975_DF4 * sem, abs=1e-7)
    assert r["delta_ci_high"] == pytest.approx(0.01 + T975_DF4 * sem, abs=1e-7)
    assert r["d_z"] == pytest.approx(0.01 / sd)
    assert r["p_t"] == pytest.approx(_t_two_sided_p_df4(0.01 / sem), rel=1e-6)
    # ranks of |d|: 1..5, the negative one has rank 5 -> W- = 5. Subsets of {1..5} with sum <= 5: 10 of 32.
    assert r["p_wilcoxon"] == pytest.approx(2 * 10 / 32)
    assert r["min_p_wilcoxon"] == pytest.approx(2 / 32)
    assert r["too_few_seeds"] is True


def test_too_few_seeds_threshold_matches_scipy_floor():
    base5 = {s: 0.5 for s in range(5)}
    base6 = {s: 0.5 for s in range(6)}
    five = paired_comparison(base5, {s: 0.5 + 0.01 * (s + 1) for s in range(5)})
    six = paired_comparison(base6, {s: 0.5 + 0.01 * (s + 1) for s in range(6)})
    assert five["too_few_seeds"] is True and six["too_few_seeds"] is False
    assert five["min_p_wilcoxon"] == pytest.approx(0.0625) and six["min_p_wilcoxon"] == pytest.approx(0.03125)
    # a perfectly consistent difference reaches exactly the floor
    assert five["p_wilcoxon"] == pytest.approx(0.0625) and six["p_wilcoxon"] == pytest.approx(0.03125)
    assert min_p_wilcoxon(0) == 1.0 and min_p_wilcoxon(1) == 1.0


def test_all_zero_differences_give_p_one_without_warnings():
    arm = {0: 0.8, 1: 0.81, 2: 0.79, 3: 0.85}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = paired_comparison(arm, dict(arm))
    assert r["p_t"] == 1.0 and r["p_wilcoxon"] == 1.0
    assert r["delta"] == 0.0 and r["delta_ci_low"] == 0.0 and r["delta_ci_high"] == 0.0
    assert r["d_z"] == 0.0


def test_constant_nonzero_difference_gives_signed_inf_effect():
    baseline = {0: 0.5, 1: 0.25, 2: 0.75}
    variant = {s: v - 0.125 for s, v in baseline.items()}  # exactly representable: differences all -0.125
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = paired_comparison(baseline, variant)
    assert r["d_z"] == -math.inf and r["p_t"] == 0.0
    assert r["delta_ci_low"] == r["delta_ci_high"] == -0.125
    assert cohen_dz(np.array([0.125, 0.125])) == math.inf


def test_no_or_one_pair_gives_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        none = paired_comparison({0: 0.8}, {1: 0.9})
        one = paired_comparison({0: 0.8, 1: 0.7}, {1: 0.9})
    assert none["n_pairs"] == 0 and none["too_few_seeds"] is True
    for key in ("delta", "delta_ci_low", "p_t", "p_wilcoxon", "d_z"):
        assert math.isnan(none[key]), key
    assert one["n_pairs"] == 1 and one["delta"] == pytest.approx(0.2)
    assert math.isnan(one["p_t"]) and math.isnan(one["d_z"]) and math.isnan(one["delta_ci_low"])
    assert one["p_wilcoxon"] == 1.0  # one nonzero pair: the exact two-sided p is 2 / 2 = 1


def test_planted_difference_is_detected():
    rng = np.random.default_rng(0)
    base = 0.8 + rng.normal(0, 0.02, 10)
    var = base + 0.02 + rng.normal(0, 0.003, 10)
    r = paired_comparison(dict(enumerate(base)), dict(enumerate(var)))
    assert r["p_t"] < 0.01 and r["p_wilcoxon"] < 0.01
    assert r["too_few_seeds"] is False
    assert r["delta_ci_low"] < 0.02 < r["delta_ci_high"]


def test_planted_null_has_nominal_false_positive_rate():
    rng = np.random.default_rng(12345)
    seed_effect = rng.normal(0.8, 0.02, (400, 1))  # shared by both arms, as a seed is
    base = seed_effect + rng.normal(0, 0.01, (400, 8))
    var = seed_effect + rng.normal(0, 0.01, (400, 8))
    pairs = zip(base, var, strict=True)
    p = np.array([paired_comparison(dict(enumerate(b)), dict(enumerate(v)))["p_t"] for b, v in pairs])
    assert 0.02 <= np.mean(p < 0.05) <= 0.09


# --- accuracies on a k/N grid -----------------------------------------------------------------------------


def _exact_wilcoxon(counts_diff: np.ndarray) -> float:
    """scipy on the integer count differences: exact and tie-aware (exhaustive permutations for ties/zeros)."""
    return 1.0 if not counts_diff.any() else float(stats.wilcoxon(counts_diff).pvalue)


def test_wilcoxon_on_the_issue_example_is_the_exact_tie_aware_p():
    base = np.array([193, 195, 206, 175, 196, 207])
    var = np.array([190, 195, 207, 175, 193, 210])
    r = paired_comparison(dict(enumerate(base / 240)), dict(enumerate(var / 240)))
    assert stats.wilcoxon(var / 240 - base / 240).pvalue == pytest.approx(0.75)  # float noise hides the ties
    assert r["p_wilcoxon"] == _exact_wilcoxon(var - base) == 1.0
    assert r["n_pairs"] == 6 and r["n_nonzero"] == 4


@pytest.mark.parametrize(("n_valid", "n_seeds", "cases"), [(60, 4, 60), (240, 6, 60), (240, 8, 40), (997, 10, 8)])
def test_wilcoxon_on_random_accuracy_grids_matches_integer_counts(n_valid, n_seeds, cases):
    rng = np.random.default_rng(n_valid * 100 + n_seeds)
    for _ in range(cases):
        base = rng.integers(int(0.6 * n_valid), n_valid - 3, n_seeds)
        var = base + rng.integers(-3, 4, n_seeds)
        r = paired_comparison(dict(enumerate(base / n_valid)), dict(enumerate(var / n_valid)))
        assert r["p_wilcoxon"] == pytest.approx(_exact_wilcoxon(var - base), abs=1e-12), (base, var)
        assert r["n_nonzero"] == np.count_nonzero(var - base)
        expected_t = (1.0 if not (var - base).any() else 0.0) if len(set(var - base)) == 1 else \
            stats.ttest_1samp(var - base, 0.0).pvalue
        assert r["p_t"] == pytest.approx(expected_t, rel=1e-9)  # the t-test is scale-free: counts give the same p


def test_wilcoxon_without_ties_and_beyond_scipys_exact_range():
    rng = np.random.default_rng(7)
    distinct = rng.permutation(np.arange(1, 21)) * rng.choice([-1, 1], 20) / 240  # 20 pairs, no ties
    r = paired_comparison(dict(enumerate(np.zeros(20))), dict(enumerate(distinct)))
    assert r["p_wilcoxon"] == pytest.approx(stats.wilcoxon(distinct, method="exact").pvalue, rel=1e-9)
    tied = rng.integers(-4, 6, 40)  # 40 pairs with many ties: scipy only approximates; the two must be close
    r = paired_comparison(dict(enumerate(np.zeros(40))), dict(enumerate(tied / 240)))
    assert r["p_wilcoxon"] == pytest.approx(stats.wilcoxon(tied, method="asymptotic").pvalue, abs=0.02)
    one_sided = paired_comparison(dict(enumerate(np.zeros(8))), dict(enumerate(np.ones(8) / 240)))
    assert one_sided["p_wilcoxon"] == pytest.approx(2 / 2**8)  # all tied and of one sign: the floor


def test_snap_ties_merges_float_noise_and_keeps_signs():
    snapped = snap_ties([0.1 - 0.3, 0.2, 1e-12, -1e-12, -0.2000000001, 0.5, -0.0])
    assert snapped[0] == -snapped[1] == snapped[4] == pytest.approx(-0.2)  # one magnitude, signs kept
    assert snapped[[2, 3, 6]].tolist() == [0.0, 0.0, 0.0] and snapped[5] == 0.5
    assert np.signbit(snapped[[2, 3, 6]]).sum() == 0  # zeros are plain 0.0
    distinct = np.arange(1, 50) / 997  # a fine grid stays distinct
    assert snap_ties(distinct).tolist() == distinct.tolist()
    assert snap_ties([]).size == 0


def test_too_few_seeds_counts_only_nonzero_differences():
    base = {s: 0.5 for s in range(6)}
    variant = {s: 0.5 + 0.01 * s for s in range(6)}  # seed 0: difference 0, dropped by Wilcoxon
    r = paired_comparison(base, variant)
    assert r["n_pairs"] == 6 and r["n_nonzero"] == 5
    assert r["min_p_wilcoxon"] == pytest.approx(0.0625) and r["p_wilcoxon"] == pytest.approx(0.0625)
    assert r["too_few_seeds"] is True


@pytest.mark.parametrize("n", range(2, 11))
def test_intervals_stay_in_the_range_of_an_accuracy(n):
    rng = np.random.default_rng(n)
    for low_end in (True, False):
        values = rng.uniform(0.0, 0.3, n)
        values[0] = 0.0
        values = values if low_end else 1.0 - values
        s = summarize(values)
        assert 0.0 <= s["ci_low"] <= s["mean"] <= s["ci_high"] <= 1.0
        unbounded = stats.t.interval(0.95, n - 1, loc=np.mean(values), scale=stats.sem(values))
        assert s["ci_low"] == pytest.approx(max(0.0, unbounded[0]))  # only the part outside [0, 1] is cut
        assert s["ci_high"] == pytest.approx(min(1.0, unbounded[1]))
        r = paired_comparison(dict(enumerate(values)), dict(enumerate(1.0 - values)))
        assert -1.0 <= r["delta_ci_low"] <= r["delta"] <= r["delta_ci_high"] <= 1.0


# --- holm ----------------------------------------------------------------------------------------------------


def test_holm_hand_computed():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])


def test_holm_nan_kept_and_not_counted_cap_and_ties():
    out = holm([0.01, float("nan"), 0.04])  # m = 2
    np.testing.assert_allclose(out, [0.02, np.nan, 0.04])
    np.testing.assert_allclose(holm([0.6, 0.9]), [1.0, 1.0])
    np.testing.assert_allclose(holm([0.02, 0.02]), [0.04, 0.04])
    assert holm([]).shape == (0,)
    assert np.isnan(holm([float("nan")])).all()


# --- ablation_table ------------------------------------------------------------------------------------------


def _cells() -> pd.DataFrame:
    rows = []
    base = [0.80, 0.82, 0.84, 0.86, 0.88, 0.83]
    for seed in range(6):
        rows.append(("wide", seed, "complete", base[seed] + 0.01 * (seed + 1)))
    for seed in range(6):
        rows.append(("base", seed, "complete", base[seed]))
    for seed in range(6):
        if seed == 2:
            rows.append(("deep", seed, "pruned", 0.5))
        elif seed == 4:
            rows.append(("deep", seed, "fail", float("nan")))
        else:
            rows.append(("deep", seed, "complete", base[seed] - 0.002 * seed))
    return pd.DataFrame(rows, columns=["variant", "seed", "state", "value"])


def test_ablation_table_rows_counts_and_comparisons():
    cells = _cells()
    t = ablation_table(cells, "base")
    assert t["variant"].tolist() == ["base", "wide", "deep"]
    assert t["n_complete"].tolist() == [6, 6, 4]
    assert t["n_pruned"].tolist() == [0, 0, 1]
    assert t["n_failed"].tolist() == [0, 0, 1]
    assert t["n_pairs"].tolist()[1:] == [6, 4]

    base_row = t.iloc[0]
    for col in ("delta", "delta_ci_low", "delta_ci_high", "p_t", "p_wilcoxon", "p_t_holm", "p_wilcoxon_holm", "d_z"):
        assert math.isnan(base_row[col]), col
    assert pd.isna(base_row["n_pairs"])
    assert t["too_few_seeds"].dtype == bool and not base_row["too_few_seeds"]  # nothing compared, nothing flagged
    assert base_row["mean"] == pytest.approx(np.mean([0.80, 0.82, 0.84, 0.86, 0.88, 0.83]))

    # deep: pruned seed 2 and failed seed 4 excluded from both its summary and its pairing
    deep = t.iloc[2]
    assert deep["mean"] == pytest.approx(np.mean([0.80, 0.82 - 0.002, 0.86 - 0.006, 0.83 - 0.010]))
    assert deep["delta"] == pytest.approx(np.mean([0.0, -0.002, -0.006, -0.010]))
    assert bool(deep["too_few_seeds"]) is True and bool(t.iloc[1]["too_few_seeds"]) is False

    for col in ("p_t", "p_wilcoxon"):
        np.testing.assert_allclose(t[f"{col}_holm"].iloc[1:], holm(t[col].iloc[1:].to_numpy()))
    assert t.iloc[1]["p_wilcoxon"] == pytest.approx(2 / 64)  # all six differences positive


def test_ablation_table_errors():
    cells = _cells()
    with pytest.raises(ValueError, match="baseline"):
        ablation_table(cells, "nope")
    dup = pd.concat([cells, cells.iloc[[0]]], ignore_index=True)
    with pytest.raises(ValueError, match="several complete"):
        ablation_table(dup, "base")
    bad = cells.copy()
    bad.loc[0, "value"] = float("nan")  # a complete cell without a value is a data error, not a drop
    with pytest.raises(ValueError, match="non-finite"):
        ablation_table(bad, "base")
