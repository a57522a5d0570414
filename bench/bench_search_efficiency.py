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

--timed LABEL=STUDY.toml[:KEY=VALUE;KEY=VALUE] ... runs another comparison: wall-clock searches as a user runs
them (`run-study search STUDY --workers auto`, each variant for its own study.timeout unless --minutes), then
`predict --labels` of the best trial and of the top-3 average; per dataset, repetition (study.seed = rep) and
variant: trials (complete / pruned), steps per trial, best validation accuracy, test accuracy; then the means
over repetitions. E.g. the 5-minute study against the 20-minute one, or a lever switched off:
  python -m bench.bench_search_efficiency --timed cpu5=studies/cpu5.toml "no-enqueue=studies/cpu5.toml:study.enqueue=[]"
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


def timed_search(space: Path, data: Path, labels: Path, db: Path, seed: int, overrides: list[str],
                 minutes: float | None) -> dict:
    """One wall-clock search on all cores, then predict --labels of its best trial and its top-3 average."""
    import re

    import optuna

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OPTUNA_STORAGE", None)
    storage = ["--storage", f"sqlite:///{db}"]
    sets = [arg for o in [*overrides, "study.name=timed", f"study.seed={seed}",
                          *([f"study.timeout={minutes * 60:g}"] if minutes else [])] for arg in ("--set", o)]
    start = time.time()
    subprocess.run([sys.executable, str(ROOT / "run_study.py"), "search", str(space), "--data", str(data), "-q",
                    "--workers", "auto", *storage, *sets], check=True, capture_output=True, env=env, cwd=db.parent)
    wall = time.time() - start
    out = {"wall": wall}
    for label, extra in (("best", []), ("top3", ["--top-k", "3"])):
        done = subprocess.run([sys.executable, str(ROOT / "run_study.py"), "predict", "timed", *storage, "--data",
                               str(data), *extra, "--out", str(db.with_suffix(f".{label}.csv")), "--labels",
                               str(labels)], check=True, capture_output=True, text=True, env=env, cwd=db.parent)
        out[label] = float(re.search(r"accuracy (\S+) on", done.stdout).group(1))
    trials = optuna.load_study(study_name="timed", storage=f"sqlite:///{db}").trials
    states = [t.state.name for t in trials]
    out.update(complete=states.count("COMPLETE"), pruned=states.count("PRUNED"),
               valid=max((t.value for t in trials if t.value is not None), default=float("nan")),
               steps=statistics.mean(t.user_attrs.get("steps_run", 0) for t in trials) if trials else 0,
               precision=",".join(sorted({str(t.user_attrs.get("precision")) for t in trials})))
    return out


def timed(args: argparse.Namespace, work: Path) -> None:
    variants = []
    for item in args.timed:
        label, _, rest = item.partition("=")
        space, _, sets = rest.partition(":")
        variants.append((label, Path(space).resolve(), [o for o in sets.split(";") if o]))
    print(f"timed searches on all cores ({os.cpu_count()} CPUs); {args.reps} repetitions; working in {work}")
    means: dict[tuple[str, str], list[dict]] = {}
    for dataset in args.datasets.split(","):
        data, labels = _dataset(dataset, work, args.fsdd)
        print(f"\n{dataset}: {'variant':>12} {'rep':>3} {'wall s':>6} {'complete':>8} {'pruned':>6} "
              f"{'steps/trial':>11} {'best valid':>10} {'test best':>9} {'test top-3':>10} precision")
        for rep in range(args.reps):
            for label, space, sets in variants:  # interleaved: a slow spell of the machine hits every variant
                db = work / f"{dataset}-{label}-{rep}.db"
                r = timed_search(space, data, labels, db, rep, [*sets, *args.overrides], args.minutes)
                means.setdefault((dataset, label), []).append(r)
                print(f"{'':>{len(dataset) + 1}} {label:>12} {rep:>3} {r['wall']:6.0f} {r['complete']:8d} "
                      f"{r['pruned']:6d} {r['steps']:11.0f} {r['valid']:10.4f} {r['best']:9.4f} {r['top3']:10.4f} "
                      f"{r['precision']}", flush=True)
    print("\nmeans over repetitions:")
    for (dataset, label), runs in means.items():
        mean = {k: statistics.mean(r[k] for r in runs) for k in ("wall", "complete", "pruned", "best", "top3")}
        print(f"  {dataset} {label}: {mean['wall']:.0f} s, {mean['complete']:.1f} complete + {mean['pruned']:.1f} "
              f"pruned trials; test best trial {mean['best']:.4f} (min {min(r['best'] for r in runs):.4f}), "
              f"top-3 {mean['top3']:.4f}")


def _dataset(dataset: str, work: Path, fsdd: Path) -> tuple[Path, Path]:
    """The dataset's folder (copied or generated into `work`, packed) and its test labels."""
    data = work / dataset
    if not data.exists():
        if dataset == "fsdd":
            shutil.copytree(fsdd / "hw4", data)
        else:
            from data.synthetic import make_synthetic

            make_synthetic(data, speakers=40, utterances_per_speaker=60, seed=0)  # the quickstart's data
    subprocess.run([sys.executable, str(ROOT / "run_study.py"), "pack", str(data)], check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return data, (fsdd / "test_labels_names.csv" if dataset == "fsdd" else data / "test_labels.csv")


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
    parser.add_argument("--timed", nargs="+", metavar="LABEL=STUDY[:KEY=V;...]",
                        help="compare wall-clock searches of these study files instead (see the module's help)")
    parser.add_argument("--minutes", type=float, help="--timed: every search this long (default: its study.timeout)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_efficiency-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.timed:
        timed(args, work)
        if args.keep is None:
            shutil.rmtree(work)
        return
    cores = sorted(os.sched_getaffinity(0))
    core_pair = (cores[0], cores[-1])
    print(f"space {args.space.name} {' '.join(args.overrides)}; {args.reps} repetitions; "
          f"random: {args.random_trials} unpruned trials; "
          f"tpe: the space's sampler + {args.pruner or 'its'} pruner, same total steps; cores {core_pair}; "
          f"working in {work}")
    ratios: dict[str, list[float]] = {}
    bests: dict[str, list[tuple[float, float]]] = {}  # (random's best, TPE's best within the same steps)
    for dataset in args.datasets.split(","):
        data, _ = _dataset(dataset, work, args.fsdd)
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
