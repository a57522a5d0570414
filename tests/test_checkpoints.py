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
from search.attrs import run_config_of
from search.checkpoints import artifacts, best_name, latest_name, load
from search.config import RunConfig
from search.storage import load_existing_study, normalize_url
from search.train import evaluate
from tests.conftest import fresh_database, small_disk_at
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
        assert trial.system_attrs["latest_state"] is None  # they were recorded there, never as artifacts
        metas = optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage)  # Optuna 5.0 reads them
        assert [(m.filename, m.artifact_id) for m in metas] == list(files.items())
        checkpoint = load(store, files[best_name(trial.number)])
        assert RunConfig.from_dict(checkpoint["config"]) == RunConfig.from_dict(run_config_of(trial))
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


@pytest.mark.parametrize(("kind", "how"), [("sqlite", signal.SIGTERM), ("postgresql", signal.SIGINT),
                                           ("mysql", signal.SIGKILL)])  # each kill on one storage: the suite's time
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
                       and ts[0].system_attrs.get("latest_state"), "killed", url)
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
    left = first.system_attrs["latest_state"]
    assert left["filename"] == latest_name(0, left["step"]) and left["step"] == step  # the one it resumed from
    assert load(study_artifact_store(optuna.load_study(study_name="killed", storage=normalize_url(url))),
                left["artifact_id"])["step"] == left["step"]
    assert artifacts(first, _storage(url)) == {}  # latest states are not Optuna artifacts
    assert list(artifacts(retry, _storage(url))) == [best_name(retry.number)]
    assert retry.system_attrs["latest_state"] is None  # dropped when the retry completed
    for trial in (first, retry):  # Optuna 5.0's reader fails on no entry of ours
        optuna.artifacts.get_all_artifact_meta(trial, storage=_storage(url))


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


# --- TrialCheckpoints on a real SQLite storage, without training ------------------------------------------
def _state(step: int) -> dict:
    return {"step": step, "weights": torch.full((4096,), float(step)), "history": [{"step": step}]}


def _study(tmp_path, storage=None) -> optuna.Study:
    storage = storage or optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'unit.db'}")
    return optuna.create_study(study_name="unit", storage=storage, direction="maximize")


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _retry_of(study: optuna.Study, *numbers: int) -> optuna.Trial:
    """A trial that retries `numbers` as Optuna's retry callback makes it: their system attrs copied (the last
    one's), and retry_history."""
    trial = study.ask()
    for key, value in study.trials[numbers[-1]].system_attrs.items():
        study._storage.set_trial_system_attr(trial._trial_id, key, value)
    study._storage.set_trial_system_attr(trial._trial_id, "retry_history", list(numbers))
    return trial


def test_only_the_best_checkpoint_is_an_optuna_artifact(tmp_path):
    """Regression: Optuna 5.0's get_all_artifact_meta failed (TypeError) on the null "artifacts:" entries that
    removed latest states left. Latest states are recorded in our own attr, the best model as an artifact."""
    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta

    from search.checkpoints import LATEST_ATTR, TrialCheckpoints, latest_name

    study = _study(tmp_path)
    folder = tmp_path / "store"
    folder.mkdir()
    trial = study.ask()
    checkpoints = TrialCheckpoints(trial, FileSystemArtifactStore(folder))
    checkpoints.save_latest(_state(10))
    checkpoints.save_latest(_state(20))
    record = study._storage.get_trial_system_attrs(trial._trial_id)[LATEST_ATTR]
    assert record["filename"] == latest_name(trial.number, 20) and record["step"] == 20
    assert _files(folder) == [record["artifact_id"]]  # the step-10 state was removed once step 20 was recorded
    assert get_all_artifact_meta(trial) == []  # latest states are not Optuna artifacts
    checkpoints.save_best({"format": 1, "model": {"w": torch.ones(3)}})
    checkpoints.drop_latest()
    study.tell(trial, 0.5)
    frozen = study.trials[0]
    assert frozen.system_attrs[LATEST_ATTR] is None
    metas = get_all_artifact_meta(frozen, storage=study._storage)
    assert [(m.filename, m.mimetype, m.encoding) for m in metas] == [(best_name(0), "application/octet-stream", None)]
    assert _files(folder) == [metas[0].artifact_id]
    assert torch.equal(load(FileSystemArtifactStore(folder), metas[0].artifact_id)["model"]["w"], torch.ones(3))
    assert artifacts(frozen, study._storage) == {best_name(0): metas[0].artifact_id}


def test_a_retry_resumes_from_the_latest_state_attr_and_skips_one_cut_short(tmp_path):
    from optuna.artifacts import FileSystemArtifactStore

    from search.checkpoints import LATEST_ATTR, TrialCheckpoints

    study = _study(tmp_path)
    store = FileSystemArtifactStore(tmp_path)
    dead = TrialCheckpoints(study.ask(), store)
    dead.save_latest(_state(10))
    dead.save_latest(_state(20))  # then killed: not dropped
    study.tell(0, state=TrialState.FAIL)
    # trial 1 retries trial 0 and dies before its first save: it holds only a copy of trial 0's attr
    study.tell(_retry_of(study, 0), state=TrialState.FAIL)
    said: list[str] = []
    retry = TrialCheckpoints(_retry_of(study, 0, 1), store, said.append)
    state = retry.resume_state(lambda s: True)
    assert state["step"] == 20 and torch.equal(state["weights"], _state(20)["weights"])
    assert said == ["trial 2: resuming trial 0 from step 20"]
    # the copied attr does not make the retry remove the dead trial's file when it saves or ends
    retry.save_latest(_state(30))
    retry.drop_latest()
    recorded = study._storage.get_trial_system_attrs(study.trials[0]._trial_id)[LATEST_ATTR]
    assert load(store, recorded["artifact_id"])["step"] == 20
    # cut short (a disk that filled, a copy interrupted): one line, and no resume
    path = tmp_path / recorded["artifact_id"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    said.clear()
    assert TrialCheckpoints(_retry_of(study, 0), store, said.append).resume_state(lambda s: True) is None
    assert said == ["trial 3: skipping trial-0-latest-step00000020.pt: it is damaged (cut short or corrupt: "
                    "not a complete torch file)"]


def test_a_study_of_the_former_layout_still_resumes(tmp_path):
    """Latest states as "artifacts:" entries (removed ones marked null), as this project wrote them before."""
    import io

    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    from search.checkpoints import TrialCheckpoints, latest_name

    study = _study(tmp_path)
    store = FileSystemArtifactStore(tmp_path)
    dead = study.ask()
    ids = {}
    for step in (10, 20, 30):
        path = tmp_path / latest_name(0, step)
        torch.save(_state(step), path)
        ids[step] = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=dead)
    study._storage.set_trial_system_attr(dead._trial_id, f"artifacts:{ids[10]}", json.dumps(None))  # removed
    store.remove(ids[10])
    cut = io.BytesIO(store.open_reader(ids[30]).read()[:100])
    store.write(ids[30], cut)  # the newest was cut short by the kill
    study.tell(dead, state=TrialState.FAIL)
    said: list[str] = []
    state = TrialCheckpoints(_retry_of(study, 0), store, said.append).resume_state(lambda s: True)
    assert state["step"] == 20
    assert said == [f"trial 1: skipping {latest_name(0, 30)}: it is damaged (cut short or corrupt: not a complete "
                    "torch file)", "trial 1: resuming trial 0 from step 20"]


class _HalfStore:
    """A folder store whose write stores half the bytes and says nothing (a full disk it does not notice)."""

    def __new__(cls, folder):
        from optuna.artifacts import FileSystemArtifactStore

        class Half(FileSystemArtifactStore):
            def write(self, artifact_id, content_body) -> None:
                data = content_body.read()
                with open(self._get_filepath(artifact_id), "wb") as f:
                    f.write(data[: len(data) // 2])

        return Half(folder)


def test_a_short_write_leaves_no_record_and_raises_disk_full(tmp_path):
    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta

    from search.checkpoints import LATEST_ATTR, TrialCheckpoints
    from search.faults import DiskFull, is_disk_full

    study = _study(tmp_path)
    folder = tmp_path / "store"
    folder.mkdir()
    trial = study.ask()
    good = TrialCheckpoints(trial, FileSystemArtifactStore(folder))
    good.save_latest(_state(10))
    kept = _files(folder)
    half = TrialCheckpoints(trial, _HalfStore(folder))
    half.recorded = good.recorded
    with pytest.raises(DiskFull, match=rf"no space left in {folder}.*trial-0-latest-step00000020.pt: \d+ of \d+ "
                                       "bytes stored") as raised:
        half.save_latest(_state(20))
    assert is_disk_full(raised.value) and raised.value.where == str(folder)
    assert _files(folder) == kept  # the partial file is gone, the recorded one is kept
    attrs = study._storage.get_trial_system_attrs(trial._trial_id)
    assert attrs[LATEST_ATTR]["step"] == 10 and load(FileSystemArtifactStore(folder), kept[0])["step"] == 10
    with pytest.raises(DiskFull, match="trial-0-best.pt"):
        half.save_best({"format": 1, "model": {}})
    assert _files(folder) == kept and get_all_artifact_meta(trial) == []  # no record of a cut-short best model


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 kB file system."""
    with small_disk_at(tmp_path / "tiny", "64k") as mount:
        yield mount


def test_a_full_disk_raises_disk_full_naming_the_folder_and_leaves_nothing(tmp_path, tiny_tmpfs, monkeypatch):
    """On a real full file system: the store's (the write fails with ENOSPC) and the temporary folder's (torch.save
    fails: its RuntimeError wraps the ENOSPC)."""
    import tempfile

    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta

    from search.checkpoints import LATEST_ATTR, TrialCheckpoints
    from search.faults import DiskFull

    study = _study(tmp_path)
    trial = study.ask()
    big = {"step": 10, "weights": torch.zeros(100_000)}  # 400 kB
    checkpoints = TrialCheckpoints(trial, FileSystemArtifactStore(tiny_tmpfs))
    with pytest.raises(DiskFull, match=rf"no space left in {tiny_tmpfs} \(writing trial-0-latest-step00000010.pt: "
                                       r"OSError: \[Errno 28\]"):
        checkpoints.save_latest(big)
    with pytest.raises(DiskFull, match=rf"no space left in {tiny_tmpfs}"):
        checkpoints.save_best(big)
    assert _files(tiny_tmpfs) == [] and get_all_artifact_meta(trial) == []
    assert LATEST_ATTR not in study._storage.get_trial_system_attrs(trial._trial_id)

    folder = tmp_path / "store"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tiny_tmpfs))
    with pytest.raises(DiskFull, match=rf"no space left in {tiny_tmpfs} \(saving trial-0-latest-step00000010.pt"):
        TrialCheckpoints(trial, FileSystemArtifactStore(folder)).save_latest(big)
    assert _files(tiny_tmpfs) == [] and _files(folder) == []


def test_while_the_database_is_away_a_new_latest_state_waits_as_pending(tmp_path):
    """set_trial_system_attr fails with StorageAway (search.storage.no_wait) a few times: training goes on, the
    newest state is kept beside the recorded one, and the next save or drop records it first."""
    from optuna.artifacts import FileSystemArtifactStore

    from search.checkpoints import LATEST_ATTR, TrialCheckpoints
    from search.faults import StorageAway

    class Away(optuna.storages.RDBStorage):
        fail, watched = 0, None

        def set_trial_system_attr(self, trial_id, key, value) -> None:
            if self.fail and trial_id == self.watched:
                self.fail -= 1
                raise StorageAway("database away (test)")
            super().set_trial_system_attr(trial_id, key, value)

    storage = Away(f"sqlite:///{tmp_path / 'away.db'}")
    study = _study(tmp_path, storage)
    folder = tmp_path / "store"
    folder.mkdir()
    store = FileSystemArtifactStore(folder)
    trial = study.ask()
    storage.watched = trial._trial_id
    checkpoints = TrialCheckpoints(trial, store)

    def recorded() -> dict | None:
        return storage.get_trial_system_attrs(trial._trial_id).get(LATEST_ATTR)

    def steps_stored() -> list[int]:
        return sorted(load(store, name)["step"] for name in _files(folder))

    best = {"format": 1, "model": {}, "step": 0}
    checkpoints.save_latest(_state(10))
    storage.fail = 4  # calls that fail: the records of 20, of 20 again and of 30, the pending one in save_best
    checkpoints.save_latest(_state(20))  # its record fails: kept as pending, step 10 still recorded
    assert recorded()["step"] == 10 and steps_stored() == [10, 20]
    # a retry now (the worker killed) finds the recorded state, which loads
    assert TrialCheckpoints(_retry_of(study, 0), store).resume_state(lambda s: True)["step"] == 10
    checkpoints.save_latest(_state(30))  # still away (the pending record, then its own): 30 replaces 20
    assert storage.fail == 1 and recorded()["step"] == 10 and steps_stored() == [10, 30]
    with pytest.raises(StorageAway):
        checkpoints.save_best(best)  # still away: the pending record comes first
    assert recorded()["step"] == 10 and steps_stored() == [10, 30]
    checkpoints.save_best(best)  # back: step 30 recorded first, step 10 removed
    assert recorded()["step"] == 30 and artifacts(trial, storage).keys() == {best_name(0)}
    assert steps_stored() == [0, 30]
    storage.fail = 1
    checkpoints.save_latest(_state(40))
    assert recorded()["step"] == 30
    checkpoints.drop_latest()  # back: 40 recorded, then the attr nulled; only the best model is left
    assert recorded() is None and _files(folder) == [artifacts(trial, storage)[best_name(0)]]


def test_a_failed_record_removes_the_new_file_and_keeps_the_recorded_one(tmp_path):
    from optuna.artifacts import FileSystemArtifactStore

    from search.checkpoints import LATEST_ATTR, TrialCheckpoints

    class Broken(optuna.storages.RDBStorage):
        broken = False

        def set_trial_system_attr(self, trial_id, key, value) -> None:
            if self.broken:
                raise RuntimeError("trial already finished (test)")
            super().set_trial_system_attr(trial_id, key, value)

    storage = Broken(f"sqlite:///{tmp_path / 'broken.db'}")
    study = _study(tmp_path, storage)
    trial = study.ask()
    store = FileSystemArtifactStore(tmp_path)
    checkpoints = TrialCheckpoints(trial, store)
    checkpoints.save_latest(_state(10))
    before = sorted(p.name for p in tmp_path.iterdir())
    storage.broken = True
    for call in (lambda: checkpoints.save_latest(_state(20)), lambda: checkpoints.save_best({"format": 1})):
        with pytest.raises(RuntimeError, match="already finished"):
            call()
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert load(store, storage.get_trial_system_attrs(trial._trial_id)[LATEST_ATTR]["artifact_id"])["step"] == 10
