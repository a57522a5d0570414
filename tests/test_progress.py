"""A search you can watch: one line per evaluation off a TTY, bars on one, -q, one line per failed trial with its
traceback in a log file beside the storage, and a short summary at the end instead of the whole report."""
import io

import pytest

import run_study
from search import progress
from tests.conftest import write_study
from tests.test_cli import FAST


@pytest.fixture(autouse=True)
def _fresh_progress():
    yield
    progress.activate(None)


def _search(tmp_path, data, *extra: str) -> int:
    study = write_study(tmp_path / "watch.toml", FAST)
    return run_study.main(["search", str(study), "--data", str(data), "--n-trials", "2", *extra])


def test_off_a_tty_one_line_per_evaluation_and_a_short_summary(tmp_path, tiny_synthetic, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _search(tmp_path, tiny_synthetic) == 0
    out, err = capsys.readouterr()
    for number in (0, 1):
        assert f"trial {number} started (" in err
        assert f"trial {number} step 20/40: loss " in err and f"trial {number} step 40/40: loss " in err
    assert "trial 1 complete: valid_acc" in err and "2/2 finished)" in err
    assert "Trial 0 finished with value" not in err  # Optuna's own INFO lines only with -v
    assert "best: trial " in out and "checkpoint: trial-" in out and "next: run-study train" in out
    assert "report: watch.results/watch.md" in out
    assert "| trial |" not in out.replace(" ", "").replace("|trial|", "| trial |")  # the table is in the files
    assert "## Top" not in out


def test_quiet_shows_no_progress_and_verbose_the_whole_report(tmp_path, tiny_synthetic, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _search(tmp_path, tiny_synthetic, "-q", "--set", "study.name=other") == 0
    out, err = capsys.readouterr()
    assert "step" not in err and "started" not in err
    assert "best: trial" in out
    # a renamed study is not the study file's: the next commands name it and its storage
    assert "next: run-study train other --storage sqlite:///other.db --trial best" in out
    assert _search(tmp_path, tiny_synthetic, "-v", "--n-trials", "3") == 0
    out, _ = capsys.readouterr()
    assert "## Top" in out


def test_a_failed_trial_is_one_line_and_its_traceback_goes_to_the_log(tmp_path, tiny_synthetic, capsys,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _search(tmp_path, tiny_synthetic, "--set", "model.loss=test_nan") == 3  # stopped by failures in a row
    out, err = capsys.readouterr()
    failed = [line for line in err.splitlines() if " failed: " in line]
    log = tmp_path / "watch.log"
    assert len(failed) == 5  # max_failures_in_row, then the study stops
    assert failed[0].startswith("trial 0 failed: training loss became non-finite")
    assert failed[0].endswith("(traceback: watch.log)")  # beside the storage, watch.db
    assert "Traceback" not in err
    text = log.read_text()
    assert text.count("Traceback (most recent call last)") == 5 and "NonFiniteLossError" in text


def test_bars_on_a_terminal():
    """tqdm bars: the study's (finished/target, best) and the trial's (steps, loss, valid_acc)."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    assert progress.choose_mode(False, stream) == progress.BARS and progress.choose_mode(True, stream) == "quiet"
    shown = progress.Progress(progress.BARS, target=3, done=1, best=0.5, stream=stream)
    shown.start_trial(4, 10, {"lr": 0.01})
    for _ in range(10):
        shown.step()
    shown.evaluated({"step": 10, "train_loss": 1.25, "valid_acc": 0.75, "lr": 0.0})
    shown.end_trial(4, "COMPLETE", 0.75)
    shown.close()
    text = stream.getvalue()
    assert "trial 4" in text and "10/10" in text and "valid_acc=0.7500" in text and "loss=1.250" in text
    assert "trials" in text and "2/3" in text and "best=0.7500" in text


def test_a_workers_lines_give_the_whole_studys_best_and_count():
    """One of several workers: its 'best so far' and count are the study's, other workers' trials included."""
    stream = io.StringIO()
    worker = progress.Progress(progress.LINES, stream=stream)
    worker.end_trial(3, "COMPLETE", 0.6, study_so_far=(4, 0.9))  # another worker already reached 0.9
    worker.end_trial(5, "PRUNED", 0.2, study_so_far=(6, 0.9))
    worker.end_trial(7, "COMPLETE", 0.95, study_so_far=(8, 0.95))
    lines = stream.getvalue().splitlines()
    assert lines == ["trial 3 complete: valid_acc 0.6000 (best so far 0.9000; 4 finished)",
                     "trial 5 pruned: valid_acc 0.2000 (best so far 0.9000; 6 finished)",
                     "trial 7 complete: valid_acc 0.9500 (best so far 0.9500; 8 finished)"]
