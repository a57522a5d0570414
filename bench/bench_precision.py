"""Precision on this CPU: training steps per CPU-second of the preset models in fp32 (torch's default matmul route
and oneDNN's), fp32 as `auto` picks it, and bf16 autocast; the probe's decision and its cost; GFLOP/s against
the measured matmul peak of each dtype. Everything in one process and one thread, interleaved, so the ratios
hold on a shared machine.

The models: each preset's default model (StudySpec.default_run_config: the first choice of every list), the
sample's d80 Transformer, medium's d512 Transformer and boss's Conformer at d256. A step is batch 32 x 128 frames,
n_mels 40, 600 classes, forward + backward + AdamW, computed as train() computes it (search.precision).
Each cell runs >= --seconds CPU-seconds after 2 warm-up steps; --reps rounds of every cell, median.

Goals (issue 22): oneDNN fp32 >= 1.4x the default route where the CPU's default GEMM is slow (AMD); with native
bf16, auto >= 2x for d256+ and >= 1.5x for d80; without either, auto within 1% of fp32.

Run from the repository root:
  python -m bench.bench_precision [--seconds 3] [--reps 3]
"""
import argparse
import dataclasses
import statistics
import time

import torch

from bench.bench_presets import STUDIES
from models import build_model
from models.flops import forward_flops
from search import precision as P
from search.spec import load_spec

MODES = {"fp32 default": P.Precision("fp32", "default"), "fp32 oneDNN": P.Precision("fp32", "onednn"),
         "bf16": P.Precision("bf16", "default")}


def models() -> dict:
    """Name -> RunConfig of the models measured."""
    sample = load_spec(STUDIES / "sample.toml").default_run_config()
    medium = load_spec(STUDIES / "medium.toml").default_run_config()
    boss = load_spec(STUDIES / "boss.toml").default_run_config()
    out = {"sample d80 transformer": sample,
           "medium d512 transformer": dataclasses.replace(medium, model=dataclasses.replace(medium.model, d_model=512)),
           "boss d256 conformer": dataclasses.replace(boss, model=dataclasses.replace(boss.model, d_model=256))}
    cpu = load_spec(STUDIES / "cpu.toml").default_run_config()
    out[f"cpu.toml d{cpu.model.d_model} {cpu.model.encoder}"] = cpu
    return out


def step_cost(cfg, precision: P.Precision, seconds: float) -> float:
    """CPU-seconds per training step."""
    torch.manual_seed(0)
    model = build_model(cfg.model, 40, 600)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, lengths = torch.randn(32, 128, 40), torch.full((32,), 128)
    y = torch.randint(0, 600, (32,))
    step = P.training_step(model, optimizer, x, lengths, y, precision)
    step(), step()
    steps, start = 0, time.process_time()
    while (spent := time.process_time() - start) < seconds or steps < 2:
        step()
        steps += 1
    return spent / steps


def matmul_peak(dtype: torch.dtype, precision: P.Precision) -> float:
    """GFLOP per CPU-second of a 2048 x 1024 x 1024 matmul in `dtype` (fp32 through the precision's route)."""
    a, b = torch.randn(2048, 1024).to(dtype), torch.randn(1024, 1024).to(dtype)
    with precision.applied():
        a @ b
        calls, start = 0, time.process_time()
        while (spent := time.process_time() - start) < 0.5:
            a @ b
            calls += 1
    return 2 * 2048 * 1024 * 1024 * calls / spent / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="CPU-seconds per cell and round")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, 1 thread; "
          f"bf16 native (oneDNN): {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    peaks = {"fp32 default": matmul_peak(torch.float32, MODES["fp32 default"]),
             "fp32 oneDNN": matmul_peak(torch.float32, MODES["fp32 oneDNN"]),
             "bf16": matmul_peak(torch.bfloat16, MODES["fp32 default"])}
    print("matmul peak, GFLOP per CPU-second: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    header = f"{'model':28s} {'route':13s} {'steps/CPU-s':>11s} {'vs fp32':>8s} {'GFLOP/CPU-s':>11s} {'of peak':>8s}"
    for name, cfg in models().items():
        flops = 3 * 32 * forward_flops(build_model(cfg.model, 40, 600), 40, 128)  # forward + backward, a batch
        probed = P.measure(cfg, 40, 600, 1)
        auto = probed.decision()
        # where the probe found bf16 matmuls far slower (no native bf16) its steps take minutes: not timed here either
        modes = {m: p for m, p in MODES.items() if m != "bf16" or probed.timing("bf16").timed}
        costs = {mode: [] for mode in modes}
        for _ in range(args.reps):  # interleaved: a slow spell of the machine hits every mode alike
            for mode, precision in modes.items():
                costs[mode].append(step_cost(cfg, precision, args.seconds))
        speed = {mode: 1 / statistics.median(c) for mode, c in costs.items()}
        auto_mode = "bf16" if auto.dtype == "bf16" else ("fp32 oneDNN" if auto.route == "onednn" else "fp32 default")
        print(f"\n{name} ({flops / 3 / 32 / 1e9:.2f} GFLOP forward per segment); the probe took "
              f"{probed.seconds:.2f} s, saw bf16 at {probed.bf16_speedup:.2f}x its fp32 route and picks {auto.label}")
        print(header)
        for mode in (*modes, "auto"):
            shown = auto_mode if mode == "auto" else mode
            peak = peaks[shown]
            print(f"{name[:28]:28s} {mode:13s} {speed[shown]:11.2f} {speed[shown] / speed['fp32 default']:7.2f}x "
                  f"{speed[shown] * flops / 1e9:11.1f} {speed[shown] * flops / 1e9 / peak:7.0%}")
        if "bf16" not in modes:
            print(f"{name[:28]:28s} {'bf16':13s} not timed: the probe's matmul check puts it at "
                  f"{probed.timing('bf16').steps_per_cpu_s:.3f} steps/CPU-s")


if __name__ == "__main__":
    main()
