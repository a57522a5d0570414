"""Where studies live: the default SQLite file beside the study file, or any RDB URL given; and the one
policy every storage call goes through.

Several processes (local workers, other terminals, other machines) may open the same storage at the
same moment: creating the schema and the study are retried when another process wins the race.

The storage policy (ResilientRDBStorage): Optuna's RDBStorage re-raises every SQLAlchemy error, so a
database restart, a killed connection or a network blip would end every worker. Here each call retries
connection errors with back-off (1, 2, 4 ... 30 s; pool_pre_ping and TCP keepalives find dead pooled
connections), saying one line per attempt; past `study.storage_outage_s` it raises StorageLost and the
worker stops cleanly. Inside `no_wait()` a call fails at once with StorageAway instead, so training goes
on while the database is away (its reports are sent when it is back). A heartbeat write is one attempt
(its thread retries every interval and never dies); `heartbeat_age` tells the trial how long it has gone
without one. For database servers the study's gate is the server's own lock (ServerLock), so counts are
exact across machines.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import random
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning, StorageInternalError, UpdateFinishedTrialError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.pool import NullPool

from search.cells import identity_attrs
from search.faults import DiskFull, StorageAway, StorageLost, is_disk_full
from search.studyfile import SpecError, near

ARTIFACTS_PREFIX = "artifacts:"  # optuna.artifacts' trial system-attr prefix (one per artifact)
LATEST_ATTR = "latest_state"  # trial system attr: the running trial's latest training state (search.checkpoints)
MAX_RETRY = 2  # a trial whose worker died (no heartbeat) is re-run with the same parameters at most this often
RACE_ATTEMPTS = 12  # schema/study creation attempts when other processes create the same storage at once
DEFAULT_OUTAGE_S = 600  # study.storage_outage_s: how long a worker waits for its database before it stops
BACKOFF_S = (1, 2, 4, 8, 15, 30)  # waits between attempts while the database is away (then 30 s each)
# Messages of errors that say the database file itself is damaged: retrying cannot help
DAMAGED = ("database disk image is malformed", "file is not a database", "file is encrypted or is not a database")
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
        attempt.system_attrs = {k: v for k, v in trial.system_attrs.items()
                                if not (k.startswith(ARTIFACTS_PREFIX) or k == LATEST_ATTR)}
        super().__call__(study, attempt)


# --- the storage policy -----------------------------------------------------------------------------------
def _chain(err: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_damaged(err: BaseException) -> bool:
    """The database file itself is corrupt (SQLite): no retry can help."""
    return any(any(m in str(e) for m in DAMAGED) for e in _chain(err))


def is_connection_error(err: BaseException) -> bool:
    """A fault of the connection, the server or (SQLite) the file's lock or disk, not of what was asked:
    worth retrying the same call. Optuna wraps SQLAlchemy's errors in StorageInternalError."""
    if is_damaged(err):
        return False
    for e in _chain(err):
        if isinstance(e, (OperationalError, InterfaceError, DisconnectionError)):
            return True
        if isinstance(e, DBAPIError) and e.connection_invalidated:
            return True
    return False


def reason_of(err: BaseException) -> str:
    """The driver's own first line (connection refused, server closed the connection, disk full ...)."""
    for e in _chain(err):
        if isinstance(e, DBAPIError) and e.orig is not None:
            return (str(e.orig).strip().splitlines() or [type(e.orig).__name__])[0]
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _default_log(line: str) -> None:
    """Through the running command's progress when there is one (bars stay intact), else to stderr."""
    shown = sys.modules.get("search.progress")
    if shown is not None:
        shown.active().say(line)
    else:
        print(line, file=sys.stderr, flush=True)


class _Outage:
    """One outage of one storage, shared by the threads of a process (trial loop, heartbeat)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.since: float | None = None  # time.monotonic() of the first failed call
        self.told_no_wait = False  # "training goes on" said for this outage


_calling = threading.local()  # depth of policy calls in this thread (only the outermost retries)


@contextmanager
def no_wait() -> Iterator[None]:
    """Storage calls in this block fail at once with StorageAway when the database is away (no retry)."""
    previous = getattr(_calling, "no_wait", False)
    _calling.no_wait = True
    try:
        yield
    finally:
        _calling.no_wait = previous


def _policy(name: str) -> Callable:
    def call(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self.call(name, getattr(RDBStorage, name), *args, **kwargs)

    call.__name__ = name
    return call


class ResilientRDBStorage(RDBStorage):
    """Optuna's RDBStorage with the storage policy (see the module docstring) on every call."""

    should_stop: Callable[[], None] = staticmethod(lambda: None)  # raises to abandon a wait (a signal came)

    def __init__(self, url: str, *, outage_s: float = DEFAULT_OUTAGE_S, log: Callable[[str], None] | None = None,
                 **kwargs: Any) -> None:
        self.outage, self.outage_s, self.log = _Outage(), outage_s, log or _default_log
        self.heartbeats: dict[int, float] = {}  # trial id -> time.monotonic() of its last recorded heartbeat
        super().__init__(url, **kwargs)

    def call(self, name: str, method: Callable, *args: Any, **kwargs: Any) -> Any:
        depth = getattr(_calling, "depth", 0)
        _calling.depth = depth + 1
        try:
            if depth:
                return method(self, *args, **kwargs)
            return self._with_policy(name, method, *args, **kwargs)
        finally:
            _calling.depth = depth

    def _with_policy(self, name: str, method: Callable, *args: Any, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                result = method(self, *args, **kwargs)
            except UpdateFinishedTrialError:
                # A retried state change whose first attempt was committed before the connection dropped
                if attempt and name == "set_trial_state_values" and self._state_is(args, kwargs):
                    result = True
                else:
                    raise
            except Exception as err:
                if is_damaged(err):
                    raise StorageLost(f"storage {self.url_shown} is damaged ({reason_of(err)}); restore it from a "
                                      "backup or start a new storage") from None
                if is_disk_full(err):  # the SQLite file's disk: waiting rarely frees space
                    raise DiskFull(self.url_shown, reason_of(err)) from None
                if not is_connection_error(err):
                    raise
                attempt += 1
                self.scoped_session.remove()  # a fresh session and connection for the next attempt
                self._wait(err, attempt)
                continue
            self._back()
            return result

    def _state_is(self, args: tuple, kwargs: dict) -> bool:
        trial_id = args[0] if args else kwargs["trial_id"]
        state = args[1] if len(args) > 1 else kwargs["state"]
        return RDBStorage.get_trial(self, trial_id).state == state

    def _wait(self, err: BaseException, attempt: int) -> None:
        """One attempt failed: raise StorageAway (no_wait), StorageLost (past outage_s), or wait and say so."""
        with self.outage.lock:
            now = time.monotonic()
            if self.outage.since is None:
                self.outage.since, self.outage.told_no_wait = now, False
            away = now - self.outage.since
            tell = getattr(_calling, "no_wait", False) and not self.outage.told_no_wait
            self.outage.told_no_wait |= tell
        reason = reason_of(err)
        if getattr(_calling, "no_wait", False):
            if tell:
                self.log(f"storage unreachable ({reason}); training goes on, its results are sent when it is back")
            raise StorageAway(reason) from None
        if away >= self.outage_s:
            raise StorageLost(f"storage {self.url_shown} unreachable for {away:.0f} s (study.storage_outage_s = "
                              f"{self.outage_s:g}): {reason}") from None
        delay = min(BACKOFF_S[min(attempt, len(BACKOFF_S)) - 1], max(0.1, self.outage_s - away))
        self.log(f"storage unreachable for {away:.0f} s, retrying (attempt {attempt}, next in {delay:.0f} s): "
                 f"{reason}")
        until = time.monotonic() + delay
        while time.monotonic() < until:
            self.should_stop()
            time.sleep(min(0.2, max(0.0, until - time.monotonic())))

    def _back(self) -> None:
        if self.outage.since is None:
            return
        with self.outage.lock:
            since, self.outage.since = self.outage.since, None
        if since is not None:
            self.log(f"storage back after {time.monotonic() - since:.0f} s")

    @property
    def url_shown(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    # Heartbeats: one attempt; its thread tries again every interval and must never die
    def record_heartbeat(self, trial_id: int) -> None:
        try:
            with no_wait():
                self.call("record_heartbeat", RDBStorage.record_heartbeat, trial_id)
        except Exception:  # the database is away: the trial's loop reads heartbeat_age
            return
        self.heartbeats[trial_id] = time.monotonic()

    def heartbeat_age(self, trial_id: int) -> float:
        """Seconds since this process last recorded the trial's heartbeat (0 if it never tried)."""
        last = self.heartbeats.get(trial_id)
        return 0.0 if last is None else time.monotonic() - last


for _name in ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
              "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
              "get_study_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param", "get_trial_param",
              "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr",
              "set_trial_system_attr", "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials",
              "get_best_trial", "_get_stale_trial_ids",
              # what Optuna's _CachedStorage (in front of every study's RDBStorage) calls directly
              "_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_trials"):
    setattr(ResilientRDBStorage, _name, _policy(_name))


def engine_kwargs(url: str) -> dict[str, Any]:
    """Find dead connections before use (pool_pre_ping) and notice a vanished server (TCP keepalives)."""
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return {"connect_args": {"timeout": 60}}
    if backend == "postgresql":  # libpq options, for psycopg2 and psycopg 3 alike
        args = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                "keepalives_count": 3}
    else:  # MySQL/MariaDB drivers have no keepalive option; the read timeout bounds a dead server's silence
        args = {"connect_timeout": 10}
    return {"pool_pre_ping": True, "connect_args": args}


def open_storage(url: str, heartbeat_interval: int = 30, grace_period: int = 120,
                 outage_s: float = DEFAULT_OUTAGE_S, log: Callable[[str], None] | None = None,
                 wait: bool = False) -> ResilientRDBStorage:
    """An RDB storage with heartbeats (trials of a killed worker are failed and retried, not left RUNNING)
    and the storage policy (`outage_s`). With `wait` (a worker), a database that is away at start is waited
    for as long; else (every other command) it is one line at once: most often the URL is wrong."""
    if url.startswith("postgres://"):  # Heroku-style; SQLAlchemy knows only postgresql://
        raise SpecError(f"storage {url!r}: did you mean {'postgresql://' + url[len('postgres://'):]!r}? "
                        "(SQLAlchemy names the dialect postgresql)")
    if not url.startswith(("sqlite:", "postgresql", "mysql", "mariadb")):
        raise SpecError(
            f"storage {url!r} is not supported; use sqlite:///FILE.db, postgresql://... or mysql+pymysql://..."
        )
    driver_url = normalize_url(url)

    def create() -> ResilientRDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats: stable in practice since 2.x
            return ResilientRDBStorage(
                driver_url,
                outage_s=outage_s,
                log=log,
                engine_kwargs=engine_kwargs(driver_url),
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryStaleTrial(max_retry=MAX_RETRY),
            )

    began, attempt = time.monotonic(), 0
    while True:
        try:
            return retry_race(create)
        except Exception as err:  # sqlalchemy/driver errors differ per backend; the user needs the URL and reason
            shown = make_url(driver_url).render_as_string(hide_password=True)
            if is_damaged(err):
                raise StorageLost(f"storage {shown} is damaged ({reason_of(err)}); restore it from a backup "
                                  "or start a new storage") from None
            if is_disk_full(err):
                raise DiskFull(shown, reason_of(err)) from None
            attempt += 1
            if not (wait and is_connection_error(err) and time.monotonic() - began < outage_s):
                raise SpecError(f"cannot open storage {shown!r}: {reason_of(err)}") from None
            delay = BACKOFF_S[min(attempt, len(BACKOFF_S)) - 1]
            (log or _default_log)(f"storage unreachable, retrying (attempt {attempt}, next in {delay} s): "
                                  f"{reason_of(err)}")
            time.sleep(delay)


# --- the gate on a database server ---------------------------------------------------------------------
class ServerLock:
    """A study's gate on a database server, so `--n-trials` is exact and every ablation cell is queued and
    claimed once however many machines run: a PostgreSQL advisory lock or a MySQL/MariaDB GET_LOCK, held on
    a connection of its own (the lock dies with it: a killed holder never blocks the study). Polled, so a
    signal is handled while waiting. Same interface as filelock.FileLock."""

    def __init__(self, url: str, key: str, poll_s: float = 0.05, storage: ResilientRDBStorage | None = None) -> None:
        self.url = normalize_url(url)
        self.backend = make_url(self.url).get_backend_name()
        digest = hashlib.sha256(key.encode()).digest()
        self.key = int.from_bytes(digest[:8], "big", signed=True)  # PostgreSQL: a bigint
        self.name = "hw4:" + digest.hex()[:40]  # MySQL: at most 64 characters
        self.poll_s, self.storage = poll_s, storage
        self.engine = sqlalchemy.create_engine(self.url, poolclass=NullPool, **{
            k: v for k, v in engine_kwargs(self.url).items() if k != "pool_pre_ping"})
        self.conn: sqlalchemy.Connection | None = None
        self.is_locked = False

    def _try(self) -> bool:
        if self.conn is None:
            self.conn = self.engine.connect()
        if self.backend == "postgresql":
            row = self.conn.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key})
        else:
            row = self.conn.execute(sqlalchemy.text("SELECT GET_LOCK(:n, 0)"), {"n": self.name})
        self.conn.commit()
        return bool(row.scalar())

    def acquire(self) -> None:
        attempt = 0
        while True:
            try:
                if self._try():
                    self.is_locked = True
                    return
            except SQLAlchemyError as err:
                self._drop()
                if not is_connection_error(err) or self.storage is None:
                    raise
                attempt += 1
                self.storage._wait(err, attempt)
                continue
            if self.storage is not None:
                self.storage.should_stop()
            time.sleep(random.uniform(0.5, 1.5) * self.poll_s)

    def release(self) -> None:
        if not self.is_locked:
            return
        self.is_locked = False
        try:
            statement = ("SELECT pg_advisory_unlock(:k)" if self.backend == "postgresql"
                         else "SELECT RELEASE_LOCK(:n)")
            self.conn.execute(sqlalchemy.text(statement), {"k": self.key, "n": self.name})
            self.conn.commit()
        except SQLAlchemyError:  # the connection died: the lock died with it
            self._drop()

    def _drop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.invalidate()
                self.conn.close()
            except SQLAlchemyError:
                pass
            self.conn = None

    def __enter__(self) -> ServerLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def retry_race(action: Callable[[], T], attempts: int = RACE_ATTEMPTS) -> T:
    """Run `action`, retrying with jittered back-off when a concurrent creator makes it fail.

    Two processes creating the same schema or study collide as 'table already exists' (SQLite, MariaDB),
    a unique violation (PostgreSQL) or a lock timeout; the loser's retry finds the winner's result."""
    for attempt in range(attempts):
        try:
            return action()
        except (SQLAlchemyError, StorageInternalError) as err:
            if attempt == attempts - 1 or is_damaged(err) or is_disk_full(err):  # no other process can fix those
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
