"""`run-study status`: a real SQLite study with trials in every state, read while one trial runs."""
import re
import time
import warnings
from datetime import datetime, timedelta

import optuna
import pytest
import sqlalchemy as sa
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.storages import RDBStorage
from optuna.trial import TrialState, create_trial

import run_study
from search.status import study_status
from search.storage import normalize_url
from tests.conftest import TINY_STUDY
from tests.test_cli import assert_one_line_error, cli

SPACE = {"pooling": CategoricalDistribution(["mean", "stats"]), "lr": FloatDistribution(1e-4, 1e-2, log=True)}


@pytest.fixture(autouse=True)
def _no_env_storage(monkeypatch):
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)  # the developer's own must not steer these tests


def _finished(study: optuna.Study, state: TrialState, seconds: float, value: float | None = None,
              params: dict | None = None, steps: dict | None = None) -> None:
    trial = create_trial(state=state, value=value, params=params or {"pooling": "mean", "lr": 1e-3},
                         distributions=SPACE, intermediate_values=steps)
    trial.datetime_start = datetime(2026, 1, 1, 12, 0, 0)
    trial.datetime_complete = trial.datetime_start + timedelta(seconds=seconds)
    study.add_trial(trial)


def _study(url: str, name: str = "st") -> tuple[optuna.Study, RDBStorage]:
    """2 complete (60 s, 120 s), 1 pruned (90 s), 1 failed, 2 running (one with heartbeats), 1 waiting."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(normalize_url(url), heartbeat_interval=60, grace_period=120)  # the installed driver
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    _finished(study, TrialState.COMPLETE, 60, 0.5)
    _finished(study, TrialState.COMPLETE, 120, 0.8, {"pooling": "stats", "lr": 0.0031234})
    _finished(study, TrialState.PRUNED, 90, steps={10: 0.2})
    _finished(study, TrialState.FAIL, 5)
    running = study.ask(SPACE)  # trial 4: what a worker (search.runner) does while it trains
    running.set_user_attr("worker", "hostA:123")
    running.report(0.41, step=20)
    running.report(0.45, step=40)
    storage.record_heartbeat(running._trial_id)
    beats = sa.table("trial_heartbeats", sa.column("heartbeat", sa.DateTime))
    with storage.engine.begin() as db:  # its last heartbeat was 42 s ago, by the database's clock (as Optuna's)
        now = db.execute(sa.select(sa.func.now())).scalar_one().replace(tzinfo=None)
        db.execute(beats.update().values(heartbeat=now - timedelta(seconds=42)))
    study.ask(SPACE)  # trial 5: just started, no worker attr, no step, no heartbeat yet
    study.enqueue_trial({"pooling": "mean", "lr": 1e-3})  # trial 6
    return study, storage


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_status_of_a_running_study(storage_url, capsys):
    """SQLite, PostgreSQL and MariaDB: heartbeat ages are read on the database's clock, whatever its time zone."""
    _study(storage_url)
    assert run_study.main(["status", "st", "--storage", storage_url]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "study 'st': 7 trials: 2 complete, 1 pruned, 1 fail, 2 running, 1 waiting"
    assert re.fullmatch(r"  running #4 on hostA:123: step 40 value 0\.4500, heartbeat 4[23] s ago, started \d+ s ago",
                        lines[1]), lines[1]
    assert re.fullmatch(r"  running #5 on \?: no step reported, heartbeat \?, started \d+ s ago", lines[2]), lines[2]
    assert lines[3] == "best: #1 value 0.8000 (pooling=stats, lr=0.003123)"
    assert lines[4] == "finished: 3, mean 1 min 30 s each"  # (60 + 120 + 90) / 3; no `search` set a target
    assert len(lines) == 5
    # `run-study search --n-trials 9` stores its target: 6 left x 90 s / 2 running
    optuna.load_study(study_name="st", storage=normalize_url(storage_url)).set_user_attr("target_trials", 9)
    assert run_study.main(["status", "st", "--storage", storage_url]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == "finished: 3, mean 1 min 30 s each; 6 of 9 trials left, ETA 4 min 30 s (2 running)"
    optuna.load_study(study_name="st", storage=normalize_url(storage_url)).set_user_attr("target_trials", 3)
    assert run_study.main(["status", "st", "--storage", storage_url]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "finished: 3, mean 1 min 30 s each; target of 3 reached"


def test_status_reads_the_storage_from_optuna_storage(tmp_path, monkeypatch, capsys):
    """--storage, then OPTUNA_STORAGE, then the study file's [study] storage, then studies/NAME.db."""
    urls = {where: f"sqlite:///{tmp_path / where}.db" for where in ("flag", "env", "file")}
    for n, url in enumerate(urls.values()):
        study = optuna.create_study(study_name="prec", storage=url, direction="maximize")
        for _ in range(n + 1):  # flag.db holds 1 trial, env.db 2, file.db 3
            _finished(study, TrialState.COMPLETE, 10, 0.5)
    (tmp_path / "prec.toml").write_text(TINY_STUDY.replace("[study]\n", f"[study]\nstorage = '{urls['file']}'\n"))
    monkeypatch.chdir(tmp_path)

    def trials(*args: str) -> str:
        assert run_study.main(["status", *args]) == 0
        return capsys.readouterr().out.splitlines()[0].split(": ")[1]

    assert trials("prec.toml") == "3 trials"
    monkeypatch.setenv("OPTUNA_STORAGE", urls["env"])
    assert trials("prec.toml") == "2 trials"
    assert trials("prec") == "2 trials"  # a study name needs no --storage then
    assert trials("prec.toml", "--storage", urls["flag"]) == "1 trial"
    # one place for every command that takes --storage, the training ones too
    for argv in (["search", "x.toml"], ["ablate", "x.toml"], ["report", "x"], ["dashboard", "x"]):
        assert run_study._parser().parse_args(argv).storage == urls["env"]
    monkeypatch.setenv("OPTUNA_STORAGE", "")  # set but empty: as if unset
    assert trials("prec.toml") == "3 trials"


def test_ablation_status_has_an_eta():
    """An ablation stores its target (rows x seeds): cells left x mean cell time / running workers."""
    study = optuna.create_study(direction="maximize")  # in memory: no heartbeats to read
    study.set_user_attr("kind", "ablation")
    study.set_user_attr("rows", ["baseline", "no-subsample", "mean-pooling"])
    study.set_user_attr("seeds", [0, 1])
    cell = {"variant": CategoricalDistribution(["baseline", "no-subsample", "mean-pooling"]),
            "seed": CategoricalDistribution([0, 1])}
    for seconds, row, seed in ((100, "baseline", 0), (200, "baseline", 1)):
        trial = create_trial(value=0.7, params={"variant": row, "seed": seed}, distributions=cell)
        trial.datetime_start = datetime(2026, 1, 1, 12, 0, 0)
        trial.datetime_complete = trial.datetime_start + timedelta(seconds=seconds)
        study.add_trial(trial)
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"variant": "baseline", "seed": 0},
                                 distributions=cell))  # a worker that found no cell left: not counted
    for _ in range(2):
        study.ask(cell)
    text = study_status(study, time.time()).splitlines()
    assert text[1].endswith("no step reported, heartbeat ?, started 0 s ago")
    # 4 of 6 cells left x 150 s / 2 running workers = 300 s
    assert text[-1] == "finished: 2, mean 2 min 30 s each; 4 of 6 cells left, ETA 5 min 00 s (2 running)"


def test_status_of_a_missing_study_is_one_line(tmp_path):
    assert_one_line_error(cli("status", "nope", cwd=tmp_path, check=False), "nope")
    assert_one_line_error(cli("status", "nope", "--storage", f"sqlite:///{tmp_path / 'none.db'}", cwd=tmp_path,
                              check=False), "none.db does not exist")
    assert not (tmp_path / "none.db").exists()  # status never creates a storage
