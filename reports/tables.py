"""A search study's report: trials as a pandas DataFrame straight from storage (fast on large studies), top
trials, marginal tables per choice, importances, best config."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import optuna
import pandas as pd

from reports.document import Report, Section
from reports.figures import IMPORTANCE_NOTE, choice_figures, search_figures
from search.attrs import best_of, run_config_of
from search.origin import COMMAND_ATTR, search_command, study_handle

ATTR_COLUMNS = ("n_params", "flops_per_segment", "steps_run", "steps_per_s", "best_step", "seed", "precision",
                "stopped_at_deadline")  # the step a trial running at the study's deadline stopped at
COUNT_COLUMNS = ("n_params", "flops_per_segment")  # shown as 13.3 M rather than 13251584
MIN_IMPORTANCE_TRIALS = 20  # below this many complete trials an importance is flagged as a rough hint


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value, duration, sampled params, and the recorded metrics."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        row = {"trial": t.number, "state": t.state.name.lower(), "valid_acc": t.value, "duration_s": duration}
        row.update({k: t.user_attrs.get(k) for k in ATTR_COLUMNS})
        row.update(t.params)
        row["fail_reason"] = t.user_attrs.get("fail_reason")
        rows.append(row)
    return pd.DataFrame(rows)


def summary_counts(frame: pd.DataFrame) -> dict[str, int]:
    states = frame["state"].value_counts() if len(frame) else pd.Series(dtype=int)
    return {s: int(states.get(s, 0)) for s in ("complete", "pruned", "fail", "running", "waiting")}


def top_trials(frame: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """The k best complete trials by validation accuracy, best first, without all-empty columns."""
    if frame.empty:
        return frame
    done = frame[frame["state"] == "complete"].sort_values("valid_acc", ascending=False).head(k)
    return done.dropna(axis=1, how="all").drop(columns=["state"], errors="ignore").reset_index(drop=True)


def top_table(frame: pd.DataFrame, k: int, params: list[str]) -> tuple[pd.DataFrame, str]:
    """The top-k table as a reader wants it: trial and accuracy, then the parameters in the order given (most
    important first), then the metrics, counts human-readable. A column with one value in every shown row
    moves to a line saying what they share, returned with the table."""
    top = top_trials(frame, k)
    if top.empty:
        return top, ""
    first = ["trial", "valid_acc", *[p for p in params if p in top]]
    rest = [c for c in top if c not in first and c not in ATTR_COLUMNS and c != "duration_s"]  # other params
    top = top[first + rest + [c for c in (*ATTR_COLUMNS, "duration_s") if c in top]]
    shared = [c for c in top.columns[2:] if len(top) > 1 and top[c].nunique(dropna=False) == 1]
    line = (f"All {len(top)} share: " + ", ".join(f"{c} = {_fmt_value(c, top[c].iloc[0])}" for c in shared)
            if shared else "")
    top = top.drop(columns=shared)
    for column in COUNT_COLUMNS:
        if column in top:
            top[column] = top[column].map(_fmt_count).astype(object)
    return top, line


def _fmt_count(value) -> str:
    return "" if pd.isna(value) else si_count(float(value))


def _fmt_value(column: str, value) -> str:
    if column in COUNT_COLUMNS or pd.isna(value):
        return _fmt_count(value)
    return format(value, ".4g") if isinstance(value, float) else str(value)


def si_count(x: float) -> str:
    """13251584 -> '13.3 M', 1234 -> '1.23 k', 512 -> '512' (three significant digits)."""
    for factor, suffix in ((1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{suffix}"
    return f"{x:.3g}"


def best_config(study: optuna.Study) -> dict | None:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return None
    return run_config_of(best_of(complete))


def search_report(study: optuna.Study, k: int = 10, plots: bool = False) -> Report:
    """Top trials, marginals per choice, importances, best config; Optuna's plots if asked. CSV: every trial."""
    frame = trials_frame(study)
    counts = summary_counts(frame)
    searched = searched_params(study)
    basis = importance_basis(study)
    importances = param_importances(study, basis)
    top, shared = top_table(frame, k, [*importances, *sorted(set(searched) - set(importances))])
    top_title = f"Top {len(top)} of {counts['complete']} complete trials (best validation accuracy)"
    sections = [
        Section(text="Trials: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n)
                if len(frame) else "No trials yet."),
        Section(top_title, table=top, note=shared) if counts["complete"] else
        Section("Top complete trials", "None complete."),
    ]
    starved = budget_starved(study)
    if starved:
        sections.append(Section(text=starved))
    marginals = marginal_tables(study, frame)
    sections += [Section(f"By {name} (complete trials)", table=table, index=True) for name, table in marginals.items()]
    if importances:
        sections.append(Section(f"Parameter importances (Optuna's default evaluator, {basis.title})", floatfmt=".3f",
                                index=True, note=basis.caveat,
                                table=pd.Series(importances, name="importance").rename_axis("parameter").to_frame()))
    config = best_config(study)
    if config is not None:
        sections.append(Section("Best trial's run config", code=json.dumps(config, indent=2)))
    figures = (search_figures(study, frame, searched, importances, list(marginals), basis.title) if plots
               else choice_figures(frame, list(marginals)))
    return Report(f"Study `{study.study_name}`", sections, figures, csv=frame, tex=top)


def budget_starved(study: optuna.Study) -> str:
    """A warning when the best complete trial peaked at its last evaluation with accuracy still rising: its
    budget, not its config, limited it, and longer trials would likely do better; it names which budget (the
    study's deadline, train.max_minutes or train.max_steps) and gives commands that work as printed: a new study
    with twice that budget (a budget is part of a study's identity, so this one cannot resume with another) and a
    final fit of that trial. '' otherwise, and at accuracy 1.0, which cannot rise."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    curves = [sorted(t.intermediate_values.items()) for t in complete]
    peaked = [c for c in curves if len(c) >= 2 and max(v for _, v in c) == c[-1][1]]
    if not complete:
        return ""
    best = best_of(complete)
    curve = sorted(best.intermediate_values.items())
    if len(curve) < 2 or curve[-1][1] <= curve[-2][1] or curve[-1][1] < max(v for _, v in curve) or curve[-1][1] >= 1:
        return ""
    (prev_step, prev), (last_step, last) = curve[-2], curve[-1]
    train = (run_config_of(best) or {}).get("train", {})
    final_fit = f"run-study train {study_handle(study)} --trial {best.number} --set train.max_steps={4 * last_step}"
    timeout = (study.user_attrs.get(COMMAND_ATTR) or {}).get("timeout")
    if "stopped_at_deadline" in best.user_attrs:
        limit, what = "the study's deadline stopped it", "more time"
        new = search_command(study, f"{study.study_name}-longer", timeout=2 * timeout) if timeout else None
    elif train.get("max_minutes") and last_step < train.get("max_steps", last_step):
        minutes = 2 * train["max_minutes"]
        limit, what = f"train.max_minutes={train['max_minutes']:g} sized it to {last_step} steps", \
            f"train.max_minutes={minutes:g}"
        new = search_command(study, f"{study.study_name}-{minutes:g}min", what)
    else:
        limit, what = "", f"train.max_steps={2 * last_step}"
        new = search_command(study, f"{study.study_name}-{2 * last_step}steps", what)
    advice = f"a new study with {what}: {new}" if new else f"a new study (--set study.name=NEW) with {what}"
    return (f"(!) budget-starved: the best trial ({best.number}) peaked at its last evaluation, step {last_step}, "
            f"with validation accuracy still rising ({prev:.4f} at step {prev_step} -> {last:.4f})"
            f"{f'; {limit}' if limit else ''}; {len(peaked)} of {len(complete)} complete trials peaked at their last "
            f"evaluation. Longer trials would likely do better: {advice}; or a final fit of that trial: {final_fit}")


def searched_params(study: optuna.Study) -> list[str]:
    """Parameters that were really sampled (a one-value distribution is a fixed setting, not a search)."""
    return sorted({n for t in study.get_trials(deepcopy=False) for n, d in t.distributions.items() if not d.single()})


def marginal_tables(study: optuna.Study, frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per searched categorical parameter with two or more choices among the complete trials: count, best and
    mean accuracy of the complete trials per choice."""
    done = frame[frame["state"] == "complete"] if len(frame) else frame
    categorical = sorted({
        name for t in study.get_trials(deepcopy=False)
        for name, dist in t.distributions.items()
        if isinstance(dist, optuna.distributions.CategoricalDistribution) and len(dist.choices) > 1
    })
    return {
        name: done.groupby(name)["valid_acc"].agg(count="count", best="max", mean="mean")
        .sort_values("best", ascending=False)
        for name in categorical if name in done and done[name].nunique() > 1  # one value: nothing to compare
    }


@dataclass(frozen=True)
class ImportanceBasis:
    """What importances rest on: the complete trials, and the searched parameters that varied among them."""

    n_complete: int
    varied: list[str]
    unvaried: list[str]  # searched, but one value in every complete trial: nothing to attribute to them
    fixed: tuple[str, ...] = ()  # parameters with a one-value distribution (a choice list of one): not searched

    @property
    def too_few(self) -> bool:
        return self.n_complete < MIN_IMPORTANCE_TRIALS

    @property
    def title(self) -> str:
        return f"from {self.n_complete} complete trials" + (", too few to trust" if self.too_few else "")

    @property
    def caveat(self) -> str:
        parts = []
        if self.too_few:
            parts.append(f"(!) only {self.n_complete} complete trials: importances from so few are a rough hint, "
                         f"not a finding; trust them from about {MIN_IMPORTANCE_TRIALS} complete trials.")
        if self.unvaried:
            parts.append("Not ranked, one value in every complete trial: " + ", ".join(self.unvaried) + ".")
        if self.unvaried or self.fixed:
            parts.append("optuna-dashboard's own importance card ranks every parameter of the trials with its own "
                         "evaluator (PED-ANOVA), so it also ranks "
                         + ", ".join(sorted({*self.unvaried, *self.fixed}))
                         + ", which took one value in every complete trial: a rank there means nothing.")
        return " ".join(parts)


def importance_basis(study: optuna.Study) -> ImportanceBasis:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    searched = sorted({n for t in complete for n, d in t.distributions.items() if not d.single()})
    values = {n: {repr(t.params[n]) for t in complete if n in t.params} for n in searched}
    fixed = sorted({n for t in complete for n, d in t.distributions.items() if d.single()} - set(searched))
    return ImportanceBasis(len(complete), [n for n in searched if len(values[n]) > 1],
                           [n for n in searched if len(values[n]) <= 1], tuple(fixed))


def param_importances(study: optuna.Study, basis: ImportanceBasis | None = None) -> dict[str, float]:
    """Optuna's importances of the searched parameters that varied among the complete trials, most important
    first; empty when too few complete trials to estimate. `basis`: importance_basis(study), if already read."""
    basis = basis or importance_basis(study)
    if basis.n_complete < 3 or not basis.varied:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", IMPORTANCE_NOTE, UserWarning)
            return dict(optuna.importance.get_param_importances(study, params=basis.varied))
    except (RuntimeError, ValueError):  # e.g. a parameter present in too few trials to evaluate
        return {}
