"""`run-study dashboard` serves the study's storage through optuna-dashboard's own server."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna

import run_study
from reports import study_report, write_report
from reports.document import to_note
from reports.export import NOTE_BEGIN, NOTE_END, report_section, with_report
from tests.conftest import write_study

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    # optuna-dashboard 0.21 answers 500 for bundle.js without Accept-Encoding; browsers always send it.
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.read()


def _put_json(url: str, payload: dict) -> int:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="PUT",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status


@contextmanager
def _dashboard(study_file: Path, cwd: Path) -> Iterator[str]:
    """`run-study dashboard STUDY` on a free port; yields its base URL once it answers."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "run_study.py"), "dashboard", str(study_file), "--port", str(port)],
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                _get(f"http://127.0.0.1:{port}/api/studies")
                break
            except OSError:
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def _pooling_study(path: Path, name: str) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{path}", direction="maximize")
    for value, choice in ((0.5, "mean"), (0.7, "stats"), (0.6, "stats")):
        _add_trial(study, value, choice)
    return study


def _add_trial(study: optuna.Study, value: float, choice: str) -> None:
    pooling = {"pooling": optuna.distributions.CategoricalDistribution(["mean", "stats"])}
    study.add_trial(optuna.trial.create_trial(params={"pooling": choice}, distributions=pooling, value=value))


def test_dashboard_serves_the_study(tmp_path):
    study_file = write_study(tmp_path / "dash.toml", "")
    study = _pooling_study(tmp_path / "dash.db", "dash")
    text, _ = write_report(study, tmp_path / "results", formats=("md",))  # the note and figures go into the storage
    with _dashboard(study_file, tmp_path) as base:
        status, body = _get(f"{base}/api/studies")
        assert status == 200
        assert [s["study_name"] for s in json.loads(body)["study_summaries"]] == ["dash"]
        assert _get(f"{base}/static/bundle.js")[0] == 200
        detail = json.loads(_get(f"{base}/api/studies/{study._study_id}")[1])
        note = to_note(study_report(study))  # the Markdown with its tables as monospace blocks
        assert report_section(detail["note"]["body"]) == note  # an empty note: the report section alone
        assert detail["note"]["body"] == f"{NOTE_BEGIN}\n\n{note}\n{NOTE_END}\n"
        assert text.startswith("# Study `dash`") and "## By pooling" in text
        figures = {f["id"]: json.loads(f["graph_object"]) for f in detail["plotly_graph_objects"]}
        assert list(figures) == ["by-pooling"]
        assert sorted(figures["by-pooling"]["data"][0]["x"]) == ["mean", "stats", "stats"]


def test_report_replaces_only_its_section_of_a_note_the_user_edited(tmp_path, monkeypatch):
    """Text typed in the dashboard's note editor, above and below the report, survives `run-study report` reruns."""
    study_file = write_study(tmp_path / "notes.toml", "")
    study = _pooling_study(tmp_path / "notes.db", "notes")
    monkeypatch.chdir(tmp_path)
    report = ["report", str(study_file), "--format", "md"]
    assert run_study.main(report) == 0
    above, below = "My notes: stats pooling wins.\n\n- try attentive_stats next\n", "TODO: rerun with seed 2\n"
    with _dashboard(study_file, tmp_path) as base:
        note = json.loads(_get(f"{base}/api/studies/{study._study_id}")[1])["note"]
        # what the editor sends: the next version and the whole body, the user's lines around the report
        edited = f"{above}\n{note['body']}\n{below}"
        assert _put_json(f"{base}/api/studies/{study._study_id}/note",
                         {"version": note["version"] + 1, "body": edited}) == 204  # saved
        _add_trial(study, 0.9, "mean")  # the report changes between the runs
        for _ in range(2):
            assert run_study.main(report) == 0
        body = json.loads(_get(f"{base}/api/studies/{study._study_id}")[1])["note"]["body"]
    text = (tmp_path / "notes.results" / "notes.md").read_text()  # beside notes.db
    assert "Trials: 4 complete" in text
    assert body.startswith(above) and body.endswith(below)
    assert body.count(NOTE_BEGIN) == body.count(NOTE_END) == 1 and body.count("# Study `notes`") == 1
    note = to_note(study_report(study))
    assert report_section(body) == note
    assert body == f"{above}\n{NOTE_BEGIN}\n\n{note}\n{NOTE_END}\n\n{below}"


def test_note_without_markers_gets_the_report_appended():
    section = f"{NOTE_BEGIN}\n\n# Report\n\n{NOTE_END}\n"
    assert with_report("", "# Report\n") == section
    assert with_report("  \n", "# Report\n") == section
    assert with_report("user text\n\n\n", "# Report\n") == f"user text\n\n{section}"
    assert with_report(section, "# New\n") == section.replace("# Report", "# New")
    # a marker deleted by hand: nothing is replaced (no user text can be lost), a complete section is appended
    broken = f"{NOTE_BEGIN}\n\n# Report\n\nuser text"
    assert with_report(broken, "# New\n") == f"{broken}\n\n{section.replace('# Report', '# New')}"
    assert report_section(broken) is None
    for lone in (broken, f"user text\n\n# Report\n\n{NOTE_END}\n\nmore user text\n"):  # either marker deleted
        once = with_report(lone, "# New\n")
        assert once.startswith(lone.rstrip()) and report_section(once) == "# New\n"
        assert with_report(once, "# Newer\n") == once.replace("# New", "# Newer")  # the lone marker stays put
