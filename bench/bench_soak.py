"""Soak: 4 workers on one database study, a random one kill -9'd every ~30 s and restarted; optionally the
database server itself restarted, stopped and killed under them.

Four independent `run-study search` commands (one core each) share a new database and a target of --trials
tiny trials (heartbeat 1 s, grace period 3 s). Every ~30 s (jittered) one of them is killed with SIGKILL, at
whatever line it is, and started again. The database is a fresh one on a private server this bench starts
(tests/dbservers.py: PostgreSQL by default, --server mysql for MariaDB), deleted at the end, or --storage URL
(any storage; the study gets a unique name there and is left in it). With --restart-db-every S the private
server goes down every ~S s (jittered), in turn: a clean restart (pg_ctl -m fast / SIGTERM), an immediate stop
with 5 s of downtime, a kill -9; each is printed. At the end it checks and prints: finished trials (must equal
the target), trials lost (a killed trial never retried to a finish), duplicate parameter sets among finished
trials, trials left RUNNING or WAITING, interrupted trials not retried, the kills, the database restarts,
trials resumed from a checkpoint, the workers' exit codes and the tracebacks in their log.

Run from the repository root:
    python -m bench.bench_soak [--trials 200] [--every 30] [--server postgresql|mysql] [--restart-db-every 60]
    python -m bench.bench_soak --storage postgresql://USER@HOST/DB      # an existing database instead
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
from collections import Counter
from pathlib import Path

import optuna
from optuna.trial import TrialState

from search.storage import normalize_url
from tests.dbservers import SERVER_CLASSES

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


class DatabaseChaos:
    """Takes the private server down every ~`every` s (jittered), cycling through three ways; never two at once."""

    ACTIONS = ("restart(fast)", "stop(immediate) + 5 s + start", "kill9 + start")

    def __init__(self, server, every: float, began: float) -> None:
        self.server, self.every, self.began = server, every, began
        self.rng = random.Random(1)
        self.done = 0
        self.back_at: float | None = None  # set while stopped: when to start it again
        self.down_since = 0.0
        self.next_at = began + self.rng.uniform(0.5, 1.5) * every

    def say(self, text: str) -> None:
        print(f"[{time.time() - self.began:6.1f} s] database: {text}", flush=True)

    def tick(self) -> None:
        now = time.time()
        if self.back_at is not None:
            if now >= self.back_at:
                self.server.start()
                self.back_at = None
                self.say(f"started again, {time.time() - self.down_since:.2f} s down")
                self.schedule()
            return
        if now < self.next_at:
            return
        action = self.ACTIONS[self.done % len(self.ACTIONS)]
        self.done += 1
        self.down_since = time.time()
        if action == "restart(fast)":
            self.server.restart("fast")
            self.say(f"#{self.done} {action}: {time.time() - self.down_since:.2f} s down")
        elif action.startswith("stop"):
            self.server.stop("immediate")
            self.back_at = time.time() + 5
            self.say(f"#{self.done} {action}: stopped")
            return
        else:
            self.server.kill9()
            self.server.start()
            self.say(f"#{self.done} {action}: {time.time() - self.down_since:.2f} s down")
        self.schedule()

    def schedule(self) -> None:
        self.next_at = time.time() + self.rng.uniform(0.5, 1.5) * self.every

    def finish(self) -> None:
        if self.back_at is not None:
            self.server.start()
            self.back_at = None
            self.say(f"started again, {time.time() - self.down_since:.2f} s down")


def tracebacks(log: str) -> Counter:
    """How often each exception (the last line of a traceback) occurs in the workers' log."""
    errors: Counter = Counter()
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("Traceback"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith((" ", "\t")) or not lines[j].strip()):
                j += 1
            errors[lines[j].strip()[:160] if j < len(lines) else "(log ends inside a traceback)"] += 1
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--every", type=float, default=30.0, help="mean seconds between kills of a worker")
    parser.add_argument("--storage", help="a database URL to use (default: a new database on a private server)")
    parser.add_argument("--server", choices=sorted(SERVER_CLASSES), default="postgresql",
                        help="which private server to start when there is no --storage")
    parser.add_argument("--restart-db-every", type=float, default=0.0, metavar="S",
                        help="mean seconds between restarts of the private server (0: never)")
    parser.add_argument("--log", type=Path, help="keep the workers' log here (default: deleted)")
    args = parser.parse_args()
    if args.restart_db_every and args.storage:
        parser.error("--restart-db-every restarts a server this bench started itself: leave out --storage")
    server = None
    if args.storage:
        url, study_name, where = args.storage, f"soak_{uuid.uuid4().hex[:8]}", args.storage
    else:
        server = SERVER_CLASSES[args.server]()
        began = time.perf_counter()
        server.start()
        url, study_name = server.create_database(), "soak"
        where = f"a private {args.server} server (started in {time.perf_counter() - began:.1f} s)"
    chaos, procs = None, []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            from data.synthetic import make_synthetic

            data = make_synthetic(Path(tmp) / "ds", speakers=6, utterances_per_speaker=16, seed=0, n_mels=16,
                                  min_len=20, max_len=90)
            study_file = Path(tmp) / f"{study_name}.toml"
            study_file.write_text(STUDY)
            cmd = [sys.executable, str(ROOT / "run_study.py"), "search", str(study_file), "--data", str(data),
                   "--storage", url, "--n-trials", str(args.trials)]
            log = args.log or Path(tmp) / "workers.log"
            log.write_text("")
            procs = [start(cmd, i, log) for i in range(args.workers)]
            kills, began = 0, time.time()
            chaos = DatabaseChaos(server, args.restart_db_every, began) if args.restart_db_every else None
            next_kill = began + random.uniform(0.5, 1.5) * args.every
            rng = random.Random(0)
            while any(p.poll() is None for p in procs):
                time.sleep(0.2)
                if chaos is not None:
                    chaos.tick()
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
            if chaos is not None:
                chaos.finish()
            errors = tracebacks(log.read_text(errors="replace"))
            trials = optuna.load_study(study_name=study_name, storage=normalize_url(url)).trials
    finally:
        for p in procs:  # after an error in the bench itself: no worker outlives it
            if p.poll() is None:
                p.kill()
                p.wait()
        if server is not None:
            server.close()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    killed = [t for t in trials if t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs]
    interrupted = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") == "interrupted"]
    retried_to_finish = {t.system_attrs.get("failed_trial") for t in finished}
    lost = [t.number for t in killed if t.system_attrs.get("failed_trial", t.number) not in retried_to_finish]
    lost_interrupted = [t.number for t in interrupted
                        if t.system_attrs.get("failed_trial", t.number) not in retried_to_finish]
    params = [tuple(sorted(t.params.items())) for t in finished]
    resumed = [t.number for t in trials if (t.user_attrs.get("resumed_from_step") or 0) > 0]
    print(f"{args.workers} workers on {where}, target {args.trials} trials, {elapsed:.0f} s, exit codes {codes}")
    seconds = [t.duration.total_seconds() for t in trials if t.duration is not None]
    print(f"kill -9 + restart: {kills}; mean trial {sum(seconds) / max(1, len(seconds)):.1f} s")
    print(f"database restarts: {chaos.done if chaos else 0}"
          + (f" (every ~{args.restart_db_every:.0f} s: {', '.join(DatabaseChaos.ACTIONS)}, in turn)" if chaos else ""))
    print(f"finished trials: {len(finished)} ({sum(t.state == TrialState.PRUNED for t in finished)} pruned); "
          f"all trials in storage: {len(trials)}")
    print(f"trials killed mid-run (FAIL by heartbeat): {len(killed)}; retried to a finish: "
          f"{len(killed) - len(lost)}; lost: {len(lost)} {lost or ''}")
    print(f"trials interrupted (FAIL 'interrupted': a signal, or the storage gone past the grace period): "
          f"{len(interrupted)}; lost: {len(lost_interrupted)} {lost_interrupted or ''}")
    print(f"trials resumed from a checkpoint (resumed_from_step > 0): {len(resumed)} {resumed or ''}")
    print(f"duplicate parameter sets among finished trials: {len(params) - len(set(params))}")
    print(f"left RUNNING: {sum(t.state == TrialState.RUNNING for t in trials)}, "
          f"WAITING: {sum(t.state == TrialState.WAITING for t in trials)}")
    other = Counter(str(t.user_attrs["fail_reason"]) for t in trials if t.state == TrialState.FAIL and "fail_reason"
                    in t.user_attrs)
    print(f"other failures: {sum(other.values())} {dict(other) or ''}")
    print(f"tracebacks in the workers' log: {sum(errors.values())}")
    for error, n in errors.most_common(8):
        print(f"  {n} x {error}")


if __name__ == "__main__":
    main()
