"""Where a study came from, recorded on it by its first run: the dataset (path, n_mels, speakers) and the command
(study file, --data, --set overrides, timeout). `train` and `predict` then find the data by the study's name
alone and refuse other speakers from the JSON files, before any feature file is hashed or packed (on the real
HW4 folder that is ~90 s and a 3.4 GB pack, for an error mapping.json shows at once); hints give commands that
work. No torch here: `report` reads it."""
from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.studyfile import locate, near

if TYPE_CHECKING:
    from data import HW4Index, PackedStore

DATASET_ATTR = "dataset"  # study user attr: {path, n_mels, n_speakers, speakers (a digest of mapping.json's list)}
COMMAND_ATTR = "command"  # study user attr: {study_file, data, overrides, timeout} of the run that created it


def speakers_digest(id2speaker: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(id2speaker)).encode()).hexdigest()[:16]


def record_dataset(study, store: PackedStore, path: Path) -> None:
    """Note the dataset on the study once (its first run's): `train` and `predict` then find it by the study's
    name alone and refuse other speakers before packing."""
    if DATASET_ATTR not in study.user_attrs:
        study.set_user_attr(DATASET_ATTR, {"path": str(Path(path).resolve()), "n_mels": store.n_mels,
                                           "n_speakers": store.n_classes,
                                           "speakers": speakers_digest(store.id2speaker)})


def recorded(study) -> dict[str, Any] | None:
    return study.user_attrs.get(DATASET_ATTR)


def recorded_path(study) -> Path | None:
    """The folder the study ran on, if it is still there."""
    info = recorded(study)
    return Path(info["path"]) if info and Path(info["path"]).is_dir() else None


def same_shape(n_mels: int, id2speaker: Sequence[str] | None, trained: str, digest: str | None = None,
               n_speakers: int | None = None) -> Callable[[HW4Index | PackedStore], None]:
    """A check of a folder's index (or store): the same n_mels and the same speakers in the same order as what
    `trained` names (a checkpoint, a study) was trained on; the speakers as a list or as their digest."""
    digest = digest or speakers_digest(id2speaker or ())
    n_speakers = len(id2speaker) if id2speaker is not None else n_speakers

    def check(data: HW4Index | PackedStore, where: Path) -> None:
        from data import DataError

        if data.n_mels != n_mels:
            raise DataError(f"{where}: n_mels is {data.n_mels} but {trained} was trained on {n_mels}")
        if speakers_digest(data.id2speaker) != digest:
            raise DataError(f"{where}/mapping.json: its {len(data.id2speaker)} speakers differ from the "
                            f"{n_speakers} that {trained} was trained on; use that dataset")

    return check


def study_shape(study) -> Callable[[HW4Index | PackedStore, Path], None] | None:
    info = recorded(study)
    if info is None:  # a study from before the dataset was recorded: the fingerprint check after packing remains
        return None
    return same_shape(info["n_mels"], None, f"study {study.study_name!r}", info["speakers"], info["n_speakers"])


def record_command(study, study_file: Path, data: Path | None, overrides: Sequence[str], timeout: float | None
                   ) -> None:
    if COMMAND_ATTR not in study.user_attrs:
        study.set_user_attr(COMMAND_ATTR, {
            "study_file": str(Path(study_file).resolve()), "data": str(Path(data).resolve()) if data else None,
            "overrides": [o for o in overrides if o.partition("=")[0].strip() != "study.name"], "timeout": timeout})


def study_handle(study) -> str:
    """How `train`, `predict`, `report` find this study: its study file when that names it, else its name and
    storage (the data is recorded on the study)."""
    url = storage_url(study)
    command = study.user_attrs.get(COMMAND_ATTR) or {}
    file = command.get("study_file")
    if file and Path(file).exists():
        name, default_url = locate(Path(file))
        if name == study.study_name:
            same = url is None or _same_storage(url, default_url)
            return shlex.quote(str(near(Path(file)))) + ("" if same else f" --storage {shlex.quote(url)}")
    return f"{shlex.quote(study.study_name)} --storage {shlex.quote(url)}" if url else shlex.quote(study.study_name)


def search_command(study, new_name: str, *sets: str, timeout: float | None = None) -> str | None:
    """The `run-study search` that starts a new study like this one (same file, data and overrides) with `sets`
    added; None when the study's command was not recorded (a study from an older version)."""
    command = study.user_attrs.get(COMMAND_ATTR)
    if not command:
        return None
    keys = {s.partition("=")[0] for s in sets}
    parts = ["run-study", "search", str(near(Path(command["study_file"])))]
    if command.get("data"):
        parts += ["--data", str(near(Path(command["data"])))]
    url = storage_url(study)
    if url and not url.startswith("sqlite"):  # a server: the new study beside this one (SQLite: a file of its own)
        parts += ["--storage", url]
    for item in [*[o for o in command["overrides"] if o.partition("=")[0].strip() not in keys],
                 f"study.name={new_name}", *sets]:
        parts += ["--set", item]
    if timeout:
        parts += ["--timeout", f"{timeout:g}"]
    return shlex.join(parts)


def storage_url(study) -> str | None:
    storage = getattr(study._storage, "_backend", study._storage)  # RDBStorage behind Optuna's cache
    return getattr(storage, "url", None)


def _same_storage(a: str, b: str) -> bool:
    sqlite = "sqlite:///"
    if a.startswith(sqlite) and b.startswith(sqlite):
        return Path(a[len(sqlite):]).resolve() == Path(b[len(sqlite):]).resolve()
    return a == b
