"""Search efficiency: TPE + pruning (the study file's own sampler and pruner) vs unpruned random search, in
training steps, on the synthetic quickstart data and on the real FSDD speech set (../shared/data/fsdd).

For each dataset and repetition (study seed r), both searches run the same space through `run-study search`, one
process each, pinned to its own core with one torch thread, sequentially (so trial order = time order):
  random: sampler random, pruner none, --random-trials trials, every trial runs max_steps;
  tpe:    the space's sampler and pruner, up to --tpe-trials trials, cut at random's total steps (same budget).
A trial's steps are its training steps (validation excluded); its accuracy is its best validation accuracy.
Printed per run: the best accuracy and the steps each search needed to reach random's best ("-" when TPE did not
reach it within the budget); then the ratio tpe / random per repetition and their median. Goal: <= 1/3.

Run from the repository root:
  python -m bench.bench_search_efficiency [--space studies/quickstart.toml] [--reps 3] [--random-trials 16]
"""
import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from search.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent


def search(space: Path, data: Path, db: Path, name: str, seed: int, n_trials: int, core: int,
           extra: list[str], budget: float = float("inf")) -> None:
    """One `run-study search` on one core; interrupted (SIGINT) once its finished trials used `budget` steps."""
    cmd = [sys.executable, str(ROOT / "run_study.py"), "search", str(space), "--data", str(data), "-q",
           "--storage", f"sqlite:///{db}", "--n-trials", str(n_trials), "--workers", "1",
           "--set", f"study.name={name}", "--set", f"study.seed={seed}", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("OPTUNA_STORAGE", None)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env, cwd=db.parent,
                                preexec_fn=lambda: os.sched_setaffinity(0, {core}))
        while proc.poll() is None:
            time.sleep(2)
            if _spent(db) >= budget:
                proc.send_signal(signal.SIGINT)  # the rest would be past the budget: not counted anyway
                proc.wait()
                return
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"{name} failed ({proc.returncode}):\n{err.read()[-2000:]}")


def _spent(db: Path) -> int:
    """Training steps reported so far (read-only: never creates tables beside the running search)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT MAX(step) FROM trial_intermediate_values GROUP BY trial_id").fetchall()
    except sqlite3.OperationalError:  # no file or no tables yet
        return 0
    return int(sum(step for (step,) in rows))


def with_strategy(space: Path, folder: Path, label: str, sampler: str | None, pruner: str | None) -> Path:
    """A copy of the study file whose [sampler] / [pruner] table is replaced by `name = ...` alone (when given)."""
    replaced = {f"[{kind}]": name for kind, name in (("sampler", sampler), ("pruner", pruner)) if name}
    kept, skipping = [], False
    for line in space.read_text().splitlines():
        if line.strip().startswith("["):
            skipping = line.strip() in replaced
        if not skipping:
            kept.append(line)
    path = folder / label / space.name  # same file name: the same default study name
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(kept + [f'\n{table}\nname = "{name}"' for table, name in replaced.items()]) + "\n")
    return path


def curve(db: Path, name: str) -> list[tuple[int, float]]:
    """(training steps, best validation accuracy) of each finished trial, in trial order."""
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    points = []
    for trial in study.trials:
        if trial.intermediate_values:
            steps = trial.user_attrs.get("steps_run", max(trial.intermediate_values))
            points.append((int(steps), max(trial.intermediate_values.values())))
    return points


def within(points: list[tuple[int, float]], budget: float = float("inf")):
    """(steps spent so far, trial accuracy) for the trials that fit in `budget` steps."""
    spent = 0
    for steps, accuracy in points:
        spent += steps
        if spent > budget:
            return
        yield spent, accuracy


def steps_to_reach(points: list[tuple[int, float]], target: float, budget: float = float("inf")) -> int | None:
    return next((spent for spent, accuracy in within(points, budget) if accuracy >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=ROOT / "studies" / "quickstart.toml")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--random-trials", type=int, default=16)
    parser.add_argument("--tpe-trials", type=int, default=40, help="an upper bound; TPE is cut at random's steps")
    parser.add_argument("--datasets", default="synthetic,fsdd")
    parser.add_argument("--fsdd", type=Path, default=ROOT.parent / "shared" / "data" / "fsdd")
    parser.add_argument("--pruner", help="TPE's pruner instead of the space's (e.g. hyperband: rungs from the budget)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a study-file override for both searches (e.g. a shorter train.max_steps)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_efficiency-"))
    work.mkdir(parents=True, exist_ok=True)
    cores = sorted(os.sched_getaffinity(0))
    core_pair = (cores[0], cores[-1])
    print(f"space {args.space.name} {' '.join(args.overrides)}; {args.reps} repetitions; "
          f"random: {args.random_trials} unpruned trials; "
          f"tpe: the space's sampler + {args.pruner or 'its'} pruner, same total steps; cores {core_pair}; "
          f"working in {work}")
    ratios: dict[str, list[float]] = {}
    bests: dict[str, list[tuple[float, float]]] = {}  # (random's best, TPE's best within the same steps)
    for dataset in args.datasets.split(","):
        data = work / dataset
        if not data.exists():
            if dataset == "fsdd":
                shutil.copytree(args.fsdd / "hw4", data)
            else:
                from data.synthetic import make_synthetic

                make_synthetic(data, speakers=40, utterances_per_speaker=60, seed=0)  # the quickstart's data
        subprocess.run([sys.executable, str(ROOT / "run_study.py"), "pack", str(data)], check=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        print(f"\n{dataset}: {'rep':>3} {'random best':>11} {'steps':>6} {'tpe best':>9} {'steps':>6} "
              f"{'trials':>6} {'ratio':>6}")
        tpe_space = with_strategy(args.space, work, "tpe", None, args.pruner)
        max_steps = load_spec(tpe_space, args.overrides).default_run_config().train.max_steps
        random_budget = args.random_trials * max_steps  # unpruned: every random trial runs max_steps
        for rep in range(args.reps):
            db = work / f"{dataset}-{rep}.db"
            with ThreadPoolExecutor(2) as pool:
                overrides = [arg for o in args.overrides for arg in ("--set", o)]
                plain = [arg for o in args.overrides if not o.startswith(("sampler.", "pruner."))
                         for arg in ("--set", o)]  # random search has no sampler or pruner arguments
                runs = [pool.submit(search, with_strategy(args.space, work, "random", "random", "none"), data,
                                    db.with_suffix(".random.db"), "random", rep, args.random_trials, core_pair[0],
                                    plain),
                        pool.submit(search, with_strategy(args.space, work, "tpe", None, args.pruner), data,
                                    db.with_suffix(".tpe.db"), "tpe", rep, args.tpe_trials, core_pair[1],
                                    overrides, random_budget)]
                for run in runs:
                    run.result()
            random_points = curve(db.with_suffix(".random.db"), "random")
            tpe_points = curve(db.with_suffix(".tpe.db"), "tpe")
            budget = sum(steps for steps, _ in random_points)
            target = max(accuracy for _, accuracy in random_points)
            random_steps = steps_to_reach(random_points, target)
            tpe_steps = steps_to_reach(tpe_points, target, budget)
            ratio = (tpe_steps or float("inf")) / random_steps
            ratios.setdefault(dataset, []).append(ratio)
            tpe_within = list(within(tpe_points, budget))
            bests.setdefault(dataset, []).append((target, max(a for _, a in tpe_within)))
            print(f"{'':>{len(dataset) + 1}} {rep:>3} {target:11.4f} {random_steps:6d} "
                  f"{max(a for _, a in tpe_within):9.4f} {tpe_steps if tpe_steps else '-':>6} {len(tpe_within):>6} "
                  f"{ratio:6.2f}")
    print("\nsteps TPE + pruning needs to reach random search's best, as a fraction of random's (goal <= 0.33):")
    for dataset, values in ratios.items():
        random_best, tpe_best = (statistics.mean(b[i] for b in bests[dataset]) for i in (0, 1))
        print(f"  {dataset}: median {statistics.median(values):.2f} over {len(values)} repetitions "
              f"({', '.join(f'{v:.2f}' for v in values)}); best accuracy at the same steps, mean: random "
              f"{random_best:.4f}, TPE + pruning {tpe_best:.4f}")
    if args.keep is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
