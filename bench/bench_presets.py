"""Training steps/s (and optionally accuracy at a small equal budget) of each preset's default model.

The default model of a study file is its first point: the first choice of every list and the low end
of every range (StudySpec.default_run_config). Steps/s: batch 32 of full 128-frame crops, n_mels 40,
600 classes, forward + backward + AdamW, after 3 warm-up steps, on this machine's CPU threads
(or CUDA when present). Accuracy: search.train.train on a synthetic HW4 dataset for --accuracy-steps.

Run from the repository root:
  python -m bench.bench_presets [--steps 10] [--accuracy-steps 200 --data datasets/quickstart]
"""

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from models import build_model
from search.spec import load_spec
from search.train import default_device, train

STUDIES = Path(__file__).resolve().parent.parent / "studies"
PRESETS = ("sample", "medium", "strong", "boss")


def steps_per_second(cfg, steps: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = build_model(cfg.model, 40, 600).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(32, 128, 40, device=device)
    lengths = torch.full((32,), 128, device=device)
    y = torch.randint(0, 600, (32,), device=device)
    for step in range(steps + 3):
        if step == 3:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = model.criterion(model(x, lengths), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--accuracy-steps", type=int, default=0, help="also train each default model this long")
    parser.add_argument("--data", type=Path, default=Path("datasets/quickstart"))
    args = parser.parse_args()
    device = default_device()
    store = None
    if args.accuracy_steps:
        from data import open_store

        store = open_store(args.data)
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch 32 x 128 frames")
    for name in PRESETS:
        cfg = load_spec(STUDIES / f"{name}.toml").default_run_config()
        m = cfg.model
        line = (f"{name:7s} {m.encoder:11s} d_model {m.d_model:4d} nhead {m.nhead:2d} layers {m.n_layers} "
                f"pooling {m.pooling:15s} loss {m.loss:11s} {steps_per_second(cfg, args.steps, device):7.2f} steps/s")
        if store is not None:
            n = args.accuracy_steps
            budget = dataclasses.replace(cfg.train, max_steps=n, warmup_steps=n // 10, valid_steps=n)
            result = train(dataclasses.replace(cfg, train=budget), store, device=device)
            line += f"  valid acc {result.best_valid_acc:.3f} after {n} steps"
        print(line, flush=True)


if __name__ == "__main__":
    main()
