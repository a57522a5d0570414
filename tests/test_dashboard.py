"""`run-study dashboard` serves the study's storage through optuna-dashboard's own server."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna

from reports import write_report
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


def test_dashboard_serves_the_study(tmp_path):
    study_file = write_study(tmp_path / "dash.toml", "")
    study = optuna.create_study(study_name="dash", storage=f"sqlite:///{tmp_path / 'dash.db'}",
                                direction="maximize")
    pooling = {"pooling": optuna.distributions.CategoricalDistribution(["mean", "stats"])}
    for value, choice in ((0.5, "mean"), (0.7, "stats"), (0.6, "stats")):
        study.add_trial(optuna.trial.create_trial(params={"pooling": choice}, distributions=pooling, value=value))
    write_report(study, tmp_path / "results", formats=("md",))  # the note and the figures go into the storage
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "run_study.py"), "dashboard", str(study_file), "--port", str(port)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline, status, body = time.time() + 60, None, b""
        while time.time() < deadline:
            try:
                status, body = _get(f"http://127.0.0.1:{port}/api/studies")
                break
            except OSError:
                time.sleep(0.3)
        assert status == 200
        assert [s["study_name"] for s in json.loads(body)["study_summaries"]] == ["dash"]
        assert _get(f"http://127.0.0.1:{port}/static/bundle.js")[0] == 200
        detail = json.loads(_get(f"http://127.0.0.1:{port}/api/studies/{study._study_id}")[1])
        assert detail["note"]["body"].startswith("# Study `dash`") and "## By pooling" in detail["note"]["body"]
        figures = {f["id"]: json.loads(f["graph_object"]) for f in detail["plotly_graph_objects"]}
        assert list(figures) == ["by-pooling"]
        assert sorted(figures["by-pooling"]["data"][0]["x"]) == ["mean", "stats", "stats"]
    finally:
        server.terminate()
        server.wait(timeout=30)
