"""What a trial records about where it ran, so any table can be rebuilt and trusted from the DB alone."""
from __future__ import annotations

import functools
import os
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


def gpu_info(device: torch.device) -> dict | None:
    """The GPU a run uses: its index on the machine (CUDA_VISIBLE_DEVICES maps a worker's cuda:0 to it), name and
    memory; None on the CPU."""
    if device.type != "cuda":
        return None
    local = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(local)
    return {"index": physical_gpu(os.environ.get("CUDA_VISIBLE_DEVICES"), local), "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1)}


def physical_gpu(visible: str | None, local: int) -> int | str:
    """The machine's index of this process's cuda:`local`: the local-th entry of CUDA_VISIBLE_DEVICES when it is
    set (an index, or a GPU UUID kept as written), else `local` itself."""
    entries = [e.strip() for e in (visible or "").split(",") if e.strip()]
    if local >= len(entries):
        return local
    return int(entries[local]) if entries[local].isdigit() else entries[local]
