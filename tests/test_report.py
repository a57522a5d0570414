import html
import json
import re
import uuid
from html.parser import HTMLParser

import optuna
import optuna_dashboard
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from reports import FORMATS, study_report, summary_counts, top_trials, trials_frame, write_report
from reports.document import to_markdown, to_note
from reports.export import report_section
from reports.tables import budget_starved


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
    assert report_section(optuna_dashboard.get_note(study)) == to_note(study_report(study, k=5))
    assert "Trials: 3 complete, 1 pruned, 1 fail" in text
    header = next(line for line in text.splitlines() if line.startswith("|"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["trial", "valid_acc", "pooling"]
    assert "## Top 3 of 3 complete trials" in text  # k=5 asked, 3 exist: the title says 3
    assert "All 3 share: n_params = 100, steps_run = 300" in text  # one-value columns become a line
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
    assert [c.strip() for c in header.split("&")] == ["trial", "valid\\_acc", "pooling"]
    assert "0.8000" in tex  # the best trial, 4 decimals
    renamed = optuna.create_study(study_name="my_study#2", direction="maximize")
    renamed.add_trials(_study().trials)
    _, paths = write_report(renamed, tmp_path, formats=("tex",))
    assert "\\caption{Study my\\_study\\#2}" in paths[0].read_text()  # a bare _ or # would not compile


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


class _Resources(HTMLParser):
    """Collects what a browser would fetch: src/href attributes and CSS url()s; script bodies are not markup."""

    def __init__(self):
        super().__init__()
        self.urls, self.scripts, self.inline = [], [], []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("src", "href", "data", "srcset", "poster") and v]
        if tag == "script":
            self.scripts.append(dict(attrs))
            self._in_script = True
        if tag == "link":
            self.urls.append(dict(attrs).get("href") or "")

    def handle_endtag(self, tag):
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data):
        if self._in_script:
            self.inline.append(data)
        else:
            self.urls += re.findall(r"url\(([^)]*)\)|@import\s+['\"]([^'\"]+)", data)


def _parse(path) -> tuple[_Resources, str]:
    page = path.read_text()
    parser = _Resources()
    parser.feed(page)
    return parser, page


def test_html_report_is_self_contained_with_the_search_figures(tmp_path):
    _, paths = write_report(_study(), tmp_path, k=5, formats=("html",))
    parser, page = _parse(paths[0])
    assert paths[0].name == "r.html"
    assert parser.urls == []  # nothing to fetch: no src, href, link or CSS url anywhere in the markup
    assert all("src" not in attrs for attrs in parser.scripts)
    assert max(map(len, parser.inline)) > 1_000_000 and "plotly.js v" in page  # plotly.js itself, inlined
    drawn = re.findall(r'Plotly\.newPlot\(\s*"([^"]+)"', page)
    assert drawn == ["history", "parallel-coordinates", "importances", "learning-curves", "by-pooling"]
    assert all(f'<div id="{fig_id}"' in page for fig_id in drawn)
    assert page.count("<table") == 3  # top trials, by pooling, importances
    text = html.unescape(page)
    assert "<h2>Best trial's run config</h2>" in text and '<pre>{\n  "model": {\n    "pooling": "stats"' in text


def _md_rows(block: str) -> list[list[str]]:
    """The cells of a Markdown table's header and body rows."""
    rows = [line for line in block.splitlines() if line.startswith("|") and not line.startswith("|:")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows if not set(line) <= set("|:- ")]


def _ablation_study() -> optuna.Study:
    """An ablation as run_ablation stores it: baseline + 2 variants x 3 seeds; one pruned, one failed cell."""
    study = optuna.create_study(study_name="abl", direction="maximize")
    for key, value in (("kind", "ablation"), ("rows", ["baseline", "wide", "stats"]),
                       ("baseline_row", "baseline"), ("seeds", [0, 1, 2])):
        study.set_user_attr(key, value)
    dist = {"variant": CategoricalDistribution(["baseline", "wide", "stats"]),
            "seed": CategoricalDistribution([0, 1, 2])}
    values = {"baseline": [0.50, 0.52, 0.54], "wide": [0.60, 0.61, 0.65], "stats": [0.40, None, None]}
    for variant, row in values.items():
        for seed, value in enumerate(row):
            state = (TrialState.COMPLETE if value is not None else TrialState.PRUNED if seed == 1 else TrialState.FAIL)
            study.add_trial(create_trial(params={"variant": variant, "seed": seed}, distributions=dist, state=state,
                                         value=value if state == TrialState.COMPLETE else None,
                                         intermediate_values={10: value or 0.1}))
    return study


def test_ablation_html_has_ci_error_bars_and_cells_by_seed(tmp_path):
    from reports.ablation import ablation_cells, ablation_frame
    from reports.figures import ablation_figures

    study = _ablation_study()
    text, paths = write_report(study, tmp_path, formats=("md", "html"))
    assert "## Cells by seed" in text
    assert text.split("\n\n")[1].startswith("This study is an ablation: 3 fixed configurations (variants) trained "
                                            "over 3 seeds each") and '"Best Trial" is just the single best cell' in text
    stats_row, by_seed = (line for line in text.splitlines() if line.startswith("| stats"))
    assert [c.strip() for c in by_seed.strip("|").split("|")] == ["stats", "0.4000", "pruned", "fail"]
    assert [c.strip() for c in stats_row.strip("|").split("|")][:5] == [
        "stats", "1/1/1", "0.4000", "", "-0.1000 (1 pair)"]  # one seed: no std, no CI, said so
    parser, page = _parse(paths[1])
    assert parser.urls == []
    for fig_id in ("ablation-bars", "ablation-deltas", "ablation-learning-curves"):
        assert f'<div id="{fig_id}"' in page

    study_cells = ablation_cells(study)
    table = ablation_frame(study)
    figures = dict(ablation_figures(study_cells, table))
    bars = figures["ablation-bars"].data[0]
    wide = table.set_index("variant").loc["wide"]
    assert list(bars.x) == ["baseline", "wide", "stats"]
    assert bars.error_y.array[1] == pytest.approx(wide["ci_high"] - wide["mean"])
    assert bars.error_y.arrayminus[1] == pytest.approx(wide["mean"] - wide["ci_low"])
    assert bars.error_y.array[2] is None  # one complete seed: no CI, no bar drawn rather than a fake one
    seeds = figures["ablation-bars"].data[1]
    assert len(seeds.y) == len(study_cells[study_cells["state"] == "complete"]) == 7
    deltas = figures["ablation-deltas"].data[0]
    assert list(deltas.y) == ["wide", "stats"] and deltas.x[0] == pytest.approx(wide["delta"])
    assert deltas.error_x.array[1] is None  # stats has one pair: its delta has no CI


@pytest.mark.parametrize("n_seeds", range(2, 11))
def test_ablation_intervals_and_bars_stay_within_zero_and_one(n_seeds):
    from reports.ablation import _display
    from reports.figures import ablation_figures
    from reports.stats import ablation_table

    rows = [(variant, seed, "complete", value) for seed in range(n_seeds)
            for variant, value in (("low", 0.3 * (seed == 0)), ("high", 1.0 - 0.3 * (seed == 0)))]
    cells = pd.DataFrame(rows, columns=["variant", "seed", "state", "value"])
    table = ablation_table(cells, "low")
    assert (table["ci_low"] >= 0).all() and (table["ci_high"] <= 1).all()
    bars = dict(ablation_figures(cells, table))["ablation-bars"].data[0]
    for mean, up, down in zip(bars.y, bars.error_y.array, bars.error_y.arrayminus, strict=True):
        assert 0.0 <= mean - down and mean + up <= 1.0
    shown = _display(table)["95% CI"].tolist()
    assert shown[0].startswith("[0.0000†,") and shown[1].endswith(", 1.0000†]")  # a cut bound says so


def test_report_figures_go_into_the_dashboard_once(tmp_path):
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    study = optuna.create_study(study_name="abl", storage=f"sqlite:///{tmp_path / 'a.db'}", direction="maximize")
    source = _ablation_study()
    for key, value in source.user_attrs.items():
        study.set_user_attr(key, value)
    study.add_trials(source.trials)

    def saved() -> dict:
        return get_plotly_graph_objects(study._storage.get_study_system_attrs(study._study_id))

    write_report(study, tmp_path, formats=("html",))
    first = saved()
    assert set(first) == {"ablation-bars", "ablation-deltas", "ablation-learning-curves"}  # curves named by cell
    assert json.loads(first["ablation-bars"])["data"][0]["x"] == ["baseline", "wide", "stats"]
    write_report(study, tmp_path, formats=("md",))
    assert saved() == first  # the same ids: replaced, not piled up


def test_several_studies_side_by_side(tmp_path):
    from reports import write_comparison

    search = _study()
    other = optuna.create_study(study_name="s", direction="maximize")
    dist = {"pooling": CategoricalDistribution(["mean", "stats"]), "d_model": CategoricalDistribution([32, 64])}
    for value, d_model in ((0.7, 32), (0.9, 64)):
        other.add_trial(create_trial(params={"pooling": "mean", "d_model": d_model}, distributions=dist, value=value))
    text, paths = write_comparison([search, other, _ablation_study()], tmp_path, ("md", "csv", "tex", "html"))
    assert [p.name for p in paths] == [f"r-vs-s-vs-abl.{fmt}" for fmt in ("md", "csv", "tex", "html")]
    overview = pd.read_csv(paths[1])
    assert overview["study"].tolist() == ["r", "s", "abl"]
    assert overview["kind"].tolist() == ["search", "search", "ablation"]
    assert overview[["complete", "pruned", "failed"]].values.tolist() == [[3, 1, 1], [2, 0, 0], [7, 1, 1]]
    assert overview["best_valid_acc"].tolist() == [0.8, 0.9, 0.65] and overview["best_trial"].tolist() == [1, 1, 5]
    assert overview["mean_valid_acc"].iloc[1] == pytest.approx(0.8) and pd.isna(overview["mean_valid_acc"].iloc[2])
    best = _md_rows(text.split("## Best trial's parameters")[1].split("##")[0])
    assert best == [["study", "d_model", "pooling"], ["r", "", "stats"], ["s", "64", "mean"]]
    assert ["wide", "0.6200 ± 0.0265 (Δ +0.1000, p 0.0033)"] in _md_rows(text.split("## Ablation variants")[1])
    assert "\\toprule" in paths[2].read_text()
    parser, page = _parse(paths[3])
    assert parser.urls == [] and '<div id="history"' in page and '<div id="ablation-bars"' in page


@pytest.mark.parametrize("url", ["postgresql+psycopg2://postgres@127.0.0.1:5432/test",
                                 "mysql+pymysql://root@127.0.0.1:3306/test"])
def test_report_reads_and_writes_a_shared_server_storage(url, tmp_path):
    """The services many machines share: the figures are chunked into study system attrs there too."""
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    name = f"abl-{uuid.uuid4().hex[:12]}"
    source = _ablation_study()
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    try:
        for key, value in source.user_attrs.items():
            study.set_user_attr(key, value)
        study.add_trials(source.trials)
        text, _ = write_report(study, tmp_path, formats=("md",))
        again = optuna.load_study(study_name=name, storage=url)  # a fresh connection, as another machine
        assert report_section(optuna_dashboard.get_note(again)) == to_note(study_report(again))
        saved = get_plotly_graph_objects(again._storage.get_study_system_attrs(again._study_id))
        local = dict(study_report(source).figures)
        assert json.loads(saved["ablation-bars"]) == json.loads(local["ablation-bars"].to_json())
        assert to_markdown(study_report(again)).replace(name, "abl") == to_markdown(study_report(source))
    finally:
        optuna.delete_study(study_name=name, storage=url)


def test_studies_without_finished_trials_still_report(tmp_path):
    from reports import write_comparison

    empty = optuna.create_study(study_name="empty", direction="maximize")
    ablation = optuna.create_study(study_name="abl0", direction="maximize")
    for key, value in (("kind", "ablation"), ("rows", ["baseline"]), ("baseline_row", "baseline"), ("seeds", [0])):
        ablation.set_user_attr(key, value)
    assert "No trials yet." in write_report(empty, tmp_path, formats=FORMATS)[0]
    assert "No finished cells yet." in write_report(ablation, tmp_path, formats=FORMATS)[0]
    _, paths = write_comparison([empty, ablation], tmp_path, ("csv", "html"))
    overview = pd.read_csv(paths[0])
    assert overview[["complete", "pruned", "failed"]].sum().sum() == 0 and overview["best_valid_acc"].isna().all()


def test_ablation_with_duplicate_complete_cells_reports_the_first_and_says_so(tmp_path):
    study = _ablation_study()
    first = {(t.params["variant"], t.params["seed"]): t.value for t in study.trials if t.value is not None}
    dup = study.trials[3]  # ("wide", 0): trained twice by an older version after an interruption
    study.add_trial(create_trial(params=dup.params, distributions=dup.distributions, value=0.99))
    text, _ = write_report(study, tmp_path, formats=("md",))
    notes = [line for line in text.splitlines() if "second complete trial" in line]
    assert notes == ["Note: 1 cell(s) had a second complete trial (trial(s) 9); each cell uses its first complete "
                     "trial, the later ones are ignored."]
    wide = next(line for line in text.splitlines() if line.startswith("| wide"))
    assert [c.strip() for c in wide.strip("|").split("|")][1:3] == ["3/0/0", "0.6200 ± 0.0265"]
    assert first[("wide", 0)] == 0.60


def test_a_best_trial_still_rising_at_its_last_evaluation_is_flagged_budget_starved():
    def study_with(best_curve: dict[int, float]) -> optuna.Study:
        study = optuna.create_study(direction="maximize")
        study.add_trial(create_trial(value=max(best_curve.values()), intermediate_values=best_curve))
        study.add_trial(create_trial(value=0.3, intermediate_values={100: 0.3, 200: 0.2}))  # peaked early
        study.add_trial(create_trial(value=0.35, intermediate_values={100: 0.2, 200: 0.35}))  # also rising
        return study

    starved = study_with({100: 0.4, 200: 0.6, 250: 0.7})
    text = to_markdown(study_report(starved))
    assert ("(!) budget-starved: the best trial (0) peaked at its last evaluation, step 250, with validation "
            "accuracy still rising (0.6000 at step 200 -> 0.7000); 2 of 3 complete trials") in text
    assert "train.max_steps=500" in text
    for curve in ({100: 0.4, 200: 0.7, 250: 0.6}, {100: 0.7, 200: 0.7}, {250: 0.7},  # fell, flat, one point
                  {100: 0.9, 200: 1.0}):  # at the ceiling: nothing left to gain
        assert "budget-starved" not in to_markdown(study_report(study_with(curve)))
    sized = optuna.create_study(direction="maximize")
    sized.add_trial(create_trial(value=0.6, intermediate_values={100: 0.4, 200: 0.6}, user_attrs={
        "run_config": {"train": {"max_steps": 4000, "max_minutes": 4.0}}}))
    assert ("0.6000); train.max_minutes=4 sized it to 200 steps; 1 of 1 complete trials peaked at their last "
            "evaluation. Longer trials would likely do better: a new study (--set study.name=NEW) with "
            "train.max_minutes=8") in budget_starved(sized)
    late = optuna.create_study(direction="maximize")
    late.add_trial(create_trial(value=0.6, intermediate_values={100: 0.4, 200: 0.6},
                                user_attrs={"stopped_at_deadline": 200}))
    assert "the study's deadline stopped it" in budget_starved(late) and "with more time" in budget_starved(late)


def test_importances_of_a_seldom_drawn_conditional_parameter_print_no_warnings(tmp_path):
    """A margin drawn in all trials but one (the inactive regime has one trial): Optuna's evaluator warns per
    parameter; the report stays quiet."""
    import warnings

    from optuna.distributions import FloatDistribution

    from reports.tables import param_importances

    study = optuna.create_study(direction="maximize")
    losses = CategoricalDistribution(["ce", "am"])
    for i, (loss, value) in enumerate([("am", 0.5), ("am", 0.6), ("am", 0.9), ("ce", 0.55), ("am", 0.4)]):
        params, dists = {"loss": loss, "lr": 1e-3 * (i + 1)}, {"loss": losses, "lr": FloatDistribution(1e-4, 1e-2)}
        if loss == "am":
            params["margin"], dists["margin"] = 0.1 + 0.05 * i, FloatDistribution(0.1, 0.4)
        study.add_trial(create_trial(params=params, distributions=dists, value=value))
    with pytest.warns(UserWarning, match="Some regimes"):  # what Optuna's evaluator says on its own
        optuna.importance.get_param_importances(study)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(param_importances(study)) == {"loss", "lr", "margin"}
        write_report(study, tmp_path, k=5)


def _searched_study(n: int = 6) -> optuna.Study:
    """A search as the CLI stores it: lr decides the accuracy, d_model and pooling vary, dropout never does."""
    from optuna.distributions import FloatDistribution, IntDistribution

    dists = {"lr": FloatDistribution(1e-5, 1e-1, log=True), "d_model": IntDistribution(32, 128),
             "pooling": CategoricalDistribution(["mean", "stats"]), "dropout": FloatDistribution(0.0, 0.3)}
    study = optuna.create_study(study_name="s", direction="maximize")
    for i in range(n):
        lr = 0.96e-4 * 1.9 ** (i % 8)  # the smallest lies a hair below 1e-4, where the log axis has a label
        params = {"lr": lr, "d_model": 32 + 16 * (i % 3), "pooling": ["mean", "stats"][i % 2], "dropout": 0.1}
        study.add_trial(create_trial(
            params=params, distributions=dists, value=0.3 + 0.1 * i,
            intermediate_values={100: 0.1 + 0.05 * i, 200: 0.3 + 0.1 * i},
            user_attrs={"n_params": 1_234_567 + i, "flops_per_segment": 13_251_584, "steps_run": 200, "seed": i}))
    return study


def test_top_table_leads_with_the_searched_parameters_most_important_first(tmp_path):
    from reports.tables import param_importances

    study = _searched_study()
    importances = param_importances(study)
    assert list(importances)[0] == "lr" and "dropout" not in importances  # one value: nothing to attribute
    text, paths = write_report(study, tmp_path, k=5, formats=("md", "html"))
    top = text.split("## Top 5 of 6 complete trials (best validation accuracy)")[1].split("##")[0]
    header, *rows = _md_rows(top)
    assert header == ["trial", "valid_acc", *importances, "n_params", "seed"]
    assert rows[0][:3] == ["5", "0.8", f"{0.96e-4 * 1.9**5:.4g}"] and rows[0][-2] == "1.23 M"
    assert "All 5 share: dropout = 0.1, flops_per_segment = 13.3 M, steps_run = 200" in top
    page = paths[1].read_text()
    assert page.count("<thead>") == page.count("<table") == 3  # top, by pooling, importances: one header row each
    assert all(head.count("<tr") == 1 for head in re.findall(r"<thead>(.*?)</thead>", page, re.S))
    assert "<th>pooling</th>" in page  # a marginal table's index is its first column


def test_importances_say_how_many_trials_they_rest_on_and_flag_too_few(tmp_path):
    from reports.figures import search_figures
    from reports.tables import MIN_IMPORTANCE_TRIALS, importance_basis, param_importances, searched_params

    few = _searched_study(6)
    text = to_markdown(study_report(few))
    assert "## Parameter importances (Optuna's default evaluator, from 6 complete trials, too few to trust)" in text
    assert f"(!) only 6 complete trials: importances from so few are a rough hint, not a finding; trust them " \
           f"from about {MIN_IMPORTANCE_TRIALS} complete trials. Not ranked, one value in every complete trial: " \
           "dropout." in text
    basis = importance_basis(few)
    figures = dict(search_figures(few, trials_frame(few), searched_params(few), param_importances(few), [],
                                  basis.title))
    assert figures["importances"].layout.title.text == \
        "Hyperparameter importances (from 6 complete trials, too few to trust)"
    enough = _searched_study(MIN_IMPORTANCE_TRIALS)
    text = to_markdown(study_report(enough))
    assert f"(Optuna's default evaluator, from {MIN_IMPORTANCE_TRIALS} complete trials)" in text
    assert "(!) only" not in text


def test_parallel_coordinate_labels_do_not_collide_on_a_log_axis():
    from reports.figures import search_figures
    from reports.tables import searched_params

    study = _searched_study(8)
    fig = dict(search_figures(study, trials_frame(study), searched_params(study), {}, []))["parallel-coordinates"]
    by_axis: dict = {}
    for a in fig.layout.annotations:
        by_axis.setdefault(a.x, []).append((a.y, a.text))
    lr_axis = next(labels for labels in by_axis.values() if "0.001" in dict(map(reversed, labels)))
    assert {t for _, t in lr_axis} == {"0.0001", "0.001", "0.00858"}  # 9.6e-05 would overprint 0.0001
    for labels in by_axis.values():
        ys = sorted(y for y, _ in labels)
        assert all(b - a >= 0.06 for a, b in zip(ys, ys[1:], strict=False)), labels


def test_ablation_learning_curves_name_variant_and_seed():
    from reports.figures import METRIC, learning_curves

    fig = dict(learning_curves(_ablation_study()))["ablation-learning-curves"]
    names = [trace.name for trace in fig.data]
    assert names[:4] == ["baseline, seed 0", "baseline, seed 1", "baseline, seed 2", "wide, seed 0"]
    assert len({trace.line.color for trace in fig.data if trace.legendgroup == "wide"}) == 1
    assert fig.layout.yaxis.title.text == METRIC and fig.layout.xaxis.title.text == "step"
    search = dict(learning_curves(_searched_study()))["learning-curves"]
    assert search.layout.yaxis.title.text == METRIC
    assert search.layout.showlegend  # which trial each curve is
    assert [t.name for t in search.data][:2] == ["trial 0 (complete)", "trial 1 (complete)"]


def test_the_dashboard_note_shows_tables_as_aligned_blocks_within_its_width():
    """optuna-dashboard draws Markdown tables without cell padding ("0.2667 0.0008823") and code lines unwrapped:
    the note's tables are monospace blocks of columns two spaces apart, a wide one cut into several blocks."""
    from reports.document import NOTE_WIDTH, Report, Section

    note = to_note(study_report(_searched_study(8)))
    assert "|--" not in note and note.count("```text") == 3  # top trials, by pooling, importances
    top = note.split("```text\n")[1].split("```")[0].splitlines()
    assert re.split(r"\s{2,}", top[0].strip()) == ["trial", "valid_acc", "lr", "d_model", "pooling", "n_params", "seed"]
    assert re.split(r"\s{2,}", top[2].strip()) == ["7", "1", "0.008581", "48", "stats", "1.23 M", "7"]
    assert "it also ranks dropout, which took one value in every complete trial" in note  # the dashboard's card
    wide = pd.DataFrame({f"column_{i}": [1.5 * i] for i in range(15)})
    blocks = to_note(Report("w", [Section(table=wide)])).split("```text\n")[1].split("```")[0].split("\n\n")
    assert len(blocks) == 2 and all(len(line) <= NOTE_WIDTH for b in blocks for line in b.splitlines())
    assert all(b.lstrip().startswith("column_0") for b in blocks)  # each block keeps the first column
    assert {c for b in blocks for c in b.splitlines()[0].split()} == set(wide.columns)
