"""Real Optuna studies in SQLite on tiny data: pruning, stored provenance, resume, changed-space refusal."""
import optuna
import pytest
from optuna.trial import TrialState

from search.spec import SpecError, load_spec
from search.study import create_or_resume, run_study
from tests.conftest import write_study

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
    assert attrs["run_config"]["model"]["d_model"] == 16 and attrs["run_config"]["train"]["max_steps"] == 60
    assert attrs["seed"] == attrs["run_config"]["train"]["seed"] == 0
    assert attrs["n_params"] > 0 and attrs["flops_per_segment"] > 2 * attrs["n_params"]
    assert attrs["steps_run"] == 60 and attrs["steps_per_s"] > 0
    assert attrs["samples_per_s"] == pytest.approx(16 * attrs["steps_per_s"])
    assert attrs["best_valid_acc"] == trial.value
    assert attrs["data_fingerprint"] == tiny_store.fingerprint
    assert set(attrs["versions"]) >= {"code", "python", "torch", "optuna", "numpy"}
    assert sorted(trial.intermediate_values) == [20, 40, 60]
    assert study.metric_names == ["valid_acc"]  # how optuna-dashboard labels the objective


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
