"""Ablation studies read back from storage: cells by (variant, seed), the statistics table, Markdown."""
from __future__ import annotations

import math

import optuna
import pandas as pd

from reports import explain
from reports.document import Report, Section
from reports.figures import ablation_figures, learning_curves
from reports.stats import ACCURACY_RANGE, CUT_MARK, DELTA_RANGE, ablation_table
from search.cells import PATH_ATTR, cell_of

FLAG_MARK = "‡"  # on a Wilcoxon p that could never be < 0.05 (too few seeds); † (CUT_MARK) marks a cut CI bound
TOO_FEW_SEEDS = (f"{FLAG_MARK} too few seeds: with 5 or fewer paired seeds whose accuracies differ (equal pairs "
                 "drop out) the Wilcoxon test cannot reach p < 0.05 whatever the data; add seeds before trusting a "
                 "difference.")


def is_ablation(study: optuna.Study) -> bool:
    return study.user_attrs.get("kind") == "ablation"


def ablation_cells(study: optuna.Study) -> pd.DataFrame:
    """One row per ablation trial: trial, variant, seed, state, value (NaN unless complete).

    A (variant, seed) cell with several complete trials (left by older versions after an interruption)
    keeps its first one, by trial number; the others are dropped and listed in attrs["duplicates"]."""
    rows = [
        {"trial": t.number, "variant": cell[0], "seed": cell[1], "state": t.state.name.lower(),
         "value": t.value if t.state == optuna.trial.TrialState.COMPLETE else math.nan,
         "precision": t.user_attrs.get("precision")}
        for t in study.get_trials(deepcopy=False)
        if t.state != optuna.trial.TrialState.WAITING and "variant" in t.params and (cell := cell_of(t))
    ]
    cells = pd.DataFrame(rows, columns=["trial", "variant", "seed", "state", "value", "precision"])
    extra = (cells["state"] == "complete") & cells[cells["state"] == "complete"].duplicated(["variant", "seed"])
    extra = extra.reindex(cells.index, fill_value=False)
    duplicates = cells.loc[extra, "trial"].tolist()
    cells = cells[~extra].reset_index(drop=True)
    cells.attrs["duplicates"] = duplicates
    return cells


def duplicates_note(cells: pd.DataFrame) -> str:
    dropped = cells.attrs.get("duplicates", [])
    if not dropped:
        return ""
    return (f"Note: {len(dropped)} cell(s) had a second complete trial (trial(s) {', '.join(map(str, dropped))}); "
            "each cell uses its first complete trial, the later ones are ignored.")


def precision_note(cells: pd.DataFrame) -> str:
    """What the complete cells computed in (train.precision, as resolved on their machines); a warning when it
    differs between cells, since the variants are then not compared on equal terms."""
    done = cells.loc[cells["state"] == "complete", "precision"].dropna()
    if done.empty:
        return ""
    counts = done.value_counts()
    if len(counts) == 1:
        return f"Every cell computed in {counts.index[0]}."
    return ("Note: the cells computed in different precisions (" + ", ".join(f"{k}: {n}" for k, n in counts.items())
            + "); set train.precision to one value to compare the variants on equal terms.")


def ablation_frame(study: optuna.Study, cells: pd.DataFrame | None = None) -> pd.DataFrame:
    cells = ablation_cells(study) if cells is None else cells
    if cells.empty:
        return cells
    # Rows in the study's own order, so the baseline comes first and the plan's order is kept.
    order = {name: i for i, name in enumerate(study.user_attrs.get("rows", []))}
    cells = cells.sort_values("variant", key=lambda col: col.map(order), kind="stable")
    return ablation_table(cells, study.user_attrs["baseline_row"])


def ablation_report(study: optuna.Study) -> Report:
    """The statistics table, each cell by seed, CI bars, deltas and learning curves named by cell (all cheap,
    none of them drawn by optuna-dashboard itself)."""
    cells = ablation_cells(study)
    table = ablation_frame(study, cells)
    seeds = study.user_attrs.get("seeds", [])
    intro = (f"Each cell's best validation accuracy over its evaluations (its peak, picked on the validation split "
             f"the variants are compared on), over seeds {seeds}; each variant is compared with "
             f"`{study.user_attrs.get('baseline_row')}` paired by seed (paired t-test and Wilcoxon signed-rank, "
             "Holm-corrected across variants; the Wilcoxon p is exact and tie-aware; "
             "d_z = mean difference / sd of differences). 95% confidence intervals are t intervals, cut where they "
             f"would leave the range an accuracy can take ({CUT_MARK} marks a cut bound).")
    intro = (f"This study is an ablation: {len(study.user_attrs.get('rows', []))} fixed configurations (variants) "
             f"trained over {len(seeds)} seeds each, one trial per (variant, seed) cell, compared in the table "
             "below. In optuna-dashboard, \"Best Trial\" is just the single best cell and the importance card "
             "has one factor to rank, `variant` (a cell's seed is a user attr); compare variants here. " + intro)
    title = f"Ablation `{study.study_name}`"
    if table.empty:
        return Report(title, [Section(text=intro), Section(text="No finished cells yet.")], csv=table, tex=table)
    display = _display(table)
    by_seed = _by_seed(cells, table["variant"])
    by_seed.attrs["latex"] = "seeds"  # exported to LaTeX too, after the main table (label tab:STUDY-seeds)
    sections = [
        # floatfmt: tabulate reads "1.00" as a number and reprints it; "#.3g" gives back the display's own text
        Section(text="\n\n".join(filter(None, [intro, precision_note(cells), duplicates_note(cells)])), table=display,
                floatfmt="#.3g",
                note=legend(display, study.user_attrs.get("baseline_row"))),
        Section("Cells by seed: best validation accuracy",
                "Each (variant, seed) cell's best validation accuracy over its evaluations (the trial's value: its "
                "peak, which can be above its accuracy at the last evaluation), picked on the validation split, the "
                "same split the variants are compared on; a pruned or failed cell is named instead.",
                table=by_seed, index=True, floatfmt=".4f"),
    ]
    figures = ablation_figures(cells, table) + learning_curves(study)  # labelled curves: the dashboard's are not
    attr = explain.explanation(study)
    if attr is None:
        return Report(title, sections, figures, csv=table, tex=display)  # LaTeX: the table as read, and by seed
    # an explain: its choices' table first (the CSV and LaTeX too), the variants' table and cells after it
    baseline = study.user_attrs["baseline_row"]
    first = table.loc[table["variant"] == baseline, "mean"]
    first = first.iloc[0] if len(first) else None
    if attr["plan"] == "path":
        frame = explain.path_steps(attr, study.user_attrs.get(PATH_ATTR, []), cells, baseline)
        caveat = explain.PATH_CAVEAT + (" " + TOO_FEW_SEEDS if frame["too_few_seeds"].any() else "")
        top = explain.path_section(attr, frame, first, format_p, FLAG_MARK, caveat)
        figure = explain.waterfall_figure(first, frame)
    else:
        frame = explain.contributions(attr, table)
        caveat = explain.LOO_CAVEAT + (" " + TOO_FEW_SEEDS if frame["too_few_seeds"].any() else "")
        top = explain.explain_section(attr, frame, first, format_p, FLAG_MARK, caveat)
        figure = explain.contribution_figure(frame)
    return Report(f"Why trial {attr['trial']} of `{attr['source']}` wins", [top, *sections], figure + figures,
                  csv=frame, tex=top.table)


def legend(display: pd.DataFrame, baseline: str | None) -> str:
    """What the display table's short headers and marks mean (the marks only where they occur)."""
    text = ("c/p/f: complete/pruned/failed cells; mean ± std and 95% CI over the complete cells; "
            f"Δ: mean difference from `{baseline}` paired by seed, with its 95% CI; p_t, p_W: paired t-test and "
            "exact Wilcoxon signed-rank p-values, Holm-corrected across the variants; "
            "d_z: mean difference / sd of differences.")
    cells = display.astype(str).to_numpy().ravel()
    if any(CUT_MARK in c for c in cells):
        text += f" {CUT_MARK} a CI bound cut to the range the value can take ([0, 1], for Δ [-1, 1])."
    if any(FLAG_MARK in c for c in cells):
        text += " " + TOO_FEW_SEEDS
    return text


def format_p(p: float) -> str:
    """A p-value to 3 significant digits, trailing zeros kept (0.9996 -> '1.00', never '1'); '<0.001' below."""
    if pd.isna(p):
        return ""
    return "<0.001" if p < 0.001 else format(p, "#.3g")


def _by_seed(cells: pd.DataFrame, order: pd.Series) -> pd.DataFrame:
    text = cells["value"].map("{:.4f}".format).where(cells["state"] == "complete", cells["state"])
    table = cells.assign(text=text).pivot_table(index="variant", columns="seed", values="text", aggfunc="last")
    return table.reindex(order).rename(columns=lambda seed: f"seed {seed}").rename_axis(columns=None).fillna("")


def _display(table: pd.DataFrame) -> pd.DataFrame:
    """The table as a reader wants it, one frame for Markdown, HTML and LaTeX: counts, mean +- std, CIs, Holm
    p-values with the too-few-seeds flag as a mark on p_W, short headers explained by `legend`."""

    def fmt(x: float, spec: str = ".4f") -> str:
        return "" if pd.isna(x) else format(x, spec)

    def interval(low: float, high: float, spec: str = ".4f", bounds: tuple[float, float] = ACCURACY_RANGE) -> str:
        if pd.isna(low):
            return ""
        cut = [CUT_MARK if end == limit and low != high else "" for end, limit in zip((low, high), bounds, strict=True)]
        return f"[{fmt(low, spec)}{cut[0]}, {fmt(high, spec)}{cut[1]}]"

    rows = []
    for r in table.itertuples(index=False):
        comparison = not pd.isna(r.delta)
        delta_ci = interval(r.delta_ci_low, r.delta_ci_high, "+.4f", DELTA_RANGE) or f"({r.n_pairs} pair)"
        rows.append({
            "variant": r.variant,
            "c/p/f": f"{r.n_complete}/{r.n_pruned}/{r.n_failed}",
            "mean ± std": f"{fmt(r.mean)} ± {fmt(r.std)}" if not pd.isna(r.std) else fmt(r.mean),
            "95% CI": interval(r.ci_low, r.ci_high),
            "Δ [95% CI]": f"{fmt(r.delta, '+.4f')} {delta_ci}" if comparison else "",
            "p_t": format_p(r.p_t_holm),
            "p_W": format_p(r.p_wilcoxon_holm) + (FLAG_MARK if comparison and r.too_few_seeds else ""),
            "d_z": "0.00" if abs(r.d_z) < 0.01 else fmt(r.d_z, "#.3g"),  # 3 significant digits, not 0.000219
        })
    return pd.DataFrame(rows)
