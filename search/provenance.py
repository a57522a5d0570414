"""What a trial records about where it ran, so any table can be rebuilt and trusted from the DB alone."""
from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

import numpy
import optuna
import torch

REPO = Path(__file__).resolve().parent.parent


@functools.cache
def code_version() -> str:
    """The git commit of this checkout (with '+dirty' when it has uncommitted changes), or 'unknown'."""
    try:
        run = functools.partial(subprocess.run, cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
        commit = run(["git", "rev-parse", "--short=12", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


@functools.cache
def versions() -> dict[str, str]:
    return {
        "code": code_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "numpy": numpy.__version__,
    }
