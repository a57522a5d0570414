import optuna
import pytest

from search.spec import SpecError, load_spec
from search.strategies import make_pruner, make_sampler
from tests.conftest import write_study

BUDGET = "[train]\nmax_steps = 600\nvalid_steps = 50\n"


def test_hyperband_resources_default_to_the_training_budget(tmp_path):
    spec = load_spec(write_study(tmp_path / "h.toml", BUDGET), ["pruner.name=hyperband"])
    pruner = make_pruner(spec)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert (pruner._min_resource, pruner._max_resource) == (50, 600)


def test_pruner_and_sampler_arguments_are_passed_through(tmp_path):
    spec = load_spec(write_study(tmp_path / "m.toml", BUDGET),
                     ["pruner.name=median", "pruner.n_warmup_steps=100", "sampler.name=tpe",
                      "sampler.n_startup_trials=3"])
    assert make_pruner(spec)._n_warmup_steps == 100
    sampler = make_sampler(spec).sampler
    assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._n_startup_trials == 3
    assert sampler._constant_liar  # Optuna 5's default: parallel workers see running trials as pending


def _first_params(spec, storage, n: int = 1) -> list[dict]:
    """What a fresh process (a new sampler) samples for its next n trials on a shared storage."""
    study = optuna.load_study(study_name="s", storage=storage, sampler=make_sampler(spec))
    trials = [study.ask() for _ in range(n)]
    for trial in trials:
        trial.suggest_float("x", 0.0, 1.0)
        study.tell(trial, 0.0)
    return [t.params for t in trials]


@pytest.mark.parametrize("name", ["tpe", "random", "gp"])
def test_every_process_and_resume_samples_fresh_parameters(tmp_path, name):
    spec = load_spec(write_study(tmp_path / "s.toml", BUDGET), [f"sampler.name={name}"])
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(study_name="s", storage=storage)
    first = _first_params(spec, storage, 2)
    later = [p for _ in range(4) for p in _first_params(spec, storage)]  # 4 more processes / resumes
    values = [p["x"] for p in first + later]
    assert len(set(values)) == len(values)  # the same seed everywhere repeated trial 0's parameters
    again = optuna.storages.InMemoryStorage()  # a fresh study replays the same stream: reproducible
    optuna.create_study(study_name="s", storage=again)
    assert _first_params(spec, again, 2) == first


def test_qmc_keeps_one_sequence_across_processes(tmp_path):
    spec = load_spec(write_study(tmp_path / "s.toml", BUDGET), ["sampler.name=qmc"])
    assert isinstance(make_sampler(spec), optuna.samplers.QMCSampler)  # its points are counted in the study


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("pruner.name=asha", "pruner.name='asha' is not known; valid: none, median"),
        ("sampler.name=cma", "sampler.name='cma' is not known; valid: tpe, random"),
        ("pruner.n_warmup=3", "pruner.n_warmup is not an argument of optuna.pruners.NopPruner; valid: none"),
        ("sampler.name=tpe;sampler.n_startup_trials=abc", "sampler.n_startup_trials='abc' must be int"),
        ("sampler.name=tpe;sampler.n_startup_trials=true", "sampler.n_startup_trials=True must be int"),
        ("sampler.name=tpe;sampler.constant_liar=1", "sampler.constant_liar=1 must be bool"),
        ("sampler.name=tpe;sampler.gamma=0.2", "sampler.gamma (Callable[[int], int] | None) cannot be set from"),
        ("sampler.name=tpe;sampler.n_startup_trials=3;sampler.n_ei_candidates=12", None),
        ("pruner.name=median;pruner.n_warmup_steps=1.5", "pruner.n_warmup_steps=1.5 must be int"),
    ],
)
def test_unknown_strategy_or_argument_is_a_clear_error(tmp_path, override, fragment):
    spec = load_spec(write_study(tmp_path / "bad.toml", BUDGET), override.split(";"))
    if fragment is None:  # the valid case of the table: built without complaint
        assert make_pruner(spec) and make_sampler(spec).sampler._n_startup_trials == 3
        return
    with pytest.raises(SpecError) as err:
        make_pruner(spec)
        make_sampler(spec)
    assert fragment in str(err.value) and str(err.value).startswith(str(tmp_path / "bad.toml"))


def test_experimental_sampler_options_the_study_file_names_print_no_warnings(tmp_path):
    """multivariate/group TPE (studies/cpu.toml) is the user's explicit choice: no ExperimentalWarning per process."""
    import warnings

    spec = load_spec(write_study(tmp_path / "g.toml", BUDGET),
                     ["sampler.name=tpe", "sampler.multivariate=true", "sampler.group=true"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler = make_sampler(spec).sampler
    assert sampler._multivariate and sampler._group
