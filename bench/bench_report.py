"""Report time on a large study: 1,000 trials in SQLite, read back and written as Markdown/CSV/LaTeX/HTML.

Builds the study with realistic trials (params, 10 intermediate values, the user attrs train_trial
stores) once per run, then times write_report from a fresh load of the storage (the report reads only
the storage, it never retrains): tables only, then all formats with the offline HTML and its figures.
Also times Optuna's own trials_dataframe on the same study, as the yardstick users know (optuna#763).

Run from the repository root:  python -m bench.bench_report [--trials 1000]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from reports import FORMATS, write_report

DISTRIBUTIONS = {
    "d_model": CategoricalDistribution([64, 128, 256]),
    "n_layers": IntDistribution(1, 3),
    "pooling": CategoricalDistribution(["mean", "attention", "stats"]),
    "lr": FloatDistribution(1e-4, 1e-2, log=True),
}


def build_study(url: str, n_trials: int) -> None:
    rng = np.random.default_rng(0)
    study = optuna.create_study(study_name="big", storage=url, direction="maximize")
    trials = []
    for i in range(n_trials):
        params = {"d_model": int(rng.choice([64, 128, 256])), "n_layers": int(rng.integers(1, 4)),
                  "pooling": str(rng.choice(["mean", "attention", "stats"])),
                  "lr": float(10 ** rng.uniform(-4, -2))}
        curve = np.sort(rng.uniform(0, 0.9, 10))
        pruned = rng.random() < 0.4
        steps = 4 if pruned else 10
        trials.append(optuna.trial.create_trial(
            params=params, distributions=DISTRIBUTIONS,
            state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE,
            value=float(curve[steps - 1]),
            intermediate_values={(s + 1) * 2000: float(curve[s]) for s in range(steps)},
            user_attrs={"n_params": 1000 * i, "flops_per_segment": 10_000 * i, "steps_run": steps * 2000,
                        "steps_per_s": 10.0, "best_step": steps * 2000, "seed": i,
                        "run_config": {"model": params, "train": {"max_steps": 20000}}},
        ))
    study.add_trials(trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'big.db'}"
        start = time.perf_counter()
        build_study(url, args.trials)
        print(f"built a {args.trials}-trial study in {time.perf_counter() - start:.1f} s")

        start = time.perf_counter()
        study = optuna.load_study(study_name="big", storage=url)
        write_report(study, Path(tmp) / "out", k=10, formats=("md", "csv", "tex"))
        report_s = time.perf_counter() - start
        print(f"report (load + md, csv, tex + dashboard note and figures): {report_s:.2f} s")

        start = time.perf_counter()
        study = optuna.load_study(study_name="big", storage=url)
        _, paths = write_report(study, Path(tmp) / "out", k=10, formats=FORMATS)
        full_s = time.perf_counter() - start
        print(f"report with offline HTML and all figures (load + md, csv, tex, html + dashboard): {full_s:.2f} s; "
              f"HTML {paths[-1].stat().st_size / 1e6:.1f} MB")

        start = time.perf_counter()
        optuna.load_study(study_name="big", storage=url).trials_dataframe()
        frame_s = time.perf_counter() - start
        print(f"optuna trials_dataframe alone (load + frame): {frame_s:.2f} s; "
              f"ratio report/frame {report_s / frame_s:.2f} (tables), {full_s / frame_s:.2f} (with HTML)")


if __name__ == "__main__":
    main()
