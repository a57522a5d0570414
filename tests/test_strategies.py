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
    sampler = make_sampler(spec)
    assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._n_startup_trials == 3


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("pruner.name=asha", "pruner.name='asha' is not known; valid: none, median"),
        ("sampler.name=cma", "sampler.name='cma' is not known; valid: tpe, random"),
        ("pruner.n_warmup=3", "pruner.n_warmup is not an argument of optuna.pruners.NopPruner; valid: none"),
    ],
)
def test_unknown_strategy_or_argument_is_a_clear_error(tmp_path, override, fragment):
    spec = load_spec(write_study(tmp_path / "bad.toml", BUDGET), [override])
    with pytest.raises(SpecError) as err:
        make_pruner(spec)
        make_sampler(spec)
    assert fragment in str(err.value) and str(err.value).startswith(str(tmp_path / "bad.toml"))
