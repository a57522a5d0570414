"""Shared fixtures: tiny valid HW4 folders written into tmp_path."""

import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from models import LOSSES


class _NaNLoss(torch.nn.Module):
    """A loss that is always NaN, to test how non-finite losses end runs and show up in reports."""

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, y) * float("nan")


LOSSES.register("test_nan")(lambda cfg: _NaNLoss())


def write_hw4(
    root: Path,
    n_speakers: int = 4,
    per_speaker: int = 5,
    n_mels: int = 8,
    n_test: int = 3,
    seed: int = 0,
    lengths: tuple[int, int] = (4, 40),
) -> Path:
    """Write a valid HW4 folder at root: random float32 features, mel_len drawn from lengths (inclusive).

    Speaker ids are deliberately not in sorted order of the speaker strings, to catch code that
    assumes they are.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    speakers = [f"id{10 * i + 7:05d}" for i in range(n_speakers)]
    ids = rng.permutation(n_speakers).tolist()
    speaker2id = dict(zip(speakers, ids, strict=True))

    def utterance() -> dict:
        name = f"uttr-{rng.bytes(8).hex()}.pt"
        mel_len = int(rng.integers(lengths[0], lengths[1] + 1))
        torch.save(torch.from_numpy(rng.normal(-5.7, 3.5, (mel_len, n_mels)).astype(np.float32)), root / name)
        return {"feature_path": name, "mel_len": mel_len}

    metadata = {"n_mels": n_mels, "speakers": {s: [utterance() for _ in range(per_speaker)] for s in speakers}}
    mapping = {"speaker2id": speaker2id, "id2speaker": {str(i): s for s, i in speaker2id.items()}}
    testdata = {"n_mels": n_mels, "utterances": [utterance() for _ in range(n_test)]}
    for name, obj in (("metadata.json", metadata), ("mapping.json", mapping), ("testdata.json", testdata)):
        (root / name).write_text(json.dumps(obj, indent=2))
    return root


@pytest.fixture
def hw4_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: hw4_folder(name="Dataset", **write_hw4 options) -> a fresh folder under tmp_path."""

    def make(name: str = "Dataset", **options) -> Path:
        return write_hw4(tmp_path / name, **options)

    return make


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small learnable synthetic dataset (8 speakers, short utterances), shared by the slower tests."""
    from data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synthetic") / "tiny"
    return make_synthetic(root, speakers=8, utterances_per_speaker=24, seed=3, n_mels=16, min_len=20, max_len=90)


@pytest.fixture(scope="session")
def tiny_store(tiny_synthetic: Path):
    from data import open_store

    return open_store(tiny_synthetic)


def write_study(path: Path, body: str) -> Path:
    """A study file for tests: a tiny, fast model and budget unless `body` says otherwise."""
    path.write_text(TINY_STUDY + body)
    return path


TINY_STUDY = """
[study]
seed = 0

[data]
valid_fraction = 0.25

[sampler]
name = "random"

[pruner]
name = "none"
"""


@contextmanager
def small_disk_at(folder: Path, size: str) -> Iterator[Path]:
    """A real file system of `size` (a tmpfs) mounted at folder: a disk a test can fill. Mounting needs root,
    which our machines and CI are; elsewhere the test fails saying so (it never skips)."""
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                         text=True)
    if run.returncode:
        pytest.fail(f"cannot mount a {size} tmpfs at {folder} (needs root): {run.stderr.strip()}", pytrace=False)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# Real database servers on every machine of ours (CI's included); each test gets its own database.
SERVERS = {
    "postgresql": ("postgresql://postgres@127.0.0.1:5432/{}", "postgres"),  # bare dialect, as users write it
    "mysql": ("mysql+pymysql://root@127.0.0.1:3306/{}", "test"),
}


@contextmanager
def fresh_database(kind: str) -> Iterator[str]:
    """A new empty database on the local PostgreSQL or MariaDB server, dropped afterwards."""
    import sqlalchemy

    from search.storage import normalize_url

    template, admin_db = SERVERS[kind]
    name = f"hw4_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(normalize_url(template.format(admin_db)), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    try:
        yield template.format(name)
    finally:
        drop = f"DROP DATABASE {name}" + (" WITH (FORCE)" if kind == "postgresql" else "")
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(drop))
        admin.dispose()


_READERS: dict = {}


def study_trials(name: str, url: str) -> list:
    """A study's trials as another process sees them, for tests that poll while CLI processes run ([] before the
    study exists). One storage per URL, kept: optuna.load_study builds an engine and checks the schema each time,
    ~60 ms of CPU, which at 10 polls a second took a third of this 2-core machine from the processes under test.
    Server URLs connect per call (NullPool): nothing stale after a database restart, no idle connections left."""
    import optuna
    import sqlalchemy

    from search.storage import normalize_url

    storage = _READERS.get(url)
    if storage is None:
        kwargs = {} if url.startswith("sqlite") else {"poolclass": sqlalchemy.pool.NullPool}
        storage = _READERS[url] = optuna.storages.RDBStorage(normalize_url(url), engine_kwargs=kwargs)
    try:
        return storage.get_all_trials(storage.get_study_id_from_name(name), deepcopy=False)
    except KeyError:
        return []


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A NEW storage (no schema yet) of each kind: an SQLite file, a PostgreSQL or a MariaDB database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    with fresh_database(request.param) as url:
        yield url


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs `-n auto`: one test process per core), each test process gets its own
    share of the cores, and every process a test starts inherits it: two tests that each start `--workers 2`
    (2 torch threads each on a 2-core machine) would otherwise oversubscribe the cores, and OpenMP's spinning
    threads cost more than they gain."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and count > 1 and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        share = cores[int(worker.removeprefix("gw")) % count::count]
        if share:
            os.sched_setaffinity(0, share)
            torch.set_num_threads(len(share))  # its pool was sized from all cores: 2 threads on 1 core ran 60x slower


@pytest.fixture(autouse=True, scope="session")
def _own_precision_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The per-machine precision probe (search.precision) caches into the test session's folder, shared by every
    test and CLI process of the session, never into the developer's ~/.cache."""
    os.environ["HW4_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _no_user_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's OPTUNA_STORAGE (the default of every --storage) must never receive test studies."""
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)


from tests.dbservers import private_db, private_server  # noqa: E402,F401
