"""Real Optuna studies in SQLite on tiny data: pruning, stored provenance, resume, changed-space refusal."""
import json
import re

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from reports.tables import best_config
from search.attrs import LINE, RUN_CONFIG, VERSIONS, dict_attr, run_config_of, split_attr
from search.config import RunConfig
from search.final import final_config, pick_trial
from search.spec import SpecError, load_spec
from search.study import create_or_resume, run_study
from tests.conftest import TINY_STUDY, write_study

TINY_SPACE = """
[model]
d_model = 16
nhead = 2
ff_mult = 2.0
dropout = 0.0
[train]
max_steps = 60
valid_steps = 20
warmup_steps = 5
segment_len = 32
batch_size = 16
lr = [3e-3, 1e-6]
"""



def test_a_run_config_reads_back_from_its_parts_and_from_the_old_single_attr():
    """Trials store the run config as short parts (`run_config 01/14`, ...); studies made before stored it as one
    `run_config` attr. Every reader (final fit, ablation baseline, the report's best config) goes through
    run_config_of, which reads both and says None for a trial still writing its parts."""
    cfg = RunConfig().to_dict()
    cfg["model"]["d_model"], cfg["train"]["max_steps"] = 48, 20
    parts = split_attr(RUN_CONFIG, cfg)
    assert len(parts) > 3 and RUN_CONFIG not in parts
    assert all(len(f"{key} {json.dumps(value)}") <= LINE for key, value in parts.items())
    assert split_attr(VERSIONS, {"code": "abc"}) == {VERSIONS: {"code": "abc"}}  # short: one attr, as before
    study = optuna.create_study(direction="maximize")
    for value, attrs in ((0.5, {RUN_CONFIG: cfg}), (0.9, parts), (0.7, {})):
        study.add_trial(create_trial(value=value, user_attrs=attrs))
    old, new, never = study.trials
    assert run_config_of(old) == run_config_of(new) == cfg and run_config_of(never) is None
    assert best_config(study) == cfg
    assert pick_trial(study, "best") is not None and pick_trial(study, "0").number == 0
    with pytest.raises(SpecError, match="no run config"):
        pick_trial(study, "2")
    for trial in (old, new):
        fitted = final_config(trial, ["train.max_steps=80"])
        assert fitted.model.d_model == 48 and fitted.train.max_steps == 80
    assert run_config_of(new)["train"]["max_steps"] == 20  # a copy: the override changed nothing stored
    missing = dict(parts)
    missing.pop(sorted(parts)[1])
    assert dict_attr(missing, RUN_CONFIG) is None  # a part not yet written: no half config with defaults

def test_pruning_really_prunes_hopeless_trials(tmp_path, tiny_store):
    spec = load_spec(write_study(tmp_path / "prune.toml", TINY_SPACE),
                     ["pruner.name=median", "pruner.n_startup_trials=2", "pruner.n_warmup_steps=0"])
    study = create_or_resume(spec, f"sqlite:///{tmp_path / 'prune.db'}", tiny_store.fingerprint)
    for lr in (3e-3, 3e-3, 1e-6, 1e-6):  # two good trials set the median; lr 1e-6 stays at chance
        study.enqueue_trial({"lr": lr})
    run_study(study, spec, tiny_store, n_trials=4)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED] * 2
    for t in trials[2:]:
        assert t.user_attrs["steps_run"] < 60
        assert t.last_step == t.user_attrs["steps_run"]


def test_every_trial_stores_what_a_table_needs(tmp_path, tiny_store):
    spec = load_spec(write_study(tmp_path / "attrs.toml", TINY_SPACE), ["train.lr=3e-3"])
    study = create_or_resume(spec, f"sqlite:///{tmp_path / 'attrs.db'}", tiny_store.fingerprint)
    run_study(study, spec, tiny_store, n_trials=1)
    trial = optuna.load_study(study_name="attrs", storage=f"sqlite:///{tmp_path / 'attrs.db'}").trials[0]
    attrs = trial.user_attrs
    config = run_config_of(trial)
    assert config["model"]["d_model"] == 16 and config["train"]["max_steps"] == 60
    assert attrs["seed"] == config["train"]["seed"] == 0
    assert RunConfig.from_dict(config) == RunConfig.from_dict(spec.run_config(optuna.trial.FixedTrial(trial.params))
                                                              .to_dict())
    # optuna-dashboard shows each attr as one unwrapped line "key value": every one is short enough for the page
    assert max(len(f"{key} {json.dumps(value)}") for key, value in attrs.items()) <= LINE
    assert attrs["n_params"] > 0 and attrs["flops_per_segment"] > 2 * attrs["n_params"]
    assert attrs["steps_run"] == 60 and attrs["steps_per_s"] > 0
    assert attrs["samples_per_s"] == pytest.approx(16 * attrs["steps_per_s"])
    assert attrs["best_valid_acc"] == trial.value
    assert attrs["data_fingerprint"] == tiny_store.fingerprint
    assert set(dict_attr(attrs, VERSIONS)) >= {"code", "python", "torch", "optuna", "numpy"}
    assert sorted(trial.intermediate_values) == [20, 40, 60]
    assert study.metric_names == ["valid_acc"]  # how optuna-dashboard labels the objective
    assert attrs["precision"] in ("fp32", "fp32 (oneDNN)", "bf16")  # as train.precision = auto resolved here
    assert best_config(study)["train"]["precision"] == "auto"


def test_enqueued_points_run_first_and_the_sampler_fills_in_the_rest(tmp_path, tiny_store):
    points = '[{ d_model = 24, lr = 1e-6 }, { pooling = "stats" }]'
    body = TINY_STUDY.replace("[study]\n", f"[study]\nenqueue = {points}\n") + TINY_SPACE.replace(
        "d_model = 16", "d_model = [16, 24]").replace("[model]", '[model]\npooling = ["mean", "stats"]')
    (tmp_path / "q.toml").write_text(body)
    spec = load_spec(tmp_path / "q.toml")
    assert spec.enqueue == ({"d_model": 24, "lr": 1e-6}, {"pooling": "stats"})
    study = create_or_resume(spec, f"sqlite:///{tmp_path / 'q.db'}", tiny_store.fingerprint)
    create_or_resume(spec, f"sqlite:///{tmp_path / 'q.db'}", tiny_store.fingerprint)  # a resume enqueues nothing
    run_study(study, spec, tiny_store, n_trials=3)
    trials = study.get_trials()
    assert len(trials) == 3
    assert trials[0].params == {"d_model": 24, "lr": 1e-6, "pooling": trials[0].params["pooling"]}
    assert trials[1].params["pooling"] == "stats"
    for point, fragment in (('[{ encoder = "none" }]', "study.enqueue[0].encoder: not a searched key"),
                            ("[{ d_model = 20 }]", "study.enqueue[0].d_model=20 is outside the space; valid: 16, 24"),
                            ("[{ lr = 1.0 }]", "valid: 0.003, 1e-06"), ('"none"', "must be a list of tables")):
        (tmp_path / "bad.toml").write_text(body.replace(points, point))
        with pytest.raises(SpecError, match=re.escape(fragment)):
            load_spec(tmp_path / "bad.toml")


def test_tied_best_trials_are_ranked_by_their_last_evaluations():
    from search.attrs import best_of, ranked

    def trial(number: int, curve: list[float]):
        t = create_trial(value=max(curve), intermediate_values=dict(enumerate(curve)))
        t.number = number
        return t

    touched, steady, later_steady = trial(0, [0.5, 1.0, 0.8, 0.9]), trial(1, [0.9, 1.0, 1.0]), trial(2, [1.0, 1.0])
    assert best_of([touched, steady, later_steady]) is later_steady  # mean of its last 3: 1.0
    assert [t.number for t in ranked([touched, steady, trial(3, [0.99])])] == [1, 0, 3]
    assert best_of([]) is None


def test_resume_with_a_changed_space_or_data_is_refused(tmp_path, tiny_store):
    path = write_study(tmp_path / "same.toml", TINY_SPACE)
    url = f"sqlite:///{tmp_path / 'same.db'}"
    create_or_resume(load_spec(path), url, tiny_store.fingerprint)
    create_or_resume(load_spec(path), url, tiny_store.fingerprint)  # unchanged: fine
    with pytest.raises(SpecError, match=r"created with a different model.d_model: 16 then, \[16, 32\] now"):
        create_or_resume(load_spec(path, ["model.d_model=[16, 32]"]), url, tiny_store.fingerprint)
    with pytest.raises(SpecError, match="created with a different train.max_steps: 60 then, 80 now"):
        create_or_resume(load_spec(path, ["train.max_steps=80"]), url, tiny_store.fingerprint)
    with pytest.raises(SpecError, match="was run on other data"):
        create_or_resume(load_spec(path), url, "0123456789abcdef")


def test_run_study_tops_up_to_the_target_count(tmp_path, tiny_store):
    spec = load_spec(write_study(tmp_path / "top.toml", TINY_SPACE), ["train.max_steps=20"])
    study = create_or_resume(spec, f"sqlite:///{tmp_path / 'top.db'}", tiny_store.fingerprint)
    assert run_study(study, spec, tiny_store, n_trials=2).ran == 2
    assert run_study(study, spec, tiny_store, n_trials=2).ran == 0
    assert run_study(study, spec, tiny_store, n_trials=3).ran == 1
    assert [t.number for t in study.trials] == [0, 1, 2]
