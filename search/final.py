"""`run-study train`: a final fit of one trial's config (through the same train()), saved as one checkpoint."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from data.packed import PackedStore
from models import ConfigError
from search.attrs import best_of, run_config_of
from search.checkpoints import model_checkpoint
from search.config import RunConfig
from search.runner import poll_interrupt
from search.status import duration_text
from search.studyfile import SpecError, apply_override
from search.train import TrainResult, train


def pick_trial(study: optuna.Study, which: str) -> FrozenTrial:
    """'best' (the best complete trial) or a trial number that finished (complete or pruned)."""
    trials = study.get_trials(deepcopy=False)
    if which == "best":
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not complete:
            raise SpecError(f"study {study.study_name!r} has no complete trial yet; run its search first")
        return best_of(complete)
    if not which.isdigit() or int(which) >= len(trials):
        raise SpecError(f"--trial {which!r}: give 'best' or a trial number of study {study.study_name!r} "
                        f"(0 to {len(trials) - 1})")
    trial = trials[int(which)]
    if run_config_of(trial) is None:
        raise SpecError(f"trial {trial.number} of study {study.study_name!r} ({trial.state.name}) never started "
                        "training: it has no run config")
    return trial


def final_config(trial: FrozenTrial, overrides: list[str]) -> RunConfig:
    """The trial's run config with --set model.X=..., train.X=..., data.X=... applied (validated)."""
    raw = {k: dict(v) for k, v in run_config_of(trial).items()}
    for item in overrides:
        section = item.partition(".")[0].strip()
        if section not in raw:
            raise SpecError(f"--set {item!r}: a final fit changes model.*, train.* or data.* keys")
        apply_override(raw, item)
    try:
        return RunConfig.from_dict(raw)
    except ConfigError as err:
        raise SpecError(f"--set: {err}") from None


def fit(cfg: RunConfig, store: PackedStore, out: Path, source: dict, log: Callable[[str], None] = print,
        every_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> TrainResult:
    """Train cfg on store, saying each evaluation and, between evaluations, at least every `every_s` seconds
    where it is, with its speed and ETA (a log file sees it move); save the best model with where it came from
    to `out`."""
    eta = FitProgress(cfg.train.max_steps, log, every_s, clock)

    def say(step: int, accuracy: float) -> bool:
        eta.evaluated(step, accuracy)
        return False

    def on_step() -> None:
        poll_interrupt()
        eta.step()

    result = train(cfg, store, say, on_step=on_step)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({**model_checkpoint(result, cfg, store), "source": source}, tmp)
    tmp.replace(out)  # a kill while saving never leaves a half-written checkpoint under the final name
    return result


class FitProgress:
    """A final fit's progress as lines: each evaluation, and a line at least every `every_s` seconds between
    them, with the steps done, steps/s and the time left at that speed (a final fit can run for hours)."""

    def __init__(self, total: int, log: Callable[[str], None], every_s: float, clock: Callable[[], float]) -> None:
        self.total, self.log, self.every_s, self.clock = total, log, every_s, clock
        self.steps, self.best = 0, None
        self.start = self.last_line = clock()

    def step(self) -> None:  # before each step: the steps done so far are self.steps
        if self.clock() - self.last_line >= self.every_s and self.steps:
            self._say(f"step {self.steps}/{self.total}")
        self.steps += 1

    def evaluated(self, step: int, accuracy: float) -> None:
        self.steps = step
        self.best = accuracy if self.best is None else max(self.best, accuracy)
        self._say(f"step {step}/{self.total}: valid_acc {accuracy:.4f} (best {self.best:.4f})")

    def _say(self, what: str) -> None:
        now = self.clock()
        self.last_line = now
        rate = self.steps / max(now - self.start, 1e-9)
        eta = duration_text((self.total - self.steps) / rate) if rate > 0 else "unknown"
        self.log(f"{what}, {rate:.3g} steps/s, {duration_text(now - self.start)} so far, ETA {eta}")

