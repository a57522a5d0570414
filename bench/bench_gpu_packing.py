"""Trials per GPU-hour with K = 1, 2, 4, 8 trials sharing one GPU, against the official sample loop on that GPU.

Models: the sample d80 (studies/sample.toml), the medium Transformer at d512 (studies/medium.toml, d_model 512,
nhead 8) and the boss Conformer at d512 (studies/boss.toml, d_model 512, nhead 8: attention pooling, AM-Softmax),
each the study's first configuration with those overrides, on a synthetic HW4-shaped dataset (600 speakers,
40 mels, batch 32 x 128 frames).

  sample loop  bench/bench_sample_loop.py's faithful copy of the official loop (a Dataset that torch.load()s
               each utterance, DataLoader with the sample's 8 workers, fp32), one process: what a student runs
  K = 1..8     K processes of train() on the same GPU, measured exactly as `--per-gpu auto` measures
               (search/probe.py: they meet at a barrier, warm up, then count steps over the same seconds)

trials/GPU-hour is total steps/s x 3600 / 70,000 (the HW4 sample's total_steps); "x sample" is that against
the sample loop's. GPU utilisation (mean) and memory (max, all processes) come from `nvidia-smi` sampled every
200 ms inside the counted window. The last line per model is the K that `--per-gpu auto` would choose from
these very points, and the best K measured, so the probe can be checked against the bench.

Without a GPU it runs on the CPU (K processes share the cores; no utilisation or memory): a check of the
script, not a number for the goals.

Run from the repository root:  python -m bench.bench_gpu_packing [--ks 1,2,4,8] [--seconds 8] [--gpu 0]
                                   [--models "sample d80,boss conformer d512"] [--sample-steps 400]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "studies"
D512 = ["model.d_model=512", "model.nhead=8"]
MODELS = {
    "sample d80": ("sample.toml", []),
    "medium d512": ("medium.toml", D512),
    "boss conformer d512": ("boss.toml", D512),
}
TRIAL_STEPS = 70_000


def study_args(model: str, data: Path) -> list[str]:
    study, overrides = MODELS[model]
    return [str(STUDIES / study), "--data", str(data), *(a for o in overrides for a in ("--set", o))]


class GpuMonitor:
    """nvidia-smi sampling one GPU every 200 ms; utilisation and memory inside a wall-clock window."""

    def __init__(self, gpu: int | None) -> None:
        self.gpu, self.proc, self.out = gpu, None, ""

    def __enter__(self) -> "GpuMonitor":
        if self.gpu is not None:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "-i", str(self.gpu), "--query-gpu=timestamp,utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", "-lms", "200"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.out = self.proc.communicate()[0]

    def within(self, start: float, end: float) -> tuple[float | None, float | None]:
        """Mean utilisation (%) and max memory used (GiB) of the samples taken between `start` and `end`."""
        util, mem = [], []
        for line in self.out.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 3:
                continue
            try:
                at = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                u, m = float(parts[1]), float(parts[2]) / 1024
            except ValueError:
                continue
            if start <= at <= end:
                util.append(u)
                mem.append(m)
        return (sum(util) / len(util), max(mem)) if util else (None, None)


def baseline(model: str, data: Path, steps: int, device: str) -> dict:
    """The sample loop in its own process (a fresh GPU context): steps/s, and its window for the monitor."""
    out = subprocess.run([sys.executable, "-m", "bench.bench_gpu_packing", "--baseline-child", model, "--data",
                          str(data), "--sample-steps", str(steps), "--device", device],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        sys.exit(f"{model} / sample loop failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_child(model: str, data: Path, steps: int, device: str) -> None:
    from bench.bench_sample_loop import sample_loop
    from search.spec import load_spec

    study, overrides = MODELS[model]
    cfg = "sample d80" if model == "sample d80" else load_spec(STUDIES / study, overrides).default_run_config().model
    s_per_step = sample_loop(data, cfg, steps, device, loader_workers=8 if device == "cuda" else 0)
    end = time.time()  # the timed steps were the last ones: the window the monitor reads
    print(json.dumps({"steps_per_s": 1 / s_per_step, "window": [end - steps * s_per_step, end]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--seconds", type=float, default=8.0, help="the counted window of each K")
    parser.add_argument("--sample-steps", type=int, default=400)
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--speakers", type=int, default=600)
    parser.add_argument("--baseline-child", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_child:
        return baseline_child(args.baseline_child, args.data, args.sample_steps, args.device)
    import torch

    from data.synthetic import make_synthetic
    from search.probe import ProbePoint, choose_per_gpu, measure_on

    cuda = torch.cuda.is_available()
    gpu = args.gpu if cuda else None
    device = "cuda" if cuda else "cpu"
    ks = [int(k) for k in args.ks.split(",")]
    data = make_synthetic(Path(tempfile.mkdtemp(prefix="bench_gpu_packing-")) / "ds", speakers=args.speakers,
                          utterances_per_speaker=8, seed=0, n_mels=40)
    os.chdir(ROOT)
    where = (f"GPU {gpu}: {torch.cuda.get_device_name(gpu)}, "
             f"{torch.cuda.get_device_properties(gpu).total_memory / 2**30:.0f} GiB" if cuda
             else f"no GPU: CPU, {os.cpu_count()} cores shared by the K processes (a check of the script only)")
    print(f"{where}; {args.speakers} speakers, batch 32 x 128 frames, {args.seconds:.0f} s counted per K; "
          f"trials/GPU-hour at {TRIAL_STEPS:,} steps", flush=True)
    print(f"{'model':<20} {'loop':<12} {'K':>2} {'steps/s':>9} {'trials/h':>9} {'x sample':>9} {'GPU util':>9} "
          f"{'GPU GiB':>8} {'GiB/proc':>9}")

    def row(model: str, loop: str, k: int, rate: float, base: float, util, mem, per_proc) -> None:
        print(f"{model:<20} {loop:<12} {k:>2} {rate:9.1f} {rate * 3600 / TRIAL_STEPS:9.2f} {rate / base:8.2f}x "
              f"{'-' if util is None else f'{util:.0f}%':>9} {'-' if mem is None else f'{mem:.1f}':>8} "
              f"{'-' if not per_proc else f'{per_proc:.1f}':>9}", flush=True)

    for model in args.models.split(","):
        with GpuMonitor(gpu) as monitor:
            base = baseline(model, data, args.sample_steps, device)
        row(model, "sample loop", 1, base["steps_per_s"], base["steps_per_s"], *monitor.within(*base["window"]), None)
        measure = measure_on(gpu, study_args(model, data), seconds=args.seconds)
        points: dict[int, ProbePoint] = {}
        for k in ks:
            with GpuMonitor(gpu) as monitor:
                point = measure(k)
            points[k] = point
            row(model, "train()", k, point.steps_per_s, base["steps_per_s"], *monitor.within(*point.window),
                point.peak_gib)
        best = max(points.values(), key=lambda p: p.steps_per_s)
        chosen, _, why = choose_per_gpu(lambda k, known=points: known.get(k, ProbePoint(k, 0.0, 0.0, None)),
                                        max_k=max(ks))
        print(f"{model:<20} --per-gpu auto would choose K={chosen} ({why}); best measured K={best.k}, "
              f"{best.steps_per_s / base['steps_per_s']:.2f}x the sample loop's trials/GPU-hour", flush=True)


if __name__ == "__main__":
    main()
