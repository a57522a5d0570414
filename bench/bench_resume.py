"""How close a resumed run is to an uninterrupted one, on this machine's device: bit-identical on CPU; on CUDA
(non-deterministic kernels, mixed precision) only within run-to-run noise. Prints both validation curves, the
largest difference between them, and, for scale, the largest difference between two uninterrupted runs.

Run from the repository root:  python -m bench.bench_resume [--steps 600] [--device cuda]
"""
import argparse
import io
import tempfile
from pathlib import Path

import torch

from data import open_store
from data.synthetic import make_synthetic
from models import ModelConfig
from search.config import DataConfig, RunConfig, TrainConfig
from search.train import default_device, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--device", default=str(default_device()))
    args = parser.parse_args()
    data = make_synthetic(Path(tempfile.mkdtemp(prefix="bench_resume-")) / "ds", speakers=40,
                          utterances_per_speaker=30, seed=0, n_mels=40)
    store = open_store(data)
    every = args.steps // 6
    cfg = RunConfig(model=ModelConfig(d_model=80, nhead=2, ff_mult=3.2, dropout=0.1, loss="am_softmax",
                                      classifier="cosine", margin_warmup_fraction=0.2),
                    train=TrainConfig(max_steps=args.steps, valid_steps=every, warmup_steps=every // 2, seed=0),
                    data=DataConfig(valid_fraction=0.2))
    saved: list[bytes] = []

    def keep(state) -> None:  # serialised and loaded back the safe way, as a checkpoint is
        buffer = io.BytesIO()
        torch.save(state, buffer)
        saved.append(buffer.getvalue())

    whole = train(cfg, store, device=args.device, save_state=keep)
    twin = train(cfg, store, device=args.device)
    state = torch.load(io.BytesIO(saved[len(saved) // 2 - 1]), weights_only=True)
    resumed = train(cfg, store, device=args.device, resume=state)
    print(f"device {whole.device}; resumed from step {state['step']} of {args.steps}")
    print(f"{'step':>6} {'uninterrupted':>14} {'resumed':>8} {'twin':>8}")
    for a, b, c in zip(whole.history, resumed.history, twin.history, strict=True):
        print(f"{a['step']:>6} {a['valid_acc']:14.4f} {b['valid_acc']:8.4f} {c['valid_acc']:8.4f}")
    gap = max(abs(a["valid_acc"] - b["valid_acc"]) for a, b in zip(whole.history, resumed.history, strict=True))
    noise = max(abs(a["valid_acc"] - c["valid_acc"]) for a, c in zip(whole.history, twin.history, strict=True))
    print(f"largest |resumed - uninterrupted| {gap:.4f}; largest |twin - uninterrupted| {noise:.4f} "
          f"(run-to-run noise); identical: {whole.history == resumed.history}")


if __name__ == "__main__":
    main()
