"""An explain study's own table and figure (search/explain.py): what the winner owes to each choice.

Leave-one-out: for each choice, the winner with it put back to the reference, and the contribution = winner - that
row, paired by seed (the ablation table's delta with its sign turned: a positive contribution means the choice
helps), with its 95% CI and Holm-adjusted paired p-values, ordered by contribution, and a bar figure. Path
(`--path`): each step of the greedy path against the step before it (the first against the reference), paired by
seed, Holm across the steps, and a waterfall from the reference to where the path ends.
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from reports.document import Section
from reports.figures import METRIC, Figures
from reports.stats import holm, paired_comparison, summarize
from search.cells import EXPLAIN_ATTR

LOO_CAVEAT = ("What these numbers cannot show: each row puts one choice back and keeps all the winner's others, so it "
              "measures what the winner loses without that choice given the rest; two choices that help only "
              "together, or that stand in for each other, can each look small here (interactions).")
PATH_CAVEAT = ("What these numbers cannot show: each step's gain is measured given the changes before it; a "
               "different order could credit the changes differently, and interactions off the path are not "
               "measured.")
CSV_COLUMNS = ["parameter", "winner", "reference", "row", "n_pairs", "mean_without", "std_without", "contribution",
               "ci_low", "ci_high", "p_t_holm", "p_wilcoxon_holm", "too_few_seeds"]
PATH_COLUMNS = ["step", "parameter", "winner", "reference", "row", "n_pairs", "mean_after", "std_after", "gain",
                "ci_low", "ci_high", "p_t", "p_wilcoxon", "too_few_seeds"]


def explanation(study) -> dict | None:
    return study.user_attrs.get(EXPLAIN_ATTR)


def contributions(attr: dict, table: pd.DataFrame) -> pd.DataFrame:
    """One row per choice, from the ablation table (each variant vs the winner, paired, Holm across variants),
    largest contribution first; choices whose row has no complete cell yet are left out."""
    by_row = table.set_index("variant")
    rows = []
    for f in attr["factors"]:
        if f["row"] not in by_row.index or pd.isna(by_row.at[f["row"], "mean"]):
            continue
        r = by_row.loc[f["row"]]
        rows.append({"parameter": f["name"], "winner": f["winner"], "reference": f["reference"], "row": f["row"],
                     "n_pairs": r["n_pairs"], "mean_without": r["mean"], "std_without": r["std"],
                     # 0.0 - x: no "-0.0000" where the choice changed nothing
                     "contribution": 0.0 - r["delta"], "ci_low": 0.0 - r["delta_ci_high"],
                     "ci_high": 0.0 - r["delta_ci_low"],
                     "p_t_holm": r["p_t_holm"], "p_wilcoxon_holm": r["p_wilcoxon_holm"],
                     "too_few_seeds": bool(r["too_few_seeds"])})
    frame = pd.DataFrame(rows, columns=CSV_COLUMNS)
    return frame.sort_values("contribution", ascending=False, kind="stable", na_position="last").reset_index(drop=True)


def contribution_display(frame: pd.DataFrame, format_p, flag: str, path: bool = False) -> pd.DataFrame:
    """The table as read: values, accuracy without the choice (path: after the step), its contribution (path: the
    step's gain) with CI, Holm p, the flag."""
    def fmt(x, spec=".4f") -> str:
        return "" if pd.isna(x) else format(x, spec)

    mean, delta = ("mean_after", "gain") if path else ("mean_without", "contribution")
    std = "std_after" if path else "std_without"
    heads = ("acc. after", "gain [95% CI]") if path else ("acc. without", "contribution [95% CI]")
    rows = []
    for r in frame.to_dict("records"):
        ci = f" [{fmt(r['ci_low'], '+.4f')}, {fmt(r['ci_high'], '+.4f')}]" if not pd.isna(r["ci_low"]) else ""
        rows.append({**({"step": r["step"]} if path else {}), "choice": r["parameter"], "winner": r["winner"],
                     "reference": r["reference"],
                     heads[0]: fmt(r[mean]) + (f" ± {fmt(r[std])}" if not pd.isna(r[std]) else ""),
                     heads[1]: fmt(r[delta], "+.4f") + ci, "p_t": format_p(r["p_t_holm"]),
                     "p_W": format_p(r["p_wilcoxon_holm"]) + (flag if r["too_few_seeds"] else "")})
    return pd.DataFrame(rows, columns=[*(["step"] if path else []), "choice", "winner", "reference", *heads, "p_t",
                                       "p_W"])


def path_steps(attr: dict, chosen: list[dict], cells: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Each step of the greedy path against the step before it (the first against the reference), paired by seed,
    Holm across the steps; steps whose cells are not all complete yet are left out."""
    done = cells[cells["state"] == "complete"]
    value = {row: dict(zip(g["seed"], g["value"], strict=True)) for row, g in done.groupby("variant")}
    factors = {f["name"]: f for f in attr["factors"]}
    rows, before = [], baseline
    for i, step in enumerate(chosen, 1):
        if before not in value or step["row"] not in value:
            break
        s = summarize(list(value[step["row"]].values()))
        c = paired_comparison(value[before], value[step["row"]])
        f = factors[step["name"]]
        rows.append({"step": i, "parameter": f["name"], "winner": f["winner"], "reference": f["reference"],
                     "row": step["row"], "n_pairs": c["n_pairs"], "mean_after": s["mean"], "std_after": s["std"],
                     "gain": c["delta"], "ci_low": c["delta_ci_low"], "ci_high": c["delta_ci_high"],
                     "p_t": c["p_t"], "p_wilcoxon": c["p_wilcoxon"], "too_few_seeds": bool(c["too_few_seeds"])})
        before = step["row"]
    frame = pd.DataFrame(rows, columns=PATH_COLUMNS)
    for col in ("p_t", "p_wilcoxon"):
        frame[f"{col}_holm"] = holm(frame[col].to_numpy(dtype=float)) if len(frame) else []
    return frame.drop(columns=["p_t", "p_wilcoxon"])


def path_section(attr: dict, frame: pd.DataFrame, reference_mean: float | None, format_p, flag: str,
                 caveat: str) -> Section:
    text = (f"Why trial {attr['trial']} of `{attr['source']}` wins, as a greedy path from the {attr['reference']} "
            "config's values: each step adds, of the changes left, the one whose row reached the highest mean "
            "over the seeds; gain = that row − the step before, paired by seed; p-values Holm-adjusted across the "
            "steps.")
    if reference_mean is not None:
        text += f" The reference itself: {reference_mean:.4f} mean validation accuracy over the seeds."
    return Section("The path from the reference to the winner", text,
                   table=contribution_display(frame, format_p, flag, path=True), floatfmt="#.3g", note=caveat)


def waterfall_figure(reference_mean: float | None, frame: pd.DataFrame) -> Figures:
    """The path as a waterfall: the reference's mean, each step's paired gain, and where the path ends."""
    if frame.empty or reference_mean is None:
        return []
    end = reference_mean + frame["gain"].sum()
    fig = go.Figure(go.Waterfall(x=["reference", *(f"+ {p}" for p in frame["parameter"]), "end"],
                                 measure=["absolute", *["relative"] * len(frame), "total"],
                                 y=[reference_mean, *frame["gain"], 0.0],
                                 text=[f"{reference_mean:.4f}", *(f"{g:+.4f}" for g in frame["gain"]), f"{end:.4f}"]))
    fig.update_layout(title="greedy path from the reference to the winner (mean gain of each step over seeds)",
                      yaxis_title=METRIC)
    return [("explain-path", fig)]


def explain_section(attr: dict, frame: pd.DataFrame, winner_mean: float | None, format_p, flag: str,
                    caveat: str) -> Section:
    source = f"trial {attr['trial']} of `{attr['source']}`"
    text = (f"Why {source} wins: each row is the winner with one choice put back to the {attr['reference']} "
            f"config's value (a parent key with its conditional keys), trained over the same seeds; contribution "
            f"= winner − that row, paired by seed, so a positive contribution means the choice helps. Ordered by "
            f"contribution; p-values Holm-adjusted across the choices.")
    if winner_mean is not None:
        text += f" The winner itself: {winner_mean:.4f} mean validation accuracy over the seeds."
    return Section("What the winner owes to each choice", text, table=contribution_display(frame, format_p, flag),
                   floatfmt="#.3g", note=caveat)  # "#.3g": tabulate would reprint a p of "1.00" as "1"


def contribution_figure(frame: pd.DataFrame) -> Figures:
    """Horizontal bars: each choice's contribution with its paired 95% CI, largest on top."""
    if frame.empty:
        return []
    up = (frame["ci_high"] - frame["contribution"]).astype(object).where(frame["ci_high"].notna(), None)
    down = (frame["contribution"] - frame["ci_low"]).astype(object).where(frame["ci_low"].notna(), None)
    labels = [f"{r.parameter}: {r.winner} (vs {r.reference})" for r in frame.itertuples(index=False)]
    fig = go.Figure(go.Bar(x=frame["contribution"], y=labels, orientation="h",
                           error_x={"type": "data", "symmetric": False, "array": up.tolist(),
                                    "arrayminus": down.tolist()}))
    fig.add_vline(x=0, line_dash="dash")
    fig.update_layout(title="what the winner owes to each choice (paired by seed, 95% CI)",
                      xaxis_title=f"Δ {METRIC}: winner − winner with the choice put back",
                      yaxis={"autorange": "reversed"}, height=max(260, 60 + 40 * len(frame)))
    return [("explain-contributions", fig)]
