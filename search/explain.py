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
import itertools
import math
import statistics
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from models import ConfigError, ModelConfig
from search.attrs import best_of, run_config_of
from search.cells import PATH_ATTR, cell_of
from search.config import RunConfig, TrainConfig
from search.runner import INTERRUPTED
from search.spec import StudySpec, choice_key
from search.studyfile import SpecError, load_raw

SAMPLE = Path(__file__).resolve().parent.parent / "studies" / "sample.toml"
WINNER = "winner"
REFERENCE = "reference"
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
    path: bool = False

    @property
    def plan(self) -> str:
        return "path" if self.path else "leave_one_out"

    def rows(self) -> dict[str, RunConfig]:
        """Leave-one-out: the winner first (every row is compared with it), then the winner with each factor put
        back. Path: every row the path could run (the reference first), named by the set of changes it makes, so
        the `variant` choices stay the same in every trial (Optuna's categorical choices cannot grow)."""
        if not self.path:
            return {WINNER: self.winner,
                    **{f.row: _apply(self.winner, f.back, self.head_dim_space) for f in self.factors}}
        rows = {}
        for size in range(len(self.factors) + 1):
            for subset in itertools.combinations(self.factors, size):
                cfg = self.reference
                for f in subset:
                    cfg = _apply(cfg, f.forward, self.head_dim_space)
                rows[self.label([f.name for f in subset])] = self.winner if size == len(self.factors) else cfg
        return rows

    def label(self, changes: list[str]) -> str:
        """A path row: 'reference', '+ a + b' (the factors' own order, whatever order the path took), 'winner'."""
        if not changes:
            return REFERENCE
        if len(changes) == len(self.factors):
            return WINNER
        return " + ".join(["", *(f.name for f in self.factors if f.name in changes)]).strip()

    def path_state(self, trials: list[FrozenTrial]) -> tuple[list[str], list[str], bool]:
        """The changes the greedy path has chosen so far (each, once all its candidates' cells are finished: the
        one whose row has the highest mean over its complete cells), the rows of the step to run now, and whether
        the path has reached the winner."""
        values: dict[str, dict[int, float]] = {}
        open_cells, failed = set(), set()
        for t in trials:
            cell = cell_of(t)
            if cell is None:
                continue
            if t.state == TrialState.COMPLETE:
                values.setdefault(cell[0], {})[cell[1]] = t.value
            elif t.state in (TrialState.RUNNING, TrialState.WAITING):
                open_cells.add(cell)
            elif t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") != INTERRUPTED:
                failed.add(cell)

        def finished(row: str) -> bool:  # each seed complete, or failed on its own and not being retried
            return all(s in values.get(row, {}) or ((row, s) in failed and (row, s) not in open_cells)
                       for s in self.seeds)

        chosen: list[str] = []
        while True:
            left = [f.name for f in self.factors if f.name not in chosen]
            step = [self.label(chosen), *(self.label([*chosen, name]) for name in left)]
            if not left:
                return chosen, [], True
            if not all(finished(row) for row in step):
                return chosen, step, False
            means = {name: statistics.mean(values[row].values()) for name in left
                     if (row := self.label([*chosen, name])) in values}
            if not means:  # every candidate failed: the path stops here
                return chosen, [], True
            chosen.append(max(left, key=lambda name: means.get(name, -math.inf)))  # ties: the first factor

    def identity(self) -> dict[str, Any]:
        return {"explain": {"source": self.source, "trial": self.trial, "reference": self.reference_name,
                            "plan": self.plan, "winner": self.winner.to_dict(),
                            "factors": {f.name: f.back for f in self.factors}},
                "seeds": list(self.seeds)}

    def attr(self) -> dict[str, Any]:
        """The study user attr the report reads: which trial, which reference, each factor's values and row."""
        return {"source": self.source, "trial": self.trial, "reference": self.reference_name, "plan": self.plan,
                "factors": [{"name": f.name, **_shown_pair(f.winner, f.reference),
                             "row": f.row if not self.path else self.label([f.name])} for f in self.factors]}


MAX_PATH_FACTORS = 8  # 2**8 = 256 possible rows: the `variant` choices every path trial stores


def study_name(source: str, trial: int, path: bool = False) -> str:
    return f"{source}-explain-t{trial}" + ("-path" if path else "")


def chosen_trial(study: optuna.Study, which: str, path: Path) -> FrozenTrial:
    """--trial best|N: a complete trial with a stored run config."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if which == "best":
        if not complete:
            raise SpecError(f"{path}: study {study.study_name!r} has no complete trial to explain yet")
        trial = best_of(complete)
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


def reference_values(reference: str) -> dict[str, Any]:
    """--reference sample|FILE.toml: its [model] and [train] values (a list or range: its first)."""
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
    return values


def explain(spec: StudySpec, trial: FrozenTrial, reference: str, seeds: int, train_overrides: dict[str, Any],
            path: bool = False) -> Explanation:
    """The factors of `trial` against the reference, and the winner run as the explain's rows train it."""
    winner = RunConfig.from_dict(run_config_of(trial))
    steps = train_overrides.get("max_steps") or int(trial.user_attrs.get("steps_run") or winner.train.max_steps)
    budget = {"max_steps": steps, "max_minutes": 0.0, "valid_steps": min(winner.train.valid_steps, steps)}
    try:
        train = dataclasses.replace(winner.train, **{**budget, **train_overrides})
    except (TypeError, ConfigError) as err:
        raise SpecError(f"--set: {err}") from None
    winner = dataclasses.replace(winner, train=train)
    win_view, ref_view = _view(spec, winner), _view(spec, winner, reference_values(reference))
    factors, unused = [], winner.model.unused_keys()
    for key, param in [*spec.model.items(), *spec.train.items()]:
        if not param.searched or key == "seed" or key in unused:  # the winner does not use it: nothing to put back
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
    factors = [_with_woken(f, winner, ref_view, unused, head_dim_space) for f in _heads_together(factors)]
    reference_cfg = winner
    for f in factors:
        reference_cfg = _apply(reference_cfg, f.back, head_dim_space)
    result = Explanation(spec.name, trial.number, reference, winner, reference_cfg, tuple(factors),
                         tuple(range(seeds)), head_dim_space, path)
    if path and len(factors) > MAX_PATH_FACTORS:
        raise SpecError(f"--path: {len(factors)} choices differ from the {reference} config; a path takes at most "
                        f"{MAX_PATH_FACTORS} (leave out --path, or give a --reference FILE.toml nearer the winner)")
    result.rows()  # a bad value: one line now, before any training
    return result


def _with_woken(f: Factor, winner: RunConfig, ref_view: dict[str, Any], unused: set[str], head_dim_space: bool
                ) -> Factor:
    """Keys the winner does not use but its row with `f` put back does (putting `encoder` back from 'none'
    wakes nhead, n_layers, dropout) take the reference's values too, not whatever the winner had left there."""
    woken = unused - _apply(winner, f.back, head_dim_space).model.unused_keys()
    extra = {k: ref_view[k] for k in sorted(woken) if k in ref_view and k not in f.back}
    return dataclasses.replace(f, back={**f.back, **extra}) if extra else f


def _heads_together(factors: list[Factor]) -> list[Factor]:
    """d_model and nhead as one choice where putting either back alone gives a d_model nhead does not divide."""
    by_name = {f.name: f for f in factors}
    d, n = by_name.get("d_model"), by_name.get("nhead")
    if d is None or n is None or (d.reference % n.winner == 0 and d.winner % n.reference == 0):
        return factors
    both = Factor("d_model/nhead", f"{d.winner}/{n.winner}", f"{d.reference}/{n.reference}", {**d.back, **n.back},
                  {**d.forward, **n.forward})
    return [both if f is d else f for f in factors if f is not n]


def _view(spec: StudySpec, winner: RunConfig, reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every key of the space as the search saw it (head_dim included): the winner's values; with `reference`,
    each searched key the reference's value (else the space's first choice) and the conditional keys of the
    branch those values activate (the reference's, else the first choice)."""
    model, train = winner.model.to_dict(), dataclasses.asdict(winner.train)
    view = {k: model[k] if k in model else train.get(k) for k in [*spec.model, *spec.train] if k != "head_dim"}
    for k in winner.model.unused_keys() & set(spec.model):  # not stored with the trial: the study file's value
        if not spec.model[k].searched:
            view[k] = spec.model[k].value
    if "head_dim" in spec.model:
        view["head_dim"] = model["d_model"] // model["nhead"]
    for parent in spec.when:
        view.update({k: model.get(k) for branch in spec.when[parent].values() for k in branch})
    if reference is None:
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


def _shown_pair(winner: Any, reference: Any) -> dict[str, str]:
    """Both values as a reader sees them: 3 significant digits, more where those would look equal."""
    if _shown(winner) == _shown(reference):
        return {"winner": repr(winner), "reference": repr(reference)}
    return {"winner": _shown(winner), "reference": _shown(reference)}


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return format(value, ".3g")
    return str(value)


SPEED_KEYS = ("batch_size", "segment_len")  # the train keys a step's cost depends on (all model keys do)


def row_minutes(e: Explanation, trial: FrozenTrial, searched: list[FrozenTrial]) -> dict[str, float] | None:
    """Each row's minutes per cell: its steps at the median steps/s of the search's trials that share the choices
    it changes (putting `encoder` back from 'none' can make a row 10x slower than the winner), else at the
    winner's; None when the winner stored no speed."""
    def rate(t: FrozenTrial) -> float | None:
        r = t.user_attrs.get("steps_per_s")
        return r if isinstance(r, (int, float)) and math.isfinite(r) and r > 0 else None

    def costly(cfg: dict) -> dict:
        return {**{("model", k): v for k, v in cfg["model"].items()},
                **{("train", k): cfg["train"][k] for k in SPEED_KEYS}}

    if rate(trial) is None:
        return None
    winner = costly(e.winner.to_dict())
    known = [(costly(RunConfig.from_dict(c).to_dict()), rate(t)) for t in searched
             if rate(t) and (c := run_config_of(t)) is not None]
    minutes = {}
    for row, cfg in e.rows().items():
        values = costly(cfg.to_dict())
        changed = {k: v for k, v in values.items() if winner[k] != v}
        alike = sorted(r for seen, r in known if changed and all(seen.get(k) == v for k, v in changed.items()))
        speed = alike[len(alike) // 2] if alike else rate(trial)
        minutes[row] = cfg.train.max_steps / speed / 60
    return minutes


def n_cells(e: Explanation) -> int:
    """The cells the explain trains: every row x seed; for the path, the rows it runs (not all it could)."""
    return (1 + len(e.factors) * (len(e.factors) + 1) // 2 if e.path else len(e.rows())) * len(e.seeds)


def describe(e: Explanation, trial: FrozenTrial, name: str, workers: str | None, searched: list[FrozenTrial],
             short: bool = False) -> str:
    """What explain runs: the factors, the variants, the cells and their cost (row_minutes)."""
    steps, cells = e.winner.train.max_steps, n_cells(e)
    what = (f"a greedy path through {len(e.factors)} changes: {cells // len(e.seeds)} rows" if e.path
            else f"{len(e.factors) + 1} variants")
    head = (f"explain trial {trial.number} of {e.source!r} (value {trial.value:.4f}) against the {e.reference_name} "
            f"config: {len(e.factors)} choice(s) differ; {what} x {len(e.seeds)} seeds = {cells} cells "
            f"of {steps} steps, in study {name!r}")
    per_row = row_minutes(e, trial, searched)
    if per_row is None:
        cost = "cost: unknown (the trial stored no steps_per_s)"
    else:
        # the path runs some of the rows it could: at their mean cost
        total = (statistics.mean(per_row.values()) * cells if e.path else sum(per_row.values()) * len(e.seeds))
        from search.status import duration_text
        from search.workers import parse_workers

        try:
            n = parse_workers(workers or "1")
        except ValueError:
            n = 1
        cost = (f"cost: about {total:.1f} trial-minutes in all (each row at the median steps/s of the search's "
                f"trials with the choices it changes, else at the winner's {trial.user_attrs['steps_per_s']:.1f})" +
                (f", about {duration_text(total * 60 / n)} on {n} workers" if n > 1 else ""))
    if short:
        return f"{head}\n{cost}"
    width = max(len(WINNER), *(len(f.name if e.path else f.row) for f in e.factors))
    lines = [head, *([] if e.path else [f"  {WINNER:<{width}}  the trial's configuration, every other row is "
                                        "compared with it"])]
    for f in e.factors:
        also = [k for k in f.back if k != f.name]
        change = (f"adds {f.name}: {_shown(f.reference)} -> {_shown(f.winner)}" if e.path
                  else f"puts back {f.name}: {_shown(f.winner)} -> {_shown(f.reference)}")
        lines.append(f"  {f.name if e.path else f.row:<{width}}  {change}" +
                     (f" (with {', '.join(also)})" if also else ""))
    return "\n".join([*lines, cost])




def run_path(study: optuna.Study, e: Explanation, spec: StudySpec, store, deadline: float | None = None,
             artifact_store=None, log=print):
    """--path: run the path's current step (its candidates' cells), choose, and go on until the winner; each
    process (a worker, another machine) reads the same stored cells, so all choose the same step, and a resumed
    run goes on where the stored cells end."""
    from search.ablation import enqueue_missing_cells, run_ablation
    from search.runner import RunStats, gate

    rows, total, seen = e.rows(), RunStats(), set()
    while True:
        with gate(study):
            chosen, step, done = e.path_state(study.get_trials(deepcopy=False))
            path = [{"name": name, "row": e.label(chosen[:i])} for i, name in enumerate(chosen, 1)]
            if study.user_attrs.get(PATH_ATTR) != path:
                study.set_user_attr(PATH_ATTR, path)
            run = [r for r in study.user_attrs.get("rows", []) if r in rows]
            if any(r not in run for r in step):
                study.set_user_attr("rows", [*run, *(r for r in step if r not in run)])
            if done:
                return total
            if tuple(chosen) in seen:  # its cells ran once in this process and still did not finish
                return total.stop(total.exit_code, f"path: the step after {chosen} did not finish")
            seen.add(tuple(chosen))
            enqueue_missing_cells(study, e.seeds, {r: rows[r] for r in step})
        stats = run_ablation(study, spec, e.seeds, rows, store, deadline, log, artifact_store)
        total.states.update(stats.states)
        total.outcomes += stats.outcomes
        total.exit_code, total.stop_reason, total.last_reason = stats.exit_code, stats.stop_reason, stats.last_reason
        if stats.exit_code or (deadline is not None and time.time() >= deadline):
            return total
