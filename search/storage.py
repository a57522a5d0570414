"""Where studies live: the default SQLite file beside the study file, or any RDB URL given.

Several processes (local workers, other terminals, other machines) may open the same storage at the
same moment: creating the schema and the study are retried when another process wins the race.
"""
from __future__ import annotations

import copy
import importlib.util
import random
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import optuna
from optuna.exceptions import ExperimentalWarning, StorageInternalError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from search.cells import identity_attrs
from search.studyfile import SpecError, near

ARTIFACTS_PREFIX = "artifacts:"  # optuna.artifacts' trial system-attr prefix (one per artifact)
MAX_RETRY = 2  # a trial whose worker died (no heartbeat) is re-run with the same parameters at most this often
RACE_ATTEMPTS = 12  # schema/study creation attempts when other processes create the same storage at once
# A bare dialect picks SQLAlchemy's default driver, which may not be installed (SQLAlchemy 2.1: psycopg 3
# for postgresql://, mysqlclient for mysql://); fall back to the drivers this project installs.
FALLBACK_DRIVERS = {"postgresql": ("psycopg", "psycopg2"), "mysql": ("MySQLdb", "pymysql"),
                    "mariadb": ("MySQLdb", "pymysql")}
T = TypeVar("T")


def normalize_url(url: str) -> str:
    """The URL with an installed driver: postgresql:// -> postgresql+psycopg2:// unless psycopg 3 is there."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise SpecError(f"storage {url!r} is not a database URL; use sqlite:///FILE.db, "
                        "postgresql://USER@HOST/DB or mysql+pymysql://USER@HOST/DB") from None
    if parsed.drivername in FALLBACK_DRIVERS:
        default, fallback = FALLBACK_DRIVERS[parsed.drivername]
        if importlib.util.find_spec(default) is None:
            return parsed.set(drivername=f"{parsed.drivername}+{fallback}").render_as_string(hide_password=False)
    return url


def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite:/// URL (None for other databases and in-memory SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def beside_sqlite(url: str, suffix: str) -> Path | None:
    """<db file without .db><suffix> for an SQLite storage (a storage's own folders sit beside it); None else."""
    db = sqlite_path(normalize_url(url))
    return None if db is None else db.with_suffix(suffix)


def results_dir(url: str, anchor: Path) -> Path:
    """The default folder of a storage's reports and final fits, one per storage, so two storages that hold
    studies of the same name never write to the same place: <db file without .db>.results beside an SQLite
    file; for a database server, <anchor>/<backend>-<host>-<database>.results (anchor: the study file's
    folder, else the working directory)."""
    beside = beside_sqlite(url, ".results")
    if beside is not None:
        return near(beside)
    parsed = make_url(normalize_url(url))
    label = f"{parsed.get_backend_name()}-{parsed.host or 'local'}-{parsed.database or 'memory'}"
    return near(anchor / (re.sub(r"[^A-Za-z0-9_.-]+", "-", label) + ".results"))


class RetryStaleTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a trial whose worker died (same parameters), without what belonged to that attempt:
    its user attrs (worker, results; an ablation cell keeps its seed) and its artifacts (the dead trial keeps
    its checkpoint; the retry finds it through retry_history and continues from it)."""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        attempt = copy.copy(trial)
        attempt.user_attrs = identity_attrs(trial)
        attempt.system_attrs = {k: v for k, v in trial.system_attrs.items() if not k.startswith(ARTIFACTS_PREFIX)}
        super().__call__(study, attempt)


def open_storage(url: str, heartbeat_interval: int = 30, grace_period: int = 120) -> RDBStorage:
    """An RDB storage with heartbeats, so trials of a killed worker are failed and retried, not left RUNNING."""
    if not url.startswith(("sqlite:", "postgresql", "mysql", "mariadb")):
        raise SpecError(
            f"storage {url!r} is not supported; use sqlite:///FILE.db, postgresql://... or mysql+pymysql://..."
        )
    driver_url = normalize_url(url)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {"pool_pre_ping": True}

    def create() -> RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats: stable in practice since 2.x
            return RDBStorage(
                driver_url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryStaleTrial(max_retry=MAX_RETRY),
            )

    try:
        return retry_race(create)
    except Exception as err:  # sqlalchemy/driver errors differ per backend; the user needs the URL and reason
        reason = str(err).splitlines()[0]
        raise SpecError(f"cannot open storage {url!r}: {reason}") from None


def retry_race(action: Callable[[], T], attempts: int = RACE_ATTEMPTS) -> T:
    """Run `action`, retrying with jittered back-off when a concurrent creator makes it fail.

    Two processes creating the same schema or study collide as 'table already exists' (SQLite, MariaDB),
    a unique violation (PostgreSQL) or a lock timeout; the loser's retry finds the winner's result."""
    for attempt in range(attempts):
        try:
            return action()
        except (SQLAlchemyError, StorageInternalError):
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.05, 0.2) * (attempt + 1))
    raise AssertionError("unreachable")


def load_existing_study(name: str, url: str) -> optuna.Study:
    """A study that must exist already: never creates a storage file or a study (read-only commands)."""
    path = sqlite_path(normalize_url(url))
    if path is not None and not path.is_file():
        raise SpecError(f"no study {name!r}: storage file {path} does not exist (run `run-study search` first, "
                        "or give --storage URL)")
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # only then list the names: summaries of every study would read every best trial
        names = optuna.get_all_study_names(storage)
        raise SpecError(f"no study {name!r} in {url}; studies there: {', '.join(names) or 'none'}") from None
