"""The ONE training function: search trials, ablation runs and final fits all call train()."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from data.batches import CropSampler, fixed_valid_batches, split
from data.packed import PackedStore
from models import SpeakerClassifier, build_model, count_parameters
from models.flops import forward_flops
from search.config import RunConfig
from search.precision import Precision, resolve

# (step, validation accuracy) -> True when the caller wants the run stopped (e.g. an Optuna prune).
Reporter = Callable[[int, float], bool]
# Called after each evaluation with the whole training state (see training_state), to keep it as a checkpoint.
StateSaver = Callable[[dict[str, Any]], None]
STATE_FORMAT = 1
FP32 = Precision()

NAN_CHECK_EVERY = 25  # steps between loss checks; each check is a host sync on CUDA


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run cannot continue."""


@dataclass
class TrainResult:
    best_valid_acc: float
    best_step: int
    steps_run: int
    pruned: bool
    n_params: int
    flops_per_segment: int  # one forward pass on one segment_len crop
    steps_per_s: float
    samples_per_s: float
    device: str
    precision: str = "fp32"  # what it computed in (Precision.label): "bf16", "fp32", "fp32 (oneDNN)"
    budget_steps: int = 0  # the steps the run was sized to: max_steps, or fewer to fit train.max_minutes
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def warmup_cosine(warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """LR factor: linear warm-up to 1, then half a cosine down to 0 at max_steps (the sample code's)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return factor


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


@torch.no_grad()
def evaluate(model: SpeakerClassifier, batches: list, device: torch.device, precision: Precision = FP32) -> float:
    """Accuracy over fixed validation batches (no margin: argmax of the plain logits)."""
    model.eval()
    correct = total = 0
    for batch in batches:
        batch = batch.to(device)
        with precision.autocast(device):
            logits = model(batch.x, batch.lengths)
        correct += int((logits.argmax(-1) == batch.y).sum())
        total += len(batch.y)
    model.train()
    return correct / max(1, total)


def train(
    cfg: RunConfig,
    store: PackedStore,
    reporter: Reporter | None = None,
    device: torch.device | str | None = None,
    on_step: Callable[[], None] | None = None,
    resume: dict[str, Any] | None = None,
    save_state: StateSaver | None = None,
    on_eval: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train one model from `cfg` on the labelled part of `store`; report validation accuracy at each
    evaluation and stop early when the reporter says so. Raises NonFiniteLossError on NaN/inf loss.
    `on_step` runs before every step (the runner raises a pending SIGINT/SIGTERM there). `save_state` gets
    the training state after each evaluation; `resume` (such a state, from this cfg and data) continues it:
    on CPU the result is bit-identical to a run that was never interrupted. `on_eval` gets each history point.
    train.precision decides what it computes in (search.precision); the result says which."""
    device = torch.device(device) if device else default_device()
    precision = resolve(cfg, device, store.n_mels, store.n_classes)
    with precision.applied():
        return _train(cfg, store, device, precision, reporter, on_step, resume, save_state, on_eval)


def _train(cfg: RunConfig, store: PackedStore, device: torch.device, precision: Precision, reporter, on_step,
           resume, save_state, on_eval) -> TrainResult:
    t = cfg.train
    seed_everything(t.seed)
    train_idx, valid_idx = split(store.labels[: store.n_train], cfg.data.valid_fraction, cfg.data.split_seed)
    sampler = CropSampler(store, train_idx, t.segment_len, t.batch_size, seed=t.seed)
    valid = fixed_valid_batches(store, valid_idx, t.segment_len, t.batch_size, cfg.data.split_seed, cfg.data.valid_mode)

    model = build_model(cfg.model, store.n_mels, store.n_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(t.warmup_steps, t.max_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_scaler())

    flops = forward_flops(model, store.n_mels, t.segment_len)
    result = TrainResult(0.0, 0, 0, False, count_parameters(model), flops, 0.0, 0.0, str(device), precision.label)
    loss_sum, loss_steps, train_seconds, tick = torch.zeros((), device=device), 0, 0.0, time.perf_counter()
    set_margin_step = getattr(model.criterion, "set_step", None)  # margin losses' warm-up
    step, wall_start = 0, time.perf_counter()
    _size_run(cfg, model, schedule, result, t.max_steps)
    if resume is not None:
        step = _restore(resume, cfg, store, model, optimizer, schedule, scaler, sampler, result)
        train_seconds = resume["train_seconds"]
        _size_run(cfg, model, schedule, result, resume.get("budget_steps", t.max_steps))
    model.train()
    while step < result.budget_steps:
        step += 1
        if on_step is not None:
            on_step()
        batch = sampler.next_batch().to(device)
        if set_margin_step is not None:
            set_margin_step(step - 1)  # steps done so far: a warmed-up margin starts at 0, like the LR factor
        with precision.autocast(device):
            logits = model(batch.x, batch.lengths)
        loss = model.criterion(logits.float(), batch.y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if t.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        loss_sum += loss.detach()
        loss_steps += 1
        result.steps_run = step
        evaluating = step % t.valid_steps == 0 or step == result.budget_steps
        if evaluating or step % NAN_CHECK_EVERY == 0:
            _check_finite(loss_sum, step, optimizer)
        if not evaluating:
            continue
        train_seconds += _elapsed(tick, device)
        accuracy = evaluate(model, valid, device, precision)
        result.history.append(
            {"step": step, "train_loss": loss_sum.item() / loss_steps, "valid_acc": accuracy,
             "lr": optimizer.param_groups[0]["lr"]}
        )
        loss_sum.zero_()
        loss_steps = 0
        if t.max_minutes and len(result.history) == 1 and resume is None:  # sized once, on the first window
            fits = int(step * t.max_minutes * 60 / (time.perf_counter() - wall_start))
            _size_run(cfg, model, schedule, result, max(step, min(t.max_steps, fits) // t.valid_steps * t.valid_steps))
        if on_eval is not None:
            on_eval(result.history[-1])
        if accuracy > result.best_valid_acc or not result.best_state:
            result.best_valid_acc, result.best_step = accuracy, step
            result.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if save_state is not None:
            save_state(training_state(cfg, store, model, optimizer, schedule, scaler, sampler, result, train_seconds))
        if reporter is not None and reporter(step, accuracy):
            result.pruned = True
            break
        tick = time.perf_counter()
    result.steps_per_s = result.steps_run / max(train_seconds, 1e-9)
    result.samples_per_s = result.steps_per_s * t.batch_size
    return result


def _size_run(cfg: RunConfig, model: SpeakerClassifier, schedule, result: TrainResult, budget_steps: int) -> None:
    """Run `budget_steps` steps in all: the LR cosine ends there (not at max_steps), and a margin warm-up
    given as a fraction lasts that fraction of them."""
    result.budget_steps = budget_steps
    if budget_steps != cfg.train.max_steps:
        schedule.lr_lambdas[0] = warmup_cosine(cfg.train.warmup_steps, budget_steps)
    if cfg.model.margin_warmup_fraction and hasattr(model.criterion, "warmup_steps"):
        model.criterion.warmup_steps = max(1, round(cfg.model.margin_warmup_fraction * budget_steps))


def training_state(cfg: RunConfig, store: PackedStore, model: SpeakerClassifier, optimizer, schedule, scaler,
                   sampler: CropSampler, result: TrainResult, train_seconds: float) -> dict[str, Any]:
    """Everything a run needs to go on exactly where it is: weights, optimizer, schedule, every random
    state, the history and the best model so far. Plain tensors, numbers and strings only, so that it
    loads with torch.load(weights_only=True)."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "format": STATE_FORMAT, "config": cfg.to_dict(), "fingerprint": store.fingerprint,
        "step": result.steps_run, "train_seconds": train_seconds, "budget_steps": result.budget_steps,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
        "scaler": scaler.state_dict(), "sampler_rng": sampler.rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy_rng": {**numpy_state, "state": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                                                "pos": numpy_state["state"]["pos"]}},
        "history": list(result.history), "best_valid_acc": result.best_valid_acc, "best_step": result.best_step,
        "best_state": result.best_state,
    }


def resumable(state: dict[str, Any], cfg: RunConfig, fingerprint: str) -> bool:
    """Whether a saved training state continues this very run (same config, same data)."""
    return (state.get("format") == STATE_FORMAT and state.get("config") == cfg.to_dict()
            and state.get("fingerprint") == fingerprint)


def _restore(state: dict[str, Any], cfg: RunConfig, store: PackedStore, model, optimizer, schedule, scaler,
             sampler: CropSampler, result: TrainResult) -> int:
    """Load a training_state into the run's objects; returns the step it was saved at."""
    if not resumable(state, cfg, store.fingerprint):
        raise ValueError("the saved training state is from another config or other data")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    scaler.load_state_dict(state["scaler"])
    sampler.rng.bit_generator.state = state["sampler_rng"]
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    numpy_state = state["numpy_rng"]
    np.random.set_state({**numpy_state, "state": {"key": numpy_state["state"]["key"].numpy().astype(np.uint32),
                                                  "pos": numpy_state["state"]["pos"]}})
    result.history = list(state["history"])
    result.best_valid_acc, result.best_step = state["best_valid_acc"], state["best_step"]
    result.best_state = state["best_state"]
    result.steps_run = state["step"]
    return state["step"]


def _elapsed(tick: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - tick


def _check_finite(loss_sum: torch.Tensor, step: int, optimizer: torch.optim.Optimizer) -> None:
    if not torch.isfinite(loss_sum):
        lr = optimizer.param_groups[0]["lr"]
        raise NonFiniteLossError(
            f"training loss became non-finite by step {step} (lr {lr:.3g}); "
            "try a lower train.lr or a train.grad_clip > 0"
        )
