"""`run-study explain`: what a search's winner owes to each of its choices, from real runs paired by seed.

From the chosen trial's run config (the winner) and a reference (the official sample config's values for the
keys it sets, else the search space's first choice), every parameter the search varied whose winning value
differs from the reference is a *factor*. A factor that is a parent of conditional keys (`loss` with its
`[model.when.loss.*]` keys) goes back together with them: putting `loss` back to `ce` also puts back
`classifier`, `scale` and `margin`.

The rows are the winner, and for each factor the winner with that one factor put back (leave-one-out).

The runs are an ablation (search/ablation.py: one trial per (row, seed) cell, resumable, workers, retries) named
STUDY-explain-tN in the same storage; every row trains the winner's steps (its trial's steps_run, no time budget)
unless `--set train.max_steps=...` says otherwise.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from models import ConfigError, ModelConfig
from search.attrs import run_config_of
from search.config import RunConfig, TrainConfig
from search.spec import StudySpec, choice_key
from search.studyfile import SpecError, load_raw

SAMPLE = Path(__file__).resolve().parent.parent / "studies" / "sample.toml"
WINNER = "winner"
MODEL_KEYS = {f.name for f in fields(ModelConfig)} | {"head_dim"}


@dataclass(frozen=True)
class Factor:
    name: str  # the searched key; a parent brings its conditional keys with it
    winner: Any
    reference: Any
    back: dict[str, Any]  # what putting it back sets: key -> the reference's value
    forward: dict[str, Any]  # what adding it to the reference sets: key -> the winner's value

    @property
    def row(self) -> str:
        return f"{self.name} = {_shown(self.reference)}"


@dataclass(frozen=True)
class Explanation:
    source: str
    trial: int
    reference_name: str
    winner: RunConfig
    reference: RunConfig
    factors: tuple[Factor, ...]
    seeds: tuple[int, ...]
    head_dim_space: bool = False

    def loo_rows(self) -> dict[str, RunConfig]:
        """The winner first (every row is compared with it), then the winner with each factor put back."""
        return {WINNER: self.winner, **{f.row: _apply(self.winner, f.back, self.head_dim_space) for f in self.factors}}

    def identity(self) -> dict[str, Any]:
        return {"explain": {"source": self.source, "trial": self.trial, "reference": self.reference_name,
                            "plan": "leave_one_out", "winner": self.winner.to_dict(),
                            "factors": {f.name: f.back for f in self.factors}},
                "seeds": list(self.seeds)}

    def attr(self) -> dict[str, Any]:
        """The study user attr the report reads: which trial, which reference, each factor's values and row."""
        return {"source": self.source, "trial": self.trial, "reference": self.reference_name,
                "plan": "leave_one_out",
                "factors": [{"name": f.name, "winner": _shown(f.winner), "reference": _shown(f.reference),
                             "row": f.row} for f in self.factors]}


def study_name(source: str, trial: int) -> str:
    return f"{source}-explain-t{trial}"


def chosen_trial(study: optuna.Study, which: str, path: Path) -> FrozenTrial:
    """--trial best|N: a complete trial with a stored run config."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if which == "best":
        if not complete:
            raise SpecError(f"{path}: study {study.study_name!r} has no complete trial to explain yet")
        trial = max(complete, key=lambda t: t.value)
    else:
        if not which.isdigit():
            raise SpecError(f"--trial {which!r}: give 'best' or a trial number")
        numbers = {t.number: t for t in complete}
        if int(which) not in numbers:
            shown = ", ".join(map(str, sorted(numbers)[:20])) or "none"
            raise SpecError(f"--trial {which}: study {study.study_name!r} has no complete trial {which}; "
                            f"complete trials: {shown}")
        trial = numbers[int(which)]
    if run_config_of(trial) is None:
        raise SpecError(f"--trial {trial.number}: the trial stored no run config (made by another tool?)")
    return trial


def reference_values(reference: str) -> tuple[str, dict[str, Any]]:
    """--reference sample|FILE.toml: (its name, its [model] and [train] values; a list or range: its first)."""
    path = SAMPLE if reference == "sample" else Path(reference)
    if reference != "sample" and not path.is_file():
        raise SpecError(f"--reference {reference}: no such file; give 'sample' or a study file (TOML)")
    _, raw = load_raw(path)
    values = {}
    for section in ("model", "train"):
        table = raw.get(section, {})
        for key, value in table.items():
            if key not in ("when", "seed"):  # a list or range: its first candidate, as the space's default
                values[key] = value[0] if isinstance(value, list) else value.get("low") if isinstance(
                    value, dict) else value
    return reference, values


def explain(spec: StudySpec, trial: FrozenTrial, reference: str, seeds: int, train_overrides: dict[str, Any]
            ) -> Explanation:
    """The factors of `trial` against the reference, and the winner run as the explain's rows train it."""
    winner = RunConfig.from_dict(run_config_of(trial))
    steps = train_overrides.get("max_steps") or int(trial.user_attrs.get("steps_run") or winner.train.max_steps)
    budget = {"max_steps": steps, "max_minutes": 0.0, "valid_steps": min(winner.train.valid_steps, steps)}
    try:
        train = dataclasses.replace(winner.train, **{**budget, **train_overrides})
    except (TypeError, ConfigError) as err:
        raise SpecError(f"--set: {err}") from None
    winner = dataclasses.replace(winner, train=train)
    name, ref = reference_values(reference)
    win_view, ref_view = _view(spec, winner, {}), _view(spec, winner, ref)
    factors = []
    for key, param in [*spec.model.items(), *spec.train.items()]:
        if not param.searched or key == "seed":
            continue
        if win_view[key] != ref_view[key]:
            keys = [key, *_branch_keys(spec, key)]
            factors.append(Factor(key, win_view[key], ref_view[key], {k: ref_view[k] for k in keys},
                                  {k: win_view[k] for k in keys}))
        elif key in spec.when:  # same branch: its searched keys are factors of their own
            for child, p in spec.when[key].get(choice_key(win_view[key]), {}).items():
                if p.searched and win_view[child] != ref_view[child]:
                    factors.append(Factor(child, win_view[child], ref_view[child], {child: ref_view[child]},
                                          {child: win_view[child]}))
    head_dim_space = "head_dim" in spec.model
    factors = _heads_together(factors)
    reference_cfg = winner
    for f in factors:
        reference_cfg = _apply(reference_cfg, f.back, head_dim_space)
    result = Explanation(spec.name, trial.number, name, winner, reference_cfg, tuple(factors),
                         tuple(range(seeds)), head_dim_space)
    result.loo_rows()  # a bad value: one line now, before any training
    return result


def _heads_together(factors: list[Factor]) -> list[Factor]:
    """d_model and nhead as one choice where putting either back alone gives a d_model nhead does not divide."""
    by_name = {f.name: f for f in factors}
    d, n = by_name.get("d_model"), by_name.get("nhead")
    if d is None or n is None or (d.reference % n.winner == 0 and d.winner % n.reference == 0):
        return factors
    both = Factor("d_model/nhead", f"{d.winner}/{n.winner}", f"{d.reference}/{n.reference}", {**d.back, **n.back},
                  {**d.forward, **n.forward})
    return [both if f is d else f for f in factors if f is not n]


def _view(spec: StudySpec, winner: RunConfig, reference: dict[str, Any]) -> dict[str, Any]:
    """Every key of the space as the search saw it (head_dim included), the winner's values overridden by the
    reference's; conditional keys of the branch those values activate (the reference's, else the first choice)."""
    model, train = winner.model.to_dict(), dataclasses.asdict(winner.train)
    view = {k: model[k] if k in model else train.get(k) for k in [*spec.model, *spec.train] if k != "head_dim"}
    if "head_dim" in spec.model:
        view["head_dim"] = model["d_model"] // model["nhead"]
    for parent in spec.when:
        view.update({k: model.get(k) for branch in spec.when[parent].values() for k in branch})
    if not reference:
        return view
    for key, param in [*spec.model.items(), *spec.train.items()]:
        if param.searched:
            view[key] = reference.get(key, param.candidates()[0])
    if "head_dim" in spec.model and "head_dim" not in reference and {"d_model", "nhead"} <= set(reference):
        view["head_dim"] = reference["d_model"] // reference["nhead"]
    for parent, branches in spec.when.items():
        active = branches.get(choice_key(view[parent]), {})
        for k in {k for branch in branches.values() for k in branch}:
            view[k] = reference.get(k, active[k].candidates()[0]) if k in active else _base(spec, k)
    return view


def _branch_keys(spec: StudySpec, parent: str) -> list[str]:
    return sorted({k for branch in spec.when.get(parent, {}).values() for k in branch})


def _base(spec: StudySpec, key: str) -> Any:
    """A conditional key's value outside its branches: its [model] value, else ModelConfig's default."""
    if key in spec.model and not spec.model[key].searched:
        return spec.model[key].value
    return next(f.default for f in fields(ModelConfig) if f.name == key)


def _apply(cfg: RunConfig, values: dict[str, Any], head_dim_space: bool) -> RunConfig:
    """cfg with `values` set; in a space that searches head_dim (d_model = nhead * head_dim), head_dim is kept
    (or set) and d_model follows it."""
    model, train = cfg.model.to_dict(), dataclasses.asdict(cfg.train)
    head_dim = values.get("head_dim", model["d_model"] // model["nhead"])
    for key, value in values.items():
        if key != "head_dim":
            (model if key in MODEL_KEYS else train)[key] = value
    if head_dim_space:
        model["d_model"] = head_dim * model["nhead"]
    try:
        return RunConfig(ModelConfig.from_dict(model), TrainConfig(**train), cfg.data)
    except ConfigError as err:
        raise SpecError(f"explain: {err}") from None


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return format(value, ".3g")
    return str(value)


def cost_minutes(trial: FrozenTrial, steps: int) -> float | None:
    """One cell's minutes at the winner's measured speed (variants differ in speed: an estimate)."""
    rate = trial.user_attrs.get("steps_per_s")
    return steps / rate / 60 if rate and math.isfinite(rate) and rate > 0 else None


def describe(e: Explanation, rows: dict[str, RunConfig], trial: FrozenTrial, name: str, workers: str | None,
             short: bool = False) -> str:
    """What explain runs: the factors, the variants, the cells and their cost at the winner's measured speed."""
    steps = e.winner.train.max_steps
    cells = len(rows) * len(e.seeds)
    head = (f"explain trial {trial.number} of {e.source!r} (value {trial.value:.4f}) against the {e.reference_name} "
            f"config: {len(e.factors)} choice(s) differ; {len(rows)} variants x {len(e.seeds)} seeds = {cells} cells "
            f"of {steps} steps, in study {name!r}")
    minutes = cost_minutes(trial, steps)
    if minutes is None:
        cost = "cost: unknown (the trial stored no steps_per_s)"
    else:
        from search.status import duration_text
        from search.workers import parse_workers

        try:
            n = parse_workers(workers or "1")
        except ValueError:
            n = 1
        cost = (f"cost: about {duration_text(minutes * 60)} per cell at the winner's "
                f"{trial.user_attrs['steps_per_s']:.1f} steps/s (variants differ in speed), "
                f"{minutes * cells:.1f} trial-minutes in all" +
                (f", about {duration_text(minutes * cells * 60 / n)} on {n} workers" if n > 1 else ""))
    if short:
        return f"{head}\n{cost}"
    by_row = {f.row: f for f in e.factors}
    width = max(map(len, rows))
    lines = [head]
    for row in rows:
        f = by_row.get(row)
        if f is None:
            what = "the trial's configuration, every other row is compared with it"
        else:
            also = [k for k in f.back if k != f.name]
            what = f"puts back {f.name}: {_shown(f.winner)} -> {_shown(f.reference)}" + (
                f" (with {', '.join(also)})" if also else "")
        lines.append(f"  {row:<{width}}  {what}")
    return "\n".join([*lines, cost])
