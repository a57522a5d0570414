"""The synthetic generator writes exact HW4 format, is seeded, idempotent, safe, and separable."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from data import synthetic
from data.errors import DataError
from data.synthetic import make_synthetic

SPEAKERS, UTTERANCES, SEED = 4, 6, 7
UTTERANCE_NAME = re.compile(r"uttr-[0-9a-f]{32}\.pt")
SPEAKER_ID = re.compile(r"id\d{5}")


def _read(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn") / "ds", SPEAKERS, UTTERANCES, SEED)


def test_metadata_and_tensors_match_hw4_format(dataset: Path) -> None:
    meta = _read(dataset, "metadata.json")
    assert set(meta) == {"n_mels", "speakers"} and meta["n_mels"] == 40
    assert len(meta["speakers"]) == SPEAKERS
    values = []
    for speaker, utterances in meta["speakers"].items():
        assert SPEAKER_ID.fullmatch(speaker) and len(utterances) == UTTERANCES
        for entry in utterances:
            assert set(entry) == {"feature_path", "mel_len"}
            assert UTTERANCE_NAME.fullmatch(entry["feature_path"])
            mels = torch.load(dataset / entry["feature_path"])
            assert mels.dtype == torch.float32 and mels.shape == (entry["mel_len"], 40)
            assert 40 <= entry["mel_len"] <= 400
            values.append(mels.flatten())
    lengths = [e["mel_len"] for us in meta["speakers"].values() for e in us]
    assert min(lengths) < 128 < max(lengths)  # some shorter than one training segment
    values_all = torch.cat(values)
    assert abs(values_all.mean().item() + 5.7) < 1.0 and 2.5 < values_all.std().item() < 4.5


def test_mapping_is_consistent_and_sorted(dataset: Path) -> None:
    mapping = _read(dataset, "mapping.json")
    assert set(mapping) == {"speaker2id", "id2speaker"}
    speakers = sorted(_read(dataset, "metadata.json")["speakers"])
    assert mapping["speaker2id"] == {s: i for i, s in enumerate(speakers)}
    assert mapping["id2speaker"] == {str(i): s for i, s in enumerate(speakers)}


def test_testdata_is_unlabelled_with_separate_answers(dataset: Path) -> None:
    test = _read(dataset, "testdata.json")
    assert set(test) == {"n_mels", "utterances"} and test["n_mels"] == 40
    assert len(test["utterances"]) == max(1, SPEAKERS * UTTERANCES // 15)
    labels = _read(dataset, synthetic.TEST_LABELS_FILE)
    assert list(labels) == [e["feature_path"] for e in test["utterances"]]
    assert set(labels.values()) <= set(_read(dataset, "mapping.json")["speaker2id"])
    kaggle = (dataset / synthetic.TEST_LABELS_CSV).read_text().splitlines()  # for `predict --labels`
    assert kaggle[0] == "Id,Category" and kaggle[1:] == [f"{path},{s}" for path, s in labels.items()]
    for entry in test["utterances"]:
        assert torch.load(dataset / entry["feature_path"]).shape == (entry["mel_len"], 40)
    train = {e["feature_path"] for us in _read(dataset, "metadata.json")["speakers"].values()
             for e in us}
    assert not train & set(labels)
    expected = len(train) + len(labels) + 6  # + metadata, mapping, testdata, labels (JSON and CSV), marker
    assert len(list(dataset.iterdir())) == expected


def test_small_shapes_and_explicit_n_test(tmp_path: Path) -> None:
    out = make_synthetic(tmp_path / "d", 2, 2, 0, n_mels=1, n_test=0, min_len=5, max_len=5)
    assert _read(out, "testdata.json") == {"n_mels": 1, "utterances": []}
    for entry in next(iter(_read(out, "metadata.json")["speakers"].values())):
        assert torch.load(out / entry["feature_path"]).shape == (5, 1)


def test_same_seed_is_byte_identical_and_other_seed_differs(dataset: Path, tmp_path: Path) -> None:
    again = make_synthetic(tmp_path / "again", SPEAKERS, UTTERANCES, SEED)
    assert _files(again) == _files(dataset)
    other = make_synthetic(tmp_path / "other", SPEAKERS, UTTERANCES, SEED + 1)
    utterances = {name for name in _files(dataset) if name.startswith("uttr-")}
    assert not utterances & set(_files(other))
    assert _read(other, "metadata.json") != _read(dataset, "metadata.json")


def test_recall_with_same_arguments_is_a_no_op(tmp_path: Path) -> None:
    out = make_synthetic(tmp_path / "d", 2, 2, 1)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert make_synthetic(out, 2, 2, 1) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    with pytest.raises(DataError, match="not empty"):
        make_synthetic(out, 2, 2, 2)


def test_refuses_foreign_folder_but_accepts_empty_one(tmp_path: Path) -> None:
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="foreign"):
        make_synthetic(tmp_path / "foreign", 2, 2, 0)
    assert [p.name for p in (tmp_path / "foreign").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    assert (make_synthetic(tmp_path / "empty", 2, 2, 0) / synthetic.MARKER_FILE).exists()


def test_interrupted_generation_leaves_nothing_behind(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(folder: Path, args: dict) -> None:
        (folder / "metadata.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic(tmp_path / "d", 2, 2, 0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"speakers": 1}, "speakers"),
    ({"utterances_per_speaker": 1}, "utterances_per_speaker"),
    ({"n_mels": 0}, "n_mels"),
    ({"min_len": 0}, "min_len"),
    ({"min_len": 50, "max_len": 49}, "max_len"),
    ({"seed": -1}, "seed"),
    ({"n_test": -1}, "n_test"),
    ({"speakers": 2.5}, "speakers"),
    ({"speakers": True}, "speakers"),
])
def test_invalid_arguments_name_the_argument(tmp_path: Path, kwargs: dict, name: str) -> None:
    args = {"speakers": 2, "utterances_per_speaker": 2, "seed": 0} | kwargs
    with pytest.raises(DataError, match=rf"\b{name}=") as info:
        make_synthetic(tmp_path / "d", **args)
    assert "\n" not in str(info.value) and "use " in str(info.value)
    assert not (tmp_path / "d").exists()


def _nearest_centroid_accuracy(folder: Path) -> float:
    """Leave-one-out nearest centroid on each utterance's mean frame."""
    speakers = _read(folder, "metadata.json")["speakers"].values()
    means = [[torch.load(folder / e["feature_path"]).mean(0).numpy() for e in us]
             for us in speakers]
    x = np.array([m for ms in means for m in ms])
    y = np.repeat(np.arange(len(means)), [len(ms) for ms in means])
    correct = 0
    for i in range(len(y)):
        others = np.arange(len(y)) != i
        centroids = np.stack([x[others & (y == c)].mean(0) for c in range(len(means))])
        correct += int(np.argmin(((centroids - x[i]) ** 2).sum(1)) == y[i])
    return correct / len(y)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_speakers_are_separable_but_not_trivially(tmp_path: Path, seed: int) -> None:
    # 8 speakers: chance 12.5 %; over seeds 0-29 this ranged 26-55 %.
    accuracy = _nearest_centroid_accuracy(make_synthetic(tmp_path / "d", 8, 10, seed))
    assert 0.25 <= accuracy <= 0.8
