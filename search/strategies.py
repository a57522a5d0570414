"""Samplers and pruners by name, built from the study file's [sampler] and [pruner] tables."""
from __future__ import annotations

import inspect
from typing import Any

import optuna

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
    kwargs = _kwargs(spec.sampler)
    kwargs.setdefault("seed", spec.seed)
    return _build(spec, "sampler", spec.sampler["name"], SAMPLERS, kwargs)


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


def _kwargs(table: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in table.items() if k != "name"}


def _build(spec: StudySpec, kind: str, name: Any, table: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    if name not in table:
        raise SpecError(f"{spec.path}: {kind}.name={name!r} is not known; valid: {', '.join(table)}")
    cls = table[name]
    valid = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise SpecError(
            f"{spec.path}: {kind}.{unknown[0]} is not an argument of optuna.{kind}s.{cls.__name__}; "
            f"valid: {', '.join(valid) or 'none'}"
        )
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise SpecError(f"{spec.path}: [{kind}] {name}: {err}") from None
    except ValueError as err:
        raise SpecError(f"{spec.path}: [{kind}] {name}: {err}") from None
