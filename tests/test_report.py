import optuna
import optuna_dashboard
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from reports import summary_counts, top_trials, trials_frame, write_report


def _study() -> optuna.Study:
    study = optuna.create_study(study_name="r", direction="maximize")
    dist = {"pooling": CategoricalDistribution(["mean", "stats"])}
    for value, pooling in ((0.5, "mean"), (0.8, "stats"), (0.65, "mean")):
        study.add_trial(create_trial(params={"pooling": pooling}, distributions=dist, value=value,
                                     user_attrs={"n_params": 100, "steps_run": 300,
                                                 "run_config": {"model": {"pooling": pooling}}}))
    study.add_trial(create_trial(params={"pooling": "mean"}, distributions=dist, state=TrialState.PRUNED,
                                 intermediate_values={50: 0.1}, value=0.1))
    study.add_trial(create_trial(params={"pooling": "mean"}, distributions=dist, state=TrialState.FAIL,
                                 user_attrs={"fail_reason": "training loss became non-finite by step 25"}))
    return study


def test_frame_counts_and_top_trials():
    frame = trials_frame(_study())
    assert summary_counts(frame) == {"complete": 3, "pruned": 1, "fail": 1, "running": 0, "waiting": 0}
    top = top_trials(frame, k=2)
    assert top["trial"].tolist() == [1, 2] and top["valid_acc"].tolist() == [0.8, 0.65]
    assert "state" not in top and "fail_reason" not in top  # all-empty for complete trials
    assert frame.loc[frame["state"] == "fail", "fail_reason"].item().startswith("training loss")


def test_written_markdown_and_csv_and_dashboard_note(tmp_path):
    study = _study()
    text, paths = write_report(study, tmp_path, k=5)
    assert optuna_dashboard.get_note(study) == text
    assert "Trials: 3 complete, 1 pruned, 1 fail" in text
    header = next(line for line in text.splitlines() if line.startswith("|"))
    assert [c.strip() for c in header.strip("|").split("|")][:3] == ["trial", "valid_acc", "duration_s"]
    assert '"pooling": "stats"' in text  # the best trial's run config
    back = pd.read_csv(paths[1])
    assert back["trial"].tolist() == [0, 1, 2, 3, 4]
    assert back["state"].tolist() == ["complete", "complete", "complete", "pruned", "fail"]
    assert back.loc[1, "valid_acc"] == 0.8 and back.loc[1, "pooling"] == "stats"


def test_latex_export_has_booktabs_and_the_columns(tmp_path):
    _, paths = write_report(_study(), tmp_path, k=5, formats=("tex",))
    tex = paths[0].read_text()
    assert paths[0].name == "r.tex"
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    header = tex.split("\\toprule")[1].split("\\\\")[0]
    assert [c.strip() for c in header.split("&")][:3] == ["trial", "valid\\_acc", "duration\\_s"]
    assert "0.8000" in tex  # the best trial, 4 decimals


def test_search_report_has_marginal_tables_and_importances(tmp_path):
    from reports.tables import marginal_tables, param_importances

    study = _study()
    table = marginal_tables(study, trials_frame(study))["pooling"]
    assert table.loc["stats"].tolist() == [1, 0.8, 0.8]
    assert table.loc["mean", "count"] == 2 and table.loc["mean", "best"] == 0.65
    assert table.loc["mean", "mean"] == pytest.approx(0.575)  # complete trials only: 0.5 and 0.65
    importances = param_importances(study)
    assert set(importances) == {"pooling"} and importances["pooling"] == pytest.approx(1.0)
    text, _ = write_report(study, tmp_path, k=5)
    assert "## By pooling (complete trials)" in text and "## Parameter importances" in text
