"""Many processes on one study, on every storage, with real processes and signals (SIGINT, SIGTERM, kill -9)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from search.attrs import run_config_of
from search.cells import cell_of
from tests.conftest import TINY_STUDY, study_trials
from tests.test_cli import ROOT, cli

SPACE = """
[model]
d_model = 16
nhead = 2
ff_mult = 2.0
dropout = 0.0
[train]
max_steps = {steps}
valid_steps = 20
warmup_steps = 5
segment_len = 32
batch_size = 16
lr = {{ low = 1e-4, high = 1e-2, log = true }}
"""
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def write_study(path: Path, body: str) -> Path:
    """A tiny study whose killed trials are noticed fast: heartbeat every 1 s, stale after 3 s."""
    path.write_text(TINY_STUDY.replace("seed = 0", "seed = 0\nheartbeat_interval = 1\ngrace_period = 3") + body)
    return path


def fixed(steps: int) -> str:
    """SPACE with nothing searched: an ablation's baseline."""
    return SPACE.format(steps=steps).replace("lr = { low = 1e-4, high = 1e-2, log = true }", "lr = 3e-3")


def start(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, str(ROOT / "run_study.py"), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def trials(name: str, url: str) -> list[optuna.trial.FrozenTrial]:
    return study_trials(name, url)  # [] while not created yet


def wait_for(condition, name: str, url: str, limit: float = 240) -> list[optuna.trial.FrozenTrial]:
    deadline = time.time() + limit
    while time.time() < deadline:
        now = trials(name, url)
        if condition(now):
            return now
        time.sleep(0.1)
    raise AssertionError(f"timed out; states: {[t.state.name for t in trials(name, url)]}")


def n_state(ts, *states) -> int:
    return sum(t.state in states for t in ts)


def training(t) -> bool:
    """Mid-trial: its parameters are drawn (run_config is stored right after). A signal before that stops a trial
    with no parameters, whose retry draws new ones: a slow start (one core per test) made that a race."""
    return t.state == TrialState.RUNNING and "worker" in t.user_attrs and run_config_of(t) is not None


# Each storage kind's gate is covered once by a kill -9 multi-process test, to keep the suite's time: SQLite
# (file lock) in both, PostgreSQL here, MariaDB in the ablation one (and both servers in tests/test_faults.py).
@pytest.mark.parametrize("storage_url", ["sqlite", "postgresql"], indirect=True)
def test_independent_commands_with_workers_share_a_new_storage(tmp_path, tiny_synthetic, storage_url):
    """2 commands x 2 workers start together on a storage with no schema: no creation race is fatal. One
    worker is killed with kill -9 mid-trial: its trial is reaped and retried once with the same parameters.
    Exactly 6 finished trials, none repeated (each process samples from its own stream)."""
    study = write_study(tmp_path / "par.toml", SPACE.format(steps=150))
    args = ("search", str(study), "--data", str(tiny_synthetic), "--storage", storage_url, "--n-trials", "6",
            "--workers", "2")
    procs = [start(*args, cwd=tmp_path) for _ in range(2)]
    running = wait_for(lambda ts: any(training(t) for t in ts), "par", storage_url)
    victim = next(t for t in running if training(t))
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err + out
        assert "Traceback" not in err + out
    ts = trials("par", storage_url)
    finished = [t for t in ts if t.state in FINISHED]
    assert len(finished) == 6 and n_state(ts, TrialState.RUNNING, TrialState.WAITING) == 0, [t.state for t in ts]
    assert [t.number for t in ts if t.state == TrialState.FAIL] == [victim.number]
    (retry,) = [t for t in ts if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.params == victim.params and retry.state in FINISHED
    lrs = [t.params["lr"] for t in finished]
    assert len(set(lrs)) == 6  # a continuous space: any repeat is a duplicated random stream
    assert len({t.user_attrs["worker"] for t in ts}) >= 3
    worker_lines = [line for out, _ in outs for line in out.splitlines() if line.startswith("[w")]
    assert worker_lines and all(line[:5] in ("[w0] ", "[w1] ") for line in worker_lines)


@pytest.mark.parametrize(("signum", "code", "workers"), [(signal.SIGINT, 130, "2"), (signal.SIGTERM, 143, "1")])
def test_sigint_and_sigterm_stop_cleanly_and_the_rerun_retries(tmp_path, tiny_synthetic, signum, code, workers):
    study = write_study(tmp_path / "sig.toml", SPACE.format(steps=3000))
    study.write_text(study.read_text().replace("[study]\n", f"[study]\nworkers = {workers}\n", 1))  # no --workers
    url = f"sqlite:///{tmp_path / 'sig.db'}"
    args = ("search", str(study), "--data", str(tiny_synthetic), "--n-trials", "2")
    proc = start(*args, cwd=tmp_path)
    wait_for(lambda ts: sum(map(training, ts)) == int(workers), "sig", url)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err + out
    said = [line for line in (err + out).splitlines() if "interrupted" in line]
    assert len(said) == 1 and said[0].startswith(f"interrupted ({signal.Signals(signum).name})"), err + out
    stopped = trials("sig", url)
    assert stopped and n_state(stopped, TrialState.RUNNING) == 0
    assert all(t.state == TrialState.FAIL and t.user_attrs["fail_reason"] == "interrupted" for t in stopped)
    if signum != signal.SIGINT:
        return
    # The rerun (a shorter study would be refused as a changed budget) queues each interrupted trial once.
    rerun = start(*args, cwd=tmp_path)
    wait_for(lambda ts: sum(map(training, ts)) == 2, "sig", url)
    rerun.send_signal(signal.SIGINT)
    rerun.communicate(timeout=60)
    after = trials("sig", url)
    retried = [t for t in after if t.system_attrs.get("failed_trial") is not None]
    assert sorted(t.system_attrs["failed_trial"] for t in retried) == [t.number for t in stopped]
    assert {t.params["lr"] for t in retried} == {t.params["lr"] for t in stopped}


@pytest.mark.parametrize("storage_url", ["sqlite", "mysql"], indirect=True)
def test_killed_ablation_worker_cell_is_retried_once_and_every_cell_completes(tmp_path, tiny_synthetic, storage_url):
    study = write_study(tmp_path / "abl.toml", fixed(400) + """
[ablation]
seeds = [0, 1]
[variants]
stats = { pooling = "stats" }
""")
    url = storage_url  # SQLite, PostgreSQL and MariaDB: the retried cell keeps its seed attr on each
    args = ("ablate", str(study), "--data", str(tiny_synthetic), "--workers", "2", "--storage", url)
    proc = start(*args, cwd=tmp_path)
    running = wait_for(lambda ts: sum(map(training, ts)) == 2, "abl", url)
    victim = next(t for t in running if training(t))
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)  # kill -9 one worker mid-cell
    out, err = proc.communicate(timeout=300)  # the other worker waits out the grace period and reruns the cell
    assert proc.returncode == 0, err + out
    ts = trials("abl", url)
    cells = [cell_of(t) for t in ts if t.state == TrialState.COMPLETE]
    assert sorted(cells) == sorted({(v, s) for v in ("baseline", "stats") for s in (0, 1)})  # each exactly once
    assert ts[victim.number].state == TrialState.FAIL and n_state(ts, TrialState.RUNNING, TrialState.WAITING) == 0
    retry = [t for t in ts if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retry) == 1 and retry[0].params == victim.params and retry[0].state == TrialState.COMPLETE
    again = cli(*args, cwd=tmp_path)
    assert "0 trial(s) run now" in again.stdout and len(trials("abl", url)) == len(ts)
    assert "workers on study" not in again.stdout  # nothing left: no worker processes started


def test_ablation_interrupted_then_resumed_has_one_complete_trial_per_cell(tmp_path, tiny_synthetic):
    study = write_study(tmp_path / "abi.toml", fixed(200) + """
[ablation]
seeds = [0, 1]
[variants]
stats = { pooling = "stats" }
""")
    url = f"sqlite:///{tmp_path / 'abi.db'}"
    args = ("ablate", str(study), "--data", str(tiny_synthetic))
    proc = start(*args, cwd=tmp_path)
    wait_for(lambda ts: n_state(ts, TrialState.COMPLETE) >= 1 and any(  # past its first checkpoint
        t.state == TrialState.RUNNING and len(t.intermediate_values) >= 2 for t in ts), "abi", url)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    cli(*args, cwd=tmp_path)
    ts = trials("abi", url)
    cells = [cell_of(t) for t in ts if t.state == TrialState.COMPLETE]
    assert sorted(cells) == sorted({(v, s) for v in ("baseline", "stats") for s in (0, 1)})
    assert n_state(ts, TrialState.FAIL) == 1 and n_state(ts, TrialState.RUNNING, TrialState.WAITING) == 0
    assert n_state(ts, TrialState.PRUNED) == 0  # the interrupted cell's retry kept its seed, so it ran that cell
    (interrupted,) = [t for t in ts if t.state == TrialState.FAIL]
    (retry,) = [t for t in ts if t.system_attrs.get("failed_trial") == interrupted.number]
    assert retry.user_attrs.get("resumed_from_step", 0) > 0  # from the interrupted cell's latest checkpoint
    report = cli("report", str(study), "--format", "md", cwd=tmp_path)
    assert "| baseline" in report.stdout


def test_this_test_process_uses_no_more_torch_threads_than_it_has_cores():
    """make test runs one test process per core (tests/conftest.py pins each): torch's thread pool must shrink to
    that share, or in-process training oversubscribes its core (2 threads on 1 core ran 60x slower)."""
    cores = os.sched_getaffinity(0)
    assert torch.get_num_threads() <= len(cores)
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        assert len(cores) < os.cpu_count() or os.cpu_count() == 1  # a share, not every core
