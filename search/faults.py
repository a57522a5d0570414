"""What goes wrong outside a trial: the database, the disk, the parent process. Imports no torch or Optuna.

A trial fails only for its own reasons (a NaN loss, a bad config, out of memory). These faults are not
the trial's: its latest checkpoint is kept, it is marked interrupted (with the cause) and retried with the
same parameters, resuming from that checkpoint. `cause` names the fault for the user in a few words.
"""
from __future__ import annotations

import errno

# Exit codes of `run-study search` / `ablate` (the README's table; run_study.py's docstring)
EXIT_OK = 0
EXIT_FAILED = 1  # every trial this run started failed on its own
EXIT_USAGE = 2  # bad input: one line `error: ...`, nothing stored
EXIT_STOPPED = 3  # stopped early: max_failures_in_row own failures in a row, or the work could not finish
EXIT_STORAGE = 4  # the storage was unreachable past study.storage_outage_s, or is damaged
EXIT_DISK_FULL = 5  # no space left for checkpoints, the SQLite file or a report
EXIT_INTERRUPTED = 130  # SIGINT (128 + 2); SIGTERM: 143

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class StorageAway(Exception):
    """The database did not answer a call made with search.storage.no_wait(): nothing was retried."""


class StorageLost(Exception):
    """The database stayed unreachable past study.storage_outage_s (or is damaged): this worker stops."""


class HeartbeatLost(Exception):
    """This worker could not record its trial's heartbeat for a whole grace period: another process may
    already have reaped the trial and queued its retry, so this worker stops training it (checkpoint kept)."""


class DiskFull(OSError):
    """No space left where a checkpoint, the SQLite file or a report is written."""

    def __init__(self, where: str, detail: str = "") -> None:
        text = f"disk full: no space left in {where}" if where else "disk full"
        super().__init__(errno.ENOSPC, text + (f" ({detail})" if detail else ""))
        self.where = where

    def __str__(self) -> str:
        return self.strerror


class ParentDied(KeyboardInterrupt):
    """The `--workers` parent of this worker is gone: stop like SIGTERM (trial interrupted, retried)."""


def is_disk_full(err: BaseException) -> bool:
    """OSError ENOSPC/EDQUOT, or torch.save's RuntimeError around one ("file write failed"), anywhere in the chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return True
        text = str(err)
        if "No space left on device" in text or "database or disk is full" in text or "Disk quota exceeded" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def outside_cause(err: BaseException) -> str | None:
    """A few words naming a fault that is not the trial's own, or None when the trial itself failed."""
    if isinstance(err, (StorageAway, StorageLost)):
        return "storage unreachable"
    if isinstance(err, HeartbeatLost):
        return "heartbeat lost"
    if is_disk_full(err):
        return "disk full"
    if isinstance(err, BrokenPipeError):
        return "output closed"
    from search.storage import is_connection_error  # imports SQLAlchemy only when a trial actually failed

    if is_connection_error(err):
        return "storage unreachable"
    return None


def own_reason(err: BaseException) -> str:
    """A trial's own failure in one line: out of GPU memory says so and what to lower (torch's message is a
    paragraph); anything else its message, or its type."""
    if type(err).__name__ == "OutOfMemoryError":
        first = str(err).split(". ")[0].strip() or "CUDA out of memory"
        return (f"out of GPU memory ({first}): a smaller model or train.batch_size, or fewer workers per GPU "
                "(--per-gpu)")
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
