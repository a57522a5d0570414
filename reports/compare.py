"""Several studies side by side: one row per study, the best configurations, ablation variants per study."""
from __future__ import annotations

import optuna
import pandas as pd

from reports.ablation import ablation_frame, is_ablation
from reports.document import Report, Section
from reports.figures import comparison_figures
from reports.tables import ATTR_COLUMNS, summary_counts, trials_frame


def comparison_report(studies: list[optuna.Study], plots: bool = False) -> Report:
    names = _labels(studies)
    frames = {name: trials_frame(s) for name, s in zip(names, studies, strict=True)}
    ablations = {name: ablation_frame(s)
                 for name, s in zip(names, studies, strict=True) if is_ablation(s)}
    overview = pd.DataFrame([_overview_row(name, frames[name], name in ablations) for name in names])
    sections = [Section(text="Validation accuracy of each study's trials, read from storage; "
                             "an ablation's best is its best single cell; its variants are compared below.",
                        table=overview)]
    best = pd.DataFrame({name: _best_params(frames[name]) for name in names if name not in ablations}).T
    if not best.empty:
        sections.append(Section("Best trial's parameters", table=best.rename_axis("study"), index=True))
    if ablations:
        sections.append(Section("Ablation variants (mean ± std over seeds; Δ vs each study's baseline, "
                                "Holm-corrected paired t p-value)", table=_variants_side_by_side(ablations),
                                index=True))
    searches = [s for name, s in zip(names, studies, strict=True) if name not in ablations]
    figures = comparison_figures(searches if plots else [], ablations)
    return Report("Studies " + ", ".join(f"`{n}`" for n in names), sections, figures, csv=overview, tex=overview)


def _labels(studies: list[optuna.Study]) -> list[str]:
    """Study names, made unique when two storages hold studies of the same name."""
    seen: dict[str, int] = {}
    labels = []
    for s in studies:
        seen[s.study_name] = seen.get(s.study_name, 0) + 1
        labels.append(s.study_name if seen[s.study_name] == 1 else f"{s.study_name} ({seen[s.study_name]})")
    return labels


def _overview_row(name: str, frame: pd.DataFrame, ablation: bool) -> dict:
    counts = summary_counts(frame)
    done = frame[frame["state"] == "complete"] if len(frame) else frame
    best = _best_complete(frame)
    finished = frame["duration_s"].dropna() if len(frame) else pd.Series(dtype=float)
    return {
        "study": name, "kind": "ablation" if ablation else "search",
        "complete": counts["complete"], "pruned": counts["pruned"], "failed": counts["fail"],
        "best valid_acc": None if best is None else best["valid_acc"],
        "mean valid_acc": None if ablation or done.empty else done["valid_acc"].mean(),  # no mean across variants
        "best trial": None if best is None else int(best["trial"]),
        "best n_params": None if best is None else best.get("n_params"),
        "trial hours": finished.sum() / 3600,
    }


def _best_complete(frame: pd.DataFrame) -> pd.Series | None:
    done = frame[frame["state"] == "complete"] if len(frame) else frame
    return done.loc[done["valid_acc"].idxmax()] if len(done) else None


def _best_params(frame: pd.DataFrame) -> pd.Series:
    best = _best_complete(frame)
    if best is None:
        return pd.Series(dtype=object)
    not_params = {"trial", "state", "valid_acc", "duration_s", "fail_reason", *ATTR_COLUMNS}
    return best.drop(labels=[c for c in best.index if c in not_params]).dropna()


def _variants_side_by_side(ablations: dict[str, pd.DataFrame]) -> pd.DataFrame:
    def cell(r) -> str:
        text = f"{r.mean:.4f} ± {r.std:.4f}" if pd.notna(r.std) else f"{r.mean:.4f}" if pd.notna(r.mean) else ""
        if pd.notna(r.delta):
            text += f" (Δ {r.delta:+.4f}, p {r.p_t_holm:.2g})" if pd.notna(r.p_t_holm) else f" (Δ {r.delta:+.4f})"
        return text

    columns = {name: pd.Series({r.variant: cell(r) for r in t.itertuples(index=False)}, dtype=object)
               for name, t in ablations.items()}
    order = list(dict.fromkeys(v for t in ablations.values() for v in t.get("variant", [])))
    return pd.DataFrame(columns).reindex(order).rename_axis("variant").fillna("")
