"""Every command block of the README, run in order exactly as written, in a fresh copy of the repository, as a new
user copies them (budgets made tiny through $RUN_STUDY_SET, which the README documents). A block that cannot run
here says why in a `<!-- not run by tests/test_readme.py: REASON -->` line above it; servers (the dashboards) are
started, asked for their page and stopped. Every TOML and YAML block must parse.
"""
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
from pathlib import Path

import yaml

from tests.test_dashboard import _get

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SKIP_MARK = re.compile(r"<!-- not run by tests/test_readme.py: (.+?) -->")
NOT_RUN_LINES = {"make test": "this test runs inside it"}
SERVERS = ("run-study dashboard", "optuna-dashboard")
TINY = "train.max_steps=10 train.valid_steps=10 train.warmup_steps=2 train.batch_size=8"
DASHBOARD_URL = "http://127.0.0.1:8080/"


def blocks(text: str) -> list[tuple[str, str, str | None]]:
    """(language, body, reason it is not run or None) of every fenced block."""
    found = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
        before = text[: match.start()].rstrip().splitlines()
        mark = SKIP_MARK.fullmatch(before[-1].strip()) if before else None
        found.append((match.group(1), match.group(2), mark.group(1) if mark else None))
    return found


def commands(body: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(shlex.join(words))
    return out


def _fresh_copy(dest: Path) -> Path:
    """The repository's files as a clone has them (mtimes kept, so make sees the shared venv as up to date)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


def _serve(command: str, activated: str, cwd: Path, env: dict) -> None:
    """A dashboard as written: it answers its page (and its script) within 60 s, then stops on Ctrl-C."""
    server = subprocess.Popen(["bash", "-c", f"{activated}exec {command}"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"{command}: exited {server.returncode}: {server.stdout.read()}"
            try:
                status, _ = _get(DASHBOARD_URL + "dashboard")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, f"{command}: no answer on {DASHBOARD_URL}"
                time.sleep(0.3)
        assert status == 200 and _get(DASHBOARD_URL + "static/bundle.js")[0] == 200, command
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_every_readme_command_block_runs_as_written(tmp_path):
    text = README.read_text()
    found = blocks(text)
    shell = [(body, reason) for lang, body, reason in found if lang == "bash"]
    assert len(shell) >= 5, "the README's command blocks were not found"
    for lang, body, _ in found:
        if lang == "toml":
            tomllib.loads(body)  # a study-file snippet that does not parse would fail the user's study file
        if lang == "yaml":
            assert isinstance(yaml.safe_load(body), dict)  # a manifest to copy (Kubernetes)
    installed = ROOT / ".venv" / ".installed"
    assert installed.exists() and installed.stat().st_mtime >= (ROOT / "pyproject.toml").stat().st_mtime, \
        "the venv is older than pyproject.toml: run `make install` (make test does) before this test"
    repo = _fresh_copy(tmp_path / "repo")
    env = {**os.environ, "RUN_STUDY_SET": TINY, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("OPTUNA_STORAGE", None)
    activated = ""
    ran = []
    for body, reason in shell:
        if reason:
            continue
        for command in commands(body):
            if command in NOT_RUN_LINES:
                continue
            if command.startswith((". ", "source ")):
                activated = command + " && "
                continue
            if command.startswith(SERVERS):
                _serve(command, activated, repo, env)
            else:
                started = time.monotonic()
                run = subprocess.run(["bash", "-c", activated + command], cwd=repo, env=env, capture_output=True,
                                     text=True, timeout=600)
                assert run.returncode == 0, f"README command failed ({run.returncode}): {command}\n{run.stderr[-3000:]}"
                assert "Traceback" not in run.stderr, f"{command}\n{run.stderr[-3000:]}"
                print(f"{time.monotonic() - started:5.1f} s  {command}", file=sys.stderr)
            ran.append(command)
    assert "make quickstart" in ran and any(c.startswith("run-study predict final.pt") for c in ran)
    assert (repo / "submission.csv").read_text().startswith("Id,Category\n")
