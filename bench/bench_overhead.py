"""What a short trial costs outside train(): Optuna's bookkeeping (storage writes, sampling, pruning),
checkpoints and the runner, in CPU seconds per trial, in one process on an SQLite storage; with Optuna's
gc.collect() after each trial (what the runner used to ask for) and without (the default now), interleaved.

Run from the repository root:  python -m bench.bench_overhead [--trials 10] [--rounds 2]
"""
import argparse
import tempfile
import time
from pathlib import Path

import optuna

import search.study as study_module
from data import open_store
from data.synthetic import make_synthetic
from search import runner
from search.artifact_store import open_artifact_store
from search.spec import load_spec
from search.study import create_or_resume, run_study
from tests.conftest import write_study
from tests.test_cli import FAST

_train = study_module.train
in_train = [0.0]


def timed_train(*args, **kwargs):
    start = time.process_time()
    try:
        return _train(*args, **kwargs)
    finally:
        in_train[0] += time.process_time() - start


def one_round(work: Path, store, gc_after_trial: bool, trials: int, tag: str) -> tuple[float, float]:
    runner.GC_AFTER_TRIAL = gc_after_trial
    spec = load_spec(write_study(work / f"{tag}.toml", FAST), ["pruner.name=median"])
    study = create_or_resume(spec, f"sqlite:///{work / tag}.db", store.fingerprint)
    artifacts = open_artifact_store(str(work / f"{tag}.artifacts"))
    run_study(study, spec, store, 1, log=lambda _: None, artifact_store=artifacts)  # imports, first trial
    in_train[0] = 0.0
    start = time.process_time()
    run_study(study, spec, store, trials + 1, log=lambda _: None, artifact_store=artifacts)
    total = time.process_time() - start
    return in_train[0] / trials, (total - in_train[0]) / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_module.train = timed_train
    work = Path(tempfile.mkdtemp(prefix="bench_overhead-"))
    data = make_synthetic(work / "ds", speakers=8, utterances_per_speaker=24, seed=3, n_mels=16, min_len=20,
                          max_len=90)
    store = open_store(data)
    results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for r in range(args.rounds):
        for gc_after in (True, False):
            results[gc_after].append(one_round(work, store, gc_after, args.trials, f"r{r}gc{int(gc_after)}"))
    print(f"{args.trials} tiny trials (40 steps, d_model 16/24) per round, best of {args.rounds} rounds, "
          "CPU s per trial")
    for gc_after, rows in results.items():
        inside, outside = min(rows, key=lambda row: row[1])
        print(f"  gc_after_trial={gc_after!s:<5}  in train() {inside:.3f}   outside train() {outside:.3f}")


if __name__ == "__main__":
    main()
