"""Where a training step's CPU time goes: torch.profiler's top operators for one model, built with the project's
layers (models.dropout's masks, our Transformer layer's attention math) and with torch's stock nn.Dropout and
nn.TransformerEncoderLayer (same weights), on one pinned core with one thread, batch 32 x 128 frames, a third of
the batch padded to 90 frames. Also prints CPU ms per step of both, best of --rounds interleaved rounds.

Run from the repository root:  python -m bench.bench_step_profile [--model "sample d80"] [--steps 20] [--rounds 3]
"""
import argparse
import copy
import os
import time

import torch

from bench.bench_sample_loop import MODELS, stock
from models import ModelConfig, build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sample d80", choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ours = build_model(ModelConfig(**MODELS[args.model]), 40, 60).train()
    models = {"project": ours, "stock torch": stock(copy.deepcopy(ours))}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    x, lengths, y = torch.randn(32, 128, 40), torch.full((32,), 128), torch.randint(0, 60, (32,))
    lengths[::3] = 90

    def step(name: str) -> None:
        model, optimizer = models[name], optimizers[name]
        loss = model.criterion(model(x, lengths), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    best = dict.fromkeys(models, float("inf"))
    for _ in range(args.rounds):
        for name in models:
            for _ in range(3):
                step(name)
            start = time.process_time()
            for _ in range(args.steps):
                step(name)
            best[name] = min(best[name], (time.process_time() - start) / args.steps)
    print(f"{args.model}: CPU ms per step, one pinned core, best of {args.rounds} rounds of {args.steps} steps: "
          + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in best.items())
          + f"; speed-up {best['stock torch'] / best['project']:.2f}x")
    from torch.profiler import ProfilerActivity, profile

    for name in ("stock torch", "project"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step(name)
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        print(f"\n{name}: top operators by self CPU time ({args.steps} steps)")
        for event in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.rows]:
            print(f"  {event.key:<36} {100 * event.self_cpu_time_total / total:5.1f}%  "
                  f"{event.self_cpu_time_total / 1e3 / args.steps:7.2f} ms/step  {event.count // args.steps:4d} calls")


if __name__ == "__main__":
    main()
