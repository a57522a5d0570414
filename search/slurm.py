"""`--slurm N`: the same `search` / `ablate` command as a Slurm job array of N tasks, submitted through submitit.

Each task runs the command without its Slurm options: a worker of the study on its database server (and, with
`--workers`/`--gpus`, several on its node), so the study's gate keeps `--n-trials` exact and every ablation cell
trained once however many tasks run. SQLite is refused: a file on a network file system shared by nodes
corrupts. `--dry-run` prints the batch script instead of submitting it.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from search.studyfile import SpecError

RUN_STUDY = Path(__file__).resolve().parent.parent / "run_study.py"
# the submitting command's own options; a task runs the command without them
OPTIONS = ("--slurm", "--gpus-per-task", "--cpus-per-task", "--time", "--partition", "--slurm-arg")
FLAGS = ("--dry-run",)
TASK_ATTR = "slurm_task"  # trial user attr: ARRAYJOB_TASK of the Slurm task that ran it


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slurm", type=int, metavar="N", help="submit N Slurm tasks (a job array, through submitit), "
                                                         "each a worker of the study on its --storage server")
    p.add_argument("--gpus-per-task", type=int, metavar="G", help="with --slurm: GPUs of each task")
    p.add_argument("--cpus-per-task", type=int, metavar="C", help="with --slurm: CPUs of each task")
    p.add_argument("--time", metavar="HH:MM:SS", help="with --slurm: each task's time limit (default 04:00:00)")
    p.add_argument("--partition", metavar="P", help="with --slurm: the partition")
    p.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="with --slurm: any other sbatch option, e.g. account=proj or qos=short")
    p.add_argument("--dry-run", action="store_true", help="with --slurm: print the batch script, submit nothing")


def task_argv(argv: Sequence[str]) -> list[str]:
    """The command a task runs: the submitting one without its Slurm options."""
    from search.workers import without_options

    return without_options(argv, OPTIONS, FLAGS)


def minutes(text: str) -> int:
    """HH:MM:SS, MM:SS or minutes -> whole minutes (at least 1)."""
    parts = text.split(":")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        raise SpecError(f"--time {text!r}: give HH:MM:SS (e.g. 04:00:00), MM:SS or minutes")
    seconds = 0
    for part, unit in zip(reversed(parts), (1, 60, 3600) if len(parts) > 1 else (60,), strict=False):
        seconds += int(part) * unit
    return max(1, -(-seconds // 60))


def executor_for(args: argparse.Namespace, name: str, folder: Path):
    import submitit

    extra = {}
    for item in args.slurm_arg:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--slurm-arg {item!r}: give KEY=VALUE, an sbatch option without its dashes "
                            "(e.g. account=proj)")
        extra[key.strip()] = value.strip()
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    parameters = {"name": f"hw4-{name}", "timeout_min": minutes(args.time or "04:00:00"), "tasks_per_node": 1,
                  "slurm_array_parallelism": args.slurm, "slurm_additional_parameters": extra}
    if args.cpus_per_task:
        parameters["cpus_per_task"] = args.cpus_per_task
    if args.gpus_per_task:
        parameters["slurm_gpus_per_task"] = args.gpus_per_task
    if args.partition:
        parameters["slurm_partition"] = args.partition
    executor.update_parameters(**parameters)
    return executor


def check(args: argparse.Namespace, url: str) -> None:
    if args.slurm is not None and args.slurm < 1:
        raise SpecError(f"--slurm {args.slurm}: the number of tasks must be positive")
    if url.startswith("sqlite"):
        raise SpecError(f"--slurm with {url}: tasks on several nodes cannot share an SQLite file (over a network "
                        "file system it corrupts); give --storage postgresql://USER@HOST/DB or mysql+pymysql://...")
    for flag in ("gpus_per_task", "cpus_per_task"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SpecError(f"--{flag.replace('_', '-')} {value}: must be positive")


def submit(args: argparse.Namespace, argv: Sequence[str], name: str, url: str, folder: Path) -> int:
    """Submit (or with --dry-run print) the job array; say how to follow it."""
    import submitit

    check(args, url)
    command = [sys.executable, str(RUN_STUDY), *task_argv(argv)]
    executor = executor_for(args, name, folder)
    function = submitit.helpers.CommandFunction(command, cwd=os.getcwd())
    if args.dry_run:
        print(batch_script(executor, args.slurm))
        print(f"# each of the {args.slurm} tasks runs: {shlex.join(command)}", file=sys.stderr)
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with executor.batch():
            jobs = [executor.submit(function) for _ in range(args.slurm)]
    except (submitit.core.utils.FailedJobError, OSError) as err:  # no sbatch, a refused option
        raise SpecError(f"--slurm: sbatch refused the job array: {str(err).strip().splitlines()[-1]}") from None
    array = jobs[0].job_id.split("_")[0]
    print(f"submitted Slurm job array {array}: {args.slurm} task(s) on study {name!r} ({url})")
    print(f"follow: squeue -j {array}; run-study status {name} --storage {url}; logs: {folder}/{array}_*_log.*")
    return 0


def batch_script(executor, n_tasks: int) -> str:
    """The sbatch script submitit writes for an array of n_tasks (what --dry-run prints)."""
    from submitit.slurm.slurm import _make_sbatch_string  # submitit's own writer: the script it would submit

    slurm = executor._executor  # AutoExecutor -> its SlurmExecutor
    return _make_sbatch_string(command=slurm._submitit_command_str, folder=slurm.folder, map_count=n_tasks,
                               **slurm.parameters)


def task_name() -> str | None:
    """ARRAYJOB_TASK of the Slurm array task this process runs in, or None."""
    job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if job and task else os.environ.get("SLURM_JOB_ID")
