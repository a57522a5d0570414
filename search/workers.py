"""`--workers N`: N local worker processes on one study, one core set each, and with `--gpus` one GPU each.

Measured on 2 cores (bench/bench_workers.py, quickstart trials): two processes that each use every core
run at 0.48x the trials/hour of one process; two workers with one thread and one core each at 1.41x
(2 x a single core's rate; 2.95x the unpinned pair). So each worker gets usable_cores // N torch threads
and, where the OS allows (Linux), its own cores via CPU affinity. Workers are started in their own session
so a terminal's Ctrl-C reaches only this process, which forwards it exactly once (a second SIGINT inside
Optuna's bookkeeping could leave a trial RUNNING). A worker whose parent dies (kill -9, a lost terminal) gets
SIGHUP from the kernel (Linux PR_SET_PDEATHSIG) and stops like a SIGTERM: its trial marked interrupted,
retried from its checkpoint. A closed output pipe stops the output, never the work (guard_output).

GPUs (`--gpus auto|none|0,1,...`, `--per-gpu K`): worker i gets GPU gpus[i % len(gpus)] through
CUDA_VISIBLE_DEVICES (so it sees one device, cuda:0, and never touches another's memory); K workers share
each GPU; CPU threads and cores are split over all workers as without GPUs.
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


def parse_workers(text: str, gpu_slots: int = 0) -> int:
    """'auto' = one per GPU slot (GPUs x per-GPU) where GPUs are used, else one per usable core; else a positive
    integer."""
    if text == "auto":
        return gpu_slots or len(usable_cores())
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--workers {text!r} must be a positive integer or 'auto'")
    return int(text)


def gpu_count() -> int:
    """The CUDA GPUs this process sees (0 without CUDA); it asks the driver, no CUDA context is made here."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_names(count: int) -> str:
    """'0 (NVIDIA H100 80GB HBM3), 1 (...)' for an error message; the indices alone where torch sees none."""
    import torch

    if not torch.cuda.is_available():
        return ", ".join(map(str, range(count)))
    return ", ".join(f"{i} ({torch.cuda.get_device_name(i)})" for i in range(count))


def parse_gpus(text: str | None, count: int | None = None) -> tuple[int, ...]:
    """--gpus: 'auto' (the default: every GPU there is, none without CUDA), 'none' (CPU only) or indices '0,2'.
    `count`: how many GPUs the machine has (asked when None)."""
    text = "auto" if text is None else str(text).strip()
    if text == "none":
        return ()
    count = gpu_count() if count is None else count
    if text == "auto":
        return tuple(range(count))
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"--gpus {text!r}: give 'auto', 'none' or distinct GPU indices such as 0,1")
    if not count:
        raise ValueError(f"--gpus {text}: this machine has no CUDA GPU (torch sees none); use --gpus none, or "
                         "leave --gpus out")
    missing = [int(p) for p in parts if int(p) >= count]
    if missing:
        raise ValueError(f"--gpus {text}: there is no GPU {missing[0]} here; GPUs: {gpu_names(count)}")
    return tuple(int(p) for p in parts)


def parse_per_gpu(text: str | int | None, gpus: Sequence[int] = (0,)) -> int | str:
    """--per-gpu K: workers sharing each GPU (default 1), or 'auto' (measured: search/probe.py) where there
    are GPUs."""
    text = "1" if text is None else str(text).strip()
    if text == "auto":
        if not gpus:
            raise ValueError("--per-gpu auto: there is no GPU to probe (torch sees none, or --gpus none); give "
                             "--per-gpu K or leave it out")
        return text
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--per-gpu {text!r} must be a positive integer (workers sharing each GPU) or 'auto'")
    return int(text)


@dataclass(frozen=True)
class Placement:
    threads: int
    cpus: tuple[int, ...] | None  # None: not pinned (more workers than cores, or no affinity API)
    gpu: int | None = None  # the GPU index this worker sees (CUDA_VISIBLE_DEVICES); None: no GPU chosen


def placements(n_workers: int, gpus: Sequence[int] = ()) -> list[Placement]:
    """Worker i: its share of the cores, and GPU gpus[i % len(gpus)] (so K = n_workers / len(gpus) per GPU)."""
    cores = usable_cores()
    threads = max(1, len(cores) // n_workers)
    pin = n_workers <= len(cores) and hasattr(os, "sched_setaffinity")
    return [Placement(threads, tuple(cores[i * threads:(i + 1) * threads]) if pin else None,
                      gpus[i % len(gpus)] if gpus else None)
            for i in range(n_workers)]


def placement_args(place: Placement) -> list[str]:
    """The command-line options that give a process its place (apply_placement reads them back)."""
    return ["--threads", str(place.threads), *(["--cpus", ",".join(map(str, place.cpus))] if place.cpus else [])]


def thread_env(threads: int) -> dict[str, str]:
    """OpenMP/MKL pools sized like torch's, before the process imports torch."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def gpu_env(gpu: int | None, gpus_used: bool) -> dict[str, str]:
    """A worker's CUDA_VISIBLE_DEVICES: its one GPU; '' (no GPU: the CPU) when GPUs are switched off."""
    if gpu is not None:
        return {"CUDA_VISIBLE_DEVICES": str(gpu)}
    return {} if gpus_used else {"CUDA_VISIBLE_DEVICES": ""}


def apply_placement(threads: int | None, cpus: str | None, gpu: int | None = None, cpu_only: bool = False
                    ) -> None:
    """In a worker: pin to its cores, then size torch's thread pool to them. In this process: use GPU `gpu`, or
    no GPU (cpu_only; before CUDA starts, which nothing here did yet). Workers started by Workers see only
    their own GPU, through CUDA_VISIBLE_DEVICES."""
    if cpu_only:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, [int(c) for c in cpus.split(",")])
    torch.set_num_threads(threads or max(1, len(usable_cores())))
    if gpu is not None and torch.cuda.is_available():
        torch.cuda.set_device(gpu)


PARENT_ONLY = ("--workers", "--gpus", "--per-gpu")  # the parent places its workers; each worker is one


def without_workers_option(argv: Sequence[str]) -> list[str]:
    return without_options(argv, PARENT_ONLY)


def without_options(argv: Sequence[str], options: Sequence[str], flags: Sequence[str] = ()) -> list[str]:
    """argv without `options` (each with its value, `--opt V` or `--opt=V`) and `flags` (no value)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif arg not in flags and not arg.startswith(tuple(f"{o}=" for o in options)):
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

    def __init__(self, argv: Sequence[str], n_workers: int, deadline: float | None,
                 gpus: Sequence[int] | None = None) -> None:
        """gpus: the GPUs to spread the workers over; () for none (CPU only); None: leave CUDA as it is."""
        self.procs: list[subprocess.Popen] = []
        self._pumps: list[threading.Thread] = []
        base = [sys.executable, str(RUN_STUDY), *without_workers_option(argv)]
        self.placements = placements(n_workers, gpus or ())
        for i, place in enumerate(self.placements):
            cmd = [*base, "--worker-id", str(i), *placement_args(place), "--parent", str(os.getpid())]
            if deadline is not None:
                cmd += ["--deadline", repr(deadline)]
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **thread_env(place.threads),
                   **({} if gpus is None else gpu_env(place.gpu, bool(gpus)))}
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                    bufsize=1, start_new_session=True)
            self.procs.append(proc)
            pump = threading.Thread(target=self._pump, args=(proc, f"[w{i}] "), daemon=True)
            pump.start()
            self._pumps.append(pump)

    def describe(self) -> str:
        def one(place: Placement) -> str:
            cores = f" on core(s) {','.join(map(str, place.cpus))}" if place.cpus else ""
            gpu = f", GPU {place.gpu}" if place.gpu is not None else ""
            return f"{place.threads} thread(s){cores}{gpu}"

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
