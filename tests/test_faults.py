"""Faults outside our process, for real: a database that restarts, goes away or drops connections (private
servers started by tests/dbservers.py), two machines on one study, a parent killed with -9, a full disk,
a damaged SQLite file, a closed output pipe. Each asserts: nothing lost or trained twice, no traceback,
nothing left RUNNING, every retried trial resumed from its checkpoint, exact counts, a true exit code."""
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.cells import cell_of
from tests.conftest import TINY_STUDY, fresh_database, small_disk_at
from tests.test_cli import cli
from tests.test_workers import SPACE, fixed, n_state, start, trials, wait_for

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def write_study(path: Path, body: str, heartbeat: int = 1, grace: int = 4, outage: int = 120,
                extra: str = "") -> Path:
    path.write_text(TINY_STUDY.replace("seed = 0", f"seed = 0\nheartbeat_interval = {heartbeat}\n"
                                       f"grace_period = {grace}\nstorage_outage_s = {outage}\n{extra}") + body)
    return path


def training(ts, n: int = 1, evaluations: int = 2) -> bool:
    """At least n trials are running past their first checkpoints."""
    return sum(t.state == TrialState.RUNNING and len(t.intermediate_values) >= evaluations for t in ts) >= n


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    return (out or "") + (err or "")


def assert_nothing_lost(ts, n_finished: int) -> None:
    """Exactly n finished trials with distinct parameters, nothing RUNNING or queued, every failure an
    interruption whose retry finished after resuming from the interrupted trial's checkpoint."""
    finished = [t for t in ts if t.state in FINISHED]
    assert len(finished) == n_finished, [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in ts]
    assert n_state(ts, TrialState.RUNNING, TrialState.WAITING) == 0
    assert len({t.params["lr"] for t in finished}) == n_finished  # no trial trained twice
    for t in ts:
        if t.state == TrialState.FAIL:
            assert t.user_attrs.get("fail_reason", "interrupted") == "interrupted", t.user_attrs
            retries = [r for r in ts if t.number in r.system_attrs.get("retry_history", [])]
            assert any(r.state in FINISHED for r in retries), t.number


def resumed(ts) -> list[int]:
    return [t.user_attrs["resumed_from_step"] for t in ts if t.user_attrs.get("resumed_from_step", 0) > 0]


@pytest.mark.parametrize("private_db", ["postgresql", "mysql"], indirect=True)
def test_a_database_restart_mid_trial_loses_nothing(tmp_path, tiny_synthetic, private_db):
    """PostgreSQL restarted (-m fast), MariaDB killed with -9 and started again, while 2 workers train."""
    url, server = private_db
    study = write_study(tmp_path / "rs.toml", SPACE.format(steps=300))
    proc = start("search", str(study), "--data", str(tiny_synthetic), "--storage", url, "--n-trials", "4",
                 "--workers", "2", cwd=tmp_path)
    wait_for(lambda ts: training(ts, 2), "rs", url)
    if "postgresql" in url:
        server.restart("fast")
    else:
        server.kill9()
        server.start()
    output = finish(proc)
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "storage unreachable" in output
    assert_nothing_lost(trials("rs", url), 4)


# PostgreSQL only, for the suite's time: MariaDB's outages are the kill -9 restart test and the two-machines test.
@pytest.mark.parametrize("private_server", ["postgresql"], indirect=True)
def test_an_outage_longer_than_the_grace_period_resumes_from_the_checkpoint(tmp_path, tiny_synthetic,
                                                                            private_server):
    """The database stops (-m immediate) for 6 s with a 3 s grace period: each worker stops its trial itself
    (no heartbeat), training went on meanwhile; when the database is back the trials are marked interrupted (or
    reaped) and retried from their latest checkpoints; no worker crashes telling a reaped trial."""
    server = private_server
    url = server.create_database()
    study = write_study(tmp_path / "out.toml", SPACE.format(steps=2500), grace=3)  # outlasts the outage
    proc = start("search", str(study), "--data", str(tiny_synthetic), "--storage", url, "--n-trials", "2",
                 "--workers", "2", cwd=tmp_path)
    wait_for(lambda ts: training(ts, 2), "out", url)
    server.stop("immediate")
    time.sleep(6)
    server.start()
    output = finish(proc)
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "Cannot tell" not in output and "training goes on" in output
    ts = trials("out", url)
    assert_nothing_lost(ts, 2)
    assert n_state(ts, TrialState.FAIL) >= 1 and len(resumed(ts)) == n_state(ts, TrialState.FAIL)
    assert all(t.user_attrs["interrupt_cause"] == "heartbeat lost" for t in ts if t.state == TrialState.FAIL)


@pytest.mark.parametrize("private_server", ["postgresql"], indirect=True)
def test_a_database_away_past_storage_outage_s_stops_the_worker_and_the_rerun_resumes(
        tmp_path, tiny_synthetic, private_server):
    server = private_server
    url = server.create_database()
    study = write_study(tmp_path / "lost.toml", SPACE.format(steps=300), grace=2, outage=3)
    args = ("search", str(study), "--data", str(tiny_synthetic), "--storage", url, "--n-trials", "2")
    proc = start(*args, cwd=tmp_path)
    wait_for(lambda ts: training(ts), "lost", url)
    server.stop("immediate")
    output = finish(proc, 60)
    server.start()
    assert proc.returncode == 4, output  # storage lost: not 0, not a crash
    assert "Traceback" not in output and "unreachable for" in output and "storage_outage_s" in output
    time.sleep(2.5)  # the dead trial's heartbeat expires: the rerun reaps it and retries it from its checkpoint
    rerun = cli(*args, cwd=tmp_path)
    assert "Traceback" not in rerun.stdout + rerun.stderr
    ts = trials("lost", url)
    assert_nothing_lost(ts, 2)
    assert resumed(ts)


@pytest.mark.parametrize("private_server", ["postgresql"], indirect=True)  # MariaDB: the kill -9 restart test
def test_killed_connections_are_reconnected_and_no_trial_fails(tmp_path, tiny_synthetic, private_server):
    server = private_server
    url = server.create_database()
    study = write_study(tmp_path / "kc.toml", SPACE.format(steps=400))
    proc = start("search", str(study), "--data", str(tiny_synthetic), "--storage", url, "--n-trials", "3",
                 "--workers", "2", cwd=tmp_path)
    wait_for(lambda ts: training(ts, 1, 1), "kc", url)
    killed = 0
    for _ in range(5):
        killed += server.terminate_backends(url.rsplit("/", 1)[1])
        time.sleep(0.7)
    output = finish(proc)
    assert proc.returncode == 0 and killed >= 5, output
    assert "Traceback" not in output
    ts = trials("kc", url)
    assert_nothing_lost(ts, 3)
    assert n_state(ts, TrialState.FAIL) == 0


@pytest.mark.parametrize("kind", ["postgresql", "mysql"])
def test_two_machines_on_one_ablation_and_one_search_are_exact(tmp_path, tiny_synthetic, kind):
    """Two commands with their own temp folders (as two machines): the server's lock is the gate, so each
    ablation cell is queued and trained once, and a search holds exactly --n-trials trials."""
    ablation = write_study(tmp_path / "ab.toml", fixed(40) + """
[ablation]
seeds = [0, 1]
[variants]
stats = { pooling = "stats" }
""")
    search = write_study(tmp_path / "se.toml", SPACE.format(steps=40))
    with fresh_database(kind) as url:
        for args, name in ((("ablate", str(ablation)), "ab"), (("search", str(search), "--n-trials", "4"), "se")):
            procs = []
            for machine in ("a", "b"):
                tmp = tmp_path / f"tmp-{name}-{machine}"
                tmp.mkdir()
                procs.append(start(*args, "--data", str(tiny_synthetic), "--storage", url, "-q", cwd=tmp_path,
                                   env={"TMPDIR": str(tmp)}))
            outputs = [finish(p) for p in procs]
            assert [p.returncode for p in procs] == [0, 0], outputs
            ts = trials(name, url)
            if name == "ab":
                cells = [cell_of(t) for t in ts]
                assert len(ts) == 4 and len(set(cells)) == 4 and n_state(ts, TrialState.COMPLETE) == 4, cells
            else:
                assert len(ts) == 4 and n_state(ts, *FINISHED) == 4, [t.state for t in ts]


def test_a_killed_parent_takes_its_workers_with_it_and_their_trials_resume(tmp_path, tiny_synthetic):
    study = write_study(tmp_path / "orph.toml", SPACE.format(steps=3000))
    url = f"sqlite:///{tmp_path / 'orph.db'}"
    args = ("search", str(study), "--data", str(tiny_synthetic), "--n-trials", "2", "--workers", "2")
    proc = start(*args, "-q", cwd=tmp_path)
    running = wait_for(lambda ts: training(ts, 2), "orph", url)
    pids = [int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in running if t.state == TrialState.RUNNING]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    ts = wait_for(lambda ts: n_state(ts, TrialState.RUNNING) == 0, "orph", url, limit=30)  # not a grace period
    deadline = time.time() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)  # no orphan runs on
    assert [t.user_attrs.get("interrupt_cause") for t in ts] == ["the --workers parent died"] * 2
    # the retries start where the trials stopped; stopped once both have (a --timeout would race the workers'
    # start-up, which takes seconds on a slow machine)
    rerun = start(*args, cwd=tmp_path)
    wait_for(lambda ts: len(resumed(t for t in ts if t.state == TrialState.RUNNING)) == 2, "orph", url)
    rerun.send_signal(signal.SIGINT)
    output = finish(rerun, timeout=60)
    assert rerun.returncode == 130 and "Traceback" not in output, output


@pytest.fixture
def small_disk(tmp_path):
    with small_disk_at(tmp_path / "disk", "16m") as mount:  # room for a report; fill() fills it
        yield mount


def fill(folder: Path, leave: int) -> Path:
    """Fill the disk of `folder` until `leave` bytes are free."""
    filler = folder / "filler"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with filler.open("wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_a_full_disk_stops_the_run_in_one_line_and_the_rerun_finishes(tmp_path, tiny_synthetic, small_disk):
    artifacts = small_disk / "artifacts"
    study = write_study(tmp_path / "full.toml", SPACE.format(steps=100), extra=f'artifacts = "{artifacts}"')
    url = f"sqlite:///{tmp_path / 'full.db'}"
    args = ("search", str(study), "--data", str(tiny_synthetic), "--n-trials", "2")
    artifacts.mkdir()
    filler = fill(small_disk, 20_000)  # less than one latest state
    run = cli(*args, cwd=tmp_path, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 5, output
    assert "Traceback" not in output and "disk full" in output
    ts = trials("full", url)
    assert n_state(ts, TrialState.RUNNING) == 0 and n_state(ts, *FINISHED) == 0
    assert [t.user_attrs.get("interrupt_cause") for t in ts] == ["disk full"]
    report = cli("report", str(study), "--out", str(small_disk / "report"), cwd=tmp_path, check=False)
    assert report.returncode == 5 and "Traceback" not in report.stderr and "No space left" in report.stderr

    filler.unlink()
    rerun = cli(*args, cwd=tmp_path)
    assert "Traceback" not in rerun.stdout + rerun.stderr
    ts = trials("full", url)
    assert_nothing_lost(ts, 2)
    storage = optuna.load_study(study_name="full", storage=url)._storage
    for t in ts:  # every artifact record Optuna lists has its whole file
        for meta in optuna.artifacts.get_all_artifact_meta(t, storage=storage):
            assert (artifacts / meta.artifact_id).stat().st_size > 1000


def test_a_full_disk_under_the_sqlite_file_is_one_line_and_loses_nothing(tmp_path, tiny_synthetic, small_disk):
    db = small_disk / "study.db"
    study = write_study(tmp_path / "sq.toml", SPACE.format(steps=40), extra=f'storage = "sqlite:///{db}"')
    args = ("search", str(study), "--data", str(tiny_synthetic), "--n-trials", "2")
    cli(*args[:-1], "1", cwd=tmp_path)
    filler = fill(small_disk, 0)
    run = cli(*args, cwd=tmp_path, check=False)
    assert run.returncode == 5, run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr and "disk full" in run.stderr
    filler.unlink()
    time.sleep(4)  # a trial the full disk left RUNNING is reaped after its grace period and run again
    cli(*args, cwd=tmp_path)
    assert_nothing_lost(trials("sq", f"sqlite:///{db}"), 2)


def test_a_damaged_sqlite_file_is_one_line(tmp_path, tiny_synthetic):
    study = write_study(tmp_path / "bad.toml", SPACE.format(steps=40))
    db = tmp_path / "bad.db"
    stored = optuna.create_study(study_name="bad", storage=f"sqlite:///{db}", direction="maximize")
    for i in range(40):  # enough rows for several data pages
        stored.add_trial(optuna.trial.create_trial(value=i / 40, user_attrs={"run_config": "x" * 400}))
    data = bytearray(db.read_bytes())
    page = 4096
    for start_at in range(2 * page, len(data), page):  # every page but the schema's: garbage
        data[start_at + 8:start_at + page] = os.urandom(page - 8)
    db.write_bytes(bytes(data))
    for args in (("status", str(study)), ("search", str(study), "--data", str(tiny_synthetic), "--n-trials", "3")):
        run = cli(*args, cwd=tmp_path, check=False)
        assert run.returncode == 4, run.stdout + run.stderr
        assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1 and "damaged" in run.stderr


def test_a_closed_output_pipe_does_not_stop_the_work(tmp_path, tiny_synthetic):
    study = write_study(tmp_path / "pipe.toml", SPACE.format(steps=60))
    proc = start("search", str(study), "--data", str(tiny_synthetic), "--n-trials", "3", "--workers", "2",
                 cwd=tmp_path)
    proc.stdout.readline()  # like `| head -1`
    proc.stdout.close()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 0
    ts = trials("pipe", f"sqlite:///{tmp_path / 'pipe.db'}")
    assert n_state(ts, *FINISHED) == 3 and n_state(ts, TrialState.FAIL) == 0
