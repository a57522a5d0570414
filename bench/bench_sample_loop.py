"""train() vs a faithful re-implementation of the official HW4 sample loop, in steps per CPU-second.

The sample loop: a Dataset that torch.load()s each utterance's .pt file and takes a random segment_len crop,
a DataLoader (batch 32, shuffle) whose collate pads with -20 (no mask), the model, CrossEntropy, AdamW with
linear warm-up then cosine. Its d80 model is the sample's Classifier (prenet, one batch-first
TransformerEncoderLayer with feed-forward 256, mean over time, Linear-ReLU-Linear); for d512 and the
Conformer d256 both loops train the same build_model() model (the sample loop calls it without a mask, and with
torch's stock nn.Dropout and nn.TransformerEncoderLayer, as the sample code would, in place of models.dropout's).
train() runs from the packed store with its masks, fixed validation once at the end (not timed in steps).

Each (model, loop) runs in its own process pinned to one core with one torch thread, interleaved over
--rounds; the best round counts (machines here are shared). Ratios are train() / sample loop, same run.

On a GPU (--device cuda) both loops run there unpinned, timed in wall seconds (synchronised), and the numbers are
steps per second; train() uses its default mixed precision there, the sample loop fp32, as the sample code does.

Run from the repository root:  python -m bench.bench_sample_loop [--steps 60] [--rounds 2] [--device cuda]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "sample d80": {"d_model": 80, "nhead": 2, "ff_mult": 3.2, "dropout": 0.1, "head": "mlp-80"},
    "transformer d512": {"d_model": 512, "nhead": 8, "ff_mult": 4.0, "dropout": 0.1, "head": "mlp-512"},
    "conformer d256": {"encoder": "conformer", "d_model": 256, "nhead": 4, "ff_mult": 4.0, "dropout": 0.1},
}


def stock(module):
    """The same model written with torch's stock layers, as the sample code would: nn.Dropout and
    nn.TransformerEncoderLayer (same weights) in place of models.dropout's cheaper CPU dropout."""
    from torch import nn

    from models.components import TransformerEncoderLayer
    from models.dropout import Dropout

    for name, child in module.named_children():
        if isinstance(child, TransformerEncoderLayer):
            layer = nn.TransformerEncoderLayer(child.linear1.in_features, child.self_attn.num_heads,
                                               dim_feedforward=child.linear1.out_features, dropout=child.dropout.p,
                                               batch_first=True)
            layer.load_state_dict(child.state_dict())
            setattr(module, name, layer)
        elif isinstance(child, Dropout):
            setattr(module, name, nn.Dropout(child.p))
        else:
            stock(child)
    return module


def sample_loop(data: Path, model_name, steps: int, device: str = "cpu", loader_workers: int = 0) -> float:
    """Seconds per step of the sample code's loop (after 5 warm-up steps): CPU seconds, wall seconds on CUDA.
    `model_name`: a key of MODELS or a models.ModelConfig; `loader_workers`: the DataLoader's worker processes
    (the sample's config has 8; 0 here on a pinned CPU core, where they would only take turns with the loop)."""
    import math
    import random

    import torch
    from torch import nn
    from torch.nn.utils.rnn import pad_sequence
    from torch.utils.data import DataLoader, Dataset

    from models import ModelConfig, build_model

    class MyDataset(Dataset):
        def __init__(self, root: Path, segment_len: int = 128) -> None:
            self.root, self.segment_len = root, segment_len
            mapping = json.loads((root / "mapping.json").read_text())["speaker2id"]
            meta = json.loads((root / "metadata.json").read_text())["speakers"]
            self.data = [(u["feature_path"], mapping[s]) for s, us in meta.items() for u in us]

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, index: int):
            path, speaker = self.data[index]
            mel = torch.load(self.root / path)
            if len(mel) > self.segment_len:
                start = random.randint(0, len(mel) - self.segment_len)
                mel = mel[start:start + self.segment_len]
            return mel.float(), torch.LongTensor([speaker]).long()

        def get_speaker_number(self) -> int:
            return len(json.loads((self.root / "mapping.json").read_text())["speaker2id"])

    def collate_batch(batch):
        mel, speaker = zip(*batch, strict=True)
        return pad_sequence(mel, batch_first=True, padding_value=-20), torch.FloatTensor(speaker).long()

    class Classifier(nn.Module):  # the sample's, batch-first
        def __init__(self, d_model: int = 80, n_spks: int = 600, dropout: float = 0.1) -> None:
            super().__init__()
            self.prenet = nn.Linear(40, d_model)
            self.encoder_layer = nn.TransformerEncoderLayer(d_model=d_model, dim_feedforward=256, nhead=2,
                                                            dropout=dropout, batch_first=True)
            self.pred_layer = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, n_spks))

        def forward(self, mels):
            out = self.encoder_layer(self.prenet(mels))
            return self.pred_layer(out.mean(dim=1))

    class Unmasked(nn.Module):  # one of our models, stock layers, called the sample's way: padded with -20, no mask
        def __init__(self, cfg: ModelConfig, n_spks: int) -> None:
            super().__init__()
            self.model = stock(build_model(cfg, 40, n_spks))

        def forward(self, mels):
            return self.model(mels, torch.full((len(mels),), mels.shape[1], device=mels.device))

    def warmup_cosine(optimizer, warmup: int, total: int):
        def factor(step: int) -> float:
            if step < warmup:
                return step / max(1, warmup)
            progress = (step - warmup) / max(1, total - warmup)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    torch.manual_seed(0)
    dataset = MyDataset(data)
    loader = DataLoader(dataset, batch_size=32, shuffle=True, drop_last=True, collate_fn=collate_batch,
                        num_workers=loader_workers, pin_memory=device == "cuda")
    n_spks = dataset.get_speaker_number()
    if model_name == "sample d80":
        model = Classifier(n_spks=n_spks).to(device)
    else:
        cfg = ModelConfig(**MODELS[model_name]) if isinstance(model_name, str) else model_name
        model = Unmasked(cfg, n_spks).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = warmup_cosine(optimizer, 1000, 70000)
    model.train()
    done, start = 0, 0.0
    while done < steps + 5:
        for mels, labels in loader:
            if done == 5:
                start = clock(device)
            mels, labels = mels.to(device), labels.to(device)
            loss = criterion(model(mels), labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            done += 1
            if done == steps + 5:
                break
    return (clock(device) - start) / steps


def clock(device: str) -> float:
    """CPU seconds on CPU (machines here are shared); wall seconds after a synchronise on CUDA."""
    if device == "cpu":
        return time.process_time()
    import torch

    torch.cuda.synchronize()
    return time.perf_counter()


def project_loop(data: Path, model_name: str, steps: int, device: str = "cpu") -> float:
    """Seconds per step of search.train.train() on the same model, data and batch (validation excluded)."""

    from data import open_store
    from models import ModelConfig
    from search.config import DataConfig, RunConfig, TrainConfig
    from search.train import train

    store = open_store(data)
    cfg = RunConfig(model=ModelConfig(**MODELS[model_name]),
                    train=TrainConfig(max_steps=steps + 5, valid_steps=steps + 5, warmup_steps=1000, seed=0),
                    data=DataConfig(valid_fraction=0.02))
    marks: list[float] = []
    count = [0]

    def on_step() -> None:  # before steps 6 and steps + 5: the CPU time of steps 6 .. steps + 4, no validation
        count[0] += 1
        if count[0] in (6, steps + 5):
            marks.append(clock(device))

    result = train(cfg, store, device=device, on_step=on_step)
    assert result.steps_run == steps + 5 and len(marks) == 2
    return (marks[1] - marks[0]) / (steps - 1)


def child(args: argparse.Namespace) -> None:
    if args.device == "cpu":
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        import torch

        torch.set_num_threads(1)
    loop = sample_loop if args.loop == "sample" else project_loop
    print(json.dumps({"s_per_step": loop(Path(args.data), args.model, args.steps, args.device)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--loop", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        return child(args)
    from data.synthetic import make_synthetic

    data = make_synthetic(Path(tempfile.mkdtemp(prefix="bench_sample-")) / "ds", speakers=60,
                          utterances_per_speaker=20, seed=0, n_mels=40)
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for model in args.models.split(","):
            for loop in ("sample", "project"):
                out = subprocess.run([sys.executable, "-m", "bench.bench_sample_loop", "--loop", loop, "--model", model,
                                      "--data", str(data), "--steps", str(args.steps), "--device", args.device],
                                     cwd=ROOT, capture_output=True, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
                if out.returncode:
                    sys.exit(f"{model} / {loop} loop failed:\n{out.stderr[-3000:]}")
                s = json.loads(out.stdout.strip().splitlines()[-1])["s_per_step"]
                best[model, loop] = min(best.get((model, loop), float("inf")), s)
    where = ("one pinned core, 1 torch thread" if args.device == "cpu" else
             f"CUDA ({__import__('torch').cuda.get_device_name()}), wall time")
    print(f"{where}, batch 32 x 128 frames, 60 speakers, {args.steps} timed steps, best of {args.rounds} rounds; "
          f"steps per {'CPU-' if args.device == 'cpu' else ''}second")
    print(f"{'model':<18} {'sample loop':>12} {'train()':>10} {'ratio':>7}")
    for model in args.models.split(","):
        sample, project = 1 / best[model, "sample"], 1 / best[model, "project"]
        print(f"{model:<18} {sample:12.2f} {project:10.2f} {project / sample:6.2f}x")


if __name__ == "__main__":
    main()
