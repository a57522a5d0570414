"""The packed store: a HW4 folder turned once into one memory-mappable float32 array plus an index.

Tens of thousands of small .pt files are slow to torch.load per item; one contiguous .npy opened with
mmap is read by slicing, and every trial and process shares it through the OS page cache.

Layout of a cache dir: `lock` (file lock), `file_hashes.json` (each .pt file's content digest, keyed by its
size, mtime and ctime, so a reopen hashes only changed files) and `pack/` (features.npy, index.npz,
meta.json), where `pack/` is built in a temp dir next to it and swapped in with os.replace.
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from numpy.lib.format import open_memmap

from data.errors import DataError
from data.files import staging_dir
from data.hw4 import HW4Index, fingerprint, load_feature, read_index

FORMAT_VERSION = 1
DEFAULT_DIRNAME = ".hw4pack"
HASHES = "file_hashes.json"


@dataclass(frozen=True, eq=False)
class PackedStore:
    """An opened pack: features is memory-mapped, utterance i is features[offsets[i]:+lengths[i]].

    Train utterances come first (labels >= 0), then test utterances (label -1).
    """

    features: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    n_mels: int
    id2speaker: tuple[str, ...]
    feature_paths: tuple[str, ...]
    fingerprint: str
    n_train: int
    n_test: int

    @property
    def n_classes(self) -> int:
        return len(self.id2speaker)

    @property
    def train_indices(self) -> np.ndarray:
        return np.flatnonzero(self.labels >= 0)

    @property
    def test_indices(self) -> np.ndarray:
        return np.flatnonzero(self.labels < 0)

    def utterance(self, i: int) -> np.ndarray:
        """Utterance i as a (mel_len, n_mels) view into the memmap (no copy, no file I/O)."""
        start = int(self.offsets[i])
        return self.features[start : start + int(self.lengths[i])]


def pack(root: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Build the pack for a HW4 folder unless a current one exists; return its directory."""
    with _current_pack(root, cache_dir) as pack_dir:
        return pack_dir


def open_store(root: str | Path, cache_dir: str | Path | None = None,
               check: Callable[[HW4Index, Path], None] | None = None) -> PackedStore:
    """Open the packed store of a HW4 folder, packing it first if missing or stale.

    Reads the JSON files, stats every feature file (hashing those that changed) and the small index;
    features stay on disk (mmap). `check(index, root)` runs on the JSON files alone, before anything is hashed,
    packed or created (e.g. the speakers a model was trained on): it raises to refuse the folder.
    """
    with _current_pack(root, cache_dir, check) as pack_dir:
        return _load(pack_dir)


@contextmanager
def _current_pack(root: str | Path, cache_dir: str | Path | None,
                  check: Callable[[HW4Index, Path], None] | None = None) -> Iterator[Path]:
    """Yield an up-to-date pack dir while holding the lock, so no concurrent repack swaps it."""
    index = read_index(root)
    if check is not None:
        check(index, Path(root))
    pack_dir = _resolve_cache_dir(Path(root), cache_dir) / "pack"
    with FileLock(pack_dir.parent / "lock"):
        fp = _fingerprint(index, pack_dir.parent / HASHES)
        if not _is_current(pack_dir, fp):
            _build(index, fp, pack_dir)
        yield pack_dir


def _fingerprint(index: HW4Index, hashes_path: Path) -> str:
    """The folder's content fingerprint, re-hashing only files whose stat changed since the last open."""
    try:
        cache = json.loads(hashes_path.read_text())
    except (OSError, ValueError):
        cache = {}
    before = json.dumps(cache, sort_keys=True)
    fp = fingerprint(index.root, index, cache)
    if json.dumps(cache, sort_keys=True) != before:
        tmp = hashes_path.with_name(f".{HASHES}.{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, hashes_path)  # readers see the old or the new file, never half of one
    return fp


def _resolve_cache_dir(root: Path, cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        path = Path(cache_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path
    path = root / DEFAULT_DIRNAME
    if os.access(root, os.W_OK):
        try:
            path.mkdir(exist_ok=True)
            return path
        except OSError:
            pass  # e.g. a read-only mount that os.access does not see
    # Keyed by the folder's path: the user cache is shared by every folder the user opens.
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    path = Path.home() / ".cache" / "hw4pack" / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_meta(pack_dir: Path) -> dict | None:
    try:
        return json.loads((pack_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _is_current(pack_dir: Path, fp: str) -> bool:
    meta = _read_meta(pack_dir)
    return bool(meta) and meta.get("format_version") == FORMAT_VERSION and meta.get("fingerprint") == fp


def _build(index: HW4Index, fp: str, pack_dir: Path) -> None:
    """Write a complete pack in a temp dir, then swap it in so readers never see a partial one."""
    # We hold the lock, so any temp dir present was left by a killed process (possibly GBs).
    for prefix in (".building-", ".stale-"):
        for leftover in pack_dir.parent.glob(prefix + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = staging_dir(".building-", pack_dir.parent)
    try:
        _write_pack(index, fp, tmp)
        _swap_in(tmp, pack_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_pack(index: HW4Index, fp: str, out: Path) -> None:
    utterances = index.train + index.test
    lengths = np.array([u.mel_len for u in utterances], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    labels = np.array([u.label for u in utterances], dtype=np.int64)
    shape = (int(lengths.sum()), index.n_mels)
    features = open_memmap(out / "features.npy", mode="w+", dtype=np.float32, shape=shape)
    # One file at a time: the whole dataset (several GB) never sits in RAM.
    for u, start in zip(utterances, offsets, strict=True):
        tensor = load_feature(index.root / u.feature_path, index.n_mels, u.mel_len)
        features[start : start + u.mel_len] = tensor.numpy()
    features.flush()
    del features
    np.savez(out / "index.npz", offsets=offsets, lengths=lengths, labels=labels)
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "n_mels": index.n_mels,
        "id2speaker": list(index.id2speaker),
        "feature_paths": [u.feature_path for u in utterances],
        "n_train": len(index.train),
        "n_test": len(index.test),
    }
    (out / "meta.json").write_text(json.dumps(meta))


def _swap_in(tmp: Path, pack_dir: Path) -> None:
    # os.replace cannot overwrite a non-empty directory, so a stale pack is moved aside first;
    # processes that still have its features mapped keep reading the old (unlinked) file.
    if pack_dir.exists():
        stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=pack_dir.parent))
        os.replace(pack_dir, stale / "pack")
        os.replace(tmp, pack_dir)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, pack_dir)


def _load(pack_dir: Path) -> PackedStore:
    meta = _read_meta(pack_dir)
    if meta is None:
        raise DataError(f"{pack_dir / 'meta.json'}: missing or unreadable; delete {pack_dir} to rebuild the pack")
    with np.load(pack_dir / "index.npz") as index:
        offsets, lengths, labels = index["offsets"], index["lengths"], index["labels"]
    return PackedStore(
        features=np.load(pack_dir / "features.npy", mmap_mode="r"),
        offsets=offsets,
        lengths=lengths,
        labels=labels,
        n_mels=meta["n_mels"],
        id2speaker=tuple(meta["id2speaker"]),
        feature_paths=tuple(meta["feature_paths"]),
        fingerprint=meta["fingerprint"],
        n_train=meta["n_train"],
        n_test=meta["n_test"],
    )
