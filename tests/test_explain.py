"""run-study explain: the winner's choices against a reference, each put back in turn, over paired seeds."""
import csv
import dataclasses
import signal
import statistics

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

import run_study
from search.attrs import run_config_of
from search.cells import cell_of
from search.explain import explain, row_minutes
from search.spec import load_spec
from search.studyfile import SpecError
from tests.conftest import write_study
from tests.test_cli import FAST
from tests.test_workers import start, trials, wait_for

SPACE = """
[model]
d_model = [16, 24]
nhead = 2
ff_mult = 2.0
pooling = ["attention", "mean"]
loss = ["am_softmax", "ce"]
[model.when.loss.am_softmax]
classifier = "cosine"
scale = 16.0
margin = { low = 0.1, high = 0.3 }
""" + FAST[FAST.index("[train]"):]  # max_steps 40, lr { low = 1e-3, ... }


def a_search(tmp_path, store, **model):
    """A search study holding one complete trial with the space's first point (changed by `model`): the winner."""
    path = write_study(tmp_path / "s.toml", SPACE)
    spec = load_spec(path)
    cfg = spec.default_run_config()  # d_model 16, attention, am_softmax (cosine, margin 0.1), lr 1e-3
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    study.set_user_attr("data_fingerprint", store.fingerprint)
    study.add_trial(create_trial(value=0.5, params={"lr": 1e-3}, distributions={"lr": FloatDistribution(1e-3, 5e-3,
                                                                                                        log=True)},
                                 user_attrs={"run_config": cfg.to_shown_dict(), "steps_run": 40, "steps_per_s": 80.0}))
    return path, url, study.trials[0]


def test_a_parent_goes_back_with_its_conditional_keys_and_a_branch_key_of_the_same_branch_is_its_own(tmp_path,
                                                                                                      tiny_store):
    path, _, trial = a_search(tmp_path, tiny_store, margin=0.25)
    e = explain(load_spec(path), trial, "sample", 3, {})
    assert [f.name for f in e.factors] == ["d_model", "pooling", "loss"]  # lr 1e-3 is the sample's: not a factor
    rows = e.rows()
    ce = rows["loss = ce"].model
    assert (ce.loss, ce.classifier) == ("ce", "linear") and rows["winner"].model.classifier == "cosine"
    assert rows["d_model = 80"].model.d_model == 80 and rows["pooling = mean"].model.pooling == "mean"
    assert all(r.train.max_steps == 40 and r.train.max_minutes == 0 for r in rows.values())  # the winner's steps
    # the reference itself: a search whose loss is the sample's (ce) has no loss factor, and margin is no factor
    reference = write_study(tmp_path / "ref.toml", '[model]\nd_model = 16\nloss = "am_softmax"\nmargin = 0.1\n')
    same = explain(load_spec(path), trial, str(reference), 2, {"max_steps": 30})
    assert [(f.name, f.winner, f.reference) for f in same.factors] == [("margin", 0.25, 0.1)]
    assert same.rows()["margin = 0.1"].train.max_steps == 30 and same.seeds == (0, 1)


def test_d_model_and_nhead_go_back_together_where_one_alone_would_not_divide(tmp_path):
    spec = load_spec(write_study(tmp_path / "h.toml", SPACE.replace("nhead = 2", "nhead = [2, 3]").replace(
        "d_model = [16, 24]", "d_model = [96, 192]")))
    cfg = spec.default_run_config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=192, nhead=3))
    trial = create_trial(value=0.8, user_attrs={"run_config": cfg.to_shown_dict()})
    factors = {f.name: f for f in explain(spec, trial, "sample", 2, {}).factors}  # the sample's 80 / 3: no
    assert "d_model" not in factors and factors["d_model/nhead"].back == {"d_model": 80, "nhead": 2}


def test_bad_explain_input_is_one_line_and_dry_run_lists_the_variants_and_their_cost(tmp_path, tiny_store,
                                                                                        tiny_synthetic, capsys):
    path, url, _ = a_search(tmp_path, tiny_store)
    same = write_study(tmp_path / "same.toml", '[model]\nd_model = 16\npooling = "attention"\nloss = "am_softmax"\n')
    base = ["explain", str(path), "--data", str(tiny_synthetic), "--storage", url]
    for extra, message in [(["--trial", "7"], "no complete trial 7; complete trials: 0"),
                           (["--set", "model.d_model=8"], "explain takes train.KEY=VALUE"),
                           (["--set", "train.nope=1"], "unknown key train.nope"),
                           (["--reference", "none.toml"], "--reference none.toml: no such file"),
                           (["--seeds", "0"], "--seeds"),
                           (["--reference", str(same)], "there is nothing to explain")]:
        assert run_study.main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert run_study.main([*base, "--seeds", "4", "--dry-run", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 variants x 4 seeds = 16 cells of 40 steps, in study 's-explain-t0'" in out
    assert any(line.split() == "loss = ce puts back loss: am_softmax -> ce (with classifier, margin, scale)".split()
               for line in out.splitlines()), out
    assert "cost: about 0.1 trial-minutes in all" in out and "else at the winner's 80.0)" in out
    assert optuna.get_all_study_names(url) == ["s"]  # nothing created
    # an explain of the same trial with other settings: refused, and --name keeps both
    optuna.create_study(study_name="s-explain-t0", storage=url).set_user_attr("spec", {"explain": "another"})
    assert run_study.main([*base, "--seeds", "2"]) == 2
    err = capsys.readouterr().err
    assert "'s-explain-t0'" in err and "created with a different" in err and "(--name NEW)" in err
    assert run_study.main([*base, "--seeds", "2", "--dry-run", "--name", "mine"]) == 0
    assert "in study 'mine'" in capsys.readouterr().out


def test_explain_resumes_after_sigint_with_no_cell_trained_twice_and_its_numbers_are_the_stored_trials(
        tmp_path, tiny_store, tiny_synthetic):
    path, url, _ = a_search(tmp_path, tiny_store)
    args = ("explain", str(path), "--data", str(tiny_synthetic), "--storage", url, "--seeds", "2",
            "--set", "train.max_steps=100", "--set", "train.valid_steps=50")
    proc = start(*args, cwd=tmp_path)
    name = "s-explain-t0"
    wait_for(lambda ts: any(t.state == TrialState.COMPLETE for t in ts)
             and any(t.state == TrialState.RUNNING and run_config_of(t) for t in ts), name, url)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    done_before = {t.number for t in trials(name, url) if t.state == TrialState.COMPLETE}
    rerun = start(*args, cwd=tmp_path)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err + out
    ts = trials(name, url)
    complete = [t for t in ts if t.state == TrialState.COMPLETE]
    cells = [cell_of(t) for t in complete]
    assert len(cells) == len(set(cells)) == 8 and done_before <= {t.number for t in complete}
    assert [t.user_attrs.get("fail_reason") for t in ts if t.state == TrialState.FAIL] == ["interrupted"]
    # an independent reading of the stored trials: contribution = mean over seeds of (winner - row)
    value = {cell_of(t): t.value for t in complete}
    with open(tmp_path / "s.results" / f"{name}.csv") as f:
        table = {r["parameter"]: r for r in csv.DictReader(f)}
    assert set(table) == {"d_model", "pooling", "loss"}
    for r in table.values():
        expected = statistics.mean(value["winner", s] - value[r["row"], s] for s in (0, 1))
        assert float(r["contribution"]) == pytest.approx(expected, abs=1e-12)
    ce = next(t for t in complete if cell_of(t)[0] == "loss = ce")
    assert run_config_of(ce)["model"]["classifier"] == "linear" and "margin" not in run_config_of(ce)["model"]


def test_explain_refuses_a_search_with_no_complete_trial(tmp_path):
    path = write_study(tmp_path / "e.toml", SPACE)
    url = f"sqlite:///{tmp_path / 'e.db'}"
    optuna.create_study(study_name="e", storage=url)
    with pytest.raises(SpecError, match="has no complete trial to explain yet"):
        run_study.cmd_explain(run_study._parser().parse_args(["explain", str(path), "--storage", url]))


def _cell(row: str, seed: int, value: float | None, state=TrialState.COMPLETE, reason: str = ""):
    return create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                        params={"variant": row}, distributions={"variant": CategoricalDistribution([row])},
                        user_attrs={"seed": seed, **({"fail_reason": reason} if reason else {})})


def test_the_greedy_path_takes_the_best_candidate_once_its_step_is_finished(tmp_path, tiny_store):
    path, _, trial = a_search(tmp_path, tiny_store)
    e = explain(load_spec(path), trial, "sample", 2, {}, path=True)
    assert [f.name for f in e.factors] == ["d_model", "pooling", "loss"]
    rows = e.rows()  # every subset, named in the factors' order: the `variant` choices never change
    assert len(rows) == 8 and list(rows)[:2] == ["reference", "+ d_model"] and rows["winner"] == e.winner
    assert rows["+ d_model + loss"].model.loss == "am_softmax" and rows["+ pooling"].model.d_model == 80
    assert e.path_state([]) == ([], ["reference", "+ d_model", "+ pooling", "+ loss"], False)
    step0 = [_cell(r, s, v) for r, v in (("reference", 0.2), ("+ d_model", 0.3), ("+ pooling", 0.25))
             for s in (0, 1)]
    assert e.path_state(step0)[2] is False  # "+ loss" has no cell yet
    # "+ loss": one seed failed on its own (counts as finished), one complete, the best mean
    step0 += [_cell("+ loss", 0, 0.5), _cell("+ loss", 1, None, TrialState.FAIL, "NonFiniteLossError")]
    assert e.path_state(step0) == (["loss"], ["+ loss", "+ d_model + loss", "+ pooling + loss"], False)
    interrupted = [_cell("+ d_model + loss", s, None, TrialState.FAIL, "interrupted") for s in (0, 1)]
    assert e.path_state(step0 + interrupted)[2] is False  # an interrupted cell is retried, not finished
    step1 = [_cell(r, s, v) for r, v in (("+ d_model + loss", 0.4), ("+ pooling + loss", 0.6)) for s in (0, 1)]
    assert e.path_state(step0 + step1) == (["loss", "pooling"], ["+ pooling + loss", "winner"], False)
    assert e.path_state(step0 + step1 + [_cell("winner", s, 0.7) for s in (0, 1)]) == (
        ["loss", "pooling", "d_model"], [], True)


def test_a_path_run_by_two_workers_survives_sigterm_and_its_gains_are_the_stored_trials(tmp_path, tiny_store,
                                                                                          tiny_synthetic):
    path, url, _ = a_search(tmp_path, tiny_store)
    reference = write_study(tmp_path / "ref.toml", '[model]\nd_model = 16\npooling = "mean"\nloss = "ce"\n')
    args = ("explain", str(path), "--data", str(tiny_synthetic), "--storage", url, "--seeds", "2", "--path",
            "--reference", str(reference), "--workers", "2", "--set", "train.max_steps=100",
            "--set", "train.valid_steps=50")
    name = "s-explain-t0-path"
    proc = start(*args, cwd=tmp_path)
    wait_for(lambda ts: sum(t.state == TrialState.COMPLETE for t in ts) >= 3, name, url)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    rerun = start(*args, cwd=tmp_path)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err + out
    complete = [t for t in trials(name, url) if t.state == TrialState.COMPLETE]
    cells = [cell_of(t) for t in complete]
    # pooling and loss differ from this reference: reference, 2 candidates, then the winner; 2 seeds each
    assert len(cells) == len(set(cells)) == 8, cells
    study = optuna.load_study(study_name=name, storage=url)
    steps = study.user_attrs["path"]
    assert sorted(s["name"] for s in steps) == ["loss", "pooling"] and steps[-1]["row"] == "winner"
    value = {cell_of(t): t.value for t in complete}
    first = steps[0]["row"]
    assert statistics.mean(value[first, s] for s in (0, 1)) >= statistics.mean(
        value[r, s] for r in ("+ pooling", "+ loss") if r != first for s in (0, 1))  # the greedy choice
    with open(tmp_path / "s.results" / f"{name}.csv") as f:
        table = list(csv.DictReader(f))
    before = "reference"
    for r, step in zip(table, steps, strict=True):
        gain = statistics.mean(value[step["row"], s] - value[before, s] for s in (0, 1))
        assert r["row"] == step["row"] and float(r["gain"]) == pytest.approx(gain, abs=1e-12)
        before = step["row"]


def test_a_reference_file_that_sets_nothing_means_the_spaces_first_choices(tmp_path, tiny_store):
    path, _, trial = a_search(tmp_path, tiny_store, d_model=24, pooling="mean")
    empty = write_study(tmp_path / "empty.toml", "")
    assert [(f.name, f.reference) for f in explain(load_spec(path), trial, str(empty), 2, {}).factors] == [
        ("d_model", 16), ("pooling", "attention")]


def test_keys_the_winner_does_not_use_are_no_choice_and_go_back_with_the_key_that_wakes_them(tmp_path):
    spec = load_spec(write_study(tmp_path / "w.toml", SPACE.replace("nhead = 2", 'nhead = [2, 4]\nn_layers = 2\n'
                                                                                'encoder = ["none", "transformer"]')))
    cfg = spec.default_run_config()  # encoder none: nhead and n_layers configure nothing (not stored)
    trial = create_trial(value=0.9, user_attrs={"run_config": cfg.to_shown_dict()})
    factors = {f.name: f for f in explain(spec, trial, "sample", 2, {}).factors}
    assert "nhead" not in factors and "n_layers" not in factors
    # nhead (searched): the sample's; n_layers and ff_mult (fixed): the study file's, not the defaults left there
    assert factors["encoder"].back == {"encoder": "transformer", "ff_mult": 2.0, "n_layers": 2, "nhead": 2}


def test_each_rows_cost_comes_from_the_search_trials_that_share_its_change(tmp_path, tiny_store):
    path, _, trial = a_search(tmp_path, tiny_store)
    spec = load_spec(path)
    slow = dataclasses.replace(spec.default_run_config(), model=dataclasses.replace(
        spec.default_run_config().model, pooling="mean", d_model=24))  # pooling "mean", as its row has it
    others = [create_trial(value=0.1, user_attrs={"run_config": slow.to_shown_dict(), "steps_per_s": rate})
              for rate in (10.0, 20.0, 30.0)]
    e = explain(spec, trial, "sample", 2, {})
    minutes = row_minutes(e, trial, [trial, *others])
    assert minutes["pooling = mean"] == pytest.approx(40 / 20.0 / 60)  # the median of the three
    assert minutes["winner"] == minutes["loss = ce"] == pytest.approx(40 / 80.0 / 60)  # nothing alike: the winner's
