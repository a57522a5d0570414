"""`--slurm N` for real: a one-node Slurm cluster started here (tests/slurmcluster.py), a job array of 2 tasks
submitted through submitit against a fresh PostgreSQL database; the study ends with exactly --n-trials finished
trials, each task's log is there, and `--dry-run` prints a batch script sbatch accepts (--test-only)."""
import subprocess

import optuna
from optuna.trial import TrialState

from search.slurm import minutes, task_argv
from search.storage import normalize_url
from tests.conftest import fresh_database, write_study
from tests.slurmcluster import one_node_slurm
from tests.test_cli import FAST, assert_one_line_error, cli


def test_a_job_array_of_two_tasks_fills_the_study_exactly(tmp_path, tiny_synthetic):
    study = write_study(tmp_path / "arr.toml", FAST)
    with one_node_slurm(tmp_path) as cluster, fresh_database("postgresql") as url:
        args = ["search", str(study), "--data", str(tiny_synthetic), "--storage", url, "--n-trials", "3",
                "--slurm", "2", "--cpus-per-task", "1", "--time", "00:10:00"]
        dry = cli(*args, "--dry-run", cwd=tmp_path, env={"SLURM_CONF": str(cluster.conf)})
        script = tmp_path / "dry.sh"
        script.write_text(dry.stdout)
        assert dry.stdout.startswith("#!/bin/bash") and "#SBATCH --array=0-1%2" in dry.stdout
        test_only = subprocess.run(["sbatch", "--test-only", str(script)], env=cluster.env, capture_output=True,
                                   text=True)
        assert test_only.returncode == 0, test_only.stderr  # "sbatch: Job ... to start at ..."
        run = cli(*args, cwd=tmp_path, env={"SLURM_CONF": str(cluster.conf)})
        assert "submitted Slurm job array " in run.stdout, run.stdout + run.stderr
        job = run.stdout.split("submitted Slurm job array ")[1].split(":")[0]
        cluster.wait_done(job, timeout=240)
        trials = optuna.load_study(study_name="arr", storage=normalize_url(url)).trials
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert len(finished) == 3 and not [t for t in trials if t.state == TrialState.RUNNING], \
            [(t.number, t.state) for t in trials]
        assert {t.user_attrs["slurm_task"] for t in finished} <= {f"{job}_0", f"{job}_1"}
        folder = tmp_path / run.stdout.split("logs: ")[1].split(f"/{job}_")[0]  # as printed: where to look
        logs = sorted(folder.glob(f"{job}_*_log.out"))
        assert len(logs) == 2 and all("study 'arr'" in log.read_text() for log in logs), logs


def test_slurm_refuses_sqlite_and_bad_options_in_one_line(tmp_path):
    study = write_study(tmp_path / "s.toml", FAST)
    assert_one_line_error(cli("search", str(study), "--slurm", "2", cwd=tmp_path, check=False),
                          "cannot share an SQLite file")
    assert_one_line_error(cli("search", str(study), "--slurm", "2", "--storage", "postgresql://u@h/db", "--time",
                              "soon", cwd=tmp_path, check=False), "--time 'soon'")
    assert not (tmp_path / "s.db").exists()
    assert minutes("04:00:00") == 240 and minutes("90") == 90 and minutes("00:00:30") == 1
    assert task_argv(["search", "s.toml", "--slurm", "2", "--time=1:00:00", "--dry-run", "--workers", "2"]) == [
        "search", "s.toml", "--workers", "2"]
