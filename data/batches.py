"""Seeded train/valid splits and batches cut straight from the packed store's memmap.

Training batches are random crops (fresh every call); validation batches are computed once and
identical on every call, so validation accuracy moves only when the model does.
"""

from dataclasses import dataclass

import numpy as np
import torch

from data.errors import DataError
from data.packed import PackedStore

VALID_MODES = ("fixed", "full")


def split(labels: np.ndarray, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Speaker-stratified (train, valid) indices into labels, both sorted, deterministic per seed.

    Each speaker gives round(fraction * n) utterances to valid: at least 1 if it has 2 or more
    (and fraction > 0), never all of them, so every speaker is trained on.
    """
    if not 0 <= valid_fraction < 1:
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction!r}")
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise DataError("split needs labelled utterances only (labels >= 0); pass the train indices' labels")
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    valid = [rng.permutation(group)[: _n_valid(len(group), valid_fraction)] for group in np.split(order, bounds)]
    is_valid = np.zeros(labels.size, dtype=bool)
    is_valid[np.concatenate(valid)] = True
    return np.flatnonzero(~is_valid), np.flatnonzero(is_valid)


def _n_valid(n: int, fraction: float) -> int:
    if n < 2 or fraction == 0:
        return 0
    return min(max(round(fraction * n), 1), n - 1)


@dataclass
class Batch:
    """x: (B, T, n_mels) float32, zero-padded; lengths: (B,) int64 frames per item; y: (B,) int64
    labels (-1 = test); index: (B,) store indices, so test predictions map back to feature paths."""

    x: torch.Tensor
    lengths: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        """The batch on device; non_blocking overlaps the copy with compute when memory is pinned."""
        index = None if self.index is None else self.index.to(device, non_blocking=True)
        return Batch(
            self.x.to(device, non_blocking=True),
            self.lengths.to(device, non_blocking=True),
            self.y.to(device, non_blocking=True),
            index,
        )


class CropSampler:
    """Endless random batches: utterances drawn uniformly with replacement, each a random
    segment_len-frame crop (whole utterance if shorter), sliced from the memmap."""

    def __init__(self, store: PackedStore, indices: np.ndarray, segment_len: int, batch_size: int, seed: int):
        _check_sizes(indices, segment_len, batch_size)
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)
        self.segment_len = segment_len
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    def next_batch(self) -> Batch:
        items = self.indices[self.rng.integers(0, len(self.indices), size=self.batch_size)]
        lengths = self.store.lengths[items]
        starts = self.rng.integers(0, np.maximum(lengths - self.segment_len, 0) + 1)
        return _collate(self.store, items, starts, np.minimum(lengths, self.segment_len))

    def __iter__(self) -> "CropSampler":
        return self

    def __next__(self) -> Batch:
        return self.next_batch()


def fixed_valid_batches(
    store: PackedStore,
    indices: np.ndarray,
    segment_len: int,
    batch_size: int,
    seed: int,
    mode: str = "fixed",
) -> list[Batch]:
    """Validation batches covering each utterance once, the same for the same arguments.

    mode "fixed": one crop per utterance at a seeded start; "full": whole utterances, sorted by
    length so each batch pads little (segment_len is unused).
    """
    if mode not in VALID_MODES:
        raise DataError(f"validation mode must be one of {', '.join(VALID_MODES)}; got {mode!r}")
    _check_sizes(indices, segment_len, batch_size)
    items = np.asarray(indices, dtype=np.int64)
    lengths = store.lengths[items]
    if mode == "full":
        order = np.argsort(lengths, kind="stable")
        items, takes, starts = items[order], lengths[order], np.zeros(len(items), dtype=np.int64)
    else:
        rng = np.random.default_rng(seed)
        takes = np.minimum(lengths, segment_len)
        starts = rng.integers(0, lengths - takes + 1)
    return [
        _collate(store, items[s : s + batch_size], starts[s : s + batch_size], takes[s : s + batch_size])
        for s in range(0, len(items), batch_size)
    ]


def _check_sizes(indices: np.ndarray, segment_len: int, batch_size: int) -> None:
    if len(indices) == 0:
        raise DataError("no utterances to draw batches from (indices is empty)")
    if segment_len < 1 or batch_size < 1:
        raise DataError(f"segment_len and batch_size must be positive, got {segment_len} and {batch_size}")


def _collate(store: PackedStore, items: np.ndarray, starts: np.ndarray, takes: np.ndarray) -> Batch:
    """Copy each crop out of the memmap into one zero-padded (B, max take, n_mels) array."""
    x = np.zeros((len(items), int(takes.max()), store.n_mels), dtype=np.float32)
    for row, (i, start, take) in enumerate(zip(items, starts, takes, strict=True)):
        begin = int(store.offsets[i] + start)
        x[row, :take] = store.features[begin : begin + take]
    return Batch(
        x=torch.from_numpy(x),
        lengths=torch.from_numpy(takes.astype(np.int64)),
        y=torch.from_numpy(store.labels[items]),
        index=torch.from_numpy(items.copy()),
    )
