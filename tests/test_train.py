import math

import pytest
import torch

from data.batches import fixed_valid_batches, split
from models import ModelConfig, build_model
from search.config import DataConfig, RunConfig, TrainConfig
from search.train import NonFiniteLossError, evaluate, train, warmup_cosine


def tiny_config(**train) -> RunConfig:
    return RunConfig(
        model=ModelConfig(d_model=32, nhead=2, ff_mult=2.0, dropout=0.0),
        train=TrainConfig(**{"max_steps": 120, "valid_steps": 40, "warmup_steps": 10, "lr": 3e-3,
                             "segment_len": 48, "batch_size": 16, "seed": 1, **train}),
        data=DataConfig(valid_fraction=0.25),
    )


def test_train_beats_chance_and_keeps_a_real_copy_of_the_best_weights(tiny_store):
    result = train(tiny_config(), tiny_store)
    chance = 1 / tiny_store.n_classes
    assert result.best_valid_acc > 3 * chance
    assert result.steps_run == 120 and not result.pruned
    assert [h["step"] for h in result.history] == [40, 80, 120]
    assert result.best_valid_acc == max(h["valid_acc"] for h in result.history)
    assert result.n_params > 0 and result.steps_per_s > 0
    # Re-evaluating the returned best weights must give the best accuracy, not the last one.
    cfg = tiny_config()
    model = build_model(cfg.model, tiny_store.n_mels, tiny_store.n_classes)
    model.load_state_dict(result.best_state)
    _, valid_idx = split(tiny_store.labels[: tiny_store.n_train], 0.25, 0)
    batches = fixed_valid_batches(tiny_store, valid_idx, 48, 16, 0, "fixed")
    assert evaluate(model, batches, torch.device("cpu")) == pytest.approx(result.best_valid_acc)


def test_same_config_same_seed_gives_the_same_run(tiny_store):
    first = train(tiny_config(max_steps=40, valid_steps=20), tiny_store)
    second = train(tiny_config(max_steps=40, valid_steps=20), tiny_store)
    assert first.history == [dict(h) for h in second.history]


def test_reporter_sees_every_evaluation_and_can_stop_the_run(tiny_store):
    seen = []

    def reporter(step: int, accuracy: float) -> bool:
        seen.append((step, accuracy))
        return step >= 40

    result = train(tiny_config(), tiny_store, reporter)
    assert [s for s, _ in seen] == [40]
    assert result.pruned and result.steps_run == 40


def test_non_finite_loss_ends_the_run_with_a_clear_reason(tiny_store):  # "test_nan": see conftest
    cfg = tiny_config()
    cfg = RunConfig(model=ModelConfig(d_model=32, nhead=2, loss="test_nan"), train=cfg.train, data=cfg.data)
    with pytest.raises(NonFiniteLossError, match=r"training loss became non-finite by step 25 \(lr"):
        train(cfg, tiny_store)


def test_warmup_then_cosine_to_zero():
    factor = warmup_cosine(10, 110)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5)
    assert factor(110) == pytest.approx(0.0, abs=1e-12)
    assert all(0 <= factor(s) <= 1 for s in range(200)) and not math.isnan(factor(10_000))
