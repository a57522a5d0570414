"""Running a study: the Optuna objective around train(), and create-or-resume with a safety check."""
from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from data.packed import PackedStore
from search import progress
from search.attrs import RUN_CONFIG, VERSIONS, set_dict_attr
from search.checkpoints import TrialCheckpoints, model_checkpoint
from search.config import RunConfig
from search.faults import StorageAway, outside_cause
from search.provenance import gpu_info, versions
from search.runner import RunStats, poll_interrupt, run_trials, search_plan
from search.spec import SpecError, StudySpec
from search.storage import no_wait, open_storage, retry_race
from search.strategies import make_pruner, make_sampler
from search.train import default_device, resumable, train

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
RESULT_ATTRS = ("n_params", "flops_per_segment", "steps_run", "steps_per_s", "samples_per_s", "best_valid_acc",
                "best_step", "budget_steps", "device", "precision")


def make_objective(spec: StudySpec, store: PackedStore, artifact_store=None, log: Callable[[str], None] = print,
                   deadline: float | None = None) -> Callable[[optuna.Trial], float]:
    """The objective Optuna calls: sample a RunConfig, train it with pruning, record provenance."""

    def objective(trial: optuna.Trial) -> float:
        return train_trial(trial, spec.run_config(trial), store, artifact_store, log, deadline)

    return objective


def train_trial(trial: optuna.Trial, cfg: RunConfig, store: PackedStore, artifact_store=None,
                log: Callable[[str], None] = print, deadline: float | None = None) -> float:
    """Train `cfg` as this trial: record provenance and results on it, report and prune through it; with an
    artifact store, keep its latest state while it runs (a retry continues from it) and its best model.
    At the study's deadline (time.time()) it stops at its next evaluation and completes with what it reached
    (user attr stopped_at_deadline = that step), unless the pruner prunes it there."""
    set_dict_attr(trial, RUN_CONFIG, cfg.to_shown_dict())  # short lines, only keys in use: attrs.run_config_of
    trial.set_user_attr("seed", cfg.train.seed)
    trial.set_user_attr("data_fingerprint", store.fingerprint)
    set_dict_attr(trial, VERSIONS, versions())
    gpu = gpu_info(default_device())
    if gpu is not None:
        trial.set_user_attr("gpu", gpu)
    checkpoints = TrialCheckpoints(trial, artifact_store, log) if artifact_store is not None else None
    resume = checkpoints.resume_state(lambda s: resumable(s, cfg, store.fingerprint)) if checkpoints else None
    if resume is not None:  # the retried trial's curve, so the pruner and the dashboard see the whole run
        trial.set_user_attr("resumed_from_step", resume["step"])
        for point in resume["history"]:
            trial.report(point["valid_acc"], point["step"])

    stopped: list[int] = []
    unsent: list[tuple[float, int]] = []  # reports made while the database was away: sent when it is back

    def send_reports() -> None:
        while unsent:
            trial.report(*unsent[0])
            unsent.pop(0)

    def reporter(step: int, accuracy: float) -> bool:
        unsent.append((accuracy, step))
        try:
            with no_wait():  # the database away: training goes on, the pruner decides once it is back
                send_reports()
                if trial.should_prune():
                    return True
        except StorageAway:
            return False
        if deadline is not None and time.time() >= deadline and step < cfg.train.max_steps:
            stopped.append(step)
            return True
        return False

    # A failure (e.g. NonFiniteLossError) is recorded by the runner; a SIGINT/SIGTERM stops at the next step
    # and keeps the latest state for the retry.
    shown = progress.active()
    shown.start_trial(trial.number, cfg.train.max_steps, trial.params, resume["step"] if resume else 0)

    def on_step() -> None:
        poll_interrupt()
        shown.step()

    try:
        result = train(cfg, store, reporter, on_step=on_step, resume=resume,
                       save_state=latest_state(checkpoints), on_eval=shown.evaluated)
    except Exception as err:
        if checkpoints and outside_cause(err) is None:
            checkpoints.drop_latest()  # its own failure: a retry would fail the same way
        raise  # a fault outside the trial (storage, disk): the latest state stays for its retry
    send_reports()
    for key in RESULT_ATTRS:
        trial.set_user_attr(key, getattr(result, key))
    if checkpoints:
        checkpoints.save_best(model_checkpoint(result, cfg, store))
        checkpoints.drop_latest()
    if stopped:
        trial.set_user_attr("stopped_at_deadline", stopped[0])
    elif result.pruned:
        raise optuna.TrialPruned(f"pruned at step {result.steps_run}")
    return result.best_valid_acc


def latest_state(checkpoints: TrialCheckpoints | None) -> Callable[[dict[str, Any]], None] | None:
    """Keep each evaluation's training state; while the database is away the file is written and its record
    waits (TrialCheckpoints keeps it pending), so training goes on."""
    if checkpoints is None:
        return None

    def save(state: dict[str, Any]) -> None:
        with no_wait():
            checkpoints.save_latest(state)

    return save


def create_or_resume(spec: StudySpec, storage_url: str, data_fingerprint: str,
                     identity: dict[str, Any] | None = None, wait: bool = False,
                     rename: str = "--set study.name=NEW") -> optuna.Study:
    """Create the study, or resume it if it exists and was made from the same space, budget and data
    (`identity` replaces the spec's own, e.g. an ablation's rows and seeds). `wait`: a worker, which waits
    up to study.storage_outage_s for a database that is away (others fail at once: likely a wrong URL).
    `rename`: the option that names a new study, for the message when the identity differs."""
    storage = open_storage(storage_url, spec.heartbeat_interval, spec.grace_period, spec.storage_outage_s,
                           wait=wait)
    sampler, pruner = make_sampler(spec), make_pruner(spec)
    identity = json.loads(json.dumps(identity or spec.identity()))  # as stored: tuples become lists

    def create() -> optuna.Study:  # retried: other processes may create the same study at the same moment
        study = optuna.create_study(study_name=spec.name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction="maximize", load_if_exists=True)
        if study.user_attrs.get("spec") is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(["valid_acc"])  # how the dashboard labels the objective
            study.set_user_attr("data_fingerprint", data_fingerprint)
            study.set_user_attr("metric", "best validation accuracy")
            for point in spec.enqueue:  # the known-good points first: the sampler's own trials come after them
                study.enqueue_trial(point, skip_if_exists=True)
            study.set_user_attr("spec", identity)  # last: its presence means the study is fully set up
        return study

    study = retry_race(create)
    stored = study.user_attrs.get("spec")
    if stored != identity:
        key, old, new = first_difference(stored, identity)
        raise SpecError(
            f"{spec.path}: study {spec.name!r} in {storage_url} was created with a different {key}: "
            f"{old} then, {new} now; resume it with the same settings or name a new study ({rename})"
        )
    elif study.user_attrs.get("data_fingerprint") != data_fingerprint:
        raise SpecError(
            f"{spec.path}: study {spec.name!r} was run on other data (fingerprint "
            f"{study.user_attrs.get('data_fingerprint')}, now {data_fingerprint}); name a new study"
        )
    return study


def first_difference(old: Any, new: Any, key: str = "") -> tuple[str, str, str]:
    """The first key (dotted) where two stored identities differ, with both values as JSON."""
    if isinstance(old, dict) and isinstance(new, dict) and not _is_param(old) and not _is_param(new):
        for k in sorted(set(old) | set(new)):
            if old.get(k, _MISSING) != new.get(k, _MISSING):
                return first_difference(old.get(k, _MISSING), new.get(k, _MISSING), f"{key}.{k}" if key else k)
    return key, _show(old), _show(new)


_MISSING = object()


def _is_param(value: dict) -> bool:
    return bool({"value", "choices", "low"} & set(value))


def _show(value: Any) -> str:
    """A parameter as written in a study file: 80, [16, 32] or {low, high, ...}; '(not set)' if absent."""
    if value is _MISSING:
        return "(not set)"
    if isinstance(value, dict) and set(value) in ({"value"}, {"choices"}):
        value = next(iter(value.values()))
    return json.dumps(value)


def run_study(study: optuna.Study, spec: StudySpec, store: PackedStore, n_trials: int | None,
              deadline: float | None = None, log: Callable[[str], None] = print, artifact_store=None) -> RunStats:
    """Run until the study holds n_trials finished (complete or pruned) trials, or the deadline passes.

    Counting finished trials in the storage makes a resumed run add only what is missing, and lets
    several workers share one target; failed trials do not count."""
    objective = make_objective(spec, store, artifact_store, log, deadline)
    return run_trials(study, objective, search_plan(n_trials), deadline, spec.max_failures_in_row,
                      poll_s=min(5.0, spec.heartbeat_interval), log=log)
