"""The one trial loop, for searches and ablations, for one process or many on one storage.

Each turn of the loop takes the study's gate (a file lock, so local workers and other local commands
take turns), reaps trials whose worker died (heartbeats), asks the plan what to do and either runs ONE
trial through `study.optimize(n_trials=1)` (so Optuna keeps the heartbeat, the pruner and the bookkeeping),
waits for trials that others are running, or stops. The gate is held until the new trial exists, so
"how many are finished or running" and "create one more" are one step: N workers on one machine never
overshoot a target, nor claim the same ablation cell.
"""
from __future__ import annotations

import gc
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
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import FrozenTrial, TrialState

from data import DataError
from models import ConfigError
from search import progress
from search.cells import cell_of, identity_attrs
from search.faults import (
    EXIT_DISK_FULL,
    EXIT_OK,
    EXIT_STOPPED,
    EXIT_STORAGE,
    DiskFull,
    HeartbeatLost,
    ParentDied,
    StorageLost,
    outside_cause,
    own_reason,
)
from search.slurm import TASK_ATTR as SLURM_TASK_ATTR
from search.slurm import task_name as slurm_task_name
from search.spec import SpecError
from search.storage import ResilientRDBStorage, ServerLock, sqlite_path

RUN, WAIT, DONE = "run", "wait", "done"
INTERRUPTED = "interrupted"  # fail_reason of a trial stopped by SIGINT/SIGTERM: the next run retries it
DEFAULT_MAX_FAILURES_IN_ROW = 5
# Optuna's gc.collect() after each trial cost 0.15 CPU s per trial (a quarter of a short trial) and freed
# nothing: 30 trials in one process kept the same peak RSS without it (models are freed by reference counting).
GC_AFTER_TRIAL = False
USER_ERRORS = (DataError, SpecError, ConfigError)  # a bad study file or dataset: the one-line error, not a failed trial


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so Optuna marks the running trial FAIL instead of leaving it RUNNING."""


def exit_code(interrupt: KeyboardInterrupt) -> int:
    return 128 + (signal.SIGTERM if isinstance(interrupt, (Terminated, ParentDied)) else signal.SIGINT)


# Signals. Raising from a handler can land anywhere: inside a weakref callback or __del__ during training
# (Python prints "Exception ignored" and drops it: the trial would go on), or inside Optuna between creating
# a trial and calling the objective (the trial would stay RUNNING with no heartbeat, never reaped). So from
# asking for a trial to telling its result the handler only records the signal; the objective and train()
# raise it at their next check (poll_interrupt, every step); elsewhere (waiting, set-up) it raises at once.
_pending: int | None = None
_deferring = False


def _interrupt(signum: int) -> KeyboardInterrupt:
    if signum == signal.SIGHUP:  # only a worker listens: its parent died (PR_SET_PDEATHSIG)
        return ParentDied()
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def watch_parent(pid: int) -> None:
    """In a --workers worker: stop like SIGTERM (trial interrupted, retried) when the parent process dies. The
    kernel signals SIGHUP (the parent forwards only SIGINT/SIGTERM), so the cause is known for certain."""
    from search.workers import die_with_parent

    signal.signal(signal.SIGHUP, _handler)
    die_with_parent(pid, signal.SIGHUP)


def _handler(signum: int, frame: Any) -> None:
    global _pending
    _pending = signum
    if not _deferring:
        raise _interrupt(signum)


def handle_signals() -> None:
    """SIGINT and SIGTERM stop this process as KeyboardInterrupt / Terminated (see above)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _handler)


def raise_signal() -> None:
    """Raise the interrupt recorded by a signal, if any."""
    if _pending is not None:
        raise _interrupt(_pending)


def poll_interrupt() -> None:
    """Raise the interrupt recorded by a signal, if any (called every training step and between trials), and
    HeartbeatLost when a training trial's heartbeat lapsed (see _heartbeat_watch)."""
    if _pending is not None:
        raise _interrupt(_pending)
    if _watch is not None:
        _watch()


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
OWN_FAIL, OK = "own-fail", "ok"  # outcomes this process counts for max_failures_in_row


@dataclass
class RunStats:
    states: Counter = field(default_factory=Counter)  # state name -> trials this process ran
    stop_reason: str = ""
    exit_code: int = EXIT_OK  # search.faults: why the loop stopped (0: the plan is done, or the deadline)
    outcomes: list = field(default_factory=list)  # OWN_FAIL / OK per trial this process ended (not interrupted)
    last_reason: str = ""  # fail_reason of this process's last own failure

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

    def stop(self, code: int, reason: str) -> RunStats:
        self.exit_code, self.stop_reason = code, reason
        return self


def gate_path(study: optuna.Study) -> Path:
    """One lock file per (storage, study) on this machine, in the temp folder (works for any storage URL)."""
    url = _url(study)
    if url is None:  # an in-memory storage lives in this process only
        url = f"memory:{os.getpid()}:{id(study._storage)}"
    path = sqlite_path(url) if url.startswith("sqlite") else None
    key = f"{path.resolve() if path else url}\0{study.study_name}"
    return Path(tempfile.gettempdir()) / f"hw4-search-{hashlib.sha256(key.encode()).hexdigest()[:16]}.lock"


def _url(study: optuna.Study) -> str | None:
    return getattr(backend_of(study), "url", None)


def backend_of(study: optuna.Study):
    """The RDBStorage behind Optuna's cache (or the storage itself)."""
    storage = study._storage
    return getattr(storage, "_backend", storage)


def gate(study: optuna.Study) -> FileLock | ServerLock:
    """The study's gate: hold it to count trials and create one, or to change what is queued (retries, ablation
    cells). SQLite: a lock file on this machine (the file lives on one machine); a database server: the
    server's own lock, so any number of machines share one gate."""
    url = _url(study)
    if url is None or url.startswith("sqlite"):
        return FileLock(gate_path(study))
    return ServerLock(url, f"{url}\0{study.study_name}", storage=backend_of(study))


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    plan: Plan,
    deadline: float | None = None,
    max_failures_in_row: int = DEFAULT_MAX_FAILURES_IN_ROW,
    poll_s: float = 5.0,
    log: Callable[[str], None] = print,
) -> RunStats:
    """Run trials of `study` as `plan` says until it is done, the deadline (time.time()) passes,
    `max_failures_in_row` trials in a row that this process ran failed on their own, or a fault outside the
    trials stops it (storage lost, disk full). Returns what this process ran, with the exit code."""
    stats = RunStats()
    failures: dict[int, str] = {}  # trial number -> traceback, for the failure log
    lock = gate(study)
    quiet_interrupts()
    backend = backend_of(study)
    if isinstance(backend, ResilientRDBStorage):
        backend.should_stop = raise_signal  # a signal ends a wait for the database
    waiting_said = False
    try:
        while True:
            poll_interrupt()
            if deadline is not None and time.time() >= deadline:
                return stats.stop(EXIT_OK, "timeout")
            lock.acquire()
            try:
                reap_stale_trials(study)
                retry_interrupted(study)  # other machines' (or this run's) interrupted trials run again now
                trials = study.get_trials(deepcopy=False)
                if _failures_in_row(stats.outcomes, max_failures_in_row):
                    return stats.stop(EXIT_STOPPED, f"stopped: the last {max_failures_in_row} trials "
                                      f"failed (last reason: {stats.last_reason}); fix the study file, then run "
                                      "again")
                action = plan(trials)
                if action == DONE:
                    return stats
                if action == WAIT:
                    lock.release()
                    if not waiting_said:
                        log("waiting for trials running elsewhere (another worker, or a killed one whose heartbeat "
                            f"expires after the grace period, {getattr(backend, 'grace_period', '?')} s)")
                        waiting_said = True
                    time.sleep(poll_s)
                    continue
                with deferred_interrupts():  # from asking for a trial to telling its result: record, do not raise
                    number, outcome = _run_one(study, objective, lock, failures, log)
            finally:
                if lock.is_locked:
                    lock.release()
            trials = study.get_trials(deepcopy=False)
            trial = trials[number]
            if outcome in (OWN_FAIL, OK):
                stats.outcomes.append(outcome)
            if outcome == OWN_FAIL:
                stats.last_reason = trial.user_attrs.get("fail_reason", "?")
            stats.states[trial.state.name] += 1
            progress.active().end_trial(number, trial.state.name, trial.value,
                                        _shown_reason(trial), failures.pop(number, ""), study_so_far=_so_far(trials))
    except StorageLost as err:
        return stats.stop(EXIT_STORAGE, f"stopped: {err}; running trials keep their checkpoints and resume when "
                          "the study runs again")
    except DiskFull as err:
        return stats.stop(EXIT_DISK_FULL, f"stopped: {err}; free space, then run the same command again "
                          "(interrupted trials resume from their checkpoints)")


def _shown_reason(trial: FrozenTrial) -> str:
    reason = trial.user_attrs.get("fail_reason", "")
    cause = trial.user_attrs.get("interrupt_cause")
    return f"{reason} ({cause}; it will be retried from its checkpoint)" if reason == INTERRUPTED and cause else reason


def _so_far(trials: list[FrozenTrial]) -> tuple[int, float | None]:
    """(finished trials, best value) of the whole study: other workers' trials count too."""
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    complete = [t.value for t in finished if t.state == TrialState.COMPLETE and t.value is not None]
    return len(finished), max(complete, default=None)


def _run_one(study: optuna.Study, objective: Callable[[optuna.Trial], float], gate: FileLock | ServerLock,
             failures: dict[int, str], log: Callable[[str], None]) -> tuple[int, str]:
    """Ask for one trial (the gate is released as soon as it exists), train it with a heartbeat, tell Optuna.
    Returns its number and outcome: OK, OWN_FAIL, or INTERRUPTED (a signal, the storage, the disk, the
    parent: not the trial's fault; marked interrupted with its cause, retried from its checkpoint).
    Raises what stops this process (a signal, bad input, storage lost, disk full) after the tell."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask()
    backend = backend_of(study)
    heartbeats = getattr(backend, "heartbeats", None)
    if heartbeats is not None:
        heartbeats[trial._trial_id] = time.monotonic()  # the clock of heartbeat_age starts now
    _first_heartbeat(trial)
    gate.release()
    state, value, attrs, stop = TrialState.COMPLETE, None, {}, None
    outcome = OK
    watch = _heartbeat_watch(backend, trial._trial_id)
    with get_heartbeat_thread(trial._trial_id, study._storage), _watching(watch):
        try:
            poll_interrupt()  # a signal that came while Optuna created the trial: fail it as interrupted
            trial.set_user_attr("worker", worker_name())
            if slurm_task_name():
                trial.set_user_attr(SLURM_TASK_ATTR, slurm_task_name())
            value = objective(trial)
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except KeyboardInterrupt as err:
            state, outcome, stop = TrialState.FAIL, INTERRUPTED, err
            attrs = {"fail_reason": INTERRUPTED, "interrupt_cause": _signal_cause(err)}
        except USER_ERRORS as err:
            state, outcome, stop = TrialState.FAIL, INTERRUPTED, err
            attrs = {"fail_reason": str(err)}
        except Exception as err:
            cause = outside_cause(err)
            state = TrialState.FAIL
            if cause is None:
                reason = own_reason(err)
                if type(err).__name__ == "OutOfMemoryError":
                    _free_gpu_memory()  # the next trial of this worker starts with the GPU's memory back
                attrs, outcome = {"fail_reason": reason}, OWN_FAIL
                failures[trial.number] = progress.format_exception(err)
            else:
                attrs, outcome = {"fail_reason": INTERRUPTED, "interrupt_cause": cause}, INTERRUPTED
                if cause == "disk full" and not isinstance(err, DiskFull):
                    stop = DiskFull(getattr(err, "filename", None) or "", str(err))
                elif not isinstance(err, HeartbeatLost):
                    stop = err
    if GC_AFTER_TRIAL:
        gc.collect()
    if not _tell(study, trial, state, value, attrs):
        log(f"trial {trial.number}: another process took it over (its heartbeat lapsed while the storage was "
            "away); this worker leaves it to its retry")
        outcome = INTERRUPTED
    if stop is not None:
        raise stop
    return trial.number, outcome


def _free_gpu_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _signal_cause(err: KeyboardInterrupt) -> str:
    if isinstance(err, ParentDied):
        return "the --workers parent died"
    return "SIGTERM" if isinstance(err, Terminated) else "SIGINT"


def _tell(study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | None,
          attrs: dict[str, Any]) -> bool:
    """Finish the trial as `state`; False when it was already finished by another process (reaped after its
    heartbeat lapsed: its retry owns the work now)."""
    storage = study._storage
    try:
        for key, item in attrs.items():
            storage.set_trial_user_attr(trial._trial_id, key, item)
        if state == TrialState.COMPLETE:
            study.tell(trial, value)
        else:
            study.tell(trial, state=state)
    except UpdateFinishedTrialError:
        return False
    except ValueError as err:  # Optuna: "Cannot tell a FAIL trial." when it was reaped meanwhile
        if storage.get_trial(trial._trial_id).state.is_finished() and "Cannot tell" in str(err):
            return False
        raise
    return True


_watch: Callable[[], None] | None = None  # checked with every poll_interrupt while a trial trains


@contextmanager
def _watching(check: Callable[[], None] | None) -> Iterator[None]:
    global _watch
    previous, _watch = _watch, check
    try:
        yield
    finally:
        _watch = previous


def _heartbeat_watch(backend: Any, trial_id: int) -> Callable[[], None] | None:
    """A worker that could not record its trial's heartbeat for a whole grace period stops the trial (others may
    have reaped it and queued its retry; the checkpoint stays for that retry) rather than race its own retry."""
    age = getattr(backend, "heartbeat_age", None)
    grace = getattr(backend, "grace_period", None)
    if age is None or grace is None or backend.get_heartbeat_interval() is None:
        return None

    def check() -> None:
        if age(trial_id) >= grace:
            raise HeartbeatLost(f"no heartbeat recorded for {grace} s (study.grace_period)")

    return check


def _first_heartbeat(trial: optuna.Trial) -> None:
    """Record the trial's heartbeat now, before any of its work. Optuna's heartbeat thread records its first
    one asynchronously: on a busy SQLite file it was seen to lag so long that a worker killed mid-trial left a
    trial with no heartbeat at all, which is never reaped (so never retried, and every worker waited for it)."""
    storage = trial.study._storage
    if getattr(storage, "get_heartbeat_interval", lambda: None)() is not None:
        storage.record_heartbeat(trial._trial_id)


def _failures_in_row(outcomes: list[str], k: int) -> bool:
    """The last k trials this process ended all failed on their own (interrupted ones do not count)."""
    return k > 0 and len(outcomes) >= k and all(o == OWN_FAIL for o in outcomes[-k:])


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
    # an ablation cell queued again by enqueue_missing_cells (or complete, or running) needs no retry
    taken = {cell_of(t) for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)}
    queued = 0
    for t in trials:
        if (t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") == INTERRUPTED and t.number not in retried
                and (cell_of(t) is None or cell_of(t) not in taken)):
            history = [*t.system_attrs.get("retry_history", []), t.number]
            system_attrs = {k: v for k, v in t.system_attrs.items() if k == "fixed_params"}
            study.add_trial(optuna.create_trial(
                state=TrialState.WAITING, params=t.params, distributions=t.distributions, user_attrs=identity_attrs(t),
                system_attrs={**system_attrs, "failed_trial": history[0], "retry_history": history},
            ))
            queued += 1
    return queued
