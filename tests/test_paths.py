"""Paths and start-up as a user meets them: a study file behaves the same from any folder, each storage keeps
its own reports, the commands that never train start without torch, created folders follow the umask."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import create_trial

from tests.test_cli import FAST, ROOT, cli

SHORT = FAST.replace("max_steps = 40", "max_steps = 20")
TINY_DATA = ("synthetic = { speakers = 4, utterances_per_speaker = 10, seed = 2, n_mels = 16, min_len = 20, "
             "max_len = 60 }")


def _project(root: Path) -> Path:
    """project/studies/q.toml whose data.path (../datasets/q, generated) and storage (default) are relative."""
    studies = root / "project" / "studies"
    studies.mkdir(parents=True)
    study = studies / "q.toml"
    study.write_text(f'[study]\nseed = 0\n[data]\npath = "../datasets/q"\n{TINY_DATA}\nvalid_fraction = 0.25\n'
                     + SHORT)
    return study


def test_a_study_file_means_the_same_from_any_working_directory(tmp_path):
    study = _project(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = cli("search", str(study), "--n-trials", "1", cwd=elsewhere)
    project = tmp_path / "project"
    assert (project / "datasets" / "q" / "metadata.json").exists()  # data.path: beside the study file
    assert (project / "studies" / "q.db").exists() and (project / "studies" / "q.results" / "q.md").exists()
    assert f"report: {project / 'studies' / 'q.results' / 'q.md'}" in run.stdout  # the summary says where
    assert list(elsewhere.iterdir()) == []  # nothing written where the command was typed

    # from the project folder: the same data and study; --out (typed: relative to the cwd) takes the report
    again = cli("search", "studies/q.toml", "--n-trials", "2", "--out", "chosen", cwd=project)
    assert "1 trial(s) run now" in again.stdout and "generating" not in again.stdout + again.stderr
    assert "report: chosen/q.md" in again.stdout and (project / "chosen" / "q.html").exists()
    status = cli("status", str(study), cwd=elsewhere)
    assert "2 complete" in status.stdout
    assert "Trials: 1 complete" in (project / "studies" / "q.results" / "q.md").read_text()  # not overwritten
    cli("report", str(study), cwd=elsewhere)
    assert list(elsewhere.iterdir()) == []
    assert "Trials: 2 complete" in (project / "studies" / "q.results" / "q.md").read_text()
    cli("report", str(study), "--out", "mine", "--format", "md", cwd=elsewhere)  # typed paths: from the cwd
    assert (elsewhere / "mine" / "q.md").exists()


def test_relative_storage_and_artifacts_in_a_study_file_are_beside_it(tmp_path):
    from search.spec import load_spec
    from search.storage import sqlite_path

    study = _project(tmp_path)
    study.write_text(study.read_text().replace("seed = 0\n", 'seed = 0\nstorage = "sqlite:///db/q.db"\n'
                                               'artifacts = "ckpt"\n', 1))
    spec = load_spec(study)
    studies = tmp_path / "project" / "studies"
    assert sqlite_path(spec.storage).resolve() == studies / "db" / "q.db"
    assert Path(spec.artifacts).resolve() == studies / "ckpt"
    assert spec.data_path.resolve() == tmp_path / "project" / "datasets" / "q"
    study.write_text(study.read_text().replace("sqlite:///db/q.db", f"sqlite:///{tmp_path}/x.db"))
    assert load_spec(study).storage == f"sqlite:///{tmp_path}/x.db"  # absolute: as written


def test_two_storages_with_a_study_of_the_same_name_keep_two_reports(tmp_path, tiny_synthetic):
    study = tmp_path / "same.toml"
    study.write_text("[study]\nseed = 0\n[data]\nvalid_fraction = 0.25\n" + SHORT)
    for db, trials in (("a.db", "1"), ("b.db", "2")):
        run = cli("search", str(study), "--data", str(tiny_synthetic), "--storage", f"sqlite:///{db}",
                  "--n-trials", trials, cwd=tmp_path)
        assert f"report: {Path(db).stem}.results/same.md" in run.stdout
    a, b = ((tmp_path / f"{x}.results" / "same.md").read_text() for x in "ab")
    assert "Trials: 1 complete" in a and "Trials: 2 complete" in b


def test_commands_that_do_not_train_import_neither_torch_nor_the_model_code(tmp_path):
    url = f"sqlite:///{tmp_path / 'light.db'}"
    (tmp_path / "light.toml").write_text(f'[study]\nstorage = "{url}"\n[model]\npooling = ["mean", "stats"]\n')
    study = optuna.create_study(study_name="light", storage=url, direction="maximize")
    dist = {"pooling": CategoricalDistribution(["mean", "stats"])}
    for value, pooling in ((0.5, "mean"), (0.7, "stats"), (0.6, "mean")):
        study.add_trial(create_trial(params={"pooling": pooling}, distributions=dist, value=value))
    script = """
import json, sys
import optuna_dashboard
optuna_dashboard.run_server = lambda *args, **kwargs: None  # serve nothing: only what the command imports
import run_study
codes = [run_study.main(argv) for argv in (["report", "light.toml"], ["dashboard", "light.toml"],
                                           ["status", "light.toml"])]
for argv in (["--help"], ["--version"], ["report", "--help"]):
    try:
        run_study.main(argv)
    except SystemExit as done:
        codes.append(done.code)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "models", "data") or m == "search.train")
print(json.dumps({"codes": codes, "heavy": heavy}))
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"codes": [0, 0, 0, 0, 0, 0], "heavy": []}
    assert (tmp_path / "light.results" / "light.html").exists()


def test_created_dataset_and_pack_folders_follow_the_umask(tmp_path):
    from data import open_store
    from data.synthetic import make_synthetic

    previous = os.umask(0o022)
    try:
        root = make_synthetic(tmp_path / "ds", speakers=3, utterances_per_speaker=4, seed=0, n_mels=8, min_len=10,
                              max_len=20)
        open_store(root)
    finally:
        os.umask(previous)
    packs = [p for p in (root / ".hw4pack").iterdir() if p.is_dir()]
    for folder in (root, *packs):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder


def test_each_storage_has_its_own_results_folder(tmp_path):
    from search.artifact_store import default_location
    from search.storage import results_dir

    assert results_dir(f"sqlite:///{tmp_path}/a.db", tmp_path) == tmp_path / "a.results"
    assert default_location(f"sqlite:///{tmp_path}/a.db", tmp_path / "q.toml") == str(tmp_path / "a.artifacts")
    servers = {results_dir(url, tmp_path) for url in ("postgresql://u@db1:5432/hw4", "postgresql://u@db2/hw4",
                                                       "mysql+pymysql://root@db1/hw4", "postgresql://u@db1/other")}
    assert tmp_path / "postgresql-db1-hw4.results" in servers and len(servers) == 4  # one folder per server db
