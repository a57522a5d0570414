"""Samplers and pruners by name, built from the study file's [sampler] and [pruner] tables."""
from __future__ import annotations

import hashlib
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial

from search.spec import SpecError, StudySpec

SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "qmc": optuna.samplers.QMCSampler,
    "gp": optuna.samplers.GPSampler,
}
PRUNERS = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
}


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The study file's sampler. Its seed is derived per process (see ProcessSeededSampler), except for QMC,
    whose points are numbered by a counter in the study, so every process must share one scrambled sequence."""
    kwargs = _kwargs(spec.sampler)
    name = spec.sampler["name"]
    if name == "qmc" or "seed" in kwargs:
        kwargs.setdefault("seed", spec.seed)
        return _build(spec, "sampler", name, SAMPLERS, kwargs)
    _build(spec, "sampler", name, SAMPLERS, {**kwargs, "seed": spec.seed})  # validate now, not at trial 1
    return ProcessSeededSampler(lambda seed: _build(spec, "sampler", name, SAMPLERS, {**kwargs, "seed": seed}),
                                spec.seed)


def derive_seed(study_seed: int, trial_number: int) -> int:
    """The study seed for trial 0 (a fresh single-process study is reproducible as before), else a hash."""
    if trial_number == 0:
        return study_seed
    return int.from_bytes(hashlib.sha256(f"{study_seed}/{trial_number}".encode()).digest()[:4], "little")


class ProcessSeededSampler(BaseSampler):
    """Seeds the study's sampler from the study seed and the number of this process's first trial.

    Trial numbers are handed out once per study by the storage, so every worker, every resume and every
    machine starts a different random stream (the same seed everywhere gave duplicate parameter sets),
    while a given run stays reproducible. All calls are passed to the Optuna sampler inside."""

    def __init__(self, build: Callable[[int], BaseSampler], study_seed: int) -> None:
        self._build, self._study_seed = build, study_seed
        self._sampler: BaseSampler | None = None

    @property
    def sampler(self) -> BaseSampler:
        if self._sampler is None:
            self._sampler = self._build(self._study_seed)
        return self._sampler

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        if self._sampler is None:
            self._sampler = self._build(derive_seed(self._study_seed, trial.number))
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: Any, values: Any) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """Pruner resources are training steps (what train() reports); Hyperband defaults to the budget."""
    kwargs = _kwargs(spec.pruner)
    name = spec.pruner["name"]
    if name in ("hyperband", "successive_halving"):
        valid_steps = spec.train.get("valid_steps")
        if valid_steps is not None and not valid_steps.searched:
            kwargs.setdefault("min_resource", valid_steps.value)
    if name == "hyperband":
        max_steps = spec.train.get("max_steps")
        if max_steps is not None and not max_steps.searched:
            kwargs.setdefault("max_resource", max_steps.value)
    return _build(spec, "pruner", name, PRUNERS, kwargs)


# Optuna's annotations (strings under `from __future__ import annotations`) -> what a TOML value must be.
_TOML_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": ()}


def _check_type(spec: StudySpec, label: str, value: Any, annotation: Any) -> None:
    """Samplers and pruners take bad types silently and fail trials later: check the study file's value now."""
    if annotation is inspect.Parameter.empty:
        return
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    names = [part.strip() for part in text.split("|")]
    if any(n not in _TOML_TYPES for n in names):
        raise SpecError(f"{spec.path}: {label} ({annotation}) cannot be set from a study file")
    allowed = tuple(t for n in names for t in _TOML_TYPES[n])
    ok = isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))
    if not ok:
        wanted = " or ".join(n for n in names if n != "None")
        raise SpecError(f"{spec.path}: {label}={value!r} must be {wanted}")


def _kwargs(table: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in table.items() if k != "name"}


def _build(spec: StudySpec, kind: str, name: Any, table: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    if name not in table:
        raise SpecError(f"{spec.path}: {kind}.name={name!r} is not known; valid: {', '.join(table)}")
    cls = table[name]
    parameters = {n: p for n, p in inspect.signature(cls).parameters.items() if n not in ("self", "args", "kwargs")}
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise SpecError(
            f"{spec.path}: {kind}.{unknown[0]} is not an argument of optuna.{kind}s.{cls.__name__}; "
            f"valid: {', '.join(parameters) or 'none'}"
        )
    for key, value in kwargs.items():
        _check_type(spec, f"{kind}.{key}", value, parameters[key].annotation)
    try:
        with warnings.catch_warnings():  # the study file named the option: Optuna's "experimental" note is noise
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(**kwargs)
    except TypeError as err:
        raise SpecError(f"{spec.path}: [{kind}] {name}: {err}") from None
    except ValueError as err:
        raise SpecError(f"{spec.path}: [{kind}] {name}: {err}") from None
