"""`run-study predict`: whole test utterances through one checkpoint or the average of several, written in the
Kaggle HW4 format (Id,Category: feature_path, speaker name), scored against a labels CSV when given."""
from __future__ import annotations

import csv
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState

from data import DataError
from data.batches import fixed_valid_batches
from data.packed import PackedStore
from models import build_model
from search.artifact_store import study_artifact_store
from search.attrs import ranked as ranked_trials
from search.checkpoints import (
    CHECKPOINT_FORMAT,
    DamagedCheckpoint,
    best_checkpoint_id,
    best_name,
    load,
    load_file,
    load_problem,
)
from search.config import RunConfig
from search.final import pick_trial
from search.origin import same_shape
from search.precision import probe, resolve
from search.spec import SpecError
from search.train import default_device
from search.workers import usable_cores


@dataclass
class Checkpoint:
    name: str  # where it came from, for messages: a file, or study/trial
    values: dict[str, Any]


def from_file(path: Path) -> Checkpoint:
    try:
        values = load_file(path)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such checkpoint file") from None
    except Exception as err:  # not a torch file, truncated, or holding pickled code (weights_only refuses it)
        raise DamagedCheckpoint(str(path), load_problem(err)) from None
    _check_model(values, str(path), "")
    return Checkpoint(str(path), values)


def _check_model(values: Any, filename: str, where: str) -> None:
    if not isinstance(values, dict) or values.get("format") != CHECKPOINT_FORMAT or "model" not in values:
        raise DamagedCheckpoint(filename, "is not a model checkpoint of run-study (a trial's best or `run-study "
                                          "train` output)", where)


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def from_study(study: optuna.Study, trial: str | None, top_k: int | None,
               log: Callable[[str], None] = _say) -> list[Checkpoint]:
    """The best checkpoints of --trial (best by default) or of the top-k complete trials that have one.
    --top-k skips a trial whose checkpoint is damaged or missing (one line each through `log`) and takes the
    next best, so K models are averaged when the study has K that load."""
    if top_k is None:
        picked = pick_trial(study, trial or "best")
        artifact_id = best_checkpoint_id(study, picked)
        if artifact_id is None:
            raise SpecError(f"trial {picked.number} of study {study.study_name!r} has no checkpoint "
                            f"({picked.state.name})")
        where = f"trial {picked.number} of study {study.study_name!r}: "
        if picked.state == TrialState.PRUNED:
            log(f"note: trial {picked.number} was pruned at step {picked.user_attrs.get('steps_run', '?')}; its "
                "checkpoint is its best weights up to then")
        return [_load_best(study, study_artifact_store(study), picked, artifact_id, where)]
    store = study_artifact_store(study)
    ranked = ranked_trials(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    checkpoints, skipped = [], 0
    for t in ranked:  # lazily: one storage read (and one load) per trial taken
        if len(checkpoints) == top_k:
            break
        artifact_id = best_checkpoint_id(study, t)
        if artifact_id is None:
            continue
        try:
            checkpoints.append(_load_best(study, store, t, artifact_id, ""))
        except SpecError as err:
            log(f"skipping trial {t.number}: {err}")
            skipped += 1
    if len(checkpoints) < top_k:
        broken = f" ({skipped} more skipped: damaged or missing)" if skipped else ""
        raise SpecError(f"--top-k {top_k}: study {study.study_name!r} has only {len(checkpoints)} complete "
                        f"trial(s) with a checkpoint that loads{broken}")
    return checkpoints


def _load_best(study: optuna.Study, store, t: FrozenTrial, artifact_id: str, where: str) -> Checkpoint:
    """Trial t's best checkpoint; DamagedCheckpoint (a SpecError) when it does not load, SpecError when its
    file is gone. `where` starts the messages ("" when the caller names the trial)."""
    name = best_name(t.number)
    try:
        values = load(store, artifact_id, name)
    except ArtifactNotFound:
        what = f"trial {t.number}'s checkpoint" if where else name
        raise SpecError(f"{what} is missing from the artifact store {study.user_attrs.get('artifacts')} "
                        f"(artifact {artifact_id})") from None
    except DamagedCheckpoint as err:
        raise DamagedCheckpoint(err.filename, err.problem, where) from None
    _check_model(values, name, where)
    return Checkpoint(f"{study.study_name}/trial {t.number}", values)


def shape_check(checkpoint: Checkpoint):
    """The check of a folder (its JSON files, before packing; or its store): the checkpoint's n_mels and speakers."""
    return same_shape(checkpoint.values["n_mels"], checkpoint.values["id2speaker"], checkpoint.name)


def check_compatible(checkpoint: Checkpoint, store: PackedStore, data: Path, other_data: bool) -> None:
    """Same n_mels, same speakers in the same order; the same dataset unless other_data."""
    values = checkpoint.values
    shape_check(checkpoint)(store, data)
    if values["fingerprint"] != store.fingerprint and not other_data:
        raise DataError(f"{data}: not the dataset {checkpoint.name} was trained on (fingerprint {store.fingerprint}, "
                        f"trained on {values['fingerprint']}); same speakers, so --other-data predicts anyway")


def set_threads(checkpoint: Checkpoint, store: PackedStore, threads: int | None) -> int:
    """Size torch's threads for predicting on the CPU (0 on a GPU): `threads`, else the per-machine probe's choice
    at the model's shapes (one thread unless more pay for their CPU-seconds)."""
    if default_device().type == "cuda":
        return 0
    if threads is None:
        cfg = RunConfig.from_dict(checkpoint.values["config"])
        threads = probe(cfg, store.n_mels, store.n_classes, threads=len(usable_cores())).predict_threads
    torch.set_num_threads(threads)
    return threads


@torch.no_grad()
def predict_proba(checkpoints: list[Checkpoint], store: PackedStore, device: torch.device | None = None,
                  batch_size: int = 64, precision: str | None = None) -> np.ndarray:
    """(n_test, n_classes): the mean softmax of the checkpoints over whole test utterances, in testdata.json's
    order. Batches hold utterances of similar length (sorted), padded and masked. `precision` (train.precision's
    values) overrides each checkpoint's own: a bf16-trained model predicts in fp32 as well, and the other way."""
    device = device or default_device()
    test = store.test_indices
    batches = fixed_valid_batches(store, test, 1, batch_size, 0, "full")
    row_of = {int(i): row for row, i in enumerate(test)}
    probs = np.zeros((len(test), store.n_classes), dtype=np.float64)
    for checkpoint in checkpoints:
        cfg = RunConfig.from_dict(checkpoint.values["config"])
        model = build_model(cfg.model, store.n_mels, store.n_classes)
        model.load_state_dict(checkpoint.values["model"])
        model.to(device).eval()
        if precision is not None:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
        chosen = resolve(cfg, device, store.n_mels, store.n_classes)
        with chosen.applied():
            for batch in batches:
                batch = batch.to(device)
                with chosen.autocast(device):
                    logits = model(batch.x, batch.lengths)
                rows = [row_of[int(i)] for i in batch.index.cpu()]
                probs[rows] += torch.softmax(logits.float(), dim=-1).cpu().numpy()
    return probs / len(checkpoints)


def write_submission(path: Path, store: PackedStore, predictions: np.ndarray) -> None:
    """Id,Category rows: feature_path, speaker name, in testdata.json's order (Kaggle HW4)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Id", "Category"])
        for i, label in zip(store.test_indices, predictions, strict=True):
            writer.writerow([store.feature_paths[i], store.id2speaker[label]])
    tmp.replace(path)


def score(labels: Path, store: PackedStore, predictions: np.ndarray) -> tuple[float, int]:
    """Accuracy against a CSV in the submission format (Category: speaker name, or its index in mapping.json)."""
    try:
        with labels.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise DataError(f"{labels}: no such labels file") from None
    if not rows or not {"Id", "Category"} <= set(rows[0]):
        raise DataError(f"{labels}: needs a header Id,Category (the submission format)")
    truth = {row["Id"]: row["Category"] for row in rows}
    speaker2id = {s: i for i, s in enumerate(store.id2speaker)}
    paths = [store.feature_paths[i] for i in store.test_indices]
    missing = [p for p in paths if p not in truth]
    if missing:
        raise DataError(f"{labels}: no label for {len(missing)} test utterance(s), e.g. {missing[0]!r}")
    correct = 0
    for path, predicted in zip(paths, predictions, strict=True):
        category = truth[path]
        expected = speaker2id.get(category, int(category) if category.isdigit() else None)
        if expected is None:
            raise DataError(f"{labels}: Category {category!r} for {path!r} is neither a speaker of mapping.json "
                            "nor a speaker index")
        correct += int(expected == predicted)
    return correct / len(paths), len(paths)
