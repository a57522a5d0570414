"""Several studies side by side: one row per study, the best configurations, ablation variants per study."""
from __future__ import annotations

import json

import optuna
import pandas as pd

from reports.ablation import ablation_frame, is_ablation
from reports.document import Report, Section
from reports.figures import comparison_figures
from reports.tables import ATTR_COLUMNS, si_count, summary_counts, trials_frame
from search.attrs import best_of, run_config_of


def comparison_report(studies: list[optuna.Study], plots: bool = False) -> Report:
    names = _labels(studies)
    frames = {name: trials_frame(s) for name, s in zip(names, studies, strict=True)}
    ablations = {name: ablation_frame(s)
                 for name, s in zip(names, studies, strict=True) if is_ablation(s)}
    overview = pd.DataFrame([_overview_row(name, frames[name], name in ablations) for name in names])
    counts = overview["best_n_params"].map(lambda n: None if pd.isna(n) else si_count(float(n)))
    shown = overview.assign(best_n_params=counts.astype(object))  # 11.2 k, as every report reads a count
    sections = [Section(text="Validation accuracy of each study's trials, read from storage; "
                             "an ablation's best is its best single cell; its variants are compared below.",
                        table=shown)]
    differ = differing_settings(studies, names)
    if len(studies) > 1:
        sections.append(Section("Settings that differ", table=differ, index=True) if len(differ) else
                        Section("Settings that differ", "None: the studies were made from the same settings "
                                                        "(study file and --set values) and data."))
    best = pd.DataFrame({name: _best_params(frames[name]) for name in names if name not in ablations}).T
    if not best.empty:
        sections.append(Section("Best trial's parameters", table=best.rename_axis("study"), index=True))
    if ablations:
        sections.append(Section("Ablation variants (mean ± std over seeds; Δ vs each study's baseline, "
                                "Holm-corrected paired t p-value)", table=_variants_side_by_side(ablations),
                                index=True))
    searches = [s for name, s in zip(names, studies, strict=True) if name not in ablations]
    figures = comparison_figures(searches if plots else [], ablations)
    return Report("Studies " + ", ".join(f"`{n}`" for n in names), sections, figures, csv=overview, tex=shown)


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
        "best_valid_acc": None if best is None else best["valid_acc"],
        "mean_valid_acc": None if ablation or done.empty else done["valid_acc"].mean(),  # no mean across variants
        "best_trial": None if best is None else int(best["trial"]),
        "best_n_params": None if best is None else best.get("n_params"),
        "trial_hours": finished.sum() / 3600,
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


def differing_settings(studies: list[optuna.Study], names: list[str]) -> pd.DataFrame:
    """One row per setting whose value is not the same in every study, one column per study: what each study
    was made from (its stored spec: the study file with its --set values; an ablation's variants), else its best
    complete trial's run config, and the data it ran on. Values read as in a study file: 250, [32, 64],
    0.0003 to 0.005 (log)."""
    settings = [_settings(s) for s in studies]
    keys = list(dict.fromkeys(k for flat in settings for k in flat))
    rows = {k: [flat.get(k, "(not set)") for flat in settings] for k in keys}
    differ = {k: values for k, values in rows.items() if len(set(values)) > 1}
    return pd.DataFrame.from_dict(differ, orient="index", columns=names).rename_axis("setting")


def _settings(study: optuna.Study) -> dict[str, str]:
    """A study's settings as flat dotted keys: the best complete trial's run config (every key, defaults
    included), overlaid by the stored spec (what the study file asked for, ranges and choices as written)."""
    flat: dict[str, str] = {}
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    config = run_config_of(best_of(complete)) if complete else None
    for section, values in (config or {}).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = _setting(value)
    spec = study.user_attrs.get("spec") or {}
    if "ablation" in spec:  # an ablation: its variants' configs, a key shared by every variant as one row
        variants = spec["ablation"]
        for key in dict.fromkeys(f"{s}.{k}" for cfg in variants.values() for s, inner in cfg.items() for k in inner):
            section, name = key.split(".", 1)
            by = {v: _setting(cfg.get(section, {}).get(name)) for v, cfg in variants.items()}
            flat[key] = next(iter(by.values())) if len(set(by.values())) == 1 else \
                ", ".join(f"{v}: {value}" for v, value in by.items())
        flat["seeds"] = _setting(spec.get("seeds"))
    else:
        _flatten(spec, "", flat)
    if study.user_attrs.get("data_fingerprint"):
        flat["data (fingerprint)"] = str(study.user_attrs["data_fingerprint"])[:12]
    return flat


def _flatten(spec: dict, prefix: str, flat: dict[str, str]) -> None:
    for key, value in spec.items():
        if isinstance(value, dict) and not ({"value", "choices", "low"} & set(value)):
            _flatten(value, f"{prefix}{key}.", flat)
        else:
            flat[f"{prefix}{key}"] = _setting(value)


def _setting(value) -> str:
    """A value as a study file writes it: 250, "mean", [32, 64], 0.0003 to 0.005 (log), 1 to 4 (step 1)."""
    if isinstance(value, dict) and set(value) in ({"value"}, {"choices"}):
        value = next(iter(value.values()))
    elif isinstance(value, dict) and "low" in value:
        extras = [e for e in ("log" if value.get("log") else "",
                              f"step {value['step']:g}" if value.get("step") else "") if e]
        return f"{value['low']:g} to {value['high']:g}" + (f" ({', '.join(extras)})" if extras else "")
    return json.dumps(value)
