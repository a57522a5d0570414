"""Honest statistics for ablations: per-variant summaries, paired comparisons against a baseline, Holm correction.

An ablation runs a baseline config and named variants over the same seeds; one (variant, seed) run is a
"cell" with a final validation accuracy. Variants are compared with the baseline *paired by seed* (same data
split and initialisation seed), which removes the seed-to-seed variance shared by both arms.

Conventions:
- Accuracies are k/N, so two differences that are equal in exact arithmetic can differ in their last bit.
  Paired differences are first snapped (``snap_ties``): magnitudes within 1e-9 of each other become one value
  and those within 1e-9 of 0 become 0, so the rank test sees the ties and zeros the data really has.
- 95% confidence intervals are t intervals (``scipy.stats.t``), cut to the range the quantity can take:
  [0, 1] for an accuracy, [-1, 1] for a difference of accuracies. The true value lies in that range, so the cut
  never lowers coverage; ``CUT_MARK`` marks a cut bound in the display tables. Bounds are NaN when n < 2.
- Two-sided p-values from the paired t-test and an exact, tie-aware Wilcoxon signed-rank test: the p-value
  ``scipy.stats.wilcoxon`` gets by enumerating every sign pattern, computed by counting instead (any n, ms).
- ``too_few_seeds`` flags comparisons whose Wilcoxon test can never reach p < 0.05: with n nonzero differences
  the smallest exact two-sided signed-rank p-value is 2 / 2**n (all of one sign), so n <= 5 is too few. Zero
  differences are dropped by the test, so they are not counted (``n_nonzero``). The paired t-test has no such
  floor (a tiny spread gives any small p), so it is deliberately not used for the flag.
- Only cells in state "complete" enter the statistics; pruned and failed cells are counted, never dropped
  silently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

CONFIDENCE = 0.95
ALPHA = 0.05
TIE_TOLERANCE = 1e-9  # far below any 1/N of a validation set, far above float noise of k/N values
ACCURACY_RANGE = (0.0, 1.0)
DELTA_RANGE = (-1.0, 1.0)
CUT_MARK = "†"

COMPARISON_COLUMNS = [
    "n_pairs",
    "n_nonzero",
    "delta",
    "delta_ci_low",
    "delta_ci_high",
    "p_t",
    "p_wilcoxon",
    "p_t_holm",
    "p_wilcoxon_holm",
    "d_z",
    "too_few_seeds",
]
TABLE_COLUMNS = [
    "variant",
    "n_complete",
    "n_pruned",
    "n_failed",
    "mean",
    "std",
    "ci_low",
    "ci_high",
    *COMPARISON_COLUMNS,
]


def _scipy_stats():
    """scipy.stats, imported on first use: its import costs about a second, and a search's report (most
    reports) never needs it."""
    from scipy import stats

    return stats


def _finite_array(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    """1-D float array; non-finite values are an error rather than silently dropped."""
    arr = np.asarray(values, dtype=float).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains non-finite values: {arr.tolist()}")
    return arr


def snap_ties(diffs: Sequence[float] | np.ndarray, tol: float = TIE_TOLERANCE) -> np.ndarray:
    """diffs with float noise removed: magnitudes within tol of 0 become 0, and magnitudes that chain within tol
    of each other (sorted ascending) take the group's smallest, keeping each sign. Ranks then see exact ties."""
    d = np.asarray(diffs, dtype=float).reshape(-1)
    if d.size == 0:
        return d.copy()
    magnitude = np.abs(d)
    order = np.argsort(magnitude, kind="stable")
    ascending = magnitude[order]
    starts = np.diff(ascending, prepend=-math.inf) > tol  # True where a new group of equal magnitudes begins
    heads = ascending[starts]
    snapped = np.empty_like(d)
    snapped[order] = np.where(heads <= tol, 0.0, heads)[np.cumsum(starts) - 1]
    return np.where(snapped == 0.0, 0.0, np.copysign(snapped, d))


def _t_interval(x: np.ndarray, bounds: tuple[float, float]) -> tuple[float, float]:
    """95% t confidence interval of the mean of x cut to bounds; NaN for n < 2, a point when x is constant."""
    n = x.size
    if n < 2:
        return math.nan, math.nan
    mean = float(np.mean(x))
    sem = float(np.std(x, ddof=1)) / math.sqrt(n)
    if sem == 0.0:  # scipy rejects scale=0; the interval degenerates to the mean
        return mean, mean
    low, high = _scipy_stats().t.interval(CONFIDENCE, df=n - 1, loc=mean, scale=sem)
    return max(float(low), bounds[0]), min(float(high), bounds[1])


def summarize(values: Sequence[float] | np.ndarray, bounds: tuple[float, float] = ACCURACY_RANGE
              ) -> dict[str, float | int]:
    """n, mean, std (ddof=1) and 95% t CI (cut to bounds) of the mean of one variant's accuracies over seeds.

    std and CI bounds are NaN when n < 2 (no spread estimate); mean is NaN when n == 0.
    """
    x = _finite_array(values, "values")
    n = int(x.size)
    mean = float(np.mean(x)) if n else math.nan
    std = float(np.std(x, ddof=1)) if n >= 2 else math.nan
    ci_low, ci_high = _t_interval(x, bounds)
    return {"n": n, "mean": mean, "std": std, "ci_low": ci_low, "ci_high": ci_high}


def min_p_wilcoxon(n_pairs: int) -> float:
    """Smallest two-sided exact Wilcoxon signed-rank p-value attainable with n_pairs nonzero pairs: 2 / 2**n.

    Capped at 1 (n = 0 or 1 can never give evidence).
    """
    return min(1.0, 2.0 / 2.0**n_pairs)


def cohen_dz(diffs: np.ndarray) -> float:
    """Cohen's d_z = mean / std (ddof=1) of paired differences.

    NaN for fewer than 2 pairs; with zero spread: 0 if the mean is 0, else +/-inf with the sign of the mean.
    """
    if diffs.size < 2:
        return math.nan
    mean = float(np.mean(diffs))
    std = float(np.std(diffs, ddof=1))
    if std == 0.0:
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / std


def _p_ttest(diffs: np.ndarray) -> float:
    """Two-sided paired t-test p (a one-sample t-test of the differences, as ttest_rel computes it); NaN for
    < 2 pairs, and the limits for constant differences.

    Constant differences make t = 0/0 or +/-inf: we return 1.0 when they are all zero (no difference seen)
    and 0.0 otherwise, the same as scipy's limit, without its division warnings.
    """
    if diffs.size < 2:
        return math.nan
    if np.all(diffs == diffs[0]):
        return 1.0 if diffs[0] == 0.0 else 0.0
    return float(_scipy_stats().ttest_1samp(diffs, 0.0).pvalue)


def _p_wilcoxon(diffs: np.ndarray) -> float:
    """Two-sided exact signed-rank p, tie-aware; NaN with no pairs, 1.0 when all differences are zero.

    Zeros are dropped (Wilcoxon's convention, scipy's default); |d| get midranks, and the null distribution of
    W+ (each sign + or - with probability 1/2) is counted exactly over doubled, hence integer, ranks. This is
    the p-value scipy.stats.wilcoxon computes exactly for <= 13 nonzero pairs (by enumerating 2**n sign
    patterns, seconds at n = 13), for any n and in milliseconds; scipy falls back to a normal approximation
    above 13 when there are ties.
    """
    if diffs.size == 0:
        return math.nan
    nonzero = diffs[diffs != 0.0]
    if nonzero.size == 0:
        return 1.0
    ranks = np.rint(2.0 * _scipy_stats().rankdata(np.abs(nonzero))).astype(int)
    w_plus = int(ranks[nonzero > 0].sum())
    null = np.zeros(int(ranks.sum()) + 1)
    null[0] = 1.0
    for r in ranks:  # add one rank with sign + or -: P(W+ = s) = (P(s) + P(s - r)) / 2
        null[r:] = null[r:] + null[:-r]  # the right side is a new array, so the overlap is safe
        null /= 2.0
    tail = min(null[: w_plus + 1].sum(), null[w_plus:].sum())
    return float(min(1.0, 2.0 * tail))


def paired_comparison(baseline: Mapping[int, float], variant: Mapping[int, float]) -> dict[str, float | int | bool]:
    """Compare variant with baseline paired by seed (dict keys); seeds missing from either arm are left out.

    Returns n_pairs, n_nonzero (pairs whose difference is not 0), delta = mean(variant - baseline) with its
    95% t CI (cut to [-1, 1]), two-sided p_t (paired t-test) and p_wilcoxon (signed-rank, tie-aware), d_z
    (Cohen's), min_p_wilcoxon = 2 / 2**n_nonzero and too_few_seeds (that floor is >= 0.05, i.e. even a
    perfectly consistent difference could not be significant by Wilcoxon). Differences are snapped first
    (``snap_ties``), so every statistic sees exact ties.
    """
    seeds = sorted(set(baseline) & set(variant))
    b = _finite_array([baseline[s] for s in seeds], "baseline")
    v = _finite_array([variant[s] for s in seeds], "variant")
    diffs = snap_ties(v - b)
    n = int(diffs.size)
    n_nonzero = int(np.count_nonzero(diffs))
    delta_ci_low, delta_ci_high = _t_interval(diffs, DELTA_RANGE)
    floor = min_p_wilcoxon(n_nonzero)
    return {
        "n_pairs": n,
        "n_nonzero": n_nonzero,
        "delta": float(np.mean(diffs)) if n else math.nan,
        "delta_ci_low": delta_ci_low,
        "delta_ci_high": delta_ci_high,
        "p_t": _p_ttest(diffs),
        "p_wilcoxon": _p_wilcoxon(diffs),
        "d_z": cohen_dz(diffs),
        "min_p_wilcoxon": floor,
        "too_few_seeds": bool(floor >= ALPHA),
    }


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down; controls the family-wise error rate), same order as input.

    With the m non-NaN p-values sorted ascending, p_(i) becomes max_{j<=i} min(1, (m - j + 1) p_(j)).
    NaNs stay NaN and do not count in m. (scipy.stats.false_discovery_control only does BH/BY.)
    """
    p = np.asarray(pvalues, dtype=float).reshape(-1)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = idx.size
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def _state_counts(group: pd.DataFrame) -> dict[str, int]:
    """Counts of complete, pruned and failed (every other state) cells of one variant."""
    state = group["state"].astype(str)
    n_complete = int((state == "complete").sum())
    n_pruned = int((state == "pruned").sum())
    return {"n_complete": n_complete, "n_pruned": n_pruned, "n_failed": int(len(group) - n_complete - n_pruned)}


def _complete_by_seed(group: pd.DataFrame, variant: str) -> dict[int, float]:
    """seed -> accuracy of the complete cells of one variant; two complete cells for one seed are an error."""
    done = group[group["state"].astype(str) == "complete"]
    if done["seed"].duplicated().any():
        dup = sorted(done.loc[done["seed"].duplicated(), "seed"].tolist())
        raise ValueError(f"variant {variant!r} has several complete cells for seeds {dup}")
    return {int(s): float(v) for s, v in zip(done["seed"], done["value"], strict=True)}


def ablation_table(cells: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """One row per variant (baseline first, then order of first appearance) with summaries and comparisons.

    cells has columns variant, seed, state, value. Only "complete" cells enter the statistics; n_pruned counts
    "pruned" and n_failed counts every other non-complete state, so nothing disappears from the table.
    Comparison columns are paired by seed against the baseline's complete cells (n_pairs says how many
    pairs), Holm-corrected across the non-baseline variants, and NaN on the baseline row, except too_few_seeds,
    a bool column that is False there.
    """
    missing = {"variant", "seed", "state", "value"} - set(cells.columns)
    if missing:
        raise ValueError(f"cells lacks columns {sorted(missing)}")
    order = list(dict.fromkeys(cells["variant"].tolist()))
    if baseline not in order:
        raise ValueError(f"baseline {baseline!r} has no cells")
    order = [baseline] + [v for v in order if v != baseline]
    groups = {name: cells[cells["variant"] == name] for name in order}
    by_seed = {name: _complete_by_seed(groups[name], name) for name in order}

    rows = []
    for name in order:
        s = summarize(list(by_seed[name].values()))
        row: dict[str, object] = {"variant": name, **_state_counts(groups[name])}
        row.update({k: s[k] for k in ("mean", "std", "ci_low", "ci_high")})
        if name == baseline:
            row.update({k: math.nan for k in COMPARISON_COLUMNS})
        else:
            row.update(paired_comparison(by_seed[baseline], by_seed[name]))
        rows.append(row)

    table = pd.DataFrame(rows).reindex(columns=TABLE_COLUMNS)
    # Nullable ints so the baseline's missing pair counts stay NA without turning into floats. The flag is a plain
    # bool, False on the baseline row (no comparison, nothing to flag): the CSV column reads True/False only.
    table[["n_pairs", "n_nonzero"]] = table[["n_pairs", "n_nonzero"]].astype("Int64")
    table["too_few_seeds"] = table["too_few_seeds"].fillna(False).astype(bool)
    others = table["variant"] != baseline
    for col in ("p_t", "p_wilcoxon"):
        table[f"{col}_holm"] = math.nan
        table.loc[others, f"{col}_holm"] = holm(table.loc[others, col].to_numpy(dtype=float))
    return table
