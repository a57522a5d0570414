"""Running a study: the Optuna objective around train(), and create-or-resume with a safety check."""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from data.packed import PackedStore
from search.config import RunConfig
from search.provenance import versions
from search.spec import SpecError, StudySpec
from search.storage import open_storage
from search.strategies import make_pruner, make_sampler
from search.train import NonFiniteLossError, train

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
RESULT_ATTRS = ("n_params", "flops_per_segment", "steps_run", "steps_per_s", "samples_per_s", "best_valid_acc",
                "best_step", "device")


def make_objective(spec: StudySpec, store: PackedStore) -> Callable[[optuna.Trial], float]:
    """The objective Optuna calls: sample a RunConfig, train it with pruning, record provenance."""

    def objective(trial: optuna.Trial) -> float:
        return train_trial(trial, spec.run_config(trial), store)

    return objective


def train_trial(trial: optuna.Trial, cfg: RunConfig, store: PackedStore) -> float:
    """Train `cfg` as this trial: record provenance and results on it, report and prune through it."""
    trial.set_user_attr("run_config", cfg.to_dict())
    trial.set_user_attr("seed", cfg.train.seed)
    trial.set_user_attr("data_fingerprint", store.fingerprint)
    trial.set_user_attr("versions", versions())

    def reporter(step: int, accuracy: float) -> bool:
        trial.report(accuracy, step)
        return trial.should_prune()

    try:
        result = train(cfg, store, reporter)
    except NonFiniteLossError as err:
        trial.set_user_attr("fail_reason", str(err))
        raise
    for key in RESULT_ATTRS:
        trial.set_user_attr(key, getattr(result, key))
    if result.pruned:
        raise optuna.TrialPruned(f"pruned at step {result.steps_run}")
    return result.best_valid_acc


def create_or_resume(spec: StudySpec, storage_url: str, data_fingerprint: str,
                     identity: dict[str, Any] | None = None) -> optuna.Study:
    """Create the study, or resume it if it exists and was made from the same space, budget and data
    (`identity` replaces the spec's own, e.g. an ablation's rows and seeds)."""
    storage = open_storage(storage_url, spec.heartbeat_interval, spec.grace_period)
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
        direction="maximize",
        load_if_exists=True,
    )
    identity = json.loads(json.dumps(identity or spec.identity()))  # as stored: tuples become lists
    stored = study.user_attrs.get("spec")
    if stored is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["valid_acc"])  # how the dashboard labels the objective
        study.set_user_attr("spec", identity)
        study.set_user_attr("data_fingerprint", data_fingerprint)
        study.set_user_attr("metric", "best validation accuracy")
    elif stored != identity:
        changed = sorted(k for k in identity if stored.get(k) != identity[k])
        raise SpecError(
            f"{spec.path}: study {spec.name!r} in {storage_url} was created with a different "
            f"{', '.join(changed)}; resume it with the same settings or name a new study (--set study.name=NEW)"
        )
    elif study.user_attrs.get("data_fingerprint") != data_fingerprint:
        raise SpecError(
            f"{spec.path}: study {spec.name!r} was run on other data (fingerprint "
            f"{study.user_attrs.get('data_fingerprint')}, now {data_fingerprint}); name a new study"
        )
    return study


def run_study(study: optuna.Study, spec: StudySpec, store: PackedStore, n_trials: int | None,
              timeout: float | None) -> int:
    """Run until the study holds n_trials finished (complete or pruned) trials, or the timeout passes.

    Counting finished trials in the storage makes a resumed run add only what is missing, and lets
    several workers share one target. Returns the number of trials this call started."""
    before = len(study.trials)
    callbacks = []
    if n_trials is not None:
        remaining = n_trials - len(study.get_trials(deepcopy=False, states=FINISHED))
        if remaining <= 0:
            return 0
        callbacks.append(optuna.study.MaxTrialsCallback(n_trials, states=FINISHED))
    study.optimize(
        make_objective(spec, store),
        n_trials=None if n_trials is None else remaining,
        timeout=timeout,
        callbacks=callbacks,
        catch=(NonFiniteLossError,),
        gc_after_trial=True,
    )
    return len(study.trials) - before
