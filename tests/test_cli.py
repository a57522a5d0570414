"""The CLI as a user runs it: subprocesses, exit codes, one-line errors, interrupted and resumed studies."""
import argparse
import importlib.metadata
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import run_study
from tests.conftest import study_trials, write_study

ROOT = Path(__file__).resolve().parent.parent
FAST = """
[model]
d_model = [16, 24]
nhead = 2
ff_mult = 2.0
[train]
max_steps = 40
valid_steps = 20
warmup_steps = 5
segment_len = 32
batch_size = 16
lr = { low = 1e-3, high = 5e-3, log = true }
"""


def cli(*args: str, cwd: Path, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    env.pop("OPTUNA_STORAGE", None)  # the default --storage: a developer's own must not receive test studies
    run = subprocess.run([sys.executable, str(ROOT / "run_study.py"), *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    if check:
        assert run.returncode == 0, run.stderr
    return run


def assert_one_line_error(run: subprocess.CompletedProcess, *fragments: str) -> None:
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_make_data_search_and_report_end_to_end(tmp_path):
    cli("make-data", "ds", "--speakers", "5", "--utterances-per-speaker", "12", "--seed", "1", cwd=tmp_path)
    assert (tmp_path / "ds" / "metadata.json").exists()
    study = write_study(tmp_path / "e2e.toml", FAST)
    run = cli("search", str(study), "--data", "ds", "--n-trials", "2", cwd=tmp_path)
    # a short summary, not the whole report: the best trial, where things are, what to run next
    assert "## Top" not in run.stdout and "best: trial " in run.stdout and "report: e2e.results/e2e.md" in run.stdout
    # what to run next, as it runs from here (the README test runs that command): the study file finds the study,
    # the study its data; no more trials averaged than there are
    predict = next(line for line in run.stdout.splitlines() if "run-study predict" in line).split("run-study ")[1]
    assert predict == "predict e2e.toml --top-k 2 --out submission.csv" and "run-study dashboard" in run.stdout
    loaded = optuna.load_study(study_name="e2e", storage=f"sqlite:///{tmp_path / 'e2e.db'}")
    assert [t.state for t in loaded.trials] == [TrialState.COMPLETE] * 2
    report = cli("report", str(study), "--out", "out", cwd=tmp_path)
    assert "Trials: 2 complete" in report.stdout
    csv = (tmp_path / "out" / "e2e.csv").read_text().splitlines()
    assert csv[0].startswith("trial,state,valid_acc") and len(csv) == 3
    assert "## Best trial's run config" in (tmp_path / "out" / "e2e.md").read_text()
    assert "plotly" in (tmp_path / "out" / "e2e.html").read_text()  # md, csv and html by default

    url = f"sqlite:///{tmp_path / 'e2e.db'}"
    optuna.create_study(study_name="copy", storage=url, direction="maximize").add_trials(loaded.trials[:1])
    side = cli("report", str(study), "copy", "--storage", url, "--format", "md,csv", cwd=tmp_path)
    assert "# Studies `e2e`, `copy`" in side.stdout
    rows = (tmp_path / "e2e.results" / "e2e-vs-copy.csv").read_text().splitlines()  # the first storage's folder
    assert [line.split(",")[:3] for line in rows[1:]] == [["e2e", "search", "2"], ["copy", "search", "1"]]
    assert_one_line_error(cli("report", str(study), "nope", "--storage", url, cwd=tmp_path, check=False), "nope")
    (tmp_path / "studies").mkdir()  # a study found by name in its default storage studies/NAME.db
    other = optuna.create_study(study_name="other", storage=f"sqlite:///{tmp_path / 'studies' / 'other.db'}")
    other.add_trials(loaded.trials)
    across = cli("report", str(study), "other", "--format", "md", cwd=tmp_path)  # two storages, side by side
    assert "# Studies `e2e`, `other`" in across.stdout


def test_bad_study_file_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    study = write_study(tmp_path / "bad.toml", "[model]\nd_model = 80\nnhead = 3\n")
    assert_one_line_error(cli("search", str(study), "--data", "x", cwd=tmp_path, check=False),  # a real process
                          "bad.toml", "model.nhead=3 must divide model.d_model=80")
    monkeypatch.chdir(tmp_path)

    def in_process(*args: str) -> subprocess.CompletedProcess:  # the same entry point, in this process: cheaper
        code = run_study.main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    assert_one_line_error(in_process("search", "missing.toml"), "missing.toml", "not found")
    good = write_study(tmp_path / "good.toml", FAST)
    assert_one_line_error(in_process("search", str(good), "--set", "train.lr=-1"),
                          "train.lr=-1 must be a positive number")
    assert_one_line_error(in_process("search", str(good), "--data", "nowhere"), "nowhere", "not found")
    assert_one_line_error(in_process("search", str(good)), "no dataset")
    assert_one_line_error(in_process("report", "nothing-here"), "nothing-here")
    assert_one_line_error(in_process("report", str(good), "--format", "md,pdf"),
                          "unknown format 'pdf'; valid: md, csv, tex")
    assert_one_line_error(in_process("report", str(good), "--top", "0"), "--top=0 must be positive")
    assert not list(tmp_path.glob("*.db"))


def test_bad_dataset_exits_2_naming_the_file(tmp_path):
    import torch

    from tests.conftest import write_hw4

    data = write_hw4(tmp_path / "ds")
    victim = sorted(data.glob("uttr-*.pt"))[0]
    torch.save(torch.zeros(3, 5), victim)  # wrong shape for its metadata entry
    study = write_study(tmp_path / "s.toml", FAST)
    assert_one_line_error(cli("search", str(study), "--data", "ds", cwd=tmp_path, check=False), victim.name)
    assert not (tmp_path / "s.db").exists() or not optuna.load_study(
        study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}").trials


def test_killed_study_resumes_without_losing_or_repeating_trials(tmp_path):
    cli("make-data", "ds", "--speakers", "5", "--utterances-per-speaker", "12", cwd=tmp_path)
    study = write_study(tmp_path / "kill.toml", FAST.replace("max_steps = 40", "max_steps = 200"))
    args = ["search", str(study), "--data", "ds", "--n-trials", "3",
            "--set", "study.heartbeat_interval=1", "--set", "study.grace_period=2"]
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen([sys.executable, str(ROOT / "run_study.py"), *args], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # one finished trial and a second one training (its parameters drawn)
        ts = study_trials("kill", url)
        if any(t.state == TrialState.COMPLETE for t in ts) and ts[-1].state == TrialState.RUNNING and ts[-1].params:
            break
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    before = optuna.load_study(study_name="kill", storage=url).trials
    assert before[-1].state == TrialState.RUNNING  # a zombie, as after kill -9 or a lost machine
    finished_before = {t.number: t.value for t in before if t.state == TrialState.COMPLETE}

    time.sleep(3)  # past the grace period: the zombie's heartbeat is stale
    cli(*args, cwd=tmp_path)
    after = optuna.load_study(study_name="kill", storage=url).trials
    assert {t.number: t.value for t in after if t.number in finished_before} == finished_before
    assert after[before[-1].number].state == TrialState.FAIL
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in after) == 3
    assert not [t for t in after if t.state == TrialState.RUNNING]
    retried = [t for t in after if t.system_attrs.get("failed_trial") == before[-1].number]
    assert len(retried) == 1 and retried[0].params == before[-1].params


def test_ablate_end_to_end_and_search_refuses_an_ablation_file(tmp_path):
    cli("make-data", "ds", "--speakers", "5", "--utterances-per-speaker", "12", "--seed", "1", cwd=tmp_path)
    body = FAST.replace("d_model = [16, 24]", "d_model = 16").replace(
        "lr = { low = 1e-3, high = 5e-3, log = true }", "lr = 3e-3").replace("max_steps = 40", "max_steps = 20")
    study = write_study(tmp_path / "abl.toml", body + """
[ablation]
seeds = [0, 1]
[variants]
stats = { pooling = "stats" }
""")
    run = cli("ablate", str(study), "--data", "ds", cwd=tmp_path)
    assert "study 'abl': 4 trial(s) run now (4 complete)" in run.stdout
    assert "| stats" in run.stdout and "too few seeds" in run.stdout
    again = cli("ablate", str(study), "--data", "ds", cwd=tmp_path)
    assert "0 trial(s) run now" in again.stdout
    report = cli("report", str(study), "--out", "out", cwd=tmp_path)
    assert "# Ablation `abl`" in report.stdout
    assert_one_line_error(cli("search", str(study), "--data", "ds", cwd=tmp_path, check=False),
                          "ablation study file", "run-study ablate")


def test_version(tmp_path):
    run = cli("--version", cwd=tmp_path)
    assert run.stdout == f"run-study {importlib.metadata.version('hw4-search')}\n"


def test_every_help_shows_its_defaults_and_a_working_example(monkeypatch, capsys):
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    parser = run_study._parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"make-data", "pack", "search", "ablate", "report", "dashboard", "status"} <= set(commands)
    for name, sub in [(None, parser), *commands.items()]:
        with pytest.raises(SystemExit) as done:
            run_study.main([name, "--help"] if name else ["--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        examples = [line.strip() for line in text.split("Example:\n")[-1].splitlines() if line.startswith("  ")]
        assert examples and all(line.startswith(f"run-study {name or ''}") for line in examples), (name, text)
        for line in examples:  # each example is a valid command line of this CLI
            assert parser.parse_args(shlex.split(line)[1:]).command == (name or shlex.split(line)[1])
        defaulted = [a for a in sub._actions if a.option_strings and a.help != argparse.SUPPRESS
                     and a.default not in (None, argparse.SUPPRESS, [], False)]
        assert "(default:" in text or not defaulted, (name, text)
        assert "(default: None)" not in text and "(default: [])" not in text
