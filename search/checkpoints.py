"""Checkpoints in the study's artifact store: each trial's best model, and its latest training state while it runs.

Files go into an Optuna artifact store (a folder beside the SQLite file by default; any folder, or s3://
or gs:// when studies span machines).

- The best model `trial-N-best.pt` is an Optuna artifact: its metadata is the trial's "artifacts:<id>" system
  attr (the JSON Optuna's upload_artifact writes), so optuna-dashboard lists it on the trial page.
- The latest training state `trial-N-latest-stepS.pt` is NOT an Optuna artifact: it is stored under an id of
  ours (uuid4) and the current one is the trial system attr `latest_state` = {"artifact_id", "filename",
  "step"}, overwritten on each save and null once dropped. (Optuna 5.0's get_all_artifact_meta fails on an
  "artifacts:" attr marked null, so removed files are never recorded there.)

Every file is written first and checked complete (a folder store: the stored size is the local size), and
only then recorded: a full disk leaves no record of a cut-short file, raises search.faults.DiskFull naming
the folder, and removes what it wrote. A running trial keeps ONE recorded latest state: a new one is stored
and recorded before the previous one is removed (a kill at any line leaves a recorded one that loads), and
it is dropped when the trial finishes. While the database is away (search.faults.StorageAway) a new state is
kept as pending, beside the recorded one; the next save or drop records it first. A trial that dies keeps
its latest state: its retry continues from it (studies of the former layout, latest states as "artifacts:"
entries, still resume).
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import ArtifactMeta, FileSystemArtifactStore
from optuna.trial import FrozenTrial

from search.artifact_store import STUDY_ATTR, _Prefixed, default_location, open_artifact_store
from search.faults import DiskFull, StorageAway, is_disk_full
from search.storage import ARTIFACTS_PREFIX, LATEST_ATTR
from search.studyfile import SpecError

CHECKPOINT_FORMAT = 1
# LATEST_ATTR (trial system attr): {"artifact_id", "filename", "step"} of its latest state, or null
MIMETYPE = "application/octet-stream"


def open_checkpoints(study: optuna.Study, spec, storage_url: str):
    """The study's artifact store: [study] artifacts, else where the study keeps them, else the default.
    The location is stored on the study, so train, predict and the dashboard find it from the storage."""
    location = spec.artifacts or study.user_attrs.get(STUDY_ATTR) or default_location(storage_url, spec.path)
    if "://" not in location:
        location = str(Path(location).resolve())
    store = open_artifact_store(location)
    if study.user_attrs.get(STUDY_ATTR) != location:
        study.set_user_attr(STUDY_ATTR, location)
    return store


# --- listing and loading ---------------------------------------------------------------------------------
def artifacts(trial: FrozenTrial | optuna.Trial, storage) -> dict[str, str]:
    """filename -> artifact id of a trial's live Optuna artifacts (its best model; in studies of the former
    layout also its latest states; entries marked null were removed)."""
    return _live_artifacts(storage.get_trial_system_attrs(trial._trial_id))


def _live_artifacts(attrs: dict[str, Any]) -> dict[str, str]:
    found = {}
    for key, value in attrs.items():
        meta = json.loads(value) if key.startswith(ARTIFACTS_PREFIX) and isinstance(value, str) else None
        if isinstance(meta, dict) and meta.get("filename") and meta.get("artifact_id"):
            found[meta["filename"]] = meta["artifact_id"]
    return found


def latest_state(number: int, attrs: dict[str, Any]) -> dict[str, Any] | None:
    """Trial `number`'s recorded latest state {"artifact_id", "filename", "step"} from its system attrs, or None.
    Only its own: a retry starts with a copy of the dead trial's system attrs, which names the dead trial's file."""
    record = attrs.get(LATEST_ATTR)
    if isinstance(record, dict) and str(record.get("filename", "")).startswith(f"trial-{number}-latest-"):
        return record
    return None


def best_name(number: int) -> str:
    return f"trial-{number}-best.pt"


def latest_name(number: int, step: int) -> str:
    return f"trial-{number}-latest-step{step:08d}.pt"


class DamagedCheckpoint(SpecError):
    """A checkpoint file that does not load: cut short, corrupt, not a torch file, or holding pickled code."""

    def __init__(self, filename: str, problem: str, where: str = "") -> None:
        self.filename, self.problem = filename, problem
        super().__init__(f"{where}{filename} {problem}")


def load_problem(err: BaseException) -> str:
    """Why torch.load failed, in a few words (its own messages run to many lines)."""
    text = str(err)
    pickled = re.search(r"Unsupported global: (GLOBAL \S+)", text)
    if pickled:
        return f"holds pickled code, refused by weights_only=True ({pickled.group(1)})"
    cut = isinstance(err, EOFError) or (isinstance(err, OSError) and err.errno == errno.EINVAL)  # a seek before 0
    if cut or "central directory" in text or "PytorchStreamReader" in text:
        return "is damaged (cut short or corrupt: not a complete torch file)"
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|Check the documentation|$)", text, re.S)
    if unpickler:
        return f"is not a torch checkpoint ({' '.join(unpickler.group(1).split())[:120]})"
    first = text.strip().splitlines()[0][:160] if text.strip() else ""
    return f"does not load ({type(err).__name__}{': ' + first if first else ''})"


def load(artifact_store, artifact_id: str, filename: str | None = None) -> dict[str, Any]:
    """A checkpoint from the store, loaded the safe way (no pickled code). With its filename: a file that
    does not load raises DamagedCheckpoint (a missing one: Optuna's ArtifactNotFound)."""
    with artifact_store.open_reader(artifact_id) as reader:
        try:
            return torch.load(reader, map_location="cpu", weights_only=True)
        except Exception as err:
            if filename is None:
                raise
            raise DamagedCheckpoint(filename, load_problem(err)) from err


def load_file(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def model_checkpoint(result, cfg, store) -> dict[str, Any]:
    """A trained model and what predicting with it needs: config, speakers, data fingerprint."""
    return {
        "format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "model": result.best_state,
        "id2speaker": list(store.id2speaker), "n_mels": store.n_mels, "fingerprint": store.fingerprint,
        "step": result.best_step, "valid_acc": result.best_valid_acc, "steps_run": result.steps_run,
    }


# --- storing: file first, checked, then the record ---------------------------------------------------------
def store_location(artifact_store) -> str:
    """Where a store keeps its files, for messages."""
    if isinstance(artifact_store, FileSystemArtifactStore):
        return str(artifact_store._base_path)
    if isinstance(artifact_store, _Prefixed):
        return f"{store_location(artifact_store.store).rstrip('/')}/{artifact_store.prefix}"
    bucket = getattr(artifact_store, "bucket", None) or getattr(artifact_store, "bucket_name", None)
    return f"bucket {bucket}" if isinstance(bucket, str) else type(artifact_store).__name__


def _reason(err: BaseException) -> str:
    while err.__cause__ is not None or err.__context__ is not None:  # the OSError under torch's RuntimeError
        if isinstance(err, OSError) and err.errno is not None:
            break
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160] if str(err).strip() else ''}"


def _discard(artifact_store, artifact_id: str) -> None:
    """Remove a file that is not (or no longer) recorded. One already gone is fine; one that cannot be removed
    (a bucket that refuses) is left behind: its removal must not undo what was recorded, nor hide why a write
    failed."""
    try:
        artifact_store.remove(artifact_id)
    except Exception:
        pass


def store_file(artifact_store, name: str, obj: dict[str, Any]) -> str:
    """torch.save `obj` to a temporary file, write it to the store under a new id, check the stored copy is
    complete, and return the id. Nothing is recorded. A failed or short write removes what it wrote and
    raises (a full disk: DiskFull naming the temporary folder or the store)."""
    artifact_id = str(uuid.uuid4())
    tmp_root = tempfile.gettempdir()
    with tempfile.TemporaryDirectory(prefix="hw4ckpt-") as tmp:
        path = os.path.join(tmp, name)
        try:
            with open(path, "wb") as f:  # a Python file: ENOSPC reaches us as an OSError under torch's error
                torch.save(obj, f)
        except Exception as err:
            if is_disk_full(err):
                raise DiskFull(tmp_root, f"saving {name}: {_reason(err)}") from err
            raise
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                artifact_store.write(artifact_id, f)
            stored = _stored_size(artifact_store, artifact_id)
        except BaseException as err:
            _discard(artifact_store, artifact_id)
            if isinstance(err, Exception) and is_disk_full(err):
                raise DiskFull(store_location(artifact_store), f"writing {name}: {_reason(err)}") from err
            raise
    if stored is not None and stored != size:
        _discard(artifact_store, artifact_id)
        raise DiskFull(store_location(artifact_store), f"{name}: {stored} of {size} bytes stored")
    return artifact_id


def _stored_size(artifact_store, artifact_id: str) -> int | None:
    """The stored file's size for a folder store; None (trust write()) for others."""
    if isinstance(artifact_store, FileSystemArtifactStore):
        return artifact_store._get_filepath(artifact_id).stat().st_size
    return None


def record_artifact(storage, trial_id: int, artifact_id: str, filename: str) -> None:
    """The "artifacts:<id>" trial system attr Optuna's upload_artifact writes: optuna-dashboard lists it."""
    meta = ArtifactMeta(artifact_id=artifact_id, filename=filename, mimetype=MIMETYPE, encoding=None)
    storage.set_trial_system_attr(trial_id, ARTIFACTS_PREFIX + artifact_id, json.dumps(asdict(meta)))


class TrialCheckpoints:
    """The checkpoints of one running trial: resume state from the trial it retries, latest, best."""

    def __init__(self, trial: optuna.Trial, artifact_store, log: Callable[[str], None] = print) -> None:
        self.trial, self.store, self.log = trial, artifact_store, log
        self.storage = trial.study._storage
        self.recorded: dict[str, Any] | None = None  # the latest state our `latest_state` attr names
        self.pending: dict[str, Any] | None = None  # a newer one, stored while the database was away

    @property
    def latest_id(self) -> str | None:
        """The id of the newest latest state this trial stored (pending, else recorded)."""
        newest = self.pending or self.recorded
        return newest["artifact_id"] if newest else None

    def resume_state(self, resumable: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        """The newest loadable latest state of the trial(s) this one retries, if it continues this run."""
        history = self.storage.get_trial_system_attrs(self.trial._trial_id).get("retry_history", [])  # Optuna's
        trials = self.trial.study.get_trials(deepcopy=False)
        for number in reversed(history):
            for name, artifact_id in _latest_candidates(number, self.storage.get_trial_system_attrs(
                    trials[number]._trial_id)):
                try:
                    state = load(self.store, artifact_id, name)
                except DamagedCheckpoint as err:  # a file cut short by a kill: try the one before
                    self.log(f"trial {self.trial.number}: skipping {name}: it {err.problem}")
                    continue
                except Exception as err:  # gone from the store, or the store unreadable
                    self.log(f"trial {self.trial.number}: skipping {name} ({type(err).__name__}: {err})")
                    continue
                if resumable(state):
                    self.log(f"trial {self.trial.number}: resuming trial {number} from step {state['step']}")
                    return state
        return None

    def save_latest(self, state: dict[str, Any]) -> None:
        """Store the state and record it as the trial's latest, then remove the one before. With the
        database away (StorageAway) the new file is kept as pending, beside the recorded one."""
        try:
            self._record_pending()
        except StorageAway:
            pass  # still away: the new state below replaces the pending one
        name = latest_name(self.trial.number, state["step"])
        new = {"artifact_id": store_file(self.store, name, state), "filename": name, "step": state["step"]}
        superseded, self.pending = self.pending, new
        if superseded is not None:  # never recorded, and no longer the newest
            _discard(self.store, superseded["artifact_id"])
        try:
            self._record_pending()
        except StorageAway:
            return  # kept: recorded by the next save_latest / drop_latest / save_best
        except Exception:  # (an interrupt inside the write may have committed it: then it stays pending)
            self.pending = None  # neither recorded nor pending: removed; the recorded one is kept
            _discard(self.store, new["artifact_id"])
            raise

    def _record_pending(self) -> None:
        """Record the pending latest state (StorageAway if the database is still away), then remove the
        one it replaces."""
        if self.pending is None:
            return
        self.storage.set_trial_system_attr(self.trial._trial_id, LATEST_ATTR, self.pending)
        previous, self.recorded, self.pending = self.recorded, self.pending, None
        if previous is not None:
            _discard(self.store, previous["artifact_id"])

    def save_best(self, checkpoint: dict[str, Any]) -> None:
        """Store the best model, then record it as the Optuna artifact trial-N-best.pt."""
        self._record_pending()
        name = best_name(self.trial.number)
        artifact_id = store_file(self.store, name, checkpoint)
        try:
            record_artifact(self.storage, self.trial._trial_id, artifact_id, name)
        except Exception:
            _discard(self.store, artifact_id)
            raise

    def drop_latest(self) -> None:
        """The trial ends (complete, pruned or failed on its own): its resume state is no longer needed."""
        self._record_pending()
        if self.recorded is not None:
            self.storage.set_trial_system_attr(self.trial._trial_id, LATEST_ATTR, None)
            _discard(self.store, self.recorded["artifact_id"])
            self.recorded = None


def _latest_candidates(number: int, attrs: dict[str, Any]) -> list[tuple[str, str]]:
    """(filename, artifact id) of trial `number`'s latest states, newest first: the `latest_state` attr, then
    those of the former layout ("artifacts:" entries named trial-N-latest-*)."""
    found = []
    record = latest_state(number, attrs)
    if record is not None:
        found.append((record["filename"], record["artifact_id"]))
    legacy = _live_artifacts(attrs)
    found += [(n, legacy[n]) for n in sorted((n for n in legacy if n.startswith(f"trial-{number}-latest-")),
                                              reverse=True)]
    return found


def best_checkpoint_id(study: optuna.Study, trial: FrozenTrial) -> str | None:
    return artifacts(trial, study._storage).get(best_name(trial.number))
