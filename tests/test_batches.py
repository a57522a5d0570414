"""Splits are seeded and stratified; batches are padded crops of the right utterances, valid ones fixed."""

import numpy as np
import pytest
import torch

from data import Batch, CropSampler, DataError, fixed_valid_batches, open_store, split


@pytest.fixture
def store(hw4_folder):
    return open_store(hw4_folder(n_speakers=5, per_speaker=8, n_mels=6, n_test=4, lengths=(3, 30)))


def test_split_deterministic_and_seeded():
    labels = np.repeat(np.arange(10), 20)
    train, valid = split(labels, 0.1, seed=1)
    again = split(labels, 0.1, seed=1)
    other = split(labels, 0.1, seed=2)
    assert np.array_equal(train, again[0]) and np.array_equal(valid, again[1])
    assert not np.array_equal(valid, other[1])
    assert np.array_equal(np.sort(np.concatenate([train, valid])), np.arange(200))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(valid) > 0)


def test_split_stratified_per_speaker():
    labels = np.random.default_rng(0).permutation(np.repeat([0, 1, 2, 3], [20, 40, 10, 30]))
    _, valid = split(labels, 0.1, seed=0)
    assert np.bincount(labels[valid], minlength=4).tolist() == [2, 4, 1, 3]


def test_split_small_speakers():
    labels = np.array([0, 1, 1, 2, 2, 2])
    train, valid = split(labels, 0.01, seed=0)
    assert set(labels[train]) == {0, 1, 2}
    assert sorted(labels[valid].tolist()) == [1, 2]
    _, valid = split(labels, 0.99, seed=0)
    assert sorted(labels[valid].tolist()) == [1, 2, 2]
    assert split(labels, 0.0, seed=0)[1].size == 0


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(DataError, match=r"valid_fraction must be in \[0, 1\)"):
        split(np.zeros(4, dtype=int), fraction, seed=0)


def assert_rows_are_crops(store, batch: Batch) -> None:
    """Each row is a contiguous slice of its utterance, then zeros up to the batch's padded length."""
    for row, i, n in zip(batch.x.numpy(), batch.index.tolist(), batch.lengths.tolist(), strict=True):
        utterance = store.utterance(i)
        starts = [s for s in range(len(utterance) - n + 1) if np.array_equal(utterance[s : s + n], row[:n])]
        assert starts, f"row is not a crop of utterance {i}"
        assert not row[n:].any()


def test_crop_sampler_batches(store):
    train = store.train_indices
    sampler = CropSampler(store, train, segment_len=12, batch_size=16, seed=0)
    batches = [next(sampler), sampler.next_batch()]
    assert any((b.lengths < 12).any() for b in batches), "no padded row was exercised"
    for batch in batches:
        assert batch.x.dtype == torch.float32 and batch.x.shape[0] == 16 and batch.x.shape[2] == 6
        assert batch.lengths.dtype == torch.int64 and batch.y.dtype == torch.int64
        assert batch.x.shape[1] == batch.lengths.max() <= 12
        assert torch.equal(batch.lengths, torch.from_numpy(np.minimum(store.lengths[batch.index.numpy()], 12)))
        assert torch.equal(batch.y, torch.from_numpy(store.labels[batch.index.numpy()]))
        assert set(batch.index.tolist()) <= set(train.tolist())
        assert_rows_are_crops(store, batch)


def test_crop_sampler_seeded(store):
    first = CropSampler(store, store.train_indices, 12, 8, seed=3).next_batch()
    again = CropSampler(store, store.train_indices, 12, 8, seed=3).next_batch()
    other = CropSampler(store, store.train_indices, 12, 8, seed=4).next_batch()
    assert torch.equal(first.x, again.x) and not torch.equal(first.index, other.index)


def test_short_utterances_kept_whole(store):
    short = np.flatnonzero(store.lengths < 20)
    assert short.size > 1
    batch = CropSampler(store, short, segment_len=20, batch_size=8, seed=0).next_batch()
    for row, i, n in zip(batch.x.numpy(), batch.index.tolist(), batch.lengths.tolist(), strict=True):
        assert n == store.lengths[i] and np.array_equal(row[:n], store.utterance(i))


def test_fixed_valid_batches_repeat(store):
    valid = store.train_indices[::3]
    first = fixed_valid_batches(store, valid, segment_len=10, batch_size=4, seed=0)
    again = fixed_valid_batches(store, valid, segment_len=10, batch_size=4, seed=0)
    assert len(first) == -(-len(valid) // 4)
    assert torch.equal(torch.cat([b.index for b in first]), torch.from_numpy(valid))
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("x", "lengths", "y", "index"))
        assert_rows_are_crops(store, a)


def test_full_mode_whole_utterances_sorted(store):
    batches = fixed_valid_batches(store, store.test_indices, segment_len=5, batch_size=3, seed=0, mode="full")
    lengths = torch.cat([b.lengths for b in batches])
    assert sorted(torch.cat([b.index for b in batches]).tolist()) == store.test_indices.tolist()
    assert torch.equal(lengths, lengths.sort().values)
    for batch in batches:
        assert (batch.y == -1).all()
        for row, i, n in zip(batch.x.numpy(), batch.index.tolist(), batch.lengths.tolist(), strict=True):
            assert np.array_equal(row[:n], store.utterance(i)) and not row[n:].any()


def test_unknown_mode(store):
    with pytest.raises(DataError, match="fixed, full"):
        fixed_valid_batches(store, store.train_indices, 10, 4, seed=0, mode="random")


def test_batch_to_device(store):
    batch = fixed_valid_batches(store, store.train_indices, 10, 4, seed=0)[0].to("cpu")
    assert batch.x.device.type == "cpu" and batch.index is not None
