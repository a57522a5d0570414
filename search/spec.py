"""Study files (studies/NAME.toml): parse, apply --set overrides, validate, and expose the search space.

Every key under [model] and [train] is either fixed (a plain value) or searched:
a list is a categorical choice, a table {low, high[, log][, step]} a numeric range.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import optuna

from models import ConfigError, ModelConfig
from models.config import known_keys
from search.config import DataConfig, RunConfig, TrainConfig
from search.studyfile import SECTIONS, SpecError, beside, default_storage_url, load_raw, storage_in_file

STUDY_KEYS = ("name", "seed", "n_trials", "timeout", "workers", "gpus", "per_gpu", "storage", "artifacts",
              "heartbeat_interval", "grace_period", "max_failures_in_row", "storage_outage_s", "enqueue")
DATA_KEYS = ("path", "synthetic", *(f.name for f in fields(DataConfig)))
RANGE_KEYS = {"low", "high", "log", "step"}
VIRTUAL_MODEL_KEYS = ("head_dim",)  # searched instead of d_model: d_model = nhead * head_dim


MAX_LISTED_VALUES = 4096  # an int range up to this long is validated value by value


@dataclass(frozen=True)
class Param:
    """One [model]/[train] key: fixed, a categorical choice, or an int/float range."""

    name: str
    value: Any = None
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @property
    def searched(self) -> bool:
        return bool(self.choices) or self.low is not None

    @property
    def is_int_range(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int) and not isinstance(self.step, float)

    def candidates(self) -> list[Any]:
        """The values to validate: every choice, every value of an int range (rules such as "odd" or "divides"
        can fail inside one), both ends of a float range (or of an int range too long to list), or the value."""
        if self.choices:
            return list(self.choices)
        if self.low is not None:
            values = self.range_values()
            return values if 0 < len(values) <= MAX_LISTED_VALUES else [self.low, self.high]
        return [self.value]

    def range_values(self) -> list[int]:
        """Every value an int range can produce (log ranges too: Optuna samples any integer in them)."""
        return list(range(int(self.low), int(self.high) + 1, int(self.step or 1))) if self.is_int_range else []

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.low is None:
            return self.value
        if self.is_int_range:
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


@dataclass(frozen=True)
class StudySpec:
    path: Path
    name: str
    seed: int = 0
    n_trials: int | None = None
    timeout: float | None = None
    workers: str | None = None  # local worker processes: a positive integer or "auto" (--workers wins)
    gpus: str | None = None  # "auto" (every GPU; the default), "none" or indices "0,1" (--gpus wins)
    per_gpu: int | str | None = None  # workers sharing each GPU, or "auto" (measured) (--per-gpu wins; default 1)
    storage: str | None = None
    artifacts: str | None = None  # checkpoints: a folder, s3:// or gs:// (default: beside the SQLite file)
    heartbeat_interval: int = 30
    grace_period: int = 120
    max_failures_in_row: int = 5  # a run stops when this many of its trials in a row failed on their own
    storage_outage_s: float = 600  # a worker waits this long for its database, then stops (exit code 4)
    data_path: Path | None = None
    synthetic: dict[str, Any] | None = None
    data: DataConfig = field(default_factory=DataConfig)
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    model: dict[str, Param] = field(default_factory=dict)
    train: dict[str, Param] = field(default_factory=dict)
    is_ablation: bool = False  # has an [ablation] table: run with `ablate`, not `search`
    # [model.when.PARENT.CHOICE]: keys sampled only in trials where model.PARENT took CHOICE.
    when: dict[str, dict[str, dict[str, Param]]] = field(default_factory=dict)
    # study.enqueue: points (Optuna param name -> value) the study starts with, before the sampler's own; keys not
    # given are sampled. Not part of the identity: like the sampler they steer which trials run, not what a trial is.
    enqueue: tuple[dict[str, Any], ...] = ()

    @property
    def storage_url(self) -> str:
        """[study] storage, else sqlite:///NAME.db beside the study file."""
        return self.storage or default_storage_url(self.path, self.name)

    def run_config(self, trial: optuna.Trial) -> RunConfig:
        """Sample (or fix) every [model]/[train] value for one trial; conditional keys only when active."""
        model = {name: p.suggest(trial) for name, p in self.model.items()}
        for parent, branches in self.when.items():
            for name, p in branches.get(choice_key(model[parent]), {}).items():
                model[name] = p.suggest(trial)
        train = {name: p.suggest(trial) for name, p in self.train.items()}
        train.setdefault("seed", self.seed + first_attempt(trial))
        return _build_run_config(model, train, self.data)

    def default_run_config(self) -> RunConfig:
        """The space's first point: first choice of every list, low end of every range (for benches)."""
        model = _with_branches(self, {k: p.candidates()[0] for k, p in self.model.items()})
        train = {k: p.candidates()[0] for k, p in self.train.items()}
        return _build_run_config(model, train, self.data)

    def identity(self) -> dict[str, Any]:
        """What must not change when a study is resumed: the space, the budget and the split.
        (Sampler, pruner and seed may change: they steer new trials without making old ones incomparable.)"""
        return {
            "model": {k: _param_dict(p) for k, p in sorted(self.model.items())},
            "when": {parent: {choice: {k: _param_dict(p) for k, p in sorted(params.items())}
                              for choice, params in sorted(branches.items())}
                     for parent, branches in sorted(self.when.items())},
            "train": {k: _param_dict(p) for k, p in sorted(self.train.items())},
            "data": {f.name: getattr(self.data, f.name) for f in fields(DataConfig)},
        }


def first_attempt(trial: optuna.Trial) -> int:
    """The number of the trial a retry repeats (Optuna's "failed_trial"; the same for our retries), so that
    a retry trains with the same seed and can continue the dead trial's checkpoint; else its own number."""
    storage = getattr(trial, "storage", None)  # FixedTrial has none
    if storage is None:
        return trial.number
    return storage.get_trial_system_attrs(trial._trial_id).get("failed_trial", trial.number)


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StudySpec:
    """Read, override and validate a study file; every problem is a one-line SpecError naming the file."""
    return parse_spec(*load_raw(path, overrides))


def parse_spec(path: Path, raw: dict[str, Any]) -> StudySpec:
    try:
        return _parse(path, raw)
    except (SpecError, ConfigError) as err:
        raise SpecError(f"{path}: {err}") from None


def _parse(path: Path, raw: dict[str, Any]) -> StudySpec:
    _only(raw, SECTIONS, "section ")
    study, data = _table(raw, "study"), _table(raw, "data")
    _only(study, STUDY_KEYS, "key study.")
    _only(data, DATA_KEYS, "key data.")
    name = study.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        raise SpecError(f"study.name={name!r} must be a non-empty string")
    if any(c in name for c in "/\\\0"):  # it names files too: NAME.db, NAME.artifacts, NAME.results
        raise SpecError(f"study.name={name!r} must not contain '/' or '\\' (it also names the study's files, "
                        "e.g. NAME.db); use letters, digits, '-', '_' or '.'")
    spec = StudySpec(
        path=path,
        name=name,
        seed=_typed(study, "study.seed", "seed", int, 0),
        n_trials=_positive(study, "n_trials", int),
        timeout=_positive(study, "timeout", (int, float)),
        workers=_workers(study.get("workers")),
        gpus=_gpus(study.get("gpus")),
        per_gpu=study.get("per_gpu") if study.get("per_gpu") == "auto" else _positive(study, "per_gpu", int),
        storage=_in_file(path, _typed(study, "study.storage", "storage", str, None), storage_in_file),
        artifacts=_in_file(path, _typed(study, "study.artifacts", "artifacts", str, None),
                           lambda p, v: v if "://" in v else str(beside(p, v))),
        heartbeat_interval=_positive(study, "heartbeat_interval", int) or 30,
        grace_period=_positive(study, "grace_period", int) or 120,
        max_failures_in_row=_positive(study, "max_failures_in_row", int) or 5,
        storage_outage_s=_positive(study, "storage_outage_s", (int, float)) or 600,
        data_path=beside(path, data["path"]) if isinstance(data.get("path"), str) else None,
        synthetic=_typed(data, "data.synthetic", "synthetic", dict, None),
        data=DataConfig(**{k: v for k, v in data.items() if k not in ("path", "synthetic")}),
        sampler=_strategy(raw, "sampler", "tpe"),
        pruner=_strategy(raw, "pruner", "median"),
        model=_params({k: v for k, v in _table(raw, "model").items() if k != "when"}),
        when=_conditions(_table(raw, "model")),
        is_ablation="ablation" in raw,
        train=_params(_table(raw, "train")),
    )
    if "path" in data and spec.data_path is None:
        raise SpecError(f"data.path={data['path']!r} must be a string (a HW4 folder)")
    _check_heads(spec.model)
    _check_conditions(spec)
    spec = replace(spec, enqueue=_enqueue(spec, study.get("enqueue", [])))
    _probe(spec)
    return spec


def _enqueue(spec: StudySpec, points: Any) -> tuple[dict[str, Any], ...]:
    """study.enqueue = [{key = value, ...}, ...]: each key a searched [model]/[train] key (or a [model.when] key of
    the branch the point picks), each value one the space can take; -> Optuna params for enqueue_trial."""
    if not isinstance(points, list) or not all(isinstance(p, dict) and p for p in points):
        raise SpecError(f"study.enqueue={points!r} must be a list of tables, e.g. [{{ encoder = \"none\" }}]")
    out = []
    for i, point in enumerate(points):
        params = {}
        for key, value in point.items():
            label = f"study.enqueue[{i}].{key}"
            param = spec.model.get(key) or spec.train.get(key)
            if param is None or not param.searched:
                param = next((branch[key] for parent, branches in spec.when.items() if parent in point
                              for choice, branch in branches.items()
                              if choice == choice_key(point[parent]) and key in branch), None)
            searched = [k for k, p in (*spec.model.items(), *spec.train.items()) if p.searched]
            if param is None or not param.searched:
                raise SpecError(f"{label}: not a searched key of this study (searched: {', '.join(searched)}; a "
                                "[model.when] key needs its parent's choice in the same point)")
            if not _in_space(param, value):
                valid = (", ".join(map(repr, param.choices)) if param.choices else f"{param.low} to {param.high}")
                raise SpecError(f"{label}={value!r} is outside the space; valid: {valid}")
            params[param.name] = value
        out.append(params)
    return tuple(out)


def _in_space(param: Param, value: Any) -> bool:
    if param.choices:
        return value in param.choices
    return isinstance(value, (int, float)) and not isinstance(value, bool) and param.low <= value <= param.high


def _in_file(path: Path, value: str | None, resolve) -> str | None:
    """A location written in the study file, made relative to the study file's folder (see search.studyfile)."""
    return None if value is None else resolve(path, value)


def _table(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise SpecError(f"[{key}] must be a table, got {value!r}")
    return value


def _only(table: dict[str, Any], valid: tuple[str, ...], what: str) -> None:
    for key in table:
        if key not in valid:
            raise SpecError(f"unknown {what}{key}; valid: {', '.join(valid)}")


def _typed(table: dict[str, Any], label: str, key: str, kind: Any, default: Any) -> Any:
    value = table.get(key, default)
    if value is not default and (not isinstance(value, kind) or isinstance(value, bool)):
        raise SpecError(f"{label}={value!r} has the wrong type; expected {getattr(kind, '__name__', kind)}")
    return value


def _positive(table: dict[str, Any], key: str, kind: Any) -> Any:
    value = table.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool) or value <= 0):
        raise SpecError(f"study.{key}={value!r} must be a positive number")
    return value


def _workers(value: Any) -> str | None:
    if value is None or value == "auto" or isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return None if value is None else str(value)
    raise SpecError(f"study.workers={value!r} must be a positive integer or \"auto\" (one per usable core)")


def _gpus(value: Any) -> str | None:
    """study.gpus: "auto", "none", "0,1" or a list of indices [0, 1]; checked against the machine when used."""
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                 for v in value):
        return ",".join(map(str, value))
    if value is None or isinstance(value, str) and value.strip():
        return value
    raise SpecError(f"study.gpus={value!r} must be \"auto\", \"none\" or GPU indices such as [0, 1]")


def _strategy(raw: dict[str, Any], section: str, default: str) -> dict[str, Any]:
    table = dict(_table(raw, section))
    table.setdefault("name", default)
    return table


def _params(table: dict[str, Any]) -> dict[str, Param]:
    return {name: _param(name, value) for name, value in table.items()}


def _param(name: str, value: Any) -> Param:
    if isinstance(value, list):
        if not value or len(set(map(repr, value))) != len(value):
            raise SpecError(f"{name}={value!r}: a choice list must be non-empty without repeats")
        if not all(isinstance(v, (str, int, float, bool)) for v in value):
            raise SpecError(f"{name}={value!r}: choices must be strings, numbers or booleans")
        return Param(name, choices=tuple(value))
    if isinstance(value, dict):
        extra = set(value) - RANGE_KEYS
        if extra or not {"low", "high"} <= set(value):
            raise SpecError(f"{name}={value!r}: a range is a table with low, high and optional log, step")
        low, high = value["low"], value["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
            raise SpecError(f"{name}={value!r}: low and high must be numbers with low <= high")
        if value.get("log") and value.get("step"):
            raise SpecError(f"{name}={value!r}: a range cannot have both log and step")
        return Param(name, low=low, high=high, log=bool(value.get("log", False)), step=value.get("step"))
    return Param(name, value=value)


def choice_key(value: Any) -> str:
    """How a choice is spelled as a TOML table key: strings as they are, other values as TOML/JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _conditions(model: dict[str, Any]) -> dict[str, dict[str, dict[str, Param]]]:
    """[model.when.PARENT.CHOICE] tables -> {parent: {choice: {key: Param}}}.

    A key defined differently under several branches gets a qualified Optuna name
    (e.g. "margin@loss=aam_softmax"), since one name must keep one distribution."""
    when = model.get("when", {})
    if not isinstance(when, dict) or not all(
        isinstance(b, dict) and all(isinstance(t, dict) for t in b.values()) for b in when.values()
    ):
        raise SpecError("model.when must hold tables [model.when.PARENT.CHOICE], e.g. [model.when.loss.am_softmax]")
    definitions: dict[str, set[str]] = {}
    for branches in when.values():
        for table in branches.values():
            for key, value in table.items():
                definitions.setdefault(key, set()).add(repr(value))
    parsed: dict[str, dict[str, dict[str, Param]]] = {}
    for parent, branches in when.items():
        for choice, table in branches.items():
            params = parsed.setdefault(parent, {}).setdefault(choice, {})
            for key, value in table.items():
                name = key if len(definitions[key]) == 1 else f"{key}@{parent}={choice}"
                params[key] = _param(name, value)
    return parsed


def _check_conditions(spec: StudySpec) -> None:
    for parent, branches in spec.when.items():
        if parent not in spec.model:
            raise SpecError(f"model.when.{parent}: model.{parent} must be set in [model] (a value or a choice list)")
        choices = [choice_key(v) for v in spec.model[parent].candidates()]
        for choice, params in branches.items():
            if choice not in choices:
                raise SpecError(
                    f"model.when.{parent}.{choice}: {choice!r} is not a choice of model.{parent}; "
                    f"choices: {', '.join(choices)}"
                )
            for key in params:
                if key in ("d_model", "nhead", "head_dim", "when") or key in spec.when:
                    raise SpecError(f"model.when.{parent}.{choice}.{key}: {key} cannot be conditional")
                if key in spec.model and spec.model[key].searched:
                    raise SpecError(
                        f"model.when.{parent}.{choice}.{key}: model.{key} is already searched in [model]; "
                        "a conditional key may only override a fixed value"
                    )


def _check_heads(model: dict[str, Param]) -> None:
    """Every sampled (d_model, nhead) must be valid, since Optuna choices cannot depend on each other."""
    if "head_dim" in model:
        if "d_model" in model:
            raise SpecError("give model.d_model or model.head_dim (d_model = nhead * head_dim), not both")
        return
    if not any(p is not None and p.searched for p in (model.get("d_model"), model.get("nhead"))):
        return  # both fixed: ModelConfig's own check names the valid nhead values
    d_values = _values(model.get("d_model"), ModelConfig.d_model)
    n_values = _values(model.get("nhead"), ModelConfig.nhead)
    for d_model, nhead in itertools.product(d_values, n_values):
        if d_model % nhead:
            where = " (a value its range can produce)" if model.get("d_model") and model["d_model"].low else ""
            raise SpecError(
                f"model.nhead={nhead} does not divide model.d_model={d_model}{where}, and both can be sampled "
                "together; choose values that always divide, or search model.head_dim and model.nhead "
                "(d_model = nhead * head_dim)"
            )


def _values(param: Param | None, default: int) -> list[Any]:
    """Every value param can take: all of an int range however long (a modulo check is cheap)."""
    if param is None:
        return [default]
    return param.range_values() or param.candidates()


def _probe(spec: StudySpec) -> None:
    """Build a RunConfig for every candidate value of every parameter, so a bad choice fails now."""
    model = {k: p.candidates()[0] for k, p in spec.model.items()}
    train = {k: p.candidates()[0] for k, p in spec.train.items()}
    for name, param in spec.model.items():
        for value in param.candidates():
            _build_run_config(_with_branches(spec, {**model, name: value}), train, spec.data)
    for name, param in spec.train.items():
        for value in param.candidates():
            _build_run_config(_with_branches(spec, model), {**train, name: value}, spec.data)
    for parent, branches in spec.when.items():
        for choice, params in branches.items():
            value = next(v for v in spec.model[parent].candidates() if choice_key(v) == choice)
            active = _with_branches(spec, {**model, parent: value})
            for name, param in params.items():
                for candidate in param.candidates():
                    _build_run_config({**active, name: candidate}, train, spec.data)


def _with_branches(spec: StudySpec, model: dict[str, Any]) -> dict[str, Any]:
    """model values plus the first candidate of every conditional key that these values activate."""
    active = dict(model)
    for parent, branches in spec.when.items():
        active.update({k: p.candidates()[0] for k, p in branches.get(choice_key(model[parent]), {}).items()})
    return active


def _build_run_config(model: dict[str, Any], train: dict[str, Any], data: DataConfig) -> RunConfig:
    model = dict(model)
    if "head_dim" in model:
        model["d_model"] = model.pop("head_dim") * model.get("nhead", ModelConfig.nhead)
    train_config = TrainConfig(**known_keys(TrainConfig, train, "train"))
    return RunConfig(model=ModelConfig.from_dict(model), train=train_config, data=data)


def _param_dict(p: Param) -> dict[str, Any]:
    if p.choices:
        return {"choices": list(p.choices)}
    if p.low is not None:
        return {"low": p.low, "high": p.high, "log": p.log, "step": p.step}
    return {"value": p.value}
