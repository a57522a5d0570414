"""The trial loop in-process: plans, counting, failures in a row, signals while training, the gate."""
import os
import signal
import time

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

import run_study
from search import runner
from search.runner import DONE, RUN, WAIT, ablation_plan, gate_path, search_plan
from search.spec import load_spec
from search.study import create_or_resume
from search.study import run_study as run_search
from tests.conftest import write_study
from tests.test_workers import fixed

# test_workers' fixed space, shorter (20 steps, evaluated every 10), with the loss to fill in
SPACE = (fixed(20).replace("valid_steps = 20", "valid_steps = 10")
         .replace("dropout = 0.0\n", "dropout = 0.0\nloss = {loss}\n"))


def frozen(state: TrialState, **params) -> optuna.trial.FrozenTrial:
    dists = {k: CategoricalDistribution([v]) for k, v in params.items()}
    return create_trial(state=state, params=params, distributions=dists,
                        value=0.5 if state == TrialState.COMPLETE else None)


def test_search_plan_counts_finished_and_waits_for_running():
    plan = search_plan(3)
    done, pruned, running, failed = (frozen(s) for s in (TrialState.COMPLETE, TrialState.PRUNED,
                                                          TrialState.RUNNING, TrialState.FAIL))
    assert plan([done, failed, failed]) == RUN  # failed trials do not count
    assert plan([done, pruned, running]) == WAIT  # the running one may finish (or die and be retried)
    assert plan([done, pruned, done]) == DONE
    assert plan([done, pruned, running, frozen(TrialState.WAITING)]) == RUN  # queued retries always run
    assert search_plan(None)([done] * 50) == RUN  # no target: until the deadline


def test_ablation_plan_runs_the_queue_and_waits_for_cells_in_flight():
    plan = ablation_plan([("baseline", 0), ("stats", 0)])
    base = frozen(TrialState.COMPLETE, variant="baseline", seed=0)
    assert plan([base, frozen(TrialState.WAITING)]) == RUN
    assert plan([base, frozen(TrialState.RUNNING, variant="stats", seed=0)]) == WAIT
    assert plan([base, frozen(TrialState.FAIL, variant="stats", seed=0)]) == DONE  # retried by the next run
    assert plan([base, frozen(TrialState.COMPLETE, variant="stats", seed=0)]) == DONE


def test_n_trials_counts_finished_trials_and_failures_in_a_row_stop(tmp_path, tiny_store):
    path = write_study(tmp_path / "acc.toml", SPACE.format(loss='["ce", "test_nan"]'))
    spec = load_spec(path)
    study = create_or_resume(spec, f"sqlite:///{tmp_path / 'acc.db'}", tiny_store.fingerprint)
    stats = run_search(study, spec, tiny_store, n_trials=3)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 3 and TrialState.FAIL in states  # 3 finished, failures extra
    assert stats.ran == len(states) and not stats.all_failed
    assert all("non-finite" in t.user_attrs["fail_reason"] for t in study.trials if t.state == TrialState.FAIL)

    nan = load_spec(path, ["model.loss=test_nan", "study.name=all_nan", "study.max_failures_in_row=3"])
    study = create_or_resume(nan, f"sqlite:///{tmp_path / 'acc.db'}", tiny_store.fingerprint)
    stats = run_search(study, nan, tiny_store, n_trials=10)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3
    assert stats.all_failed and stats.stop_reason.startswith("stopped: the last 3 trials failed (last reason: "
                                                             "training loss became non-finite")


def test_cli_exits_3_when_failures_in_a_row_stop_it(tmp_path, tiny_synthetic, capsys):
    path = write_study(tmp_path / "fail.toml", SPACE.format(loss='"test_nan"'))
    code = run_study.main(["search", str(path), "--data", str(tiny_synthetic), "--n-trials", "4",
                           "--set", "study.max_failures_in_row=2"])
    out, err = capsys.readouterr()
    assert code == 3  # stopped by failures: not done (0), not "every trial failed" of a finished run (1)
    assert "stopped: the last 2 trials failed" in err and "2 trial(s) run now (2 fail)" in out


def test_failures_in_a_row_count_only_this_runs_own_failures(tmp_path):
    """Old failures (a full disk last time, a bad config since fixed) do not stop a new run at once, and
    interrupted trials never count."""
    study = optuna.create_study(study_name="f", storage=f"sqlite:///{tmp_path / 'f.db'}", direction="maximize")
    for _ in range(5):
        study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "disk full"}))
    calls = []

    def objective(trial):
        calls.append(trial.number)
        if len(calls) == 1:  # interrupted by a fault outside the trial, then fine
            raise OSError(28, "No space left on device")
        return 1.0

    stats = runner.run_trials(study, objective, search_plan(2), max_failures_in_row=1, log=lambda _: None)
    assert stats.exit_code == 5 and "disk full" in stats.stop_reason  # a full disk stops the run: retry later
    stats = runner.run_trials(study, objective, search_plan(2), max_failures_in_row=1, log=lambda _: None)
    assert stats.exit_code == 0 and study.trials[-1].state == TrialState.COMPLETE
    interrupted = [t for t in study.trials if t.user_attrs.get("interrupt_cause") == "disk full"]
    assert len(interrupted) == 1 and interrupted[0].user_attrs["fail_reason"] == "interrupted"
    retried = [t.system_attrs.get("failed_trial") for t in study.trials if t.state == TrialState.COMPLETE]
    assert interrupted[0].number in retried  # queued again with the same parameters


def test_a_worker_that_cannot_heartbeat_stops_its_trial_and_it_is_retried(tmp_path, monkeypatch):
    """The database refuses heartbeats for longer than the grace period: the worker stops the trial itself
    (marked interrupted, cause 'heartbeat lost'), which is queued again with the same parameters and run."""
    from sqlalchemy.exc import OperationalError

    from search.storage import RDBStorage, open_storage

    real = RDBStorage.record_heartbeat
    refuse = [True]

    def record(self, trial_id):
        if refuse[0]:
            raise OperationalError("UPDATE trial_heartbeats", {}, Exception("server closed the connection"))
        return real(self, trial_id)

    monkeypatch.setattr(RDBStorage, "record_heartbeat", record)
    study = optuna.create_study(study_name="hb", storage=open_storage(f"sqlite:///{tmp_path / 'hb.db'}", 1, 2),
                                direction="maximize")
    lines = []

    def objective(trial):
        trial.suggest_float("x", 0, 1)
        for _ in range(100):  # 5 s of "training", checking like train() does every step
            runner.poll_interrupt()
            time.sleep(0.05)
        return 1.0

    def objective_then_heal(trial):
        try:
            return objective(trial)
        finally:
            refuse[0] = False

    stats = runner.run_trials(study, objective_then_heal, search_plan(1), log=lines.append)
    first, retry = study.trials
    assert first.state == TrialState.FAIL and first.user_attrs["interrupt_cause"] == "heartbeat lost"
    assert first.duration.total_seconds() < 4  # stopped at the grace period, not after its 5 s
    assert retry.state == TrialState.COMPLETE and retry.params == first.params
    assert retry.system_attrs["failed_trial"] == first.number and stats.exit_code == 0


def test_a_reaped_trials_worker_leaves_it_without_crashing(tmp_path):
    """Another process failed (reaped) this trial while it trained: telling it is skipped with one line."""
    study = optuna.create_study(study_name="r", storage=f"sqlite:///{tmp_path / 'r.db'}", direction="maximize")
    lines = []

    def objective(trial):
        if trial.number == 0:
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # the reaper
        return 1.0

    stats = runner.run_trials(study, objective, search_plan(1), log=lines.append)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE] and stats.exit_code == 0
    assert any("another process took it over" in line for line in lines)


def test_a_signal_during_the_summary_of_finished_work_exits_0(tmp_path, tiny_synthetic, monkeypatch, capsys):
    path = write_study(tmp_path / "ok.toml", SPACE.format(loss='"ce"'))

    def summary(*args):
        raise runner.Terminated()

    monkeypatch.setattr(run_study, "_say_done", summary)
    assert run_study.main(["search", str(path), "--data", str(tiny_synthetic), "--n-trials", "1", "-q"]) == 0
    assert "after the work was done" in capsys.readouterr().err


def test_a_signal_during_training_stops_at_the_next_step_not_inside_a_callback(tmp_path, tiny_store):
    """SIGTERM while a trial trains: recorded, raised by train() at its next step as Terminated, the trial
    FAIL with reason 'interrupted'; no exception escapes from wherever the signal happened to land."""
    path = write_study(tmp_path / "sig.toml", SPACE.format(loss='"ce"'))
    spec = load_spec(path)
    study = create_or_resume(spec, f"sqlite:///{tmp_path / 'sig.db'}", tiny_store.fingerprint)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    runner.handle_signals()
    real = runner.deferred_interrupts
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(runner, "deferred_interrupts", lambda: _SignalInside(real))
            with pytest.raises(runner.Terminated):
                run_search(study, spec, tiny_store, n_trials=1)
    finally:
        runner._pending = None
        for s, handler in previous.items():
            signal.signal(s, handler)
    (trial,) = study.trials
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "interrupted"
    assert "steps_run" not in trial.user_attrs  # stopped inside train(), before it returned


class _SignalInside:
    """deferred_interrupts(), with a SIGTERM delivered as soon as it is entered (only recorded there)."""

    def __init__(self, real):
        self._cm = real()

    def __enter__(self):
        self._cm.__enter__()
        os.kill(os.getpid(), signal.SIGTERM)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_gate_is_one_file_per_storage_and_study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    absolute = optuna.create_study(study_name="g", storage=f"sqlite:///{tmp_path / 'g.db'}")
    relative = optuna.load_study(study_name="g", storage="sqlite:///g.db")
    other = optuna.create_study(study_name="h", storage="sqlite:///g.db")
    assert gate_path(absolute) == gate_path(relative) != gate_path(other)


def test_bad_inputs_are_one_line_and_store_nothing(tmp_path, tiny_synthetic, capsys):
    study = write_study(tmp_path / "bad.toml", SPACE.format(loss='"ce"'))
    data = ["--data", str(tiny_synthetic)]

    def error(*argv: str) -> str:
        try:
            code = run_study.main(list(argv))
        except SystemExit as stop:  # argparse
            code = stop.code
        out, err = capsys.readouterr()
        assert code == 2 and "Traceback" not in err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        return lines[0]

    assert "sampler.n_startup_trials='abc' must be int" in error(
        "search", str(study), *data, "--set", "sampler.name=tpe", "--set", "sampler.n_startup_trials=abc")
    assert "--workers '0' must be a positive integer or 'auto'" in error("search", str(study), *data,
                                                                         "--workers", "0")
    assert "argument --n-trials: invalid int value: 'x'" in error("search", str(study), "--n-trials", "x")
    assert "invalid choice: 'serch'" in error("serch")
    assert "no study 'bad': storage file" in error("report", str(study))
    assert "no study 'nope'" in error("dashboard", "nope", "--storage", f"sqlite:///{tmp_path / 'nope.db'}")
    ablation = write_study(tmp_path / "abl.toml", SPACE.format(loss='"ce"') + """
[ablation]
seeds = [0]
baseline = "best:missing"
[variants]
stats = { pooling = "stats" }
""")
    assert "no study 'missing'" in error("ablate", str(ablation), *data)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".db") == []  # nothing was created


def test_names_and_urls_that_would_fail_later_are_one_line_now(tmp_path, capsys):
    """study.name=a/b (it names files: SQLite's 'unable to open database file' later), postgres:// (SQLAlchemy
    knows postgresql://), and a dashboard port already taken (the server's traceback after 'Listening')."""
    import socket

    from search.spec import SpecError
    from search.storage import open_storage

    path = write_study(tmp_path / "n.toml", SPACE.format(loss='"ce"'))
    with pytest.raises(SpecError, match=r"study.name='a/b' must not contain '/'"):
        load_spec(path, ["study.name=a/b"])
    with pytest.raises(SpecError, match=r"did you mean 'postgresql://u@h/db'\?"):
        open_storage("postgres://u@h/db")
    optuna.create_study(study_name="n", storage=f"sqlite:///{tmp_path / 'n.db'}")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert run_study.main(["dashboard", str(path), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and f"--port {port}: cannot listen there" in err and f"try --port {port + 1}" in err
    assert "optuna-dashboard on" not in out


@pytest.mark.parametrize(("url", "expected"), [
    ("postgresql://u@h/db", "postgresql+psycopg2://u@h/db"),  # SQLAlchemy 2.1 would pick psycopg 3 (absent)
    ("postgresql+psycopg2://u:pw@h:5432/db", "postgresql+psycopg2://u:pw@h:5432/db"),
    ("mysql://root@h/db", "mysql+pymysql://root@h/db"),  # not mysqlclient, which needs a C build
    ("mysql+pymysql://root@h/db", "mysql+pymysql://root@h/db"),
    ("sqlite:///studies/x.db", "sqlite:///studies/x.db"),
])
def test_storage_urls_as_users_write_them_get_an_installed_driver(url, expected):
    from search.storage import normalize_url

    assert normalize_url(url) == expected


def test_the_deadline_stops_a_running_trial_at_its_next_evaluation(tmp_path, tiny_store):
    """A budget in time is kept: the trial running at the deadline stops at its next evaluation, completes with
    what it reached (and says so), and no new trial starts; nothing runs a whole trial past the deadline."""
    import time

    spec = load_spec(write_study(tmp_path / "dl.toml", SPACE.format(loss='"ce"').replace(
        "max_steps = 20", "max_steps = 100000")))
    study = create_or_resume(spec, f"sqlite:///{tmp_path / 'dl.db'}", tiny_store.fingerprint)
    start = time.time()
    stats = run_search(study, spec, tiny_store, n_trials=5, deadline=start + 3, log=lambda _: None)
    late = time.time() - (start + 3)
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE and stats.stop_reason == "timeout"
    stopped = trial.user_attrs["stopped_at_deadline"]
    assert stopped % 10 == 0 and stopped == trial.user_attrs["steps_run"] == max(trial.intermediate_values)
    assert 0 < stopped < 100000 and trial.value == max(trial.intermediate_values.values())
    assert late < 2.0  # one 10-step evaluation window past the deadline, not a 100,000-step trial


def test_a_trial_has_a_heartbeat_before_its_objective_runs(tmp_path, monkeypatch):
    """Optuna's heartbeat thread records asynchronously (on a busy SQLite file it lagged until a worker was killed
    mid-trial: a trial with no heartbeat is never reaped). The runner records one before the objective runs;
    here Optuna's thread records nothing at all, as if it lagged forever."""
    from optuna.storages._heartbeat import NullHeartbeatThread

    from search.status import heartbeat_ages
    from search.storage import open_storage

    monkeypatch.setattr(runner, "get_heartbeat_thread", lambda *a: NullHeartbeatThread())
    study = optuna.create_study(study_name="hb", storage=open_storage(f"sqlite:///{tmp_path / 'hb.db'}", 1, 3),
                                direction="maximize")
    seen = []

    def objective(trial):
        seen.append(heartbeat_ages(study).get(trial.number))
        return 1.0

    runner.run_trials(study, objective, search_plan(2), log=lambda _: None)
    assert len(seen) == 2 and all(age is not None and age < 60 for age in seen)
