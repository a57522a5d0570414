"""An ablation cell's identity, read from a trial. Imports only Optuna, so reports and the dashboard stay light."""
from __future__ import annotations

from typing import Any

from optuna.trial import FrozenTrial

EXPLAIN_ATTR = "explain"  # an explain study's user attr: its trial, reference and choices (search/explain.py)
PATH_ATTR = "path"  # an explain --path study's user attr: the steps chosen so far, [{"name", "row"}, ...]


def cell_of(trial: FrozenTrial) -> tuple[Any, Any] | None:
    """An ablation trial's (variant, seed): the param `variant` (for a queued trial, the one it was enqueued
    with) and the user attr `seed` (a param in studies made before seeds became user attrs)."""
    params = trial.params or trial.system_attrs.get("fixed_params") or {}
    seed = params.get("seed", trial.user_attrs.get("seed"))
    if "variant" not in params or seed is None:
        return None
    return params["variant"], seed


def identity_attrs(trial: FrozenTrial) -> dict[str, Any]:
    """The user attrs a retry of trial must keep: an ablation cell's seed, part of which cell it is."""
    cell = cell_of(trial)
    return {"seed": cell[1]} if cell is not None and "seed" in trial.user_attrs else {}
