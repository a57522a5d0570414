"""`--workers N`: N local worker processes on one study, one core set each.

Measured on 2 cores (bench/bench_workers.py, quickstart trials): two processes that each use every core
run at 0.48x the trials/hour of one process; two workers with one thread and one core each at 1.41x
(2 x a single core's rate; 2.95x the unpinned pair). So each worker gets usable_cores // N torch threads
and, where the OS allows (Linux), its own cores via CPU affinity. Workers are started in their own session
so a terminal's Ctrl-C reaches only this process, which forwards it exactly once (a second SIGINT inside
Optuna's bookkeeping could leave a trial RUNNING). A worker whose parent dies (kill -9, a lost terminal) gets
SIGHUP from the kernel (Linux PR_SET_PDEATHSIG) and stops like a SIGTERM: its trial marked interrupted,
retried from its checkpoint. A closed output pipe stops the output, never the work (guard_output).
"""
from __future__ import annotations

import ctypes
import errno
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

RUN_STUDY = Path(__file__).resolve().parent.parent / "run_study.py"


def usable_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def parse_workers(text: str) -> int:
    """'auto' = usable cores; else a positive integer."""
    if text == "auto":
        return len(usable_cores())
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--workers {text!r} must be a positive integer or 'auto'")
    return int(text)


@dataclass(frozen=True)
class Placement:
    threads: int
    cpus: tuple[int, ...] | None  # None: not pinned (more workers than cores, or no affinity API)


def placements(n_workers: int) -> list[Placement]:
    cores = usable_cores()
    threads = max(1, len(cores) // n_workers)
    pin = n_workers <= len(cores) and hasattr(os, "sched_setaffinity")
    return [Placement(threads, tuple(cores[i * threads:(i + 1) * threads]) if pin else None)
            for i in range(n_workers)]


def apply_placement(threads: int | None, cpus: str | None) -> None:
    """In a worker: pin to its cores, then size torch's thread pool to them."""
    import torch

    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, [int(c) for c in cpus.split(",")])
    torch.set_num_threads(threads or max(1, len(usable_cores())))


def without_workers_option(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int, signum: int) -> None:
    """In a worker: the kernel sends it `signum` when its parent dies (Linux). A parent already gone (it died
    before this call) is the same: the signal now."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)


class _Guarded(io.TextIOBase):
    """A text stream that, once its reader is gone (EPIPE), swallows further output instead of raising."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.closed_pipe = stream, False

    def write(self, text: str) -> int:
        if not self.closed_pipe:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (BrokenPipeError, ValueError) as err:
                self._closed(err)
            except OSError as err:
                if err.errno != errno.EPIPE:
                    raise
                self._closed(err)
        return len(text)

    def _closed(self, err: Exception) -> None:
        self.closed_pipe = True
        try:  # point the descriptor at /dev/null, so the interpreter's own final flush does not complain
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass

    def flush(self) -> None:
        if not self.closed_pipe:
            try:
                self.stream.flush()
            except (BrokenPipeError, ValueError) as err:
                self._closed(err)

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", "utf-8")


def guard_output() -> None:
    """stdout and stderr survive a closed pipe (`run-study search ... | head`, a worker whose parent died)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Guarded):
            setattr(sys, name, _Guarded(stream))


class Workers:
    """Start N copies of this command as workers, prefix their output lines with [wI], forward signals."""

    def __init__(self, argv: Sequence[str], n_workers: int, deadline: float | None) -> None:
        self.procs: list[subprocess.Popen] = []
        self._pumps: list[threading.Thread] = []
        base = [sys.executable, str(RUN_STUDY), *without_workers_option(argv)]
        self.placements = placements(n_workers)
        for i, place in enumerate(self.placements):
            cmd = [*base, "--worker-id", str(i), "--threads", str(place.threads), "--parent", str(os.getpid())]
            if place.cpus:
                cmd += ["--cpus", ",".join(map(str, place.cpus))]
            if deadline is not None:
                cmd += ["--deadline", repr(deadline)]
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(place.threads),
                   "MKL_NUM_THREADS": str(place.threads)}
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                    bufsize=1, start_new_session=True)
            self.procs.append(proc)
            pump = threading.Thread(target=self._pump, args=(proc, f"[w{i}] "), daemon=True)
            pump.start()
            self._pumps.append(pump)

    def describe(self) -> str:
        def one(place: Placement) -> str:
            cores = f" on core(s) {','.join(map(str, place.cpus))}" if place.cpus else ""
            return f"{place.threads} thread(s){cores}"

        return "; ".join(f"w{i}: {one(p)}" for i, p in enumerate(self.placements))

    @property
    def names(self) -> set[str]:
        from search.runner import worker_name

        return {worker_name(p.pid) for p in self.procs}

    @staticmethod
    def _pump(proc: subprocess.Popen, prefix: str) -> None:
        for line in proc.stdout:  # drained to the end even when our own output is gone: a full pipe blocks a worker
            try:
                sys.stdout.write(prefix + line)
                sys.stdout.flush()
            except (OSError, ValueError):
                pass

    def wait(self) -> list[int]:
        """Exit codes; on SIGINT/SIGTERM here, the same signal goes once to every worker, then we wait."""
        from search.runner import Terminated, poll_interrupt

        try:
            while any(p.poll() is None for p in self.procs):
                poll_interrupt()  # in case the handler's exception was swallowed somewhere
                time.sleep(0.2)
            codes = [p.returncode for p in self.procs]
        except KeyboardInterrupt as interrupt:
            self.signal(signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)
            previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                for p in self.procs:
                    p.wait()
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
            self._join()
            raise
        self._join()
        return codes

    def signal(self, signum: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def _join(self) -> None:
        for pump in self._pumps:
            pump.join(timeout=5)
