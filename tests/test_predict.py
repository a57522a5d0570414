"""From a study to a Kaggle submission: `train` (final fit) and `predict` (one checkpoint, a trial, the top k)."""
import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

import run_study
from data import open_store
from search import predict
from search.artifact_store import study_artifact_store
from search.attrs import ranked as ranked_trials
from search.attrs import run_config_of
from search.checkpoints import best_checkpoint_id, load
from search.config import RunConfig
from tests.conftest import write_study
from tests.test_cli import FAST, cli


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_synthetic) -> Path:
    """A 3-trial search by the real CLI: studies/fit.toml, its SQLite file and checkpoints."""
    cwd = tmp_path_factory.mktemp("predict")
    (cwd / "studies").mkdir()
    write_study(cwd / "studies" / "fit.toml", FAST.replace("max_steps = 40", "max_steps = 60"))
    cli("search", "studies/fit.toml", "--data", str(tiny_synthetic), "--n-trials", "3", cwd=cwd)
    return cwd


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_predict_writes_the_kaggle_format_in_testdata_order_and_scores_it(searched, tiny_synthetic, capsys):
    out = searched / "submission.csv"
    code = run_study.main(["predict", str(searched / "studies/fit.toml"), "--data", str(tiny_synthetic),
                           "--out", str(out), "--labels", str(tiny_synthetic / "test_labels.csv")])
    assert code == 0
    rows = _rows(out)
    assert rows[0] == ["Id", "Category"]
    test = json.loads((tiny_synthetic / "testdata.json").read_text())["utterances"]
    assert [r[0] for r in rows[1:]] == [u["feature_path"] for u in test]
    speakers = set(json.loads((tiny_synthetic / "mapping.json").read_text())["speaker2id"])
    assert {r[1] for r in rows[1:]} <= speakers
    truth = dict(_rows(tiny_synthetic / "test_labels.csv")[1:])
    accuracy = np.mean([truth[i] == c for i, c in rows[1:]])
    printed = capsys.readouterr().out
    assert f"accuracy {accuracy:.4f} on {len(test)} labelled test utterances" in printed
    assert re.search(r"\), on [12] CPU threads?\n", printed), printed  # the probe sized them (2 cores here)
    # the same checkpoint in bf16 on one thread: the same submission but for near-ties
    bf16 = searched / "bf16.csv"
    assert run_study.main(["predict", str(searched / "studies/fit.toml"), "--data", str(tiny_synthetic), "--out",
                           str(bf16), "--precision", "bf16", "--threads", "1"]) == 0
    assert "), on 1 CPU thread\n" in capsys.readouterr().out
    assert np.mean([a == b for a, b in zip(_rows(out), _rows(bf16), strict=True)]) >= 0.9
    assert accuracy > 2 / len(speakers)  # a trained model, well above chance
    # --labels with speaker indices (the fsdd style) scores the same
    ids = json.loads((tiny_synthetic / "mapping.json").read_text())["speaker2id"]
    by_index = searched / "labels_by_index.csv"
    by_index.write_text("Id,Category\n" + "".join(f"{i},{ids[s]}\n" for i, s in truth.items()))
    store = open_store(tiny_synthetic)
    predicted = [store.id2speaker.index(c) for _, c in rows[1:]]
    assert predict.score(by_index, store, np.array(predicted)) == (accuracy, len(test))


def test_top_k_averages_the_softmax_of_the_k_best_trials(searched, tiny_synthetic):
    study = optuna.load_study(study_name="fit", storage=f"sqlite:///{searched / 'studies/fit.db'}")
    store = open_store(tiny_synthetic)
    ranked = ranked_trials(study.trials)  # value, then ties by their last evaluations (search.attrs.rank_key)
    checkpoints = predict.from_study(study, None, 2)
    assert [c.name for c in checkpoints] == [f"fit/trial {t.number}" for t in ranked[:2]]
    each = [predict.predict_proba([c], store) for c in checkpoints]
    both = predict.predict_proba(checkpoints, store)
    np.testing.assert_allclose(both, (each[0] + each[1]) / 2, rtol=1e-6)
    np.testing.assert_allclose(both.sum(axis=1), 1.0, rtol=1e-6)
    # whole utterances of different lengths: padding is masked, so the batch size changes nothing
    np.testing.assert_allclose(predict.predict_proba(checkpoints[:1], store, batch_size=1), each[0], atol=1e-5)
    out = searched / "top2.csv"
    assert run_study.main(["predict", str(searched / "studies/fit.toml"), "--top-k", "2", "--data",
                           str(tiny_synthetic), "--out", str(out)]) == 0
    assert [r[1] for r in _rows(out)[1:]] == [store.id2speaker[i] for i in both.argmax(axis=1)]


def test_train_refits_the_best_trial_with_overrides_into_one_checkpoint(searched, tiny_synthetic, capsys):
    study = optuna.load_study(study_name="fit", storage=f"sqlite:///{searched / 'studies/fit.db'}")
    best = study.best_trial
    out = searched / "final.pt"
    assert run_study.main(["train", str(searched / "studies/fit.toml"), "--data", str(tiny_synthetic), "--set",
                           "train.max_steps=80", "--set", "data.valid_fraction=0.1", "--out", str(out)]) == 0
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["source"]["trial"] == best.number
    assert checkpoint["config"]["train"]["max_steps"] == 80 and checkpoint["config"]["data"]["valid_fraction"] == 0.1
    expected = RunConfig.from_dict(run_config_of(best)).model
    assert RunConfig.from_dict(checkpoint["config"]).model == expected  # the trial's model, unchanged
    assert checkpoint["steps_run"] == 80
    said = capsys.readouterr().out
    assert f"saved {out}" in said and "next: run-study predict" in said
    # and it predicts
    sub = searched / "final.csv"
    assert run_study.main(["predict", str(out), "--data", str(tiny_synthetic), "--out", str(sub)]) == 0
    assert len(_rows(sub)) == 1 + len(json.loads((tiny_synthetic / "testdata.json").read_text())["utterances"])


def test_a_trials_best_artifact_is_what_predict_uses(searched):
    study = optuna.load_study(study_name="fit", storage=f"sqlite:///{searched / 'studies/fit.db'}")
    trial = study.trials[1]
    checkpoint = load(study_artifact_store(study), best_checkpoint_id(study, trial))
    assert predict.from_study(study, "1", None)[0].values["valid_acc"] == checkpoint["valid_acc"] == trial.value


@pytest.mark.parametrize("case", ["other_mels", "other_speakers", "train_other_speakers", "train_no_gpu", "no_testdata",
                                  "garbage_file", "bad_trial", "bad_set", "pickled_code", "missing_labels",
                                  "other_data", "train_other_data", "missing_checkpoint", "truncated_file",
                                  "truncated_trial", "truncated_best", "bad_precision", "bad_threads"])
def test_bad_input_is_one_line_and_exit_2(searched, tiny_synthetic, hw4_folder, case, tmp_path, capsys):
    study = str(searched / "studies/fit.toml")
    data = str(tiny_synthetic)
    out = ["--out", str(tmp_path / "s.csv")]
    args = {  # built lazily: only this case's files
        "other_mels": lambda: ["predict", study, "--data", str(hw4_folder(n_mels=8)), *out],
        "other_speakers": lambda: ["predict", study, "--data", str(hw4_folder(n_mels=16)), *out],
        "train_other_speakers": lambda: ["train", study, "--data", str(hw4_folder(n_mels=16)),
                                         "--out", str(tmp_path / "f.pt")],
        "no_testdata": lambda: ["predict", study, "--data", str(_without_testdata(tiny_synthetic, tmp_path)), *out],
        "garbage_file": lambda: ["predict", str(_write(tmp_path / "x.pt", b"not a checkpoint")), "--data", data,
                                 *out],
        "bad_trial": lambda: ["predict", study, "--trial", "99", "--data", data, *out],
        "bad_set": lambda: ["train", study, "--data", data, "--set", "train.max_stepz=5"],
        "bad_precision": lambda: ["train", study, "--data", data, "--set", "train.precision=bf17"],
        "bad_threads": lambda: ["predict", study, "--data", data, "--threads", "0", *out],
        "train_no_gpu": lambda: ["train", study, "--gpus", "0", "--out", str(tmp_path / "f.pt")],
        "pickled_code": lambda: ["predict", str(_pickled(tmp_path / "evil.pt")), "--data", data, *out],
        "missing_labels": lambda: ["predict", study, "--data", data, "--labels", str(tmp_path / "none.csv"), *out],
        "other_data": lambda: ["predict", study, "--data", str(_one_test_utterance_less(tiny_synthetic, tmp_path)),
                               *out],
        "train_other_data": lambda: ["train", study, "--data", str(_one_test_utterance_less(tiny_synthetic, tmp_path)),
                                     "--out", str(tmp_path / "f.pt")],
        "missing_checkpoint": lambda: ["predict", str(_without_best_checkpoint(searched, tmp_path)), "--storage",
                                       f"sqlite:///{tmp_path / 'copy.db'}", "--data", data, *out],
        "truncated_file": lambda: ["predict", str(_truncated_copy(searched, tmp_path)), "--data", data, *out],
        "truncated_trial": lambda: ["predict", "fit", "--storage",
                                    _with_damaged_best(searched, tmp_path / "cut1", 1)[0], "--trial", "1",
                                    "--data", data, *out],
        "truncated_best": lambda: ["predict", "fit", "--storage",
                                   _with_damaged_best(searched, tmp_path / "cut", "best")[0], "--data", data, *out],
    }[case]()
    expected = {"other_mels": "n_mels is 8 but fit/trial", "no_testdata": "testdata.json", "garbage_file": "x.pt",
                "other_speakers": "mapping.json: its 4 speakers differ from the 8 that fit/trial",
                "train_other_speakers": "mapping.json: its 4 speakers differ from the 8 that study 'fit' was trained",
                "bad_trial": "--trial '99'", "bad_set": "max_stepz", "pickled_code": "evil.pt",
                "bad_precision": "train.precision='bf17' must be one of auto, fp32, bf16, fp16",
                "bad_threads": "--threads=0 must be positive",
                "train_no_gpu": "--gpus 0: this machine has no CUDA GPU",
                "missing_labels": "none.csv", "other_data": "--other-data predicts anyway",
                "train_other_data": "not the dataset study 'fit' was run on",
                "missing_checkpoint": "checkpoint is missing from the artifact store",
                "truncated_file": "cut.pt is damaged (cut short or corrupt",
                "truncated_trial": "trial 1 of study 'fit': trial-1-best.pt is damaged (cut short or corrupt",
                "truncated_best": "-best.pt is damaged (cut short or corrupt: not a complete torch file)"}[case]
    if case == "other_mels":  # as a user meets it: a process, its stderr and exit code
        run = cli(*args, cwd=searched, check=False)
        code, err = run.returncode, run.stderr
    else:
        code, err = run_study.main(args), capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert expected in lines[0]
    assert "pickled code ran" not in capsys.readouterr().out
    if case != "missing_labels":
        assert not (tmp_path / "s.csv").exists()  # nothing written before the input is known good
    assert not (tmp_path / "f.pt").exists()
    if case in ("other_mels", "other_speakers", "train_other_speakers"):  # refused from the JSON files alone
        assert not list(tmp_path.rglob(".hw4pack")), "the other folder was hashed and packed before the refusal"


def test_other_data_of_the_same_speakers_is_predicted_when_asked(searched, tiny_synthetic, tmp_path):
    other = _one_test_utterance_less(tiny_synthetic, tmp_path)
    out = tmp_path / "other.csv"
    assert run_study.main(["predict", str(searched / "studies/fit.toml"), "--data", str(other), "--other-data",
                           "--out", str(out)]) == 0
    expected = json.loads((other / "testdata.json").read_text())["utterances"]
    assert [r[0] for r in _rows(out)[1:]] == [u["feature_path"] for u in expected]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _without_testdata(root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "notest"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".hw4pack", "testdata.json"))
    return copy


def _one_test_utterance_less(root: Path, tmp_path: Path) -> Path:
    """Same speakers and n_mels, another dataset (its fingerprint differs): the last test utterance dropped."""
    copy = tmp_path / "other"
    if not copy.exists():
        shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".hw4pack"))
        test = json.loads((copy / "testdata.json").read_text())
        test["utterances"] = test["utterances"][:-1]
        (copy / "testdata.json").write_text(json.dumps(test))
    return copy


def _without_best_checkpoint(searched: Path, tmp_path: Path) -> str:
    """A copy of the study whose best trial's checkpoint file is gone from its (copied) artifact folder."""
    shutil.copy(searched / "studies/fit.db", tmp_path / "copy.db")
    shutil.copytree(searched / "studies/fit.artifacts", tmp_path / "copy.artifacts")
    study = optuna.load_study(study_name="fit", storage=f"sqlite:///{tmp_path / 'copy.db'}")
    study.set_user_attr("artifacts", str(tmp_path / "copy.artifacts"))
    (tmp_path / "copy.artifacts" / best_checkpoint_id(study, study.best_trial)).unlink()
    return "fit"


def _copy_study(searched: Path, folder: Path) -> optuna.Study:
    """The searched study copied (SQLite file and artifact folder) into folder, using its own artifacts."""
    folder.mkdir()
    shutil.copy(searched / "studies/fit.db", folder / "fit.db")
    shutil.copytree(searched / "studies/fit.artifacts", folder / "fit.artifacts")
    study = optuna.load_study(study_name="fit", storage=f"sqlite:///{folder / 'fit.db'}")
    study.set_user_attr("artifacts", str(folder / "fit.artifacts"))
    return study


def _cut(path: Path) -> None:
    """Keep the first half of a file, as a full disk or an interrupted copy leaves it."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _with_damaged_best(searched: Path, folder: Path, which: int | str) -> tuple[str, int]:
    """A copy of the study in folder whose trial `which` (a number, or "best") has its best checkpoint cut short:
    its storage URL and that trial's number."""
    study = _copy_study(searched, folder)
    trial = study.best_trial if which == "best" else study.trials[which]
    _cut(folder / "fit.artifacts" / best_checkpoint_id(study, trial))
    return f"sqlite:///{folder / 'fit.db'}", trial.number


def _truncated_copy(searched: Path, tmp_path: Path) -> Path:
    study = optuna.load_study(study_name="fit", storage=f"sqlite:///{searched / 'studies/fit.db'}")
    path = tmp_path / "cut.pt"
    shutil.copy(searched / "studies/fit.artifacts" / best_checkpoint_id(study, study.best_trial), path)
    _cut(path)
    return path


def test_top_k_skips_a_damaged_checkpoint_and_still_averages_k(searched, tiny_synthetic, tmp_path, capsys):
    url, damaged = _with_damaged_best(searched, tmp_path / "cut", "best")
    study = optuna.load_study(study_name="fit", storage=url)
    ranked = [t.number for t in ranked_trials(study.trials)]
    assert ranked[0] == damaged
    said: list[str] = []
    checkpoints = predict.from_study(study, None, 2, log=said.append)
    assert [c.name for c in checkpoints] == [f"fit/trial {n}" for n in ranked[1:3]]  # the next best complete ones
    assert said == [f"skipping trial {damaged}: trial-{damaged}-best.pt is damaged (cut short or corrupt: not a "
                    "complete torch file)"]
    # as a user meets it: one line on stderr, and the 2 that load averaged
    out = tmp_path / "top2.csv"
    args = ["predict", "fit", "--storage", url, "--data", str(tiny_synthetic)]
    assert run_study.main([*args, "--top-k", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == said and "Traceback" not in captured.err
    store = open_store(tiny_synthetic)
    both = predict.predict_proba(checkpoints, store)
    assert [r[1] for r in _rows(out)[1:]] == [store.id2speaker[i] for i in both.argmax(axis=1)]
    assert f"(fit/trial {ranked[1]}, fit/trial {ranked[2]})" in captured.out
    # K more than the study has that load: one line per skipped, then the error, exit 2
    assert run_study.main([*args, "--top-k", "3", "--out", str(tmp_path / "top3.csv")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [*said, "error: --top-k 3: study 'fit' has only 2 complete trial(s) with a checkpoint that loads "
                            "(1 more skipped: damaged or missing)"]
    assert not (tmp_path / "top3.csv").exists()


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def _pickled(path: Path) -> Path:
    torch.save({"format": 1, "model": _Evil()}, path)  # weights_only=True must refuse to run it
    return path


def test_predicting_from_a_pruned_trial_says_so(searched):
    """--trial N of a pruned trial works (its best weights up to the prune) and says that it was pruned."""
    from optuna.trial import TrialState, create_trial

    from search.artifact_store import STUDY_ATTR
    from search.predict import from_study

    url = f"sqlite:///{searched / 'studies' / 'fit.db'}"
    done = optuna.load_study(study_name="fit", storage=url).trials[0]
    pruned = optuna.create_study(study_name="fit-pruned", storage=url, direction="maximize")
    pruned.set_user_attr(STUDY_ATTR, optuna.load_study(study_name="fit", storage=url).user_attrs[STUDY_ATTR])
    pruned.add_trial(create_trial(state=TrialState.PRUNED, params=done.params, distributions=done.distributions,
                                  intermediate_values=done.intermediate_values, user_attrs=done.user_attrs,
                                  system_attrs={k: v for k, v in done.system_attrs.items()
                                                if k.startswith("artifacts:")}))
    said = []
    (checkpoint,) = from_study(pruned, "0", None, log=said.append)
    assert checkpoint is not None
    assert said == [f"note: trial 0 was pruned at step {done.user_attrs['steps_run']}; its checkpoint is its best "
                    "weights up to then"]


def test_train_and_predict_find_a_study_by_name_alone_and_its_dataset(searched, tmp_path, capsys):
    """Elsewhere, with only the study's name and storage: the dataset its search ran on is recorded on it."""
    url = f"sqlite:///{searched / 'studies/fit.db'}"
    study = optuna.load_study(study_name="fit", storage=url)
    assert Path(study.user_attrs["dataset"]["path"]).name == "tiny"
    out = tmp_path / "by-name.pt"
    assert run_study.main(["train", "fit", "--storage", url, "--set", "train.max_steps=20", "--out", str(out),
                           "--gpus", "none"]) == 0
    said = capsys.readouterr().out
    assert "20 steps on the CPU" in said  # placed as workers are: --gpus none, or auto / one index
    assert f"next: run-study predict {out} --data {study.user_attrs['dataset']['path']} --out submission.csv" in said
    assert run_study.main(["predict", "fit", "--storage", url, "--out", str(tmp_path / "s.csv")]) == 0


def test_a_final_fit_says_where_it_is_with_speed_and_eta_between_evaluations():
    from search.final import FitProgress

    now = [0.0]
    lines: list[str] = []
    progress = FitProgress(1000, lines.append, every_s=60, clock=lambda: now[0])
    for _ in range(250):  # 250 steps in 125 s, no evaluation yet: a line every 60 s
        progress.step()
        now[0] += 0.5
    assert lines == ["step 120/1000, 2 steps/s, 1 min 00 s so far, ETA 7 min 20 s",
                     "step 240/1000, 2 steps/s, 2 min 00 s so far, ETA 6 min 20 s"]
    progress.evaluated(250, 0.41)
    assert lines[-1] == "step 250/1000: valid_acc 0.4100 (best 0.4100), 2 steps/s, 2 min 05 s so far, ETA 6 min 15 s"


def test_the_budget_starved_hint_gives_commands_that_work(searched, tmp_path, monkeypatch):
    """The hint's commands, run as printed: a new study with twice the steps (this one cannot resume with another
    budget) and a final fit of the trial. The starved best trial is a copy of a real one with a rising curve."""
    import shlex

    from optuna.trial import create_trial

    from reports.tables import budget_starved

    work = tmp_path / "work"
    shutil.copytree(searched, work, ignore=shutil.ignore_patterns("*.results"))
    url = f"sqlite:///{work / 'studies/fit.db'}"
    study = optuna.load_study(study_name="fit", storage=url)
    study.set_user_attr("command", {**study.user_attrs["command"], "study_file": str(work / "studies/fit.toml")})
    monkeypatch.chdir(work)  # the hint shows paths as typed from here
    real = study.best_trial
    study.add_trial(create_trial(value=0.99, params=real.params, distributions=real.distributions,
                                 intermediate_values={10: 0.5, 20: 0.99}, user_attrs=real.user_attrs))
    hint = budget_starved(study)
    commands = [part.strip().rstrip(".") for part in hint.split(": ")[-2:]]
    new, fit = commands[0].split("; or a final fit of that trial")[0], commands[1]
    assert new == (f"run-study search studies/fit.toml --data {study.user_attrs['dataset']['path']} "
                   "--set study.name=fit-40steps --set train.max_steps=40")
    assert fit == f"run-study train studies/fit.toml --trial {len(study.trials) - 1} --set train.max_steps=80"
    env = "study.n_trials=1 train.max_steps=20 train.valid_steps=10"  # as small as the suite affords
    for command in (new, fit):
        run = cli(*shlex.split(command)[1:], cwd=work, check=False, env={"RUN_STUDY_SET": env})
        assert run.returncode == 0, (command, run.stderr)
    assert optuna.load_study(study_name="fit-40steps", storage=f"sqlite:///{work / 'studies/fit-40steps.db'}")
