"""`run-study status`: where a study stands, read from its storage while trials run (it never changes it)."""
from __future__ import annotations

from collections import Counter

import optuna
import sqlalchemy as sa
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from search.attrs import best_of
from search.progress import params_text

STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what --n-trials counts (search.runner.search_plan)
TARGET_ATTR = "target_trials"  # study user attr: the finished-trial target of the last `search` command


def study_status(study: optuna.Study, now: float) -> str:
    """Counts per state, each running trial (worker, last reported step, heartbeat age), the best trial, and
    an ETA where the study knows its target; `now` is time.time(), for the running trials' ages."""
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state for t in trials)
    lines = [f"study {study.study_name!r}: {len(trials)} trial{'s' if len(trials) != 1 else ''}: "
             + ", ".join(f"{counts[s]} {s.name.lower()}" for s in STATES)]
    running = [t for t in trials if t.state == TrialState.RUNNING]
    beats = heartbeat_ages(study) if running else None
    for t in running:
        step = max(t.intermediate_values, default=None)
        reported = f"step {step} value {t.intermediate_values[step]:.4f}" if step is not None else "no step reported"
        age = beats.get(t.number) if beats is not None else None
        started = f"{duration_text(now - t.datetime_start.timestamp())} ago" if t.datetime_start else "?"
        gpu = t.user_attrs.get("gpu")
        task = t.user_attrs.get("slurm_task")
        where = (t.user_attrs.get("worker", "?") + (f" (Slurm task {task})" if task else "")
                 + (f" GPU {gpu['index']} ({gpu['name']})" if gpu else ""))
        lines.append(f"  running #{t.number} on {where}: {reported}, heartbeat "
                     f"{'?' if age is None else f'{age:.0f} s ago'}, started {started}")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = best_of(complete)
        params = params_text(best.params)
        lines.append(f"best: #{best.number} value {best.value:.4f} ({params})")
    lines.append(_progress(study, trials, len(running)))
    return "\n".join(lines)


def heartbeat_ages(study: optuna.Study) -> dict[int, float] | None:
    """Seconds since each trial's last heartbeat, by trial number; None when the storage keeps no heartbeats.

    Optuna has no getter for heartbeat times (only `_get_stale_trial_ids`), so this reads its trial_heartbeats
    table. Both times come from the database's clock (heartbeats are stored with its now()): no clock skew
    between machines, and no time zone guessing (SQLite stores UTC, PostgreSQL and MySQL session time)."""
    storage = getattr(study._storage, "_backend", study._storage)  # RDBStorage behind Optuna's cache
    if not isinstance(storage, RDBStorage) or storage.get_heartbeat_interval() is None:
        return None
    trials = sa.table("trials", sa.column("trial_id"), sa.column("number"), sa.column("study_id"))
    studies = sa.table("studies", sa.column("study_id"), sa.column("study_name"))
    beats = sa.table("trial_heartbeats", sa.column("trial_id"), sa.column("heartbeat", sa.DateTime))
    query = (sa.select(trials.c.number, beats.c.heartbeat)
             .join(trials, trials.c.trial_id == beats.c.trial_id)
             .join(studies, studies.c.study_id == trials.c.study_id)
             .where(studies.c.study_name == study.study_name))
    with storage.engine.connect() as connection:
        db_now = connection.execute(sa.select(sa.func.now())).scalar_one()  # typed DateTime: parsed on SQLite
        rows = connection.execute(query).all()
    db_now = db_now.replace(tzinfo=None)  # as Optuna does: PostgreSQL answers with a time zone, the column has none
    return {number: (db_now - beat.replace(tzinfo=None)).total_seconds() for number, beat in rows}


def _progress(study: optuna.Study, trials: list[FrozenTrial], n_running: int) -> str:
    """Finished trials and their mean duration, and the ETA: trials (an ablation's cells) left x mean duration /
    running workers. A search's target is the --n-trials (or study.n_trials) of its last `search` command."""
    attrs = study.user_attrs
    ablation = attrs.get("kind") == "ablation" and attrs.get("rows") and attrs.get("seeds")
    # an ablation's pruned trials are workers that found no cell left: they took no time, so they do not count
    counted = (TrialState.COMPLETE,) if ablation else FINISHED
    finished = [t for t in trials if t.state in counted and t.duration is not None]
    if not finished:
        return "finished: none yet"
    mean = sum(t.duration.total_seconds() for t in finished) / len(finished)
    line = f"finished: {len(finished)}, mean {duration_text(mean)} each"
    workers = max(1, n_running)
    if not ablation:
        target = attrs.get(TARGET_ATTR)
        if not target:
            return line
        left = max(0, target - len(finished))
        if left == 0:
            return line + f"; target of {target} reached"
        eta = duration_text(left * mean / workers)
        return line + f"; {left} of {target} trials left, ETA {eta} ({n_running} running)"
    target = len(attrs["rows"]) * len(attrs["seeds"])
    left = target - len({(t.params.get("variant"), t.params.get("seed")) for t in finished})
    return line + f"; {left} of {target} cells left, ETA {duration_text(left * mean / workers)} ({workers} running)"


def duration_text(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
