"""Trials/hour of studies/quickstart.toml run three ways, in one run on this machine.

  one process    run-study search ... (--workers 1): one process, torch threads = all usable cores
  1 thread       one process pinned to one core (taskset-like): what a single core gives, for the bound
  --workers 2    two worker processes, cores // 2 threads each, pinned one per core set
  2 commands     two independent `run-study search` commands side by side, each with all cores' threads
                 (what users did before --workers: the 0.4x case of issue 8)

Every way runs the same number of trials of the same architecture (the quickstart space with its model
fixed to one mid-size choice, pruning off) so trials cost the same; lr is still sampled. trials/hour is
counted from the storage (first trial start to last trial end); `wall` includes start-up (imports, data).
The ways run in interleaved rounds and each keeps its best round: machines here are shared (a 2-vCPU VM whose
vCPUs may share a physical core with a neighbour), and --workers 2 measured 372 and 195 trials/hour an hour
apart. `CPU s per trial` (user + system of all processes, start-up included) does not depend on such load.

Run from the repository root:  python -m bench.bench_workers [--trials 4] [--rounds 2]
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parent.parent
FIXED = ["model.d_model=64", "model.nhead=4", "model.n_layers=1", "model.dropout=0.1", "model.head=linear",
         "pruner.n_warmup_steps=1000000"]  # no pruning: every trial the same length


def run_way(label: str, commands: list[list[str]], storage: str, data: Path,
            one_core: bool = False) -> tuple[str, float, float, int, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    core = sorted(os.sched_getaffinity(0))[:1]
    start, cpu_before = time.time(), _children_cpu()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "run_study.py"), *cmd, "--storage", storage,
                               "--data", str(data), "--set", "study.name=bench"] +
                              [a for f in FIXED for a in ("--set", f)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              preexec_fn=(lambda: os.sched_setaffinity(0, core)) if one_core else None)
             for cmd in commands]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"{label}: exit {p.returncode}: {err[-2000:]}")
    wall, cpu = time.time() - start, _children_cpu() - cpu_before
    trials = optuna.load_study(study_name="bench", storage=storage).get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    return label, len(trials) / span * 3600, wall, len(trials), cpu


def _children_cpu() -> float:
    """CPU seconds (user + system) of every finished child and grandchild process (workers included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="trials per way and round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    study = str(ROOT / "studies" / "quickstart.toml")
    n = str(args.trials)
    with tempfile.TemporaryDirectory() as tmp:
        from data.synthetic import make_synthetic

        data = make_synthetic(Path(tmp) / "quickstart", speakers=40, utterances_per_speaker=60, seed=0)
        subprocess.run([sys.executable, str(ROOT / "run_study.py"), "pack", str(data)], check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
        ways = [  # (label, commands, pin the command to one core)
            ("one process (all cores' threads)", [["search", study, "--n-trials", n]], False),
            ("one process, 1 thread on 1 core", [["search", study, "--n-trials", n]], True),
            ("--workers 2 (1 thread, 1 core each)", [["search", study, "--n-trials", n, "--workers", "2"]], False),
            ("2 commands side by side (unpinned)", [["search", study, "--n-trials", n]] * 2, False),
        ]
        rounds = [[run_way(label, cmds, f"sqlite:///{Path(tmp) / f'w{r}-{i}.db'}", data, one_core=pin)
                   for i, (label, cmds, pin) in enumerate(ways)]
                  for r in range(args.rounds)]
    rows = [max(results, key=lambda row: row[1]) for results in zip(*rounds, strict=True)]
    for r, results in enumerate(rounds):
        print(f"round {r}: " + ", ".join(f"{row[1]:.0f}" for row in results) + " trials/hour")
    base = rows[0][1]
    print(f"{len(os.sched_getaffinity(0))} usable cores, {args.trials} trials per way and round, best of "
          f"{args.rounds} rounds, quickstart d_model=64\n")
    print(f"| {'way':<36} | trials | trials/hour | vs one process | wall s | CPU s per trial |")
    print(f"|{'-' * 38}|--------|-------------|----------------|--------|-----------------|")
    for label, rate, wall, count, cpu in rows:
        print(f"| {label:<36} | {count:>6} | {rate:>11.0f} | {rate / base:>13.2f}x | {wall:>6.1f} | "
              f"{cpu / count:>15.1f} |")


if __name__ == "__main__":
    main()
