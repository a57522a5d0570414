"""HW4-format speaker data: reading and validating folders, the packed memory-mapped store,
seeded splits and batches, and the synthetic generator."""
from data.errors import DataError

__all__ = ["DataError"]
