"""Folders built in a temp dir and swapped in whole: with the permissions the user's umask gives."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def staging_dir(prefix: str, parent: Path) -> Path:
    """A new temp folder in parent (same filesystem, so it can be renamed into place), with the mode a plain
    mkdir would give under the user's umask. tempfile.mkdtemp makes it 0700, and a folder renamed into place
    keeps that: a dataset or pack nobody else on the machine could read."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    return path
