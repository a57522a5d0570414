"""Checkpoints as Optuna artifacts: each trial's best model, and its latest training state while it runs.

Files go into an Optuna artifact store (a folder beside the SQLite file by default; any folder, or s3://
or gs:// when studies span machines); their metadata are the trial's "artifacts:<id>" system attrs, so
optuna-dashboard lists them on the trial page. A running trial keeps ONE latest state: each new one is
uploaded before the previous one is removed (a kill at any line leaves a loadable one), and the last is
removed when the trial finishes. A trial that dies keeps its latest state: its retry continues from it.
Removed artifacts are marked null, the way optuna-dashboard deletes them.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import upload_artifact
from optuna.trial import FrozenTrial

from search.artifact_store import STUDY_ATTR, default_location, open_artifact_store
from search.storage import ARTIFACTS_PREFIX

CHECKPOINT_FORMAT = 1


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
    """filename -> artifact id of a trial's live artifacts (removed ones are null)."""
    attrs = storage.get_trial_system_attrs(trial._trial_id)
    found = {}
    for key, value in attrs.items():
        meta = json.loads(value) if key.startswith(ARTIFACTS_PREFIX) and isinstance(value, str) else None
        if meta:
            found[meta["filename"]] = meta["artifact_id"]
    return found


def best_name(number: int) -> str:
    return f"trial-{number}-best.pt"


def latest_name(number: int, step: int) -> str:
    return f"trial-{number}-latest-step{step:08d}.pt"


def load(artifact_store, artifact_id: str) -> dict[str, Any]:
    """A checkpoint from the store, loaded the safe way (no pickled code)."""
    with artifact_store.open_reader(artifact_id) as reader:
        return torch.load(reader, map_location="cpu", weights_only=True)


def load_file(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def model_checkpoint(result, cfg, store) -> dict[str, Any]:
    """A trained model and what predicting with it needs: config, speakers, data fingerprint."""
    return {
        "format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "model": result.best_state,
        "id2speaker": list(store.id2speaker), "n_mels": store.n_mels, "fingerprint": store.fingerprint,
        "step": result.best_step, "valid_acc": result.best_valid_acc, "steps_run": result.steps_run,
    }


def _upload(trial, storage, artifact_store, name: str, obj: dict[str, Any]) -> str:
    with tempfile.TemporaryDirectory(prefix="hw4ckpt-") as tmp:
        path = os.path.join(tmp, name)
        torch.save(obj, path)
        return upload_artifact(artifact_store=artifact_store, file_path=path, study_or_trial=trial,
                               storage=storage, mimetype="application/octet-stream")


def _remove(trial_id: int, storage, artifact_store, artifact_id: str) -> None:
    artifact_store.remove(artifact_id)
    storage.set_trial_system_attr(trial_id, ARTIFACTS_PREFIX + artifact_id, json.dumps(None))


class TrialCheckpoints:
    """The checkpoints of one running trial: resume state from the trial it retries, latest, best."""

    def __init__(self, trial: optuna.Trial, artifact_store, log: Callable[[str], None] = print) -> None:
        self.trial, self.store, self.log = trial, artifact_store, log
        self.storage = trial.study._storage
        self.latest_id: str | None = None

    def resume_state(self, resumable: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        """The newest loadable latest state of the trial(s) this one retries, if it continues this run."""
        history = self.storage.get_trial_system_attrs(self.trial._trial_id).get("retry_history", [])  # Optuna's
        trials = self.trial.study.get_trials(deepcopy=False)
        for number in reversed(history):
            found = artifacts(trials[number], self.storage)
            for name in sorted((n for n in found if n.startswith(f"trial-{number}-latest-")), reverse=True):
                try:
                    state = load(self.store, found[name])
                except Exception as err:  # a file cut short by a kill: try the one before
                    self.log(f"trial {self.trial.number}: skipping {name} ({type(err).__name__}: {err})")
                    continue
                if resumable(state):
                    self.log(f"trial {self.trial.number}: resuming trial {number} from step {state['step']}")
                    return state
        return None

    def save_latest(self, state: dict[str, Any]) -> None:
        new = _upload(self.trial, self.storage, self.store, latest_name(self.trial.number, state["step"]), state)
        if self.latest_id is not None:
            _remove(self.trial._trial_id, self.storage, self.store, self.latest_id)
        self.latest_id = new

    def save_best(self, checkpoint: dict[str, Any]) -> None:
        _upload(self.trial, self.storage, self.store, best_name(self.trial.number), checkpoint)

    def drop_latest(self) -> None:
        """The trial ends (complete, pruned or failed on its own): its resume state is no longer needed."""
        if self.latest_id is not None:
            _remove(self.trial._trial_id, self.storage, self.store, self.latest_id)
            self.latest_id = None


def best_checkpoint_id(study: optuna.Study, trial: FrozenTrial) -> str | None:
    return artifacts(trial, study._storage).get(best_name(trial.number))
