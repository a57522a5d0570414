"""`--per-gpu auto`: how many workers should share a GPU, measured before the search (well under a minute).

K = 1, 2, 4, ... processes train the study's first configuration on one GPU at the same time; K doubles while
their total steps/s rises by at least 15% and 2K processes' memory (each one's peak reserved memory times a
headroom for the space's larger models, plus its CUDA context) fits what the GPU had free. The chosen K and every
measured point are printed and stored on the study (user attr `per_gpu_probe`). Small models leave a GPU mostly
idle in one process (59-136 steps/s on an H100, issue 10), so several per GPU is where the throughput is; how many
is measured, not guessed.

The K processes wait for each other at a start barrier (their start-up, imports and CUDA context, takes seconds
and differs between them), warm up for WARMUP_S, then count steps over the same WINDOW_S seconds: the speeds are
those of K trainings that really overlap, not of processes that ran one after another.

Run as `python -m search.probe STUDY.toml --data DIR [--set ...] [--seconds S] [--barrier DIR --k K]`, one probe
process prints one JSON line: {"steps_per_s", "peak_gib", "free_gib"} (free_gib: the GPU's free memory before it
allocated anything; peak_gib: its peak reserved memory plus CONTEXT_GIB).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from search.workers import apply_placement, placement_args, placements, thread_env

GAIN = 1.15  # a doubling of K must give at least this much more total steps/s
HEADROOM = 1.5  # the probed configuration's peak memory x this: room for larger models of the space
MAX_K = 16
WARMUP_S = 1.0  # not counted: CUDA kernels' first launches, the allocator growing
WINDOW_S = 4.0  # counted, the same seconds in every process
CONTEXT_GIB = 0.5  # a CUDA context's own memory, which torch's allocator does not count
BARRIER_TIMEOUT_S = 300.0
PROBE_ATTR = "per_gpu_probe"


@dataclass(frozen=True)
class ProbePoint:
    k: int
    steps_per_s: float  # all K processes together
    peak_gib: float  # the largest of one process's peak reserved memory + CUDA context (0 on a CPU)
    free_gib: float | None = None  # the GPU's free memory before the K processes started (None: unknown)
    window: tuple[float, float] | None = None  # the wall-clock seconds all K counted in (time.time())


def choose_per_gpu(measure: Callable[[int], ProbePoint], max_k: int = MAX_K, gain: float = GAIN,
                   headroom: float = HEADROOM) -> tuple[int, list[ProbePoint], str]:
    """The K to use, every point measured, and why the doubling stopped."""
    points = [measure(1)]
    free = points[0].free_gib
    k = 1
    while 2 * k <= max_k:
        need = 2 * k * points[-1].peak_gib * headroom
        if free is not None and need > free:
            return k, points, f"K={2 * k} would need about {need:.1f} GiB, {free:.1f} GiB were free"
        point = measure(2 * k)
        points.append(point)
        ratio = point.steps_per_s / points[-2].steps_per_s if points[-2].steps_per_s > 0 else float("inf")
        if ratio < gain:
            return k, points, f"K={2 * k} gave {ratio:.2f}x the steps/s of K={k} (less than {gain:.2f}x)"
        k *= 2
    return k, points, f"K={k} is the most probed"


def measure_on(gpu: int | None, study_args: Sequence[str], seconds: float = WINDOW_S,
               n_gpus: int = 1) -> Callable[[int], ProbePoint]:
    """measure(K): K probe processes at once on `gpu` (CUDA_VISIBLE_DEVICES; None: as this process sees it), each
    on the cores and threads a worker gets when the search runs K per GPU on `n_gpus` GPUs (search/workers.py)."""

    def measure(k: int) -> ProbePoint:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        with tempfile.TemporaryDirectory(prefix="probe-") as barrier:
            cmd = [sys.executable, "-m", "search.probe", *study_args, "--seconds", str(seconds),
                   "--barrier", barrier, "--k", str(k)]
            logs = [(Path(barrier) / f"out-{i}", Path(barrier) / f"err-{i}") for i in range(k)]
            procs = []
            for place, (out, err) in zip(placements(k * n_gpus)[:k], logs, strict=True):
                with out.open("w") as stdout, err.open("w") as stderr:
                    procs.append(subprocess.Popen([*cmd, *placement_args(place)], stdout=stdout, stderr=stderr,
                                                  text=True, env={**env, **thread_env(place.threads)},
                                                  cwd=os.getcwd()))
            try:
                _wait_all(procs, BARRIER_TIMEOUT_S + 60 * seconds)
            finally:
                for proc in procs:
                    proc.kill()  # a failed one leaves the others at the barrier
                    proc.wait()
            outputs = [(out.read_text(), err.read_text()) for out, err in logs]
        results = []
        for proc, (out, err) in zip(procs, outputs, strict=True):
            if proc.returncode:
                lines = (err.strip() or out.strip() or f"exit code {proc.returncode}").splitlines()
                raise RuntimeError(f"--per-gpu auto: a probe process failed: {lines[-1]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        free = [r["free_gib"] for r in results if r.get("free_gib") is not None]
        starts = [r["window_start"] for r in results]
        return ProbePoint(k, sum(r["steps_per_s"] for r in results), max(r["peak_gib"] for r in results),
                          min(free) if free else None, (max(starts), min(starts) + seconds))

    return measure


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    """Until every process has ended, or one has failed (the others would wait at the barrier for nothing)."""
    deadline = time.monotonic() + timeout
    while any(proc.poll() is None for proc in procs):
        if any(proc.returncode for proc in procs) or time.monotonic() > deadline:
            return
        time.sleep(0.05)


class _WindowDone(Exception):
    pass


class _Window:
    """train()'s on_step: wait at the barrier, warm up, then count steps for `seconds` and stop training."""

    def __init__(self, seconds: float, barrier: Path | None, k: int, sync: Callable[[], None]) -> None:
        self.seconds, self.barrier, self.k, self.sync = seconds, barrier, k, sync
        self.step, self.started, self.t0, self.n0 = 0, 0.0, None, 0
        self.steps_per_s, self.window_start = 0.0, 0.0

    def __call__(self) -> None:
        if self.step == 0:
            self._wait()
            self.started = time.perf_counter()
        self.step += 1
        now = time.perf_counter()
        if self.t0 is None:
            if now - self.started >= WARMUP_S:
                self.sync()
                self.t0, self.n0, self.window_start = time.perf_counter(), self.step - 1, time.time()
        elif now - self.t0 >= self.seconds:
            self.sync()
            self.steps_per_s = (self.step - 1 - self.n0) / (time.perf_counter() - self.t0)
            raise _WindowDone

    def _wait(self) -> None:
        if self.barrier is None:
            return
        (self.barrier / f"ready-{os.getpid()}").touch()
        deadline = time.monotonic() + BARRIER_TIMEOUT_S
        while sum(1 for _ in self.barrier.glob("ready-*")) < self.k:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the other probe processes did not start within {BARRIER_TIMEOUT_S:.0f} s")
            time.sleep(0.01)


def record(study, k: int, points: list[ProbePoint], why: str) -> None:
    study.set_user_attr(PROBE_ATTR, {"per_gpu": k, "why": why,
                                     "points": [{key: v for key, v in asdict(p).items()
                                                 if v is not None and key != "window"}
                                                for p in points]})


def describe(k: int, points: list[ProbePoint], why: str) -> str:
    shown = ", ".join(f"K={p.k}: {p.steps_per_s:.0f} steps/s" + (f", {p.peak_gib:.1f} GiB" if p.peak_gib else "")
                      for p in points)
    return f"--per-gpu auto: {k} worker(s) per GPU ({shown}; {why})"


def main(argv: list[str] | None = None) -> int:
    """One probe process: train the study's first configuration for a timed window, print its speed."""
    parser = argparse.ArgumentParser(prog="python -m search.probe")
    parser.add_argument("study")
    parser.add_argument("--data")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--seconds", type=float, default=WINDOW_S)
    parser.add_argument("--barrier", type=Path, help="a folder the K processes meet in before they start")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--cpus")
    args = parser.parse_args(argv)
    apply_placement(args.threads, args.cpus)
    import torch

    from data import open_store
    from search.spec import load_spec
    from search.train import default_device, train

    spec = load_spec(args.study, args.overrides)
    device = default_device()
    cuda = device.type == "cuda"
    free = torch.cuda.mem_get_info()[0] / 2**30 if cuda else None
    store = open_store(args.data or spec.data_path)
    cfg = spec.default_run_config()
    # no evaluation and no time budget: the window stops it
    cfg = replace(cfg, train=replace(cfg.train, max_steps=10**8, valid_steps=10**8, max_minutes=0.0))
    window = _Window(args.seconds, args.barrier, args.k, torch.cuda.synchronize if cuda else (lambda: None))
    try:
        train(cfg, store, device=device, on_step=window)
    except _WindowDone:
        pass
    peak = torch.cuda.max_memory_reserved() / 2**30 + CONTEXT_GIB if cuda else 0.0
    print(json.dumps({"steps_per_s": window.steps_per_s, "peak_gib": peak, "free_gib": free,
                      "window_start": window.window_start}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
