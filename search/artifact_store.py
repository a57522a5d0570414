"""Where a study's artifacts (checkpoints) live: a folder, s3:// or gs://. Imports no torch, so the dashboard
can serve them without loading the training code."""
from __future__ import annotations

import importlib
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore

from search.storage import beside_sqlite
from search.studyfile import SpecError

STUDY_ATTR = "artifacts"  # study user attr: where this study's artifacts live


def default_location(storage_url: str, study_file: Path) -> str:
    """<db file without .db>.artifacts beside an SQLite storage; else <study file folder>/<name>.artifacts."""
    return str(beside_sqlite(storage_url, ".artifacts") or study_file.with_suffix(".artifacts"))


def open_artifact_store(location: str):
    """An Optuna artifact store for a folder, s3://bucket/prefix or gs://bucket/prefix."""
    for scheme, store_class, package in (("s3", "Boto3ArtifactStore", "boto3"),
                                         ("gs", "GCSArtifactStore", "google-cloud-storage")):
        if location.startswith(f"{scheme}://"):
            bucket, _, prefix = location[len(scheme) + 3:].partition("/")
            try:
                store = getattr(importlib.import_module("optuna.artifacts"), store_class)(bucket)
            except ImportError:
                raise SpecError(f"study.artifacts={location!r} needs {package}: pip install {package}") from None
            return _Prefixed(store, prefix) if prefix else store
    if "://" in location:
        raise SpecError(f"study.artifacts={location!r}: use a folder, s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
    path = Path(location)
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(path)


class _Prefixed:
    """An artifact store whose ids live under a key prefix (several studies in one bucket)."""

    def __init__(self, store, prefix: str) -> None:
        self.store, self.prefix = store, prefix.rstrip("/") + "/"

    def open_reader(self, artifact_id: str):
        return self.store.open_reader(self.prefix + artifact_id)

    def write(self, artifact_id: str, content_body) -> None:
        self.store.write(self.prefix + artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self.store.remove(self.prefix + artifact_id)


def study_artifact_store(study: optuna.Study):
    """The artifact store a study was created with (its user attr), for train/predict/dashboard."""
    location = study.user_attrs.get(STUDY_ATTR)
    if location is None:
        raise SpecError(f"study {study.study_name!r} has no checkpoints (it was created before they were kept)")
    return open_artifact_store(location)
