"""Trials as a pandas DataFrame, built straight from the stored trials (fast on large studies)."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import optuna_dashboard
import pandas as pd

from reports.ablation import ablation_frame, ablation_markdown, is_ablation

ATTR_COLUMNS = ("n_params", "flops_per_segment", "steps_run", "steps_per_s", "best_step", "seed")


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
    return done.dropna(axis=1, how="all").drop(columns=["state"]).reset_index(drop=True)


def best_config(study: optuna.Study) -> dict | None:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return None
    return max(complete, key=lambda t: t.value).user_attrs.get("run_config")


def markdown(study: optuna.Study, frame: pd.DataFrame, k: int) -> str:
    counts = summary_counts(frame)
    lines = [
        f"# Study `{study.study_name}`",
        "",
        "Trials: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n) if len(frame) else "No trials yet.",
        "",
        f"## Top {k} complete trials (best validation accuracy)",
        "",
        top_trials(frame, k).to_markdown(index=False, floatfmt=".4g") if counts["complete"] else "None complete.",
    ]
    for name, table in marginal_tables(study, frame).items():
        lines += ["", f"## By {name} (complete trials)", "", table.to_markdown(floatfmt=".4g")]
    importances = param_importances(study)
    if importances:
        lines += ["", "## Parameter importances (Optuna's default evaluator)", "",
                  pd.Series(importances, name="importance").rename_axis("parameter").to_frame()
                  .to_markdown(floatfmt=".3f")]
    config = best_config(study)
    if config is not None:
        lines += ["", "## Best trial's run config", "", "```json", json.dumps(config, indent=2), "```"]
    return "\n".join(lines) + "\n"


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
        return dict(optuna.importance.get_param_importances(study, params=sorted(searched)))
    except (RuntimeError, ValueError):  # e.g. a parameter present in too few trials to evaluate
        return {}


FORMATS = ("md", "csv", "tex")


def write_report(study: optuna.Study, out: Path, k: int = 10, formats: tuple[str, ...] = ("md", "csv")
                 ) -> tuple[str, list[Path]]:
    """Write <out>/<study>.{md,csv,tex} (as asked) and set the Markdown as the study's dashboard note;
    return the Markdown and the paths written.

    A search gets its top trials (CSV: all trials); an ablation its statistics table."""
    if is_ablation(study):
        frame = ablation_frame(study)
        text, table = ablation_markdown(study, frame), frame
    else:
        frame = trials_frame(study)
        text, table = markdown(study, frame, k), top_trials(frame, k)
    out.mkdir(parents=True, exist_ok=True)
    optuna_dashboard.save_note(study, text)  # the same table as the study's note in optuna-dashboard
    writers = {
        "md": lambda path: path.write_text(text),
        "csv": lambda path: frame.to_csv(path, index=False),
        # booktabs rules (\toprule/\midrule/\bottomrule) are pandas' default; escape the underscores
        "tex": lambda path: path.write_text(table.to_latex(index=False, escape=True, float_format="%.4f",
                                                           na_rep="", caption=f"Study {study.study_name}")),
    }
    paths = []
    for fmt in formats:
        path = out / f"{study.study_name}.{fmt}"
        writers[fmt](path)
        paths.append(path)
    return text, paths
