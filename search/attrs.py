"""Long dict user attrs (a trial's run config, its library versions) stored as lines that fit a trial's page.

optuna-dashboard 0.21 shows each user attr as one unwrapped line, `key json.dumps(value)`, and the trial page
grows as wide as the longest one: a run config in one attr made it 6,000 px wide. A dict whose line would be
longer than LINE characters is stored as parts, `key 01/13` ... `key 13/13`, each a piece of the dict (nested
dicts keep their section: {"model": {"d_model": 80, ...}}); `dict_attr` puts them back together, reads the
single attr of older studies, and says None while parts are missing (a trial still writing them). Imports
nothing heavy, so reports and the dashboard stay light.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

RUN_CONFIG = "run_config"
VERSIONS = "versions"
LINE = 90  # characters: fits optuna-dashboard's trial page in a window about 1,200 px wide


def split_attr(key: str, value: dict[str, Any], line: int = LINE) -> dict[str, Any]:
    """The user attrs that hold `value` under `key`: {key: value} when its line is short, else its parts."""
    if len(key) + 1 + len(json.dumps(value)) <= line:
        return {key: value}
    if all(isinstance(inner, dict) and inner for inner in value.values()):  # sections: a part never spans two
        items = [((section,), k, v) for section, inner in value.items() for k, v in inner.items()]
    else:
        items = [((), k, v) for k, v in value.items()]
    room = line - len(key) - len(" 00/00 ")
    parts: list[dict[str, Any]] = []
    part_of: tuple[str, ...] | None = None
    for path, k, v in items:
        part = parts[-1] if parts and path == part_of else None
        if part is not None and len(json.dumps(_nest(path, {**_leaf(part, path), k: v}))) > room:
            part = None
        if part is None:
            parts.append(_nest(path, {}))
            part, part_of = parts[-1], path
        _leaf(part, path)[k] = v
    width = len(str(len(parts)))
    return {f"{key} {i:0{width}d}/{len(parts)}": part for i, part in enumerate(parts, 1)}


def dict_attr(attrs: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    """The dict stored by split_attr (or as one attr, as older studies did); None if absent or incomplete."""
    if key in attrs:
        return attrs[key]
    pattern = re.compile(rf"{re.escape(key)} (\d+)/(\d+)")
    parts = {}
    for name, part in attrs.items():
        match = pattern.fullmatch(name)
        if match:
            parts[int(match[1])] = (int(match[2]), part)
    if not parts or {n for n, _ in parts.values()} != {len(parts)} or set(parts) != set(range(1, len(parts) + 1)):
        return None
    merged: dict[str, Any] = {}
    for i in sorted(parts):
        for k, v in parts[i][1].items():
            if isinstance(v, dict) and isinstance(merged.get(k), dict):
                merged[k].update(v)
            else:
                merged[k] = json.loads(json.dumps(v))  # a copy: the caller may change it
    return merged


def set_dict_attr(trial: Any, key: str, value: dict[str, Any]) -> None:
    """Store `value` on an optuna.Trial as split_attr says."""
    for name, part in split_attr(key, value).items():
        trial.set_user_attr(name, part)


def run_config_of(trial: Any) -> dict[str, Any] | None:
    """A trial's run config as a plain dict ({"model": {...}, "train": {...}, "data": {...}}), from either
    layout; None if the trial never started training (or is still storing it)."""
    return dict_attr(trial.user_attrs, RUN_CONFIG)


def _nest(path: tuple[str, ...], inner: dict[str, Any]) -> dict[str, Any]:
    return {path[0]: inner} if path else inner


def _leaf(part: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    return part[path[0]] if path else part


TIE_WINDOW = 3  # evaluations: among trials tied on their best accuracy, the one steadier at the top wins


def rank_key(trial) -> tuple[float, float, int]:
    """How complete trials rank, best last: their value (best validation accuracy), then, among ties (frequent
    near 100% on a small validation split), the mean of their last TIE_WINDOW evaluations (a model that stays at
    the top over one that touched it once), then the earlier trial."""
    curve = [v for _, v in sorted(trial.intermediate_values.items())][-TIE_WINDOW:]
    return (trial.value, sum(curve) / len(curve) if curve else trial.value, -trial.number)


def best_of(trials):
    """The best of complete `trials` by rank_key; None when there is none."""
    return max(trials, key=rank_key, default=None)


def ranked(trials) -> list:
    """Complete `trials` best first, by rank_key."""
    return sorted(trials, key=rank_key, reverse=True)
