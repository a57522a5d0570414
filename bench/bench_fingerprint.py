"""Time of the dataset fingerprint (content hashes) and of packing, on a folder the size of HW4.

Prints, in one run: reading the JSON index; the old size-only fingerprint (stat every file); the content
fingerprint with no hash cache (reads and hashes every byte), with a current cache (stat only: what every
later open pays), and after one same-size edit; the pack build; and a warm open_store().

Run from the repository root:  python -m bench.bench_fingerprint --data DIR [--drop-caches]
Make a HW4-sized folder first (56,666 files of 100-650 frames x 40 mels, about 3 GB, ~1 min):
  python -c "from data.synthetic import make_synthetic as m; m(__import__('pathlib').Path('/tmp/hw4'), \
speakers=600, utterances_per_speaker=89, seed=0, n_test=3266, min_len=100, max_len=650)"
--drop-caches (root, Linux) empties the page cache before the cold hash, so it reads from disk.
"""
import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from data import open_store, read_index
from data.hw4 import fingerprint


def _timed(label: str, action):
    start = time.perf_counter()
    result = action()
    print(f"{label:<52} {time.perf_counter() - start:8.2f} s")
    return result


def _size_only(root: Path, names: list[str]) -> int:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return sum(os.stat(n, dir_fd=fd).st_size for n in names)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--drop-caches", action="store_true")
    args = parser.parse_args()
    index = _timed("read + validate JSON index", lambda: read_index(args.data))
    names = [u.feature_path for u in index.train + index.test]
    total = _size_only(args.data, names)
    print(f"{len(names):,} feature files, {total / 1e9:.2f} GB")
    _timed("size-only fingerprint (before: stat every file)", lambda: _size_only(args.data, names))
    if args.drop_caches:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    cache: dict = {}
    fp = _timed("content fingerprint, no cache (hash every byte)", lambda: fingerprint(args.data, index, cache))
    again = _timed("content fingerprint, cache current (stat only)", lambda: fingerprint(args.data, index, cache))
    assert again == fp
    victim = args.data / names[0]
    original = victim.read_bytes()
    try:
        tensor = torch.load(victim, weights_only=True)
        torch.save(tensor + 1.0, victim)  # same shape, same size, other values
        edited = _timed("content fingerprint after one same-size edit", lambda: fingerprint(args.data, index, cache))
        assert edited != fp, "a same-size edit must change the fingerprint"
    finally:
        victim.write_bytes(original)
    with tempfile.TemporaryDirectory() as tmp:
        _timed("pack: fingerprint + validate + write features.npy", lambda: open_store(args.data, Path(tmp)))
        _timed("open_store() of a current pack", lambda: open_store(args.data, Path(tmp)))
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
