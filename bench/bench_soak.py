"""Soak: 4 workers on one PostgreSQL study, a random one kill -9'd every ~30 s and restarted.

Four independent `run-study search` commands (one core each) share a new PostgreSQL database and a
target of --trials tiny trials (heartbeat 1 s, grace period 3 s). Every ~30 s (jittered) one of them is
killed with SIGKILL, at whatever line it is, and started again. At the end it checks and prints:
finished trials (must equal the target), trials lost (a killed trial never retried to a finish), duplicate
parameter sets among finished trials, trials left RUNNING or WAITING, and the kills.

Run from the repository root:  python -m bench.bench_soak [--trials 200] [--every 30]
Needs the local PostgreSQL server (postgresql://postgres@127.0.0.1:5432, trust auth).
"""
import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent
STUDY = """
[study]
seed = 0
heartbeat_interval = 1
grace_period = 3
[data]
valid_fraction = 0.25
[sampler]
name = "tpe"
n_startup_trials = 10
[pruner]
name = "median"
n_startup_trials = 5
n_warmup_steps = 200
[model]
d_model = [16, 24]
nhead = 2
ff_mult = 2.0
dropout = 0.0
[train]
max_steps = 400
valid_steps = 50
warmup_steps = 5
segment_len = 32
batch_size = 16
lr = { low = 1e-4, high = 1e-2, log = true }
"""


def start(cmd: list[str], core: int, log: Path) -> subprocess.Popen:
    cores = sorted(os.sched_getaffinity(0))
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log.open("a"),
                            stderr=subprocess.STDOUT,
                            preexec_fn=lambda: os.sched_setaffinity(0, [cores[core % len(cores)]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--every", type=float, default=30.0, help="mean seconds between kills")
    args = parser.parse_args()
    name = f"hw4_soak_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/postgres",
                                     isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            from data.synthetic import make_synthetic

            data = make_synthetic(Path(tmp) / "ds", speakers=6, utterances_per_speaker=16, seed=0, n_mels=16,
                                  min_len=20, max_len=90)
            study_file = Path(tmp) / "soak.toml"
            study_file.write_text(STUDY)
            cmd = [sys.executable, str(ROOT / "run_study.py"), "search", str(study_file), "--data", str(data),
                   "--storage", url, "--n-trials", str(args.trials)]
            log = Path(tmp) / "workers.log"
            procs = [start(cmd, i, log) for i in range(args.workers)]
            kills, began = 0, time.time()
            next_kill = began + random.uniform(0.5, 1.5) * args.every
            rng = random.Random(0)
            while any(p.poll() is None for p in procs):
                time.sleep(0.2)
                if time.time() >= next_kill:
                    i = rng.randrange(len(procs))
                    if procs[i].poll() is None:
                        procs[i].send_signal(signal.SIGKILL)
                        procs[i].wait()
                        kills += 1
                        procs[i] = start(cmd, i, log)  # restarted at once: it resumes the same study
                    next_kill = time.time() + rng.uniform(0.5, 1.5) * args.every
            codes = [p.returncode for p in procs]
            elapsed = time.time() - began
            trials = optuna.load_study(study_name="soak", storage=url.replace(
                "postgresql://", "postgresql+psycopg2://")).trials
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP DATABASE {name} WITH (FORCE)"))
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    killed = [t for t in trials if t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs]
    retried_to_finish = {t.system_attrs.get("failed_trial") for t in finished}
    lost = [t.number for t in killed if t.system_attrs.get("failed_trial", t.number) not in retried_to_finish]
    params = [tuple(sorted(t.params.items())) for t in finished]
    print(f"{args.workers} workers on PostgreSQL, target {args.trials} trials, {elapsed:.0f} s, exit codes {codes}")
    seconds = [t.duration.total_seconds() for t in trials if t.duration is not None]
    print(f"kill -9 + restart: {kills}; mean trial {sum(seconds) / max(1, len(seconds)):.1f} s")
    print(f"finished trials: {len(finished)} ({sum(t.state == TrialState.PRUNED for t in finished)} pruned); "
          f"all trials in storage: {len(trials)}")
    print(f"trials killed mid-run (FAIL by heartbeat): {len(killed)}; retried to a finish: "
          f"{len(killed) - len(lost)}; lost: {len(lost)} {lost or ''}")
    print(f"duplicate parameter sets among finished trials: {len(params) - len(set(params))}")
    print(f"left RUNNING: {sum(t.state == TrialState.RUNNING for t in trials)}, "
          f"WAITING: {sum(t.state == TrialState.WAITING for t in trials)}")
    print(f"other failures: {sum(t.state == TrialState.FAIL and 'fail_reason' in t.user_attrs for t in trials)}")


if __name__ == "__main__":
    main()
