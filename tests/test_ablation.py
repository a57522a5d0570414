"""Ablations: file validation, the three plans, a real resumable run in SQLite, and its report."""
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from reports import write_report
from search.ablation import enqueue_missing_cells, load_ablation, open_ablation, run_ablation
from search.attrs import run_config_of
from search.cells import cell_of
from search.spec import SpecError
from tests.conftest import write_study

ABLATION = """
[ablation]
plan = "one_at_a_time"
seeds = [0, 1]
[variants]
wide = { d_model = 24 }
stats = { pooling = "stats" }
[model]
d_model = 16
nhead = 2
ff_mult = 2.0
dropout = 0.0
[train]
max_steps = 40
valid_steps = 20
warmup_steps = 5
segment_len = 32
batch_size = 16
lr = 3e-3
"""


def test_the_three_plans_give_the_expected_rows(tmp_path):
    path = write_study(tmp_path / "a.toml", ABLATION)
    rows = {plan: load_ablation(path, [f"ablation.plan={plan}"]) for plan in
            ("one_at_a_time", "all_combinations", "leave_one_out")}
    names = {plan: list(a.rows(a.study.default_run_config())) for plan, a in rows.items()}
    assert names["one_at_a_time"] == ["baseline", "wide", "stats"]
    assert names["all_combinations"] == ["baseline", "wide", "stats", "wide + stats"]
    assert names["leave_one_out"] == ["all", "all - wide", "all - stats"]
    both = rows["all_combinations"].rows(rows["all_combinations"].study.default_run_config())["wide + stats"]
    assert (both.model.d_model, both.model.pooling) == (24, "stats")
    without_wide = rows["leave_one_out"].rows(rows["leave_one_out"].study.default_run_config())["all - wide"]
    assert (without_wide.model.d_model, without_wide.model.pooling) == (16, "stats")


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("ablation.plan=random", "ablation.plan='random' is not known; valid: one_at_a_time"),
        ("ablation.seeds=[1, 1]", "ablation.seeds=[1, 1] must be a non-empty list of distinct integers"),
        ("ablation.baseline=best:", "ablation.baseline='best:'"),
        ("model.d_model=[16, 32]", "an ablation's baseline must be fixed, but d_model is searched"),
        ("variants.wide.widht=3", "variants.wide.widht is not a model or train key"),
        ("variants.stats.pooling=max", "row 'stats': model.pooling='max' is not a known pooling"),
    ],
)
def test_bad_ablation_files_are_refused(tmp_path, override, fragment):
    with pytest.raises(SpecError) as err:
        load_ablation(write_study(tmp_path / "bad.toml", ABLATION), [override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def _start(tmp_path, store, overrides=()):
    ablation = load_ablation(write_study(tmp_path / "abl.toml", ABLATION), list(overrides))
    study, rows = open_ablation(ablation, f"sqlite:///{tmp_path / 'abl.db'}", store.fingerprint)
    return ablation, rows, study


def _run(study, ablation, rows, store) -> int:
    """What `run-study ablate` does: queue the missing cells, then run the queue; returns the cells run."""
    enqueue_missing_cells(study, ablation.seeds, rows)
    return run_ablation(study, ablation.study, ablation.seeds, rows, store).ran


def test_ablation_runs_every_cell_once_and_a_resume_reruns_nothing(tmp_path, tiny_store):
    ablation, rows, study = _start(tmp_path, tiny_store)
    assert _run(study, ablation, rows, tiny_store) == 6
    cells = {cell_of(t): t for t in study.trials}
    assert set(cells) == {(r, s) for r in rows for s in (0, 1)}
    assert all(t.state == TrialState.COMPLETE for t in cells.values())
    assert run_config_of(cells[("wide", 1)])["model"]["d_model"] == 24
    assert cells[("wide", 1)].user_attrs["seed"] == 1
    # a seed is not a searched factor: only `variant` is a param, so optuna-dashboard's importance card
    # (its own code, below) cannot rank `seed`
    assert all(set(t.params) == {"variant"} for t in study.trials)
    from optuna_dashboard._importance import get_param_importance_from_trials_cache
    from optuna_dashboard._inmemory_cache import InMemoryCache

    ranked = get_param_importance_from_trials_cache(InMemoryCache(), study._storage, study._study_id, 0,
                                                    study.trials)
    assert [item["name"] for item in ranked] == ["variant"]
    ablation, rows, study = _start(tmp_path, tiny_store)  # resume
    assert _run(study, ablation, rows, tiny_store) == 0
    assert len(study.trials) == 6

    text, paths = write_report(study, tmp_path / "out", formats=("md", "csv", "tex"))
    tex = paths[2].read_text()
    assert "\\toprule" in tex and "\\caption{Ablation abl}" in tex and "\\label{tab:abl}" in tex
    header = tex.split("\\midrule")[0].splitlines()[-1]
    assert header.startswith("variant & c/p/f & mean $\\pm$ std & 95\\% CI")
    assert "$\\Delta$ [95\\% CI] & $p_t$ & $p_W$ & $d_z$" in tex and "\\label{tab:abl-seeds}" in tex
    assert "±" not in tex and "Δ" not in tex and "‡" not in tex  # as math: pdflatex needs no Unicode package
    assert "| variant" in text and "complete/pruned/failed" in text
    assert "too few seeds" in text  # 2 paired seeds can never give p < 0.05
    csv = paths[1].read_text().splitlines()
    assert csv[0].startswith("variant,n_complete,n_pruned,n_failed,mean,std,ci_low,ci_high")
    assert [line.split(",")[0] for line in csv[1:]] == ["baseline", "wide", "stats"]
    assert csv[0].endswith(",too_few_seeds") and [line.rsplit(",", 1)[1] for line in csv[1:]] == [
        "False", "True", "True"]  # a plain boolean column: False on the baseline, which has nothing to flag


def test_an_ablation_stored_with_seed_as_a_param_resumes_and_reports(tmp_path, tiny_store):
    """Studies made before seeds became user attrs: their cells are still found, so a resume reruns nothing."""
    ablation, rows, study = _start(tmp_path, tiny_store)
    dist = {"variant": CategoricalDistribution(list(rows)), "seed": CategoricalDistribution([0, 1])}
    for i, (row, seed) in enumerate((r, s) for r in rows for s in (0, 1)):
        study.add_trial(create_trial(params={"variant": row, "seed": seed}, distributions=dist, value=0.5 + i / 100))
    assert enqueue_missing_cells(study, ablation.seeds, rows) == 0
    text, _ = write_report(study, tmp_path / "out")
    assert "0.5000" in text and "| wide " in text


def test_failed_cells_are_reported_and_retried_on_resume(tmp_path, tiny_store):
    ablation, rows, study = _start(tmp_path, tiny_store, ["variants.stats.loss=test_nan"])
    assert _run(study, ablation, rows, tiny_store) == 6
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert {t.params["variant"] for t in failed} == {"stats"} and len(failed) == 2
    assert "non-finite" in failed[0].user_attrs["fail_reason"]
    text, _ = write_report(study, tmp_path / "out")
    assert "| stats " in text and "0/0/2" in text
    ablation, rows, study = _start(tmp_path, tiny_store, ["variants.stats.loss=test_nan"])
    assert _run(study, ablation, rows, tiny_store) == 2  # only the failed cells, again


def test_baseline_can_be_the_best_trial_of_another_study(tmp_path, tiny_store):
    import optuna

    from search.config import RunConfig

    url = f"sqlite:///{tmp_path / 'abl.db'}"
    source = optuna.create_study(study_name="src", storage=url, direction="maximize")
    for value, d_model in ((0.4, 32), (0.7, 48), (0.5, 64)):
        cfg = load_ablation(write_study(tmp_path / "x.toml", ABLATION), [f"model.d_model={d_model}"])
        source.add_trial(optuna.trial.create_trial(
            value=value, user_attrs={"run_config": cfg.study.default_run_config().to_dict()}))
    ablation = load_ablation(write_study(tmp_path / "abl.toml", ABLATION), ["ablation.baseline=best:src"])
    study, rows = open_ablation(ablation, url, tiny_store.fingerprint)
    assert isinstance(rows["baseline"], RunConfig) and rows["baseline"].model.d_model == 48
    assert rows["wide"].model.d_model == 24 and rows["stats"].model.d_model == 48
    with pytest.raises(SpecError, match="no study 'nope'"):
        open_ablation(load_ablation(tmp_path / "abl.toml", ["ablation.baseline=best:nope"]), url,
                      tiny_store.fingerprint)
