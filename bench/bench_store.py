"""Samples/s of the official per-file loading versus the packed store, in one run.

(a) the sample code's way: a Dataset that torch.loads each .pt and random-crops 128 frames, through a
DataLoader (batch 32, num_workers=0, pad_sequence collate); (b) CropSampler on the packed memmap.
Also prints the pack time and the RSS growth from opening the store (it must stay memory-mapped).

Run from the repository root:  python -m bench.bench_store [--data DIR] [--seconds 5]
Without --data it writes a synthetic folder (2,000 utterances of 100-600 frames x 40 mels) to a temp dir.
The pack always goes to a temp cache dir, so the pack time is measured even if DIR is packed already.
"""

import argparse
import json
import random
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from data import CropSampler, open_store, read_index

SEGMENT_LEN = 128
BATCH_SIZE = 32


def write_synthetic(root: Path, n_utterances: int, n_speakers: int, n_mels: int, seed: int) -> Path:
    """A HW4 folder of random log-mel-like features with realistic lengths (no test split)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    speakers = [f"id{i:05d}" for i in range(n_speakers)]
    metadata: dict = {"n_mels": n_mels, "speakers": {s: [] for s in speakers}}
    for u in range(n_utterances):
        mel_len = int(rng.integers(100, 601))
        name = f"uttr-{u:06x}.pt"
        features = rng.normal(-5.7, 3.5, (mel_len, n_mels)).astype(np.float32)
        torch.save(torch.from_numpy(features), root / name)
        metadata["speakers"][speakers[u % n_speakers]].append({"feature_path": name, "mel_len": mel_len})
    mapping = {"speaker2id": {s: i for i, s in enumerate(speakers)}, "id2speaker": dict(enumerate(speakers))}
    (root / "metadata.json").write_text(json.dumps(metadata))
    (root / "mapping.json").write_text(json.dumps(mapping))
    return root


class OfficialDataset(Dataset):
    """The sample code's Dataset: one torch.load per item, then a random crop."""

    def __init__(self, root: Path):
        index = read_index(root)
        self.items = [(root / u.feature_path, u.label) for u in index.train]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        mel = torch.load(path, weights_only=True)
        if len(mel) > SEGMENT_LEN:
            start = random.randint(0, len(mel) - SEGMENT_LEN)
            mel = mel[start : start + SEGMENT_LEN]
        return mel, label


def official_collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    mels, labels = zip(*batch, strict=True)
    return pad_sequence(mels, batch_first=True, padding_value=-20), torch.tensor(labels)


def endless(loader: DataLoader) -> Iterator[torch.Tensor]:
    """The loader's input batches, epoch after epoch."""
    while True:
        for x, _ in loader:
            yield x


def samples_per_second(inputs: Iterable[torch.Tensor], seconds: float) -> float:
    """Draw input batches for about `seconds` (after one warm-up batch) and count samples."""
    iterator = iter(inputs)
    next(iterator)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += len(next(iterator))
    return n / (time.perf_counter() - start)


def rss_kb() -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of this process, in kB (from /proc/self/status)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="an existing HW4 folder (default: write a synthetic one)")
    parser.add_argument("--utterances", type=int, default=2000, help="synthetic folder size")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per loader")
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(87)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            start = time.perf_counter()
            root = write_synthetic(Path(tmp) / "Dataset", args.utterances, 50, 40, seed=0)
            print(f"wrote synthetic folder: {args.utterances} utterances in {time.perf_counter() - start:.1f} s")
        cache = Path(tmp) / "cache"

        start = time.perf_counter()
        store = open_store(root, cache_dir=cache)
        pack_s = time.perf_counter() - start
        size_mb = store.features.nbytes / 2**20
        print(f"pack: {pack_s:.2f} s for {store.n_train + store.n_test} utterances ({size_mb:.0f} MB features.npy)")
        del store

        before = rss_kb()
        start = time.perf_counter()
        store = open_store(root, cache_dir=cache)
        open_ms = (time.perf_counter() - start) * 1e3
        after = rss_kb()
        print(f"open (reusing the pack): {open_ms:.0f} ms, VmRSS +{(after['VmRSS'] - before['VmRSS']) / 1024:.1f} MB")

        loader = DataLoader(
            OfficialDataset(root), batch_size=BATCH_SIZE, shuffle=True, num_workers=0, collate_fn=official_collate
        )
        official = samples_per_second(endless(loader), args.seconds)
        sampler = CropSampler(store, store.train_indices, SEGMENT_LEN, BATCH_SIZE, seed=87)
        anon_before = rss_kb()["RssAnon"]
        packed = samples_per_second((batch.x for batch in sampler), args.seconds)
        anon_growth = (rss_kb()["RssAnon"] - anon_before) / 1024
        print(f"(a) official Dataset + DataLoader (torch.load per item): {official:10,.0f} samples/s")
        print(f"(b) packed store CropSampler (memmap slices):            {packed:10,.0f} samples/s")
        print(f"speed-up b/a: {packed / official:.1f}x  (batch {BATCH_SIZE}, {SEGMENT_LEN}-frame crops, 1 thread)")
        print(f"RssAnon growth while sampling (b): {anon_growth:+.1f} MB (features are read via the page cache)")


if __name__ == "__main__":
    main()
