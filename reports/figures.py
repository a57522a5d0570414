"""Plotly figures of a study: Optuna's own plots for searches, error-bar charts for ablations.

Each function returns (id, figure) pairs; the id is stable (a valid HTML id) so saving the figures into
optuna-dashboard again replaces them instead of piling up copies.
"""
from __future__ import annotations

import math
import re
import warnings

import optuna
import optuna.visualization as vis
import pandas as pd
import plotly.colors
import plotly.graph_objects as go

from search.cells import cell_of

Figures = list[tuple[str, go.Figure]]
METRIC = "validation accuracy"
# Optuna's importance evaluator warns per conditional parameter drawn in under 2 trials: not the user's to fix.
IMPORTANCE_NOTE = r"Some regimes for parameter"


def search_figures(study: optuna.Study, frame: pd.DataFrame, searched: list[str], importances: dict,
                   choices: list[str], importance_basis: str = "") -> Figures:
    """History, parallel coordinates, importances, learning curves (Optuna's plots, where the study has the
    data), then accuracy by choice of each searched categorical parameter. importance_basis ("from 5 complete
    trials, too few to trust") goes into the importance chart's title."""
    complete = int((frame["state"] == "complete").sum()) if len(frame) else 0
    figures: Figures = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", IMPORTANCE_NOTE, UserWarning)
        if complete:
            figures.append(("history", vis.plot_optimization_history(study, target_name=METRIC)))
        if complete >= 2 and searched:
            parallel = vis.plot_parallel_coordinate(study, params=searched, target_name=METRIC)
            figures.append(("parallel-coordinates", declutter_axis_labels(parallel)))
        if importances:
            chart = vis.plot_param_importances(study, params=list(importances))
            chart.update_layout(title=f"Hyperparameter importances ({importance_basis})" if importance_basis
                                else chart.layout.title.text)
            figures.append(("importances", chart))
    return figures + learning_curves(study) + choice_figures(frame, choices)


def choice_figures(frame: pd.DataFrame, choices: list[str]) -> Figures:
    """Per categorical parameter: every complete trial's accuracy by choice (a box with all points)."""
    done = frame[frame["state"] == "complete"] if len(frame) else frame
    figures = []
    for name in choices:
        if name not in done or done[name].nunique() < 2:
            continue
        fig = go.Figure(go.Box(x=done[name].astype(str), y=done["valid_acc"], boxpoints="all", pointpos=0,
                               customdata=done["trial"], hovertemplate="trial %{customdata}: %{y:.4f}<extra></extra>"))
        fig.update_layout(title=f"{METRIC} by {name} (complete trials)", xaxis_title=name, yaxis_title=METRIC)
        figures.append((f"by-{_html_id(name)}", fig))
    return figures


def ablation_figures(cells: pd.DataFrame, table: pd.DataFrame) -> Figures:
    """Mean per variant with its 95% CI and every seed's value; delta vs baseline with its paired 95% CI."""
    if table.empty:
        return []
    done = cells[cells["state"] == "complete"]
    bars = go.Figure([
        go.Bar(x=table["variant"], y=table["mean"], name="mean", error_y=_error_bars(table, "mean")),
        go.Scatter(x=done["variant"], y=done["value"], mode="markers", name="seed", customdata=done["seed"],
                   marker={"color": "black", "size": 7},
                   hovertemplate="%{x}, seed %{customdata}: %{y:.4f}<extra></extra>"),
    ])
    bars.update_layout(title=f"{METRIC} per variant: mean, 95% CI, each seed", yaxis_title=METRIC)
    figures = [("ablation-bars", bars)]
    compared = table[table["delta"].notna()]
    if len(compared):
        deltas = go.Figure(go.Scatter(x=compared["delta"], y=compared["variant"], mode="markers",
                                      marker={"size": 10}, error_x=_error_bars(compared, "delta")))
        deltas.add_vline(x=0, line_dash="dash")
        deltas.update_layout(title="difference from the baseline, paired by seed (95% CI)",
                             xaxis_title=f"Δ {METRIC}", yaxis={"autorange": "reversed"})
        figures.append(("ablation-deltas", deltas))
    return figures


def learning_curves(study: optuna.Study) -> Figures:
    """Validation accuracy at each evaluation, one line per trial, named in the legend: "trial 7 (complete)".
    An ablation's lines are named by variant and seed and coloured by variant, as figure
    "ablation-learning-curves": optuna-dashboard's own learning-curve plot names trials by number only, so this
    one is stored in the dashboard too."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    if not trials:
        return []
    cells = {t.number: cell_of(t) for t in trials}
    ablation = all(cells.values())
    if not ablation:
        fig = go.Figure()
        for t in trials:
            if t.state == optuna.trial.TrialState.FAIL:  # as Optuna's own plot: a failed trial's curve is noise
                continue
            steps, values = zip(*sorted(t.intermediate_values.items()), strict=True)
            name = f"trial {t.number} ({t.state.name.lower()})"
            fig.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers", name=name, marker={"maxdisplayed": 10},
                                     hovertemplate=f"{name}<br>step %{{x}}: %{{y:.4f}}<extra></extra>"))
        fig.update_layout(showlegend=True)
    else:
        variants = list(dict.fromkeys(cell[0] for cell in cells.values()))
        palette = plotly.colors.qualitative.Plotly
        fig = go.Figure()
        for t in trials:
            variant, seed = cells[t.number]
            steps, values = zip(*sorted(t.intermediate_values.items()), strict=True)
            fig.add_trace(go.Scatter(
                x=steps, y=values, mode="lines+markers", name=f"{variant}, seed {seed}", legendgroup=str(variant),
                line={"color": palette[variants.index(variant) % len(palette)]},
                hovertemplate=f"{variant}, seed {seed} (trial {t.number}, {t.state.name.lower()})<br>"
                              "step %{x}: %{y:.4f}<extra></extra>"))
    fig.update_layout(title=f"Learning curves: {METRIC} at each evaluation", xaxis_title="step", yaxis_title=METRIC)
    return [("ablation-learning-curves" if ablation else "learning-curves", fig)]


def declutter_axis_labels(fig: go.Figure, min_gap: float = 0.06) -> go.Figure:
    """Optuna's parallel coordinates label each axis with text annotations: its ends and, on a log axis, every
    power of ten, which collide when an end lies near one. Keep powers of ten first, then the ends, dropping
    any label within min_gap (of the axis height) of one already kept."""
    def rank(annotation) -> int:
        try:
            return 0 if math.log10(float(annotation.text)).is_integer() else 1
        except (TypeError, ValueError):  # a category name, or a value <= 0
            return 1

    labels = [a for a in fig.layout.annotations if a.y is not None and a.x is not None]
    kept = []
    for a in sorted(labels, key=rank):
        if all(b.x != a.x or abs(b.y - a.y) >= min_gap for b in kept):
            kept.append(a)
    others = [a for a in fig.layout.annotations if a not in labels]
    fig.layout.annotations = others + sorted(kept, key=lambda a: (a.x, a.y))
    return fig


def comparison_figures(searches: list[optuna.Study], ablations: dict[str, pd.DataFrame]) -> Figures:
    """Several studies on one chart: Optuna's history for searches, grouped CI bars for ablations."""
    figures: Figures = []
    with_trials = [s for s in searches
                   if s.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if with_trials:
        figures.append(("history", vis.plot_optimization_history(with_trials, target_name=METRIC)))
    if ablations:
        bars = go.Figure([go.Bar(x=t["variant"], y=t["mean"], name=name, error_y=_error_bars(t, "mean"))
                          for name, t in ablations.items() if not t.empty])
        bars.update_layout(title=f"{METRIC} per variant and study (mean, 95% CI)", barmode="group",
                           yaxis_title=METRIC)
        figures.append(("ablation-bars", bars))
    return figures


def _error_bars(table: pd.DataFrame, center: str) -> dict:
    """Asymmetric error bars from the table's CI columns (none where the CI is undefined, n < 2)."""
    low, high = ("delta_ci_low", "delta_ci_high") if center == "delta" else ("ci_low", "ci_high")
    up = (table[high] - table[center]).astype(object).where(table[high].notna(), None)
    down = (table[center] - table[low]).astype(object).where(table[low].notna(), None)
    return {"type": "data", "symmetric": False, "array": up.tolist(), "arrayminus": down.tolist()}


def _html_id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]", "-", name)
