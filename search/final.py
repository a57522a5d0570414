"""`run-study train`: a final fit of one trial's config (through the same train()), saved as one checkpoint."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from data.packed import PackedStore
from models import ConfigError
from search.checkpoints import model_checkpoint
from search.config import RunConfig
from search.runner import poll_interrupt
from search.studyfile import SpecError, apply_override
from search.train import TrainResult, train


def pick_trial(study: optuna.Study, which: str) -> FrozenTrial:
    """'best' (the best complete trial) or a trial number that finished (complete or pruned)."""
    trials = study.get_trials(deepcopy=False)
    if which == "best":
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not complete:
            raise SpecError(f"study {study.study_name!r} has no complete trial yet; run its search first")
        return study.best_trial
    if not which.isdigit() or int(which) >= len(trials):
        raise SpecError(f"--trial {which!r}: give 'best' or a trial number of study {study.study_name!r} "
                        f"(0 to {len(trials) - 1})")
    trial = trials[int(which)]
    if "run_config" not in trial.user_attrs:
        raise SpecError(f"trial {trial.number} of study {study.study_name!r} ({trial.state.name}) never started "
                        "training: it has no run config")
    return trial


def final_config(trial: FrozenTrial, overrides: list[str]) -> RunConfig:
    """The trial's run config with --set model.X=..., train.X=..., data.X=... applied (validated)."""
    raw = {k: dict(v) for k, v in trial.user_attrs["run_config"].items()}
    for item in overrides:
        section = item.partition(".")[0].strip()
        if section not in raw:
            raise SpecError(f"--set {item!r}: a final fit changes model.*, train.* or data.* keys")
        apply_override(raw, item)
    try:
        return RunConfig.from_dict(raw)
    except ConfigError as err:
        raise SpecError(f"--set: {err}") from None


def fit(cfg: RunConfig, store: PackedStore, out: Path, source: dict, log: Callable[[str], None] = print
        ) -> TrainResult:
    """Train cfg on store, saying each evaluation; save the best model with where it came from to `out`."""

    def say(step: int, accuracy: float) -> bool:
        log(f"step {step}/{cfg.train.max_steps}: valid_acc {accuracy:.4f}")
        return False

    result = train(cfg, store, say, on_step=poll_interrupt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({**model_checkpoint(result, cfg, store), "source": source}, tmp)
    tmp.replace(out)  # a kill while saving never leaves a half-written checkpoint under the final name
    return result
