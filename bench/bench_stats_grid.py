"""How often a Wilcoxon p-value on k/N accuracies differs from the exact tie-aware one.

Random ablation grids: a baseline of n seeds with k_i correct out of N, a variant a few counts away (so ties
and zeros are common, as they are on real validation sets). The reference is scipy.stats.wilcoxon on the
integer count differences (exact, tie-aware: scipy permutes exhaustively when there are ties or zeros).
Prints the mismatch rate (and how many were too small, i.e. overstated the evidence) of scipy on the float
accuracy differences (what a report got before snapping) and of reports.stats.paired_comparison, and the
largest |p - exact p| of each.

Run from the repository root:  python -m bench.bench_stats_grid [--cases 300] [--seeds 6] [--n 240]
"""
import argparse
import warnings

import numpy as np
from scipy import stats

from reports.stats import paired_comparison


def _wilcoxon(d: np.ndarray) -> float:
    return 1.0 if not np.any(d) else float(stats.wilcoxon(d).pvalue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--n", type=int, default=240, help="validation utterances (accuracies are k/N)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    raw_err, ours_err = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's normal approximation on all-tied data
        for _ in range(args.cases):
            base = rng.integers(int(0.7 * args.n), int(0.9 * args.n), args.seeds)
            var = np.clip(base + rng.integers(-3, 4, args.seeds), 0, args.n)
            exact = _wilcoxon(var - base)
            raw = _wilcoxon(var / args.n - base / args.n)
            ours = paired_comparison(dict(enumerate(base / args.n)), dict(enumerate(var / args.n)))["p_wilcoxon"]
            raw_err.append(raw - exact)
            ours_err.append(ours - exact)
    for label, err in (("scipy on float differences", raw_err), ("reports.stats.paired_comparison", ours_err)):
        err = np.asarray(err)
        print(f"{label:<34} mismatches {int((np.abs(err) > 1e-12).sum()):4d}/{args.cases} "
              f"({int((err < -1e-12).sum())} too small)  max |p - exact p| {np.abs(err).max():.4f}")


if __name__ == "__main__":
    main()
