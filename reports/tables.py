"""A search study's report: trials as a pandas DataFrame straight from storage (fast on large studies), top
trials, marginal tables per choice, importances, best config."""
from __future__ import annotations

import json
import warnings

import optuna
import pandas as pd

from reports.document import Report, Section
from reports.figures import IMPORTANCE_NOTE, choice_figures, search_figures

ATTR_COLUMNS = ("n_params", "flops_per_segment", "steps_run", "steps_per_s", "best_step", "seed",
                "stopped_at_deadline")  # the step a trial running at the study's deadline stopped at


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


def best_config(study: optuna.Study) -> dict | None:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return None
    return max(complete, key=lambda t: t.value).user_attrs.get("run_config")


def search_report(study: optuna.Study, k: int = 10, plots: bool = False) -> Report:
    """Top trials, marginals per choice, importances, best config; Optuna's plots if asked. CSV: every trial."""
    frame = trials_frame(study)
    counts = summary_counts(frame)
    sections = [
        Section(text="Trials: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n)
                if len(frame) else "No trials yet."),
        Section(f"Top {k} complete trials (best validation accuracy)", table=top_trials(frame, k))
        if counts["complete"] else Section(f"Top {k} complete trials (best validation accuracy)", "None complete."),
    ]
    starved = budget_starved(study)
    if starved:
        sections.append(Section(text=starved))
    marginals = marginal_tables(study, frame)
    sections += [Section(f"By {name} (complete trials)", table=table, index=True) for name, table in marginals.items()]
    importances = param_importances(study)
    if importances:
        sections.append(Section("Parameter importances (Optuna's default evaluator)", floatfmt=".3f", index=True,
                                table=pd.Series(importances, name="importance").rename_axis("parameter").to_frame()))
    config = best_config(study)
    if config is not None:
        sections.append(Section("Best trial's run config", code=json.dumps(config, indent=2)))
    searched = searched_params(study)
    figures = (search_figures(study, frame, searched, importances, list(marginals)) if plots
               else choice_figures(frame, list(marginals)))
    return Report(f"Study `{study.study_name}`", sections, figures, csv=frame, tex=top_trials(frame, k))


def budget_starved(study: optuna.Study) -> str:
    """A warning when the best complete trial peaked at its last evaluation with accuracy still rising: its
    budget, not its config, limited it, and longer trials would likely do better; it names which budget (the
    study's deadline, train.max_minutes or train.max_steps) and what to try. '' otherwise, and at accuracy 1.0,
    which cannot rise."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    curves = [sorted(t.intermediate_values.items()) for t in complete]
    peaked = [c for c in curves if len(c) >= 2 and max(v for _, v in c) == c[-1][1]]
    if not complete:
        return ""
    best = max(complete, key=lambda t: t.value)
    curve = sorted(best.intermediate_values.items())
    if len(curve) < 2 or curve[-1][1] <= curve[-2][1] or curve[-1][1] < max(v for _, v in curve) or curve[-1][1] >= 1:
        return ""
    (prev_step, prev), (last_step, last) = curve[-2], curve[-1]
    train = best.user_attrs.get("run_config", {}).get("train", {})
    final_fit = f"run-study train {study.study_name} --trial {best.number} --set train.max_steps={4 * last_step}"
    if "stopped_at_deadline" in best.user_attrs:
        limit, advice = "the study's deadline stopped it", "give the study more time (--timeout)"
    elif train.get("max_minutes") and last_step < train.get("max_steps", last_step):
        limit = f"train.max_minutes={train['max_minutes']:g} sized it to {last_step} steps"
        advice = f"try train.max_minutes={2 * train['max_minutes']:g}"
    else:
        limit, advice = "", f"try train.max_steps={2 * last_step}"
    return (f"(!) budget-starved: the best trial ({best.number}) peaked at its last evaluation, step {last_step}, "
            f"with validation accuracy still rising ({prev:.4f} at step {prev_step} -> {last:.4f})"
            f"{f'; {limit}' if limit else ''}; {len(peaked)} of {len(complete)} complete trials peaked at their last "
            f"evaluation. Longer trials would likely do better: {advice}, or a final fit: {final_fit}")


def searched_params(study: optuna.Study) -> list[str]:
    """Parameters that were really sampled (a one-value distribution is a fixed setting, not a search)."""
    return sorted({n for t in study.get_trials(deepcopy=False) for n, d in t.distributions.items() if not d.single()})


def marginal_tables(study: optuna.Study, frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per searched categorical parameter: count, best and mean accuracy of the complete trials per choice."""
    done = frame[frame["state"] == "complete"] if len(frame) else frame
    categorical = sorted({
        name for t in study.get_trials(deepcopy=False)
        for name, dist in t.distributions.items()
        if isinstance(dist, optuna.distributions.CategoricalDistribution) and len(dist.choices) > 1
    })
    return {
        name: done.groupby(name)["valid_acc"].agg(count="count", best="max", mean="mean")
        .sort_values("best", ascending=False)
        for name in categorical if name in done and done[name].notna().any()
    }


def param_importances(study: optuna.Study) -> dict[str, float]:
    """Optuna's importances of the searched parameters; empty when too few complete trials to estimate."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    searched = {n for t in complete for n, d in t.distributions.items() if not d.single()}
    if len(complete) < 3 or not searched:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", IMPORTANCE_NOTE, UserWarning)
            return dict(optuna.importance.get_param_importances(study, params=sorted(searched)))
    except (RuntimeError, ValueError):  # e.g. a parameter present in too few trials to evaluate
        return {}
