"""Ablations: fixed configs (a baseline and variants of it) trained over several seeds, as Optuna trials.

An ablation study file is a study file whose [model]/[train] values are all fixed (the baseline) plus
  [ablation]  plan = "one_at_a_time" | "all_combinations" | "leave_one_out", seeds = [0, 1, 2],
              baseline = "config" (this file's values) or "best:STUDY" (the best trial of STUDY in the same storage)
  [variants]  name = { key = value, ... }   (model or train keys, applied on top of the baseline)
Every (row, seed) cell is one enqueued trial with param `variant` = row and user attr `seed` (a seed is not a
searched factor, so optuna-dashboard's importance card must not rank it); a resumed
ablation enqueues only the cells that have no complete, running or queued trial, and workers claim
queued cells one at a time (Optuna pops a queued trial atomically), so no cell is trained twice.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from data.packed import PackedStore
from models import ConfigError, ModelConfig
from search.attrs import best_of, run_config_of
from search.cells import cell_of
from search.config import RunConfig, TrainConfig
from search.runner import RunStats, ablation_plan, reap_stale_trials, retry_interrupted, run_trials
from search.spec import StudySpec, parse_spec
from search.storage import load_existing_study
from search.study import create_or_resume, train_trial
from search.studyfile import SpecError, load_raw

PLANS = ("one_at_a_time", "all_combinations", "leave_one_out")
MODEL_KEYS = {f.name for f in fields(ModelConfig)}
TRAIN_KEYS = {f.name for f in fields(TrainConfig)} - {"seed"}


@dataclass(frozen=True)
class AblationSpec:
    study: StudySpec
    plan: str
    seeds: tuple[int, ...]
    baseline: str  # "config" or "best:STUDY"
    variants: dict[str, dict[str, Any]]

    def rows(self, baseline: RunConfig) -> dict[str, RunConfig]:
        """Row name -> config; the first row is the one every other row is compared with."""
        names = list(self.variants)
        if self.plan == "one_at_a_time":
            combos = [()] + [(n,) for n in names]
        elif self.plan == "all_combinations":
            combos = [c for k in range(len(names) + 1) for c in itertools.combinations(names, k)]
        else:  # leave_one_out: everything on, then each variant taken out
            combos = [tuple(names)] + [tuple(n for n in names if n != out) for out in names]
        return {self.row_name(c): self._apply(baseline, c) for c in combos}

    def row_name(self, combo: tuple[str, ...]) -> str:
        if self.plan == "leave_one_out":
            left_out = [n for n in self.variants if n not in combo]
            return "all" if not left_out else f"all - {left_out[0]}"
        return "baseline" if not combo else " + ".join(combo)

    def _apply(self, baseline: RunConfig, combo: tuple[str, ...]) -> RunConfig:
        model, train = baseline.model.to_dict(), dataclasses.asdict(baseline.train)
        for name in combo:
            for key, value in self.variants[name].items():
                (model if key in MODEL_KEYS else train)[key] = value
        try:
            return RunConfig(ModelConfig.from_dict(model), TrainConfig(**train), baseline.data)
        except ConfigError as err:
            raise SpecError(f"{self.study.path}: row {self.row_name(combo)!r}: {err}") from None


def load_ablation(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> AblationSpec:
    path, raw = load_raw(path, overrides)
    spec = parse_spec(path, raw)
    table, variants = raw.get("ablation"), raw.get("variants", {})
    if not isinstance(table, dict):
        raise SpecError(f"{path}: an ablation study file needs an [ablation] table (plan, seeds, baseline)")
    plan, seeds, baseline = table.get("plan", "one_at_a_time"), table.get("seeds"), table.get("baseline", "config")
    unknown = sorted(set(table) - {"plan", "seeds", "baseline"})
    if unknown:
        raise SpecError(f"{path}: unknown key ablation.{unknown[0]}; valid: plan, seeds, baseline")
    if plan not in PLANS:
        raise SpecError(f"{path}: ablation.plan={plan!r} is not known; valid: {', '.join(PLANS)}")
    distinct_ints = isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    if not (distinct_ints and seeds and len(set(seeds)) == len(seeds)):
        raise SpecError(f"{path}: ablation.seeds={seeds!r} must be a non-empty list of distinct integers")
    if not (baseline == "config" or (isinstance(baseline, str) and baseline.startswith("best:") and baseline[5:])):
        raise SpecError(f"{path}: ablation.baseline={baseline!r}; valid: 'config' or 'best:STUDY_NAME'")
    searched = [k for k, p in {**spec.model, **spec.train}.items() if p.searched] + list(spec.when)
    if searched:
        raise SpecError(f"{path}: an ablation's baseline must be fixed, but {searched[0]} is searched")
    if not isinstance(variants, dict) or not variants or not all(isinstance(v, dict) for v in variants.values()):
        raise SpecError(f"{path}: [variants] must hold at least one table, e.g. attn = {{ pooling = 'attention' }}")
    for name, keys in variants.items():
        bad = sorted(set(keys) - MODEL_KEYS - TRAIN_KEYS)
        if bad:
            raise SpecError(
                f"{path}: variants.{name}.{bad[0]} is not a model or train key (seeds come from ablation.seeds)"
            )
    ablation = AblationSpec(spec, plan, tuple(seeds), baseline, variants)
    if baseline == "config":
        ablation.rows(spec.default_run_config())  # a bad variant value fails now, before any training
    return ablation


def baseline_config(ablation: AblationSpec, storage: str) -> RunConfig:
    """This file's fixed values, or the run config of the best complete trial of another study."""
    if ablation.baseline == "config":
        return ablation.study.default_run_config()
    source = load_existing_study(ablation.baseline[5:], storage)
    complete = source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise SpecError(f"{ablation.study.path}: study {source.study_name!r} has no complete trial to use as baseline")
    return RunConfig.from_dict(run_config_of(best_of(complete)))


def identity(ablation: AblationSpec, rows: dict[str, RunConfig]) -> dict[str, Any]:
    return {"ablation": {name: cfg.to_dict() for name, cfg in rows.items()}, "seeds": list(ablation.seeds)}


def open_ablation(ablation: AblationSpec, storage: str, data_fingerprint: str, wait: bool = False
                  ) -> tuple[optuna.Study, dict[str, RunConfig]]:
    """Create or resume the ablation's study and mark it as an ablation, with its rows and seeds, for the report."""
    rows = ablation.rows(baseline_config(ablation, storage))
    return open_cells(ablation.study, next(iter(rows)), ablation.seeds, identity(ablation, rows), storage,
                      data_fingerprint, wait, {"rows": list(rows)}), rows


def open_cells(spec: StudySpec, baseline_row: str, seeds: tuple[int, ...], ident: dict[str, Any], storage: str,
               data_fingerprint: str, wait: bool = False, attrs: dict[str, Any] | None = None,
               rename: str = "--set study.name=NEW") -> optuna.Study:
    """Create or resume a study of (row, seed) cells (no pruning: every cell trains its full budget), compared
    with `baseline_row`. `attrs`: more study user attrs: the rows in the report's order ("rows"), an explain's."""
    spec = dataclasses.replace(spec, pruner={"name": "none"})
    study = create_or_resume(spec, storage, data_fingerprint, ident, wait=wait, rename=rename)
    for key, value in (("kind", "ablation"), ("baseline_row", baseline_row), ("seeds", list(seeds)),
                       *(attrs or {}).items()):
        if study.user_attrs.get(key) != value:  # workers opening the study at once write nothing
            study.set_user_attr(key, value)
    return study


def enqueue_missing_cells(study: optuna.Study, seeds: tuple[int, ...], rows: dict[str, RunConfig]) -> int:
    """Queue every (row, seed) cell that has no complete, running or queued trial; return how many.

    Called once per command, holding the study's gate (search.runner.gate): a cell that fails again in
    this run is not retried in a loop, and a cell whose worker died comes back through the heartbeat retry."""
    reap_stale_trials(study)
    retry_interrupted(study)  # an interrupted cell comes back as its retry, which resumes from its checkpoint
    taken = {cell_of(t) for t in study.get_trials(deepcopy=False, states=(
        TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))}
    todo = [(row, seed) for row in rows for seed in seeds if (row, seed) not in taken]
    for row, seed in todo:
        study.enqueue_trial({"variant": row}, user_attrs={"seed": seed})
    return len(todo)


def run_ablation(study: optuna.Study, spec: StudySpec, seeds: tuple[int, ...], rows: dict[str, RunConfig],
                 store: PackedStore, deadline: float | None = None, log: Callable[[str], None] = print,
                 artifact_store=None) -> RunStats:
    """Train queued cells until every cell is complete or nothing is left to run (see enqueue_missing_cells)."""

    def objective(trial: optuna.Trial) -> float:
        cell = cell_of(trial.study.get_trials(deepcopy=False)[trial.number])
        if cell is None or cell[0] not in rows:  # a new trial: another machine took the last queued cell
            raise optuna.TrialPruned("no ablation cell left for this trial (another worker took it)")
        row = trial.suggest_categorical("variant", list(rows))
        seed = cell[1]
        cfg = rows[row]
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
        return train_trial(trial, cfg, store, artifact_store, log)

    cells = [(row, seed) for row in rows for seed in seeds]
    return run_trials(study, objective, ablation_plan(cells), deadline, spec.max_failures_in_row,
                      poll_s=min(5.0, spec.heartbeat_interval), log=log)
