"""The packed store: exact copy of the folder, reused when current, rebuilt when stale, packed once."""

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from data import DataError, load_feature, open_store, pack, packed, read_index


def meta_stamp(pack_dir: Path) -> tuple[int, int]:
    """Identity of a pack build: a rebuild writes a new meta.json (new inode)."""
    stat = (pack_dir / "meta.json").stat()
    return stat.st_ino, stat.st_mtime_ns


def test_store_equals_files_exactly(hw4_folder):
    root = hw4_folder(n_speakers=3, per_speaker=4, n_mels=5, n_test=2)
    store = open_store(root)
    index = read_index(root)
    utterances = index.train + index.test
    assert (store.n_train, store.n_test, store.n_mels, store.n_classes) == (12, 2, 5, 3)
    assert store.id2speaker == index.id2speaker
    assert store.feature_paths == tuple(u.feature_path for u in utterances)
    assert store.labels.tolist() == [u.label for u in utterances]
    assert store.train_indices.tolist() == list(range(12)) and store.test_indices.tolist() == [12, 13]
    for i, u in enumerate(utterances):
        expected = load_feature(root / u.feature_path, 5, u.mel_len).numpy()
        assert np.array_equal(store.utterance(i), expected)


def test_store_is_memory_mapped_views(hw4_folder):
    store = open_store(hw4_folder())
    assert isinstance(store.features, np.memmap) and store.features.dtype == np.float32
    assert np.shares_memory(store.utterance(1), store.features)


def test_second_open_reuses_pack(hw4_folder):
    root = hw4_folder()
    pack_dir = pack(root)
    assert pack_dir.parent == root / ".hw4pack"
    stamp = meta_stamp(pack_dir)
    open_store(root)
    assert meta_stamp(pack_dir) == stamp


def test_changed_folder_triggers_repack(hw4_folder):
    root = hw4_folder(n_test=0)
    pack_dir = pack(root)
    stamp = meta_stamp(pack_dir)
    torch.save(torch.ones(7, 8), root / "uttr-extra.pt")
    meta = json.loads((root / "metadata.json").read_text())
    speaker = list(meta["speakers"])[-1]
    meta["speakers"][speaker].append({"feature_path": "uttr-extra.pt", "mel_len": 7})
    (root / "metadata.json").write_text(json.dumps(meta))
    store = open_store(root)
    assert meta_stamp(pack_dir) != stamp
    assert store.n_train == 21 and store.feature_paths[-1] == "uttr-extra.pt"
    assert np.array_equal(store.utterance(20), np.ones((7, 8), dtype=np.float32))
    assert [p.name for p in pack_dir.parent.iterdir() if p.name.startswith(".")] == []


def test_bad_file_reported_and_no_pack_left(hw4_folder):
    root = hw4_folder()
    bad = json.loads((root / "testdata.json").read_text())["utterances"][1]["feature_path"]
    torch.save({"not": "a tensor"}, root / bad)
    with pytest.raises(DataError, match=str(root / bad)):
        open_store(root)
    assert sorted(p.name for p in (root / ".hw4pack").iterdir()) == ["file_hashes.json", "lock"]


def test_explicit_cache_dir(hw4_folder, tmp_path):
    root = hw4_folder()
    pack_dir = pack(root, cache_dir=tmp_path / "cache")
    assert pack_dir == tmp_path / "cache" / "pack" and not (root / ".hw4pack").exists()
    assert open_store(root, cache_dir=tmp_path / "cache").n_train == 20


def test_unwritable_root_falls_back_to_user_cache(hw4_folder, tmp_path, monkeypatch):
    root = hw4_folder()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != root and real_access(p, mode))
    store = open_store(root)
    packs = list((tmp_path / "home" / ".cache" / "hw4pack").glob("*/pack/meta.json"))
    assert len(packs) == 1 and json.loads(packs[0].read_text())["fingerprint"] == store.fingerprint
    assert not (root / ".hw4pack").exists()


def _open_after_barrier(root: Path, barrier, builds, results) -> None:
    real_build = packed._build

    def counting_build(*args) -> None:
        with builds.get_lock():
            builds.value += 1
        real_build(*args)

    packed._build = counting_build  # this process only: it was forked
    barrier.wait()
    results.put(open_store(root).n_train)


def test_concurrent_opens_pack_once(hw4_folder):
    root = hw4_folder(n_speakers=6, per_speaker=20)
    ctx = multiprocessing.get_context("fork")
    barrier, builds, results = ctx.Barrier(3), ctx.Value("i", 0), ctx.Queue()
    workers = [ctx.Process(target=_open_after_barrier, args=(root, barrier, builds, results)) for _ in range(3)]
    for worker in workers:
        worker.start()
    sizes = [results.get(timeout=30) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert sizes == [120, 120, 120]
    assert builds.value == 1


def test_missing_feature_file_named(hw4_folder):
    root = hw4_folder()
    gone = json.loads((root / "testdata.json").read_text())["utterances"][0]["feature_path"]
    (root / gone).unlink()
    with pytest.raises(DataError, match=f"^{root / gone}: missing"):
        open_store(root)


def test_leftovers_of_a_killed_build_are_removed(hw4_folder):
    root = hw4_folder()
    leftover = root / ".hw4pack" / ".building-killed"
    leftover.mkdir(parents=True)
    (leftover / "features.npy").write_bytes(b"partial")
    open_store(root)
    assert sorted(p.name for p in (root / ".hw4pack").iterdir()) == ["file_hashes.json", "lock", "pack"]


def _rewrite_same_size(path: Path, tensor: torch.Tensor) -> None:
    """Overwrite a .pt with other values of the same shape, then put its old mtime back (size unchanged)."""
    stat = path.stat()
    torch.save(tensor, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def test_same_size_edit_is_detected_validated_and_repacked(hw4_folder):
    root = hw4_folder()
    store = open_store(root)
    pack_dir, stamp = root / ".hw4pack" / "pack", meta_stamp(root / ".hw4pack" / "pack")
    name = store.feature_paths[3]
    shape = store.utterance(3).shape
    assert meta_stamp(pack_dir) == stamp and open_store(root).fingerprint == store.fingerprint  # unchanged: reused

    _rewrite_same_size(root / name, torch.full(shape, 7.0))  # re-extracted features, same shape
    edited = open_store(root)
    assert edited.fingerprint != store.fingerprint and meta_stamp(pack_dir) != stamp
    assert np.array_equal(edited.utterance(3), np.full(shape, 7.0, dtype=np.float32))

    poisoned = torch.full(shape, 7.0)
    poisoned[0, 0] = float("nan")
    _rewrite_same_size(root / name, poisoned)  # an injected NaN is validated, not packed silently
    with pytest.raises(DataError, match=f"{root / name}: has 1 non-finite"):
        open_store(root)


def test_unchanged_files_are_not_read_again(hw4_folder, monkeypatch):
    root = hw4_folder()
    open_store(root)
    hashes = json.loads((root / ".hw4pack" / "file_hashes.json").read_text())
    assert len(hashes) == 23 and all(len(v) == 4 for v in hashes.values())
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    open_store(root)
    assert [p for p in opened if str(p).endswith(".pt")] == []
