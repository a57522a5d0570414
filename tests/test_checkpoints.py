"""Checkpoints as Optuna artifacts: best and latest per trial, and a killed trial's retry resuming from its latest."""
import json
import random
import signal
import time
from contextlib import ExitStack

import optuna
import pytest
import torch
from optuna.trial import TrialState

from data.batches import fixed_valid_batches, split
from models import build_model
from search.artifact_store import study_artifact_store
from search.checkpoints import artifacts, best_name, load
from search.config import RunConfig
from search.storage import load_existing_study, normalize_url
from search.train import evaluate
from tests.conftest import fresh_database
from tests.test_workers import SPACE, n_state, start, wait_for, write_study


def test_each_trial_keeps_its_best_model_and_no_latest_state(tmp_path, tiny_synthetic, tiny_store):
    study_file = write_study(tmp_path / "ck.toml", SPACE.format(steps=40))
    proc = start("search", str(study_file), "--data", str(tiny_synthetic), "--n-trials", "2", cwd=tmp_path)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    study = load_existing_study("ck", f"sqlite:///{tmp_path / 'ck.db'}")
    assert (tmp_path / "ck.artifacts").is_dir() and study.user_attrs["artifacts"] == str(tmp_path / "ck.artifacts")
    store = study_artifact_store(study)
    for trial in study.trials:
        files = artifacts(trial, study._storage)
        assert list(files) == [best_name(trial.number)], files  # the latest states were removed at the end
        checkpoint = load(store, files[best_name(trial.number)])
        assert checkpoint["config"] == trial.user_attrs["run_config"]
        assert checkpoint["valid_acc"] == trial.user_attrs["best_valid_acc"]
        assert checkpoint["id2speaker"] == list(tiny_store.id2speaker)
        cfg = RunConfig.from_dict(checkpoint["config"])
        model = build_model(cfg.model, tiny_store.n_mels, tiny_store.n_classes)
        model.load_state_dict(checkpoint["model"])
        _, valid_idx = split(tiny_store.labels[: tiny_store.n_train], cfg.data.valid_fraction, cfg.data.split_seed)
        batches = fixed_valid_batches(tiny_store, valid_idx, cfg.train.segment_len, cfg.train.batch_size,
                                      cfg.data.split_seed, cfg.data.valid_mode)
        assert evaluate(model, batches, torch.device("cpu")) == pytest.approx(checkpoint["valid_acc"])
    # exactly one file per trial is left in the store
    assert len(list((tmp_path / "ck.artifacts").iterdir())) == len(study.trials) == 2


@pytest.mark.parametrize(("kind", "how"), [("sqlite", signal.SIGTERM), ("sqlite", signal.SIGKILL),
                                           ("postgresql", signal.SIGINT), ("mysql", signal.SIGKILL)])
def test_a_killed_trial_is_retried_from_its_latest_state_with_the_same_history(tmp_path, tiny_synthetic, kind, how):
    """Killed (SIGTERM / SIGINT: failed as interrupted; kill -9: reaped by its heartbeat) at a random moment after
    its second evaluation, on SQLite, PostgreSQL and MariaDB: the retry starts from the latest state and ends
    with the very curve of an uninterrupted run."""
    with ExitStack() as stack:
        url = (f"sqlite:///{tmp_path / 'killed.db'}" if kind == "sqlite"
               else stack.enter_context(fresh_database(kind)))
        _kill_and_resume(tmp_path, tiny_synthetic, how, url)


def _kill_and_resume(tmp_path, tiny_synthetic, how, url: str) -> None:
    body = SPACE.format(steps=240)
    killed = write_study(tmp_path / "killed.toml", body)
    whole = write_study(tmp_path / "whole.toml", body)
    data = ("--data", str(tiny_synthetic), "--n-trials", "1")
    proc = start("search", str(killed), *data, "--storage", url, cwd=tmp_path)
    reference = start("search", str(whole), *data, cwd=tmp_path)
    running = wait_for(lambda ts: ts and ts[0].state == TrialState.RUNNING and len(ts[0].intermediate_values) >= 2
                       and any(k.startswith("artifacts:") for k in ts[0].system_attrs), "killed", url)
    time.sleep(random.uniform(0, 0.5))  # anywhere in the trial's training, checkpoint uploads included
    proc.send_signal(how)
    proc.communicate(timeout=60)
    assert running[0].state == TrialState.RUNNING
    resumed = start("search", str(killed), *data, "--storage", url, cwd=tmp_path)
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    ref_out, ref_err = reference.communicate(timeout=240)
    assert reference.returncode == 0, ref_err

    trials = optuna.load_study(study_name="killed", storage=normalize_url(url)).trials
    assert n_state(trials, TrialState.FAIL) == 1 and n_state(trials, TrialState.COMPLETE) == 1
    first, retry = trials
    step = retry.user_attrs["resumed_from_step"]
    assert step >= 40 and f"resuming trial 0 from step {step}" in err + out
    assert retry.params == first.params
    uninterrupted = optuna.load_study(study_name="whole", storage=f"sqlite:///{tmp_path / 'whole.db'}").trials[0]
    assert uninterrupted.params == retry.params
    assert retry.intermediate_values == uninterrupted.intermediate_values  # bit-identical on CPU
    assert retry.value == uninterrupted.value
    # the dead trial keeps the state it died with (its retry read it); the retry keeps only its best model
    left = list(artifacts(first, _storage(url)))
    assert left and all(n.startswith("trial-0-latest-") for n in left)  # two only if killed between them
    assert list(artifacts(retry, _storage(url))) == [best_name(retry.number)]
    meta = [json.loads(v) for k, v in retry.system_attrs.items() if k.startswith("artifacts:")]
    assert None in meta  # removed latest states are marked null, as optuna-dashboard's delete does


def _storage(url: str):
    return optuna.storages.get_storage(normalize_url(url))


def test_study_artifacts_setting_puts_checkpoints_there_and_the_study_remembers(tmp_path, tiny_synthetic,
                                                                                monkeypatch):
    import run_study
    from tests.test_cli import FAST

    monkeypatch.chdir(tmp_path)
    study_file = write_study(tmp_path / "where.toml", FAST)
    assert run_study.main(["search", str(study_file), "--data", str(tiny_synthetic), "--n-trials", "1", "-q",
                           "--set", "study.artifacts=shared/ckpt"]) == 0
    study = load_existing_study("where", f"sqlite:///{tmp_path / 'where.db'}")
    assert study.user_attrs["artifacts"] == str(tmp_path / "shared" / "ckpt")
    assert not (tmp_path / "where.artifacts").exists()
    assert load(study_artifact_store(study), artifacts(study.trials[0], study._storage)[best_name(0)])["model"]


def test_artifact_locations_are_checked():
    import importlib.util

    from search.artifact_store import open_artifact_store
    from search.spec import SpecError

    with pytest.raises(SpecError, match="ftp://x/y.*use a folder, s3://BUCKET/PREFIX or gs://BUCKET/PREFIX"):
        open_artifact_store("ftp://x/y")
    if importlib.util.find_spec("boto3") is None:
        with pytest.raises(SpecError, match="needs boto3: pip install boto3"):
            open_artifact_store("s3://bucket/prefix")


def test_a_bucket_prefix_keeps_ids_under_it():
    """s3://BUCKET/PREFIX: Optuna's bucket stores take no prefix; the wrapper puts every id under it."""
    import io

    from search.artifact_store import _Prefixed

    class Bucket:  # the ArtifactStore protocol over a dict, as a bucket holds keys
        def __init__(self) -> None:
            self.keys: dict[str, bytes] = {}

        def write(self, artifact_id, body) -> None:
            self.keys[artifact_id] = body.read()

        def open_reader(self, artifact_id):
            return io.BytesIO(self.keys[artifact_id])

        def remove(self, artifact_id) -> None:
            del self.keys[artifact_id]

    bucket = Bucket()
    store = _Prefixed(bucket, "team/hw4/")
    store.write("abc", io.BytesIO(b"weights"))
    assert list(bucket.keys) == ["team/hw4/abc"] and store.open_reader("abc").read() == b"weights"
    store.remove("abc")
    assert bucket.keys == {}
