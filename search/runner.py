"""The one trial loop, for searches and ablations, for one process or many on one storage.

Each turn of the loop takes the study's gate (a file lock, so local workers and other local commands
take turns), reaps trials whose worker died (heartbeats), asks the plan what to do and either runs ONE
trial through `study.optimize(n_trials=1)` (so Optuna keeps the heartbeat, the pruner and the bookkeeping),
waits for trials that others are running, or stops. The gate is held until the new trial exists, so
"how many are finished or running" and "create one more" are one step: N workers on one machine never
overshoot a target, nor claim the same ablation cell.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from data import DataError
from models import ConfigError
from search import progress
from search.cells import cell_of, identity_attrs
from search.spec import SpecError
from search.storage import sqlite_path

RUN, WAIT, DONE = "run", "wait", "done"
INTERRUPTED = "interrupted"  # fail_reason of a trial stopped by SIGINT/SIGTERM: the next run retries it
DEFAULT_MAX_FAILURES_IN_ROW = 5
# Optuna's gc.collect() after each trial cost 0.15 CPU s per trial (a quarter of a short trial) and freed
# nothing: 30 trials in one process kept the same peak RSS without it (models are freed by reference counting).
GC_AFTER_TRIAL = False
USER_ERRORS = (DataError, SpecError, ConfigError)  # a bad study file or dataset: the one-line error, not a failed trial


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so Optuna marks the running trial FAIL instead of leaving it RUNNING."""


class TrialFailed(Exception):
    """A trial's own error (NaN loss, out of memory, ...): the trial fails, the study goes on."""


def exit_code(interrupt: KeyboardInterrupt) -> int:
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


# Signals. Raising from a handler can land anywhere: inside a weakref callback or __del__ during training
# (Python prints "Exception ignored" and drops it: the trial would go on), or inside Optuna between creating
# a trial and calling the objective (the trial would stay RUNNING with no heartbeat, never reaped). So from
# asking for a trial to telling its result the handler only records the signal; the objective and train()
# raise it at their next check (poll_interrupt, every step); elsewhere (waiting, set-up) it raises at once.
_pending: int | None = None
_deferring = False


def _interrupt(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum: int, frame: Any) -> None:
    global _pending
    _pending = signum
    if not _deferring:
        raise _interrupt(signum)


def handle_signals() -> None:
    """SIGINT and SIGTERM stop this process as KeyboardInterrupt / Terminated (see above)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _handler)


def poll_interrupt() -> None:
    """Raise the interrupt recorded by a signal, if any (called every training step and between trials)."""
    if _pending is not None:
        raise _interrupt(_pending)


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    global _deferring
    previous, _deferring = _deferring, True
    try:
        yield
    finally:
        _deferring = previous


class _DropInterruptTracebacks(logging.Filter):
    """Optuna logs an interrupted trial as a failure with its traceback; our one-line message says it. Any other
    failed trial is one line from search.progress (its traceback in the failure log), so Optuna's two lines go."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = record.exc_info
        if info and info[0] and issubclass(info[0], KeyboardInterrupt):
            return False
        message = record.getMessage()  # a failed trial: one line from search.progress, traceback in its log
        return not (message.startswith("Trial ") and (" failed with parameters: " in message
                                                       or message.endswith(" failed with value None.")))


def quiet_interrupts() -> None:
    """On optuna's handlers: a logger's own filters do not see records of its child loggers."""
    for handler in optuna.logging.get_logger("optuna").handlers:
        if not any(isinstance(f, _DropInterruptTracebacks) for f in handler.filters):
            handler.addFilter(_DropInterruptTracebacks())


def worker_name(pid: int | None = None) -> str:
    """host:pid, stored on each trial as user attr "worker" (this process's by default)."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


# --- what to do next -------------------------------------------------------------------------------------
Plan = Callable[[list[FrozenTrial]], str]  # all trials of the study -> RUN, WAIT or DONE


def search_plan(n_trials: int | None) -> Plan:
    """Run until the study holds n_trials finished (complete or pruned) trials; failed ones do not count.
    Queued trials (retries, enqueued configs) are always run; otherwise start one only while the finished
    plus running trials are fewer than n_trials, and wait for running ones (they may die and be retried)."""

    def plan(trials: list[FrozenTrial]) -> str:
        states = Counter(t.state for t in trials)
        finished = states[TrialState.COMPLETE] + states[TrialState.PRUNED]
        if n_trials is not None and finished >= n_trials:
            return DONE
        if states[TrialState.WAITING] or n_trials is None or finished + states[TrialState.RUNNING] < n_trials:
            return RUN
        return WAIT

    return plan


def ablation_plan(cells: list[tuple[str, int]]) -> Plan:
    """Run queued cells; wait while cells are running elsewhere (a killed worker's cell comes back as a
    queued retry once its heartbeat is stale); done when no cell is queued or running."""
    wanted = set(cells)

    def plan(trials: list[FrozenTrial]) -> str:
        by_state: dict[TrialState, set] = {}
        for t in trials:
            by_state.setdefault(t.state, set()).add(cell_of(t))
        if wanted <= by_state.get(TrialState.COMPLETE, set()):
            return DONE
        if by_state.get(TrialState.WAITING):
            return RUN
        return WAIT if by_state.get(TrialState.RUNNING) else DONE

    return plan


# --- the loop --------------------------------------------------------------------------------------------
@dataclass
class RunStats:
    states: Counter = field(default_factory=Counter)  # state name -> trials this process ran
    stop_reason: str = ""

    @property
    def ran(self) -> int:
        return sum(self.states.values())

    @property
    def all_failed(self) -> bool:
        return self.ran > 0 and self.states["FAIL"] == self.ran

    @classmethod
    def of(cls, study: optuna.Study, workers: set[str]) -> RunStats:
        """What the given workers (host:pid, see worker_name) ran in this study."""
        stats = cls()
        for t in study.get_trials(deepcopy=False):
            if t.user_attrs.get("worker") in workers and t.state.is_finished():
                stats.states[t.state.name] += 1
        return stats

    def summary(self) -> str:
        parts = [f"{self.states[s]} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL") if self.states[s]]
        return f"{self.ran} trial(s) run now" + (f" ({', '.join(parts)})" if parts else "")


def gate_path(study: optuna.Study) -> Path:
    """One lock file per (storage, study) on this machine, in the temp folder (works for any storage URL)."""
    storage = study._storage
    url = getattr(getattr(storage, "_backend", storage), "url", None)  # RDBStorage behind Optuna's cache
    if url is None:  # an in-memory storage lives in this process only
        url = f"memory:{os.getpid()}:{id(storage)}"
    path = sqlite_path(url) if url.startswith("sqlite") else None
    key = f"{path.resolve() if path else url}\0{study.study_name}"
    return Path(tempfile.gettempdir()) / f"hw4-search-{hashlib.sha256(key.encode()).hexdigest()[:16]}.lock"


def gate(study: optuna.Study) -> FileLock:
    """The study's gate on this machine: hold it to change what is queued (retries, ablation cells)."""
    return FileLock(gate_path(study))


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    plan: Plan,
    deadline: float | None = None,
    max_failures_in_row: int = DEFAULT_MAX_FAILURES_IN_ROW,
    poll_s: float = 5.0,
    log: Callable[[str], None] = print,
) -> RunStats:
    """Run trials of `study` as `plan` says until it is done, the deadline (time.time()) passes, or
    `max_failures_in_row` trials in a row failed. Returns what this process ran."""
    stats = RunStats()
    failures: dict[int, str] = {}  # trial number -> traceback, for the failure log
    lock = gate(study)
    quiet_interrupts()
    waiting_said = False
    while True:
        poll_interrupt()
        if deadline is not None and time.time() >= deadline:
            stats.stop_reason = "timeout"
            return stats
        lock.acquire()
        try:
            reap_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            failed_in_row = _failures_in_row(trials, max_failures_in_row)
            if failed_in_row:
                stats.stop_reason = (f"stopped: the last {max_failures_in_row} trials failed (last reason: "
                                     f"{failed_in_row}); fix the study file, then run again")
                return stats
            action = plan(trials)
            if action == DONE:
                return stats
            if action == WAIT:
                lock.release()
                if not waiting_said:
                    backend = getattr(study._storage, "_backend", study._storage)  # behind Optuna's cache
                    log("waiting for trials running elsewhere (another worker, or a killed one whose heartbeat "
                        f"expires after the grace period, {getattr(backend, 'grace_period', '?')} s)")
                    waiting_said = True
                time.sleep(poll_s)
                continue
            with deferred_interrupts():  # from asking for a trial to telling its result: record, do not raise
                number = _run_one(study, objective, lock, failures)
        finally:
            if lock.is_locked:
                lock.release()
        if number is not None:
            trials = study.get_trials(deepcopy=False)
            trial = trials[number]
            stats.states[trial.state.name] += 1
            progress.active().end_trial(number, trial.state.name, trial.value,
                                        trial.user_attrs.get("fail_reason", ""), failures.pop(number, ""),
                                        study_so_far=_so_far(trials))


def _so_far(trials: list[FrozenTrial]) -> tuple[int, float | None]:
    """(finished trials, best value) of the whole study: other workers' trials count too."""
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    complete = [t.value for t in finished if t.state == TrialState.COMPLETE and t.value is not None]
    return len(finished), max(complete, default=None)


def _run_one(study: optuna.Study, objective: Callable[[optuna.Trial], float], gate: FileLock,
             failures: dict[int, str]) -> int | None:
    """One trial through Optuna; the gate is released as soon as the trial exists (first line of the objective)."""
    ran: list[int] = []

    def wrapped(trial: optuna.Trial) -> float:
        _first_heartbeat(trial)
        gate.release()
        ran.append(trial.number)
        try:
            poll_interrupt()  # a signal that came while Optuna created the trial: fail it as interrupted
            trial.set_user_attr("worker", worker_name())
            return objective(trial)
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", INTERRUPTED)
            raise
        except (optuna.TrialPruned, *USER_ERRORS):
            raise
        except Exception as err:
            reason = str(err) or type(err).__name__
            trial.set_user_attr("fail_reason", reason)
            failures[trial.number] = progress.format_exception(err)
            raise TrialFailed(reason) from err

    study.optimize(wrapped, n_trials=1, catch=(TrialFailed,), gc_after_trial=GC_AFTER_TRIAL)
    return ran[0] if ran else None


def _first_heartbeat(trial: optuna.Trial) -> None:
    """Record the trial's heartbeat now, before any of its work. Optuna's heartbeat thread records its first
    one asynchronously: on a busy SQLite file it was seen to lag so long that a worker killed mid-trial left a
    trial with no heartbeat at all, which is never reaped (so never retried, and every worker waited for it)."""
    storage = trial.study._storage
    if getattr(storage, "get_heartbeat_interval", lambda: None)() is not None:
        storage.record_heartbeat(trial._trial_id)


def _failures_in_row(trials: list[FrozenTrial], k: int) -> str:
    """The last failure's reason when the last k ended trials all failed on their own (not interrupted,
    not reaped after their worker died); else ''."""
    ended = [t for t in trials if t.state.is_finished()
             and not (t.state == TrialState.FAIL and t.user_attrs.get("fail_reason", INTERRUPTED) == INTERRUPTED)]
    last = ended[-k:]
    if k <= 0 or len(last) < k or any(t.state != TrialState.FAIL for t in last):
        return ""
    return last[-1].user_attrs["fail_reason"]


def reap_stale_trials(study: optuna.Study) -> None:
    """Trials whose worker stopped sending heartbeats become FAIL and are queued again (Optuna's retry callback)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def retry_interrupted(study: optuna.Study) -> int:
    """Queue again, with the same parameters, every trial stopped by SIGINT/SIGTERM and not yet retried
    (as Optuna's heartbeat retry does for killed workers). Returns how many were queued."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    queued = 0
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") == INTERRUPTED and t.number not in retried:
            history = [*t.system_attrs.get("retry_history", []), t.number]
            system_attrs = {k: v for k, v in t.system_attrs.items() if k == "fixed_params"}
            study.add_trial(optuna.create_trial(
                state=TrialState.WAITING, params=t.params, distributions=t.distributions, user_attrs=identity_attrs(t),
                system_attrs={**system_attrs, "failed_trial": history[0], "retry_history": history},
            ))
            queued += 1
    return queued
