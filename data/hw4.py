"""Reading and validating a HW4-format folder (metadata.json, mapping.json, testdata.json, *.pt).

Every problem raises DataError with one line that names the file, what is wrong and what would be
valid, because users point the harness at folders they downloaded or generated themselves.
"""

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data.errors import DataError

METADATA = "metadata.json"
MAPPING = "mapping.json"
TESTDATA = "testdata.json"
_PATH_CHARS = re.compile(r"[/\\\0]")


@dataclass(frozen=True)
class Utterance:
    """One utterance as listed in the JSON files; label is -1 for test utterances."""

    feature_path: str
    mel_len: int
    label: int


@dataclass(frozen=True)
class HW4Index:
    """A validated HW4 folder: id2speaker[label] is the speaker string of that label."""

    root: Path
    n_mels: int
    id2speaker: tuple[str, ...]
    train: tuple[Utterance, ...]
    test: tuple[Utterance, ...]


def read_index(root: str | Path) -> HW4Index:
    """Read and validate the JSON files of a HW4 folder (testdata.json is optional)."""
    root = Path(root)
    id2speaker = _read_mapping(root / MAPPING)
    speaker2id = {speaker: i for i, speaker in enumerate(id2speaker)}
    n_mels, train = _read_metadata(root / METADATA, speaker2id)
    test = _read_testdata(root / TESTDATA, n_mels)
    _check_unique_paths(root, train, test)
    return HW4Index(root, n_mels, id2speaker, train, test)


def load_feature(path: str | Path, n_mels: int, mel_len: int) -> torch.Tensor:
    """Load one utterance's (mel_len, n_mels) tensor and check it against the metadata."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing (listed in the folder's JSON files, no such file)")
    try:
        # weights_only: a downloaded .pt must never be able to run code while unpickling.
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise DataError(f"{path}: not a readable torch file saved with torch.save ({reason})") from None
    if not isinstance(obj, torch.Tensor):
        raise DataError(f"{path}: must hold a tensor of shape (mel_len, n_mels), got {type(obj).__name__}")
    if obj.ndim != 2:
        raise DataError(f"{path}: must be a 2-D tensor (mel_len, n_mels), got shape {tuple(obj.shape)}")
    if not obj.is_floating_point():
        raise DataError(f"{path}: must hold floating-point log-mel values, got dtype {obj.dtype}")
    if obj.shape[1] != n_mels:
        raise DataError(f"{path}: has {obj.shape[1]} mel bins per frame, n_mels in the JSON says {n_mels}")
    if obj.shape[0] != mel_len:
        raise DataError(f"{path}: has {obj.shape[0]} frames, mel_len in the JSON says {mel_len}")
    n_bad = int((~torch.isfinite(obj)).sum())
    if n_bad:
        raise DataError(f"{path}: has {n_bad} non-finite values (NaN or inf); all values must be finite")
    return obj.to(torch.float32).contiguous()


# name -> [size, mtime_ns, ctime_ns, content digest]: a file whose stat is unchanged is not read again.
HashCache = dict[str, list]


def fingerprint(root: str | Path, index: HW4Index | None = None, cache: HashCache | None = None) -> str:
    """Identify a folder's content: JSON bytes plus (name, content digest) of each feature file.

    No absolute paths or mtimes go in, so a copy of the folder has the same fingerprint; any edit of a
    .pt file, even one that keeps its size, changes it. Pass `cache` (updated in place) to hash only the
    files whose size, mtime or ctime changed since (ctime: an edit that restores the mtime is still seen).
    Pass `index` when it is already read, to skip parsing the JSON a second time.
    """
    root = Path(root)
    index = read_index(root) if index is None else index
    digest = hashlib.sha256()
    for name in (METADATA, MAPPING, TESTDATA):
        path = root / name
        if path.is_file():
            data = path.read_bytes()
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
    names = sorted(u.feature_path for u in index.train + index.test)
    contents = _content_digests(root, names, {} if cache is None else cache)
    digest.update("".join(f"{name}\0{d}\n" for name, d in zip(names, contents, strict=True)).encode())
    return digest.hexdigest()[:16]


def _content_digests(root: Path, names: list[str], cache: HashCache) -> list[str]:
    # stat/open relative to an open directory fd: no path walk per file, which matters at 60k files per open.
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    digests = []
    try:
        for name in names:
            st = os.stat(name, dir_fd=fd)
            key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
            known = cache.get(name)
            if known is None or known[:3] != key:
                file_fd = os.open(name, os.O_RDONLY, dir_fd=fd)
                with os.fdopen(file_fd, "rb") as handle:
                    known = cache[name] = [*key, hashlib.blake2b(handle.read(), digest_size=16).hexdigest()]
            digests.append(known[3])
    except FileNotFoundError as err:
        raise DataError(f"{root / err.filename}: missing (listed in the folder's JSON files, no such file)") from None
    finally:
        os.close(fd)
    for stale in set(cache) - set(names):
        del cache[stale]
    return digests


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: missing (a HW4 folder holds metadata.json and mapping.json)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; expected a JSON file") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: must be a JSON object {{...}}, got {type(obj).__name__}")
    return obj


def _key(obj: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    """obj[key] checked to be of JSON type `kind` (dict or list)."""
    if key not in obj:
        raise DataError(f"{path}: key {key!r} is missing")
    value = obj[key]
    if not isinstance(value, kind):
        want = "an object {...}" if kind is dict else "a list [...]"
        raise DataError(f"{path}: key {key!r} must be {want}, got {type(value).__name__}")
    return value


def _is_positive_int(value: Any) -> bool:
    # bool is an int subclass in Python; `true` in JSON is not a length.
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _n_mels(obj: dict[str, Any], path: Path) -> int:
    value = obj.get("n_mels")
    if not _is_positive_int(value):
        raise DataError(f"{path}: key 'n_mels' must be a positive integer, got {value!r}")
    return value


def _read_mapping(path: Path) -> tuple[str, ...]:
    """The speakers ordered by id, after checking ids are 0..K-1 and agree with id2speaker."""
    mapping = _read_json(path)
    speaker2id = _key(mapping, "speaker2id", dict, path)
    if not speaker2id:
        raise DataError(f"{path}: speaker2id is empty; it must map each speaker to an id 0..K-1")
    by_id: dict[int, str] = {}
    for speaker, sid in speaker2id.items():
        if isinstance(sid, bool) or not isinstance(sid, int):
            raise DataError(f"{path}: speaker2id[{speaker!r}] must be an integer id, got {sid!r}")
        if sid in by_id:
            raise DataError(
                f"{path}: speaker2id gives id {sid} to both {by_id[sid]!r} and {speaker!r}; ids must be unique"
            )
        by_id[sid] = speaker
    k = len(by_id)
    outside = sorted(set(by_id) - set(range(k)))
    if outside:
        raise DataError(f"{path}: speaker2id id {outside[0]} is out of range; ids must be exactly 0..{k - 1}")
    id2speaker = tuple(by_id[i] for i in range(k))
    if "id2speaker" in mapping:
        _check_id2speaker(_key(mapping, "id2speaker", dict, path), id2speaker, path)
    return id2speaker


def _check_id2speaker(given: dict[str, Any], id2speaker: tuple[str, ...], path: Path) -> None:
    expected = {str(i): speaker for i, speaker in enumerate(id2speaker)}
    extra = sorted(given.keys() - expected.keys())
    if extra:
        raise DataError(
            f"{path}: id2speaker key {extra[0]!r} has no matching id in speaker2id (ids 0..{len(expected) - 1})"
        )
    for key, speaker in expected.items():
        if given.get(key) != speaker:
            raise DataError(
                f"{path}: id2speaker[{key!r}] is {given.get(key)!r} but speaker2id gives id {key} to {speaker!r}"
            )


def _read_metadata(path: Path, speaker2id: dict[str, int]) -> tuple[int, tuple[Utterance, ...]]:
    meta = _read_json(path)
    n_mels = _n_mels(meta, path)
    speakers = _key(meta, "speakers", dict, path)
    train = []
    for speaker, entries in speakers.items():
        where = f"speakers[{speaker!r}]"
        if speaker not in speaker2id:
            raise DataError(f"{path}: speaker {speaker!r} is not in {MAPPING} speaker2id")
        if not isinstance(entries, list):
            raise DataError(f"{path}: {where} must be a list of utterances, got {type(entries).__name__}")
        train += _utterances(entries, speaker2id[speaker], path, where)
    if not train:
        raise DataError(f"{path}: lists no utterances; 'speakers' needs at least one utterance to train on")
    return n_mels, tuple(train)


def _read_testdata(path: Path, n_mels: int) -> tuple[Utterance, ...]:
    if not path.exists():
        return ()
    data = _read_json(path)
    test_mels = _n_mels(data, path)
    if test_mels != n_mels:
        raise DataError(f"{path}: n_mels is {test_mels} but {METADATA} says {n_mels}; they must be equal")
    entries = _key(data, "utterances", list, path)
    return tuple(_utterances(entries, -1, path, "utterances"))


def _utterances(entries: list[Any], label: int, path: Path, where: str) -> list[Utterance]:
    """Validated entries of one JSON list; `where` names the list (formatted only on error: 60k entries)."""
    utterances = []
    for j, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(
                f"{path}: {where}[{j}] must be an object with feature_path and mel_len, got {type(entry).__name__}"
            )
        name, mel_len = entry.get("feature_path"), entry.get("mel_len")
        if not _is_plain_name(name):
            raise DataError(
                f"{path}: {where}[{j}].feature_path must be a plain file name inside the folder "
                f"(no '/', '..' or absolute paths), got {name!r}"
            )
        if not _is_positive_int(mel_len):
            raise DataError(f"{path}: {where}[{j}].mel_len must be a positive integer, got {mel_len!r}")
        utterances.append(Utterance(name, mel_len, label))
    return utterances


def _is_plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and not _PATH_CHARS.search(name)


def _check_unique_paths(root: Path, train: tuple[Utterance, ...], test: tuple[Utterance, ...]) -> None:
    seen: set[str] = set()
    for source, utterances in ((METADATA, train), (TESTDATA, test)):
        for u in utterances:
            if u.feature_path in seen:
                raise DataError(
                    f"{root / source}: feature_path {u.feature_path!r} is listed more than once "
                    f"(across {METADATA} and {TESTDATA}); each utterance needs its own file"
                )
            seen.add(u.feature_path)
