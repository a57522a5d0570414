"""`--per-gpu auto`: how many workers should share a GPU, measured before the search (well under a minute).

K = 1, 2, 4, ... processes train the study's first configuration on one GPU at the same time; K doubles while
their total steps/s rises by at least 15% and 2K processes' peak memory (times a headroom for the space's larger
models) fits what the GPU had free. The chosen K and every measured point are printed and stored on the study
(user attr `per_gpu_probe`). Small models leave a GPU mostly idle in one process (59-136 steps/s on an H100,
issue 10), so several per GPU is where the throughput is; how many is measured, not guessed.

Run as `python -m search.probe STUDY.toml --data DIR --steps N [--set ...]`, one probe process prints one JSON
line: {"steps_per_s", "peak_gib", "free_gib"} (free_gib: the GPU's free memory before it allocated anything).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

GAIN = 1.15  # a doubling of K must give at least this much more total steps/s
HEADROOM = 1.5  # the probed configuration's peak memory x this: room for larger models of the space
MAX_K = 16
PROBE_STEPS = 150
PROBE_ATTR = "per_gpu_probe"


@dataclass(frozen=True)
class ProbePoint:
    k: int
    steps_per_s: float  # all K processes together
    peak_gib: float  # the largest peak of one process (0 on a CPU)
    free_gib: float | None = None  # the GPU's free memory before the K processes started (None: unknown)


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


def measure_on(gpu: int | None, study_args: Sequence[str], steps: int = PROBE_STEPS) -> Callable[[int], ProbePoint]:
    """measure(K): K probe processes at once on `gpu` (CUDA_VISIBLE_DEVICES; None: as this process sees it)."""

    def measure(k: int) -> ProbePoint:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        cmd = [sys.executable, "-m", "search.probe", *study_args, "--steps", str(steps)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                  cwd=os.getcwd()) for _ in range(k)]
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                lines = (err.strip() or out.strip() or f"exit code {proc.returncode}").splitlines()
                raise RuntimeError(f"--per-gpu auto: a probe process failed: {lines[-1]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        free = [r["free_gib"] for r in results if r.get("free_gib") is not None]
        return ProbePoint(k, sum(r["steps_per_s"] for r in results), max(r["peak_gib"] for r in results),
                          min(free) if free else None)

    return measure


def record(study, k: int, points: list[ProbePoint], why: str) -> None:
    study.set_user_attr(PROBE_ATTR, {"per_gpu": k, "why": why,
                                     "points": [{key: v for key, v in asdict(p).items() if v is not None}
                                                for p in points]})


def describe(k: int, points: list[ProbePoint], why: str) -> str:
    shown = ", ".join(f"K={p.k}: {p.steps_per_s:.0f} steps/s" + (f", {p.peak_gib:.1f} GiB" if p.peak_gib else "")
                      for p in points)
    return f"--per-gpu auto: {k} worker(s) per GPU ({shown}; {why})"


def main(argv: list[str] | None = None) -> int:
    """One probe process: train the study's first configuration for --steps steps, print its speed."""
    parser = argparse.ArgumentParser(prog="python -m search.probe")
    parser.add_argument("study")
    parser.add_argument("--data")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=PROBE_STEPS)
    args = parser.parse_args(argv)
    import torch

    from data import open_store
    from search.spec import load_spec
    from search.train import default_device, train

    spec = load_spec(args.study, args.overrides)
    device = default_device()
    free = torch.cuda.mem_get_info()[0] / 2**30 if device.type == "cuda" else None
    store = open_store(args.data or spec.data_path)
    cfg = spec.default_run_config()
    steps = min(args.steps, cfg.train.max_steps)  # one evaluation, at the end; no time budget
    cfg = replace(cfg, train=replace(cfg.train, max_steps=steps, valid_steps=steps, max_minutes=0.0))
    result = train(cfg, store, device=device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    print(json.dumps({"steps_per_s": result.steps_per_s, "peak_gib": peak, "free_gib": free}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
