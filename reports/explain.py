"""An explain study's own table and figure (search/explain.py): what the winner owes to each choice.

Leave-one-out: for each choice, the winner with it put back to the reference, and the contribution = winner - that
row, paired by seed (the ablation table's delta with its sign turned: a positive contribution means the choice
helps), with its 95% CI and Holm-adjusted paired p-values, ordered by contribution.
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from reports.document import Section
from reports.figures import METRIC, Figures
from search.cells import EXPLAIN_ATTR

LOO_CAVEAT = ("What these numbers cannot show: each row puts one choice back and keeps all the winner's others, so it "
              "measures what the winner loses without that choice given the rest; two choices that help only "
              "together, or that stand in for each other, can each look small here (interactions).")
CSV_COLUMNS = ["parameter", "winner", "reference", "row", "n_pairs", "mean_without", "std_without", "contribution",
               "ci_low", "ci_high", "p_t_holm", "p_wilcoxon_holm", "too_few_seeds"]


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


def contribution_display(frame: pd.DataFrame, format_p, flag: str) -> pd.DataFrame:
    """The table as read: values, accuracy without the choice, its contribution with CI, Holm p, the flag."""
    def fmt(x, spec=".4f") -> str:
        return "" if pd.isna(x) else format(x, spec)

    return pd.DataFrame([{
        "choice": r.parameter, "winner": r.winner, "reference": r.reference,
        "acc. without": f"{fmt(r.mean_without)} ± {fmt(r.std_without)}" if not pd.isna(r.std_without)
        else fmt(r.mean_without),
        "contribution [95% CI]": f"{fmt(r.contribution, '+.4f')} [{fmt(r.ci_low, '+.4f')}, {fmt(r.ci_high, '+.4f')}]"
        if not pd.isna(r.ci_low) else fmt(r.contribution, "+.4f"),
        "p_t": format_p(r.p_t_holm),
        "p_W": format_p(r.p_wilcoxon_holm) + (flag if r.too_few_seeds else ""),
    } for r in frame.itertuples(index=False)], columns=["choice", "winner", "reference", "acc. without",
                                                         "contribution [95% CI]", "p_t", "p_W"])


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
