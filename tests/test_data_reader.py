"""read_index / load_feature / fingerprint: valid folders read right, each bad one fails with the file named."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from data import DataError, fingerprint, load_feature, read_index


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def first_train(root: Path) -> dict:
    meta = json.loads((root / "metadata.json").read_text())
    return next(iter(meta["speakers"].values()))[0]


def expect_error(root: Path, fragment: str, file: str = "metadata.json") -> str:
    with pytest.raises(DataError) as info:
        read_index(root)
    message = str(info.value)
    assert message.startswith(str(root / file) + ":"), message
    assert fragment in message, message
    assert "\n" not in message
    return message


def test_reads_valid_folder(hw4_folder):
    root = hw4_folder(n_speakers=3, per_speaker=4, n_mels=6, n_test=2)
    index = read_index(root)
    mapping = json.loads((root / "mapping.json").read_text())["speaker2id"]
    meta = json.loads((root / "metadata.json").read_text())
    assert index.n_mels == 6 and len(index.train) == 12 and len(index.test) == 2
    assert all(index.id2speaker[i] == s for s, i in mapping.items())
    for speaker, entries in meta["speakers"].items():
        listed = [u for u in index.train if u.feature_path in {e["feature_path"] for e in entries}]
        assert len(listed) == len(entries) and all(u.label == mapping[speaker] for u in listed)
    assert all(u.label == -1 for u in index.test)


def test_testdata_is_optional(hw4_folder):
    root = hw4_folder()
    (root / "testdata.json").unlink()
    assert read_index(root).test == ()


def test_missing_metadata(hw4_folder):
    root = hw4_folder()
    (root / "metadata.json").unlink()
    expect_error(root, "missing")


def test_malformed_json_names_line(hw4_folder):
    root = hw4_folder()
    (root / "mapping.json").write_text('{\n  "speaker2id": {\n    "a": 0,\n}')
    expect_error(root, "not valid JSON (line 4", file="mapping.json")


@pytest.mark.parametrize("value", ["x", 0, -3, 2.5, True, None])
def test_bad_n_mels(hw4_folder, value):
    root = hw4_folder()
    edit_json(root / "metadata.json", lambda m: m.update(n_mels=value))
    expect_error(root, f"key 'n_mels' must be a positive integer, got {value!r}")


@pytest.mark.parametrize("value", [0, "12", 3.0, False])
def test_bad_mel_len(hw4_folder, value):
    root = hw4_folder()
    edit_json(root / "metadata.json", lambda m: next(iter(m["speakers"].values()))[0].update(mel_len=value))
    expect_error(root, f"mel_len must be a positive integer, got {value!r}")


def test_speaker_missing_from_mapping(hw4_folder):
    root = hw4_folder()
    edit_json(root / "metadata.json", lambda m: m["speakers"].update(id00999=[]))
    expect_error(root, "speaker 'id00999' is not in mapping.json speaker2id")


def test_ids_must_be_0_to_k_minus_1(hw4_folder):
    root = hw4_folder(n_speakers=3)
    edit_json(root / "mapping.json", lambda m: m["speaker2id"].update({next(iter(m["speaker2id"])): 5}))
    expect_error(root, "ids must be exactly 0..2", file="mapping.json")


def test_duplicate_ids(hw4_folder):
    root = hw4_folder(n_speakers=3)
    edit_json(root / "mapping.json", lambda m: m["speaker2id"].update({s: 0 for s in m["speaker2id"]}))
    expect_error(root, "ids must be unique", file="mapping.json")


def test_id2speaker_must_agree(hw4_folder):
    root = hw4_folder(n_speakers=3)
    edit_json(root / "mapping.json", lambda m: m["id2speaker"].update({"0": m["id2speaker"]["1"]}))
    expect_error(root, "id2speaker['0']", file="mapping.json")


@pytest.mark.parametrize("name", ["../x.pt", "/tmp/x.pt", "sub/x.pt", "..", ""])
def test_feature_path_must_be_plain_name(hw4_folder, name):
    root = hw4_folder()
    edit_json(root / "metadata.json", lambda m: next(iter(m["speakers"].values()))[0].update(feature_path=name))
    expect_error(root, "must be a plain file name inside the folder")


def test_duplicate_feature_path_across_files(hw4_folder):
    root = hw4_folder()
    path = first_train(root)["feature_path"]
    edit_json(root / "testdata.json", lambda t: t["utterances"][0].update(feature_path=path))
    expect_error(root, f"feature_path {path!r} is listed more than once", file="testdata.json")


def test_testdata_n_mels_must_match(hw4_folder):
    root = hw4_folder(n_mels=8)
    edit_json(root / "testdata.json", lambda t: t.update(n_mels=7))
    expect_error(root, "n_mels is 7 but metadata.json says 8", file="testdata.json")


def test_load_feature_returns_float32_contiguous(tmp_path):
    path = tmp_path / "u.pt"
    torch.save(torch.arange(24, dtype=torch.float64).reshape(4, 6).t(), path)
    tensor = load_feature(path, n_mels=4, mel_len=6)
    assert tensor.dtype == torch.float32 and tensor.is_contiguous() and tensor.shape == (6, 4)


def load_error(path: Path, n_mels: int = 8, mel_len: int = 10) -> str:
    with pytest.raises(DataError) as info:
        load_feature(path, n_mels, mel_len)
    assert str(info.value).startswith(f"{path}:")
    return str(info.value)


def test_missing_feature_file(tmp_path):
    assert "missing" in load_error(tmp_path / "nope.pt")


def test_not_a_torch_file(tmp_path):
    (tmp_path / "u.pt").write_bytes(b"definitely not a zip or pickle")
    assert "not a readable torch file" in load_error(tmp_path / "u.pt")


def test_dict_instead_of_tensor(tmp_path):
    torch.save({"mel": torch.zeros(10, 8)}, tmp_path / "u.pt")
    assert "got dict" in load_error(tmp_path / "u.pt")


def test_wrong_ndim(tmp_path):
    torch.save(torch.zeros(10, 8, 1), tmp_path / "u.pt")
    assert "2-D tensor" in load_error(tmp_path / "u.pt")


def test_wrong_n_mels(tmp_path):
    torch.save(torch.zeros(10, 7), tmp_path / "u.pt")
    assert "7 mel bins" in load_error(tmp_path / "u.pt") and "says 8" in load_error(tmp_path / "u.pt")


def test_mel_len_mismatch_names_both(tmp_path):
    torch.save(torch.zeros(9, 8), tmp_path / "u.pt")
    assert "has 9 frames, mel_len in the JSON says 10" in load_error(tmp_path / "u.pt")


def test_non_finite_values_counted(tmp_path):
    tensor = torch.zeros(10, 8)
    tensor[0, 0], tensor[3, 2], tensor[9, 7] = float("nan"), float("inf"), -float("inf")
    torch.save(tensor, tmp_path / "u.pt")
    assert "has 3 non-finite values" in load_error(tmp_path / "u.pt")


def test_fingerprint_stable_across_copies(hw4_folder, tmp_path):
    root = hw4_folder()
    copy = shutil.copytree(root, tmp_path / "elsewhere" / "copy")
    assert fingerprint(root) == fingerprint(copy)


def test_fingerprint_changes_with_content(hw4_folder):
    root = hw4_folder()
    before = fingerprint(root)
    entry = first_train(root)
    torch.save(torch.zeros(entry["mel_len"] + 100, 8), root / entry["feature_path"])
    resized = fingerprint(root)
    edit_json(root / "testdata.json", lambda t: t["utterances"].pop())
    assert len({before, resized, fingerprint(root)}) == 3
