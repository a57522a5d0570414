"""HW4-format speaker data: reading and validating folders, the packed memory-mapped store,
seeded splits and batches, and the synthetic generator."""

from data.batches import Batch, CropSampler, fixed_valid_batches, split
from data.errors import DataError
from data.hw4 import HW4Index, Utterance, fingerprint, load_feature, read_index
from data.packed import PackedStore, open_store, pack

__all__ = [
    "Batch",
    "CropSampler",
    "DataError",
    "HW4Index",
    "PackedStore",
    "Utterance",
    "fingerprint",
    "fixed_valid_batches",
    "load_feature",
    "open_store",
    "pack",
    "read_index",
    "split",
]
