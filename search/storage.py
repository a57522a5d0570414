"""Where studies live: the default SQLite file beside the study file, or any RDB URL given."""
from __future__ import annotations

import os
import warnings

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from search.spec import SpecError, StudySpec

MAX_RETRY = 2  # a trial whose worker died (no heartbeat) is re-run with the same parameters at most this often


def default_storage_url(spec: StudySpec) -> str:
    """sqlite:///<study file's folder>/<name>.db (git-ignored), relative to the cwd when that is shorter."""
    path = spec.path.parent / f"{spec.name}.db"
    relative = os.path.relpath(path)
    return f"sqlite:///{relative if not relative.startswith('..') else path.resolve()}"


def open_storage(url: str, heartbeat_interval: int = 30, grace_period: int = 120) -> RDBStorage:
    """An RDB storage with heartbeats, so trials of a killed worker are failed and retried, not left RUNNING."""
    if not url.startswith(("sqlite:", "postgresql", "mysql")):
        raise SpecError(
            f"storage {url!r} is not supported; use sqlite:///FILE.db, postgresql://... or mysql+pymysql://..."
        )
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats: stable in practice since 2.x
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
            )
    except Exception as err:  # sqlalchemy/driver errors differ per backend; the user needs the URL and reason
        reason = str(err).splitlines()[0]
        raise SpecError(f"cannot open storage {url!r}: {reason}") from None


def load_existing_study(name: str, url: str) -> optuna.Study:
    storage = open_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if name not in names:
        raise SpecError(f"no study {name!r} in {url}; studies there: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=name, storage=storage)
