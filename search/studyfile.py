"""A study file as TOML, its --set overrides, and where its paths point; no validation, no torch.

Every path in a study file (data.path, [study] storage and artifacts) is relative to the study file's folder,
so a study runs the same from any working directory. What is typed on the command line (--data, --storage,
--out) is relative to the working directory, as for any command-line tool. The commands that never train
(report, dashboard, status) read only this much of a study file, so they start without importing torch.
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

SECTIONS = ("study", "data", "sampler", "pruner", "model", "train", "ablation", "variants")


class SpecError(ValueError):
    """A bad study file or override, worded for the user: names the file, the key and what is valid."""


def load_raw(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """The study file's TOML as a dict, with the --set overrides applied."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: study file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: cannot read study file ({err})") from None
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{path}: not valid TOML ({err})") from None
    try:
        for item in overrides:
            apply_override(raw, item)
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None
    return path, raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `--set section.key=value` (value parsed as TOML, else taken as a plain string)."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise SpecError(f"--set {item!r} must look like section.key=value, e.g. train.max_steps=200")
    if parts[0] not in SECTIONS:
        raise SpecError(f"--set {item!r}: unknown section {parts[0]!r}; valid: {', '.join(SECTIONS)}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    table = raw
    for part in parts[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise SpecError(f"--set {item!r}: {part!r} is not a table")
    table[parts[-1]] = value


def near(path: Path) -> Path:
    """path relative to the working directory when it lies below it (shorter to read), else absolute."""
    relative = os.path.relpath(path)
    return Path(relative) if not relative.startswith("..") else Path(path).resolve()


def beside(study_file: Path, value: str | Path) -> Path:
    """A path written in a study file: relative ones are relative to the study file's folder."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else near(study_file.parent / path)


def storage_in_file(study_file: Path, url: str) -> str:
    """[study] storage: a sqlite:/// file path relative to the study file's folder; other URLs as written."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url[len(prefix):] in ("", ":memory:") or url.startswith(prefix + "/"):
        return url
    return prefix + str(beside(study_file, url[len(prefix):]))


def default_storage_url(study_file: Path, name: str) -> str:
    """sqlite:///<study file's folder>/<name>.db (git-ignored)."""
    return f"sqlite:///{beside(study_file, f'{name}.db')}"


def study_name(study_file: Path, raw: dict[str, Any]) -> str:
    study = raw.get("study", {})
    name = study.get("name", study_file.stem) if isinstance(study, dict) else study_file.stem
    if not isinstance(name, str) or not name.strip():
        raise SpecError(f"{study_file}: study.name={name!r} must be a non-empty string")
    return name


def locate(study_file: str | Path) -> tuple[str, str]:
    """(study name, storage URL) of a study file, read without validating the rest of it."""
    path, raw = load_raw(study_file)
    name = study_name(path, raw)
    storage = raw.get("study", {}).get("storage") if isinstance(raw.get("study"), dict) else None
    if storage is not None and not isinstance(storage, str):
        raise SpecError(f"{path}: study.storage={storage!r} must be a string")
    return name, storage_in_file(path, storage) if storage else default_storage_url(path, name)
