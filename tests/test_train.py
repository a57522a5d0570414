import math

import pytest
import torch

from data.batches import fixed_valid_batches, split
from models import ConfigError, ModelConfig, build_model
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


def test_a_run_resumed_from_a_saved_state_is_bit_identical_to_an_uninterrupted_one(tiny_store, tmp_path):
    """Dropout on (torch RNG), crops (the sampler's RNG), AdamW moments, the LR schedule and a margin loss's
    warm-up all go on from the saved state: same history, same final weights, bit for bit, on CPU."""
    import io

    cfg = tiny_config(max_steps=60, valid_steps=20)
    cfg = RunConfig(model=ModelConfig(d_model=32, nhead=2, ff_mult=2.0, dropout=0.2, loss="am_softmax",
                                            classifier="cosine", margin_warmup_steps=30),
                    train=cfg.train, data=cfg.data)
    saved: list[bytes] = []

    def keep(state):  # as a checkpoint would: serialised at once, loaded the safe way
        buffer = io.BytesIO()
        torch.save(state, buffer)
        saved.append(buffer.getvalue())

    whole = train(cfg, tiny_store, save_state=keep)
    assert len(saved) == 3
    state = torch.load(io.BytesIO(saved[0]), weights_only=True)
    assert state["step"] == 20 and state["budget_steps"] == 60
    resumed = train(cfg, tiny_store, resume=state)
    assert resumed.history == whole.history
    assert resumed.steps_run == whole.steps_run == 60
    assert (resumed.best_step, resumed.best_valid_acc) == (whole.best_step, whole.best_valid_acc)
    for key, tensor in whole.best_state.items():
        assert torch.equal(resumed.best_state[key], tensor), key
    final_whole = torch.load(io.BytesIO(saved[-1]), weights_only=True)["model"]
    first_state = saved[0]  # loaded afresh: the optimizer takes over the loaded tensors and changes them
    saved.clear()
    train(cfg, tiny_store, resume=torch.load(io.BytesIO(first_state), weights_only=True), save_state=keep)
    final_resumed = torch.load(io.BytesIO(saved[-1]), weights_only=True)["model"]
    assert all(torch.equal(final_resumed[k], v) for k, v in final_whole.items())


def test_a_saved_state_from_another_config_is_refused(tiny_store):
    states = []
    train(tiny_config(max_steps=20, valid_steps=20), tiny_store, save_state=states.append)
    with pytest.raises(ValueError, match="another config"):
        train(tiny_config(max_steps=40, valid_steps=20), tiny_store, resume=states[0])


def test_the_mean_std_floor_learns_in_a_few_steps(tiny_store):
    """encoder "none" + raw features + stats pooling + linear head: a baseline any search space can include."""
    base = tiny_config(max_steps=120, valid_steps=40, lr=3e-2)
    cfg = RunConfig(model=ModelConfig(encoder="none", prenet=False, pooling="stats", dropout=0.0),
                    train=base.train, data=base.data)
    result = train(cfg, tiny_store)
    assert result.n_params == 2 * tiny_store.n_mels * tiny_store.n_classes + tiny_store.n_classes
    assert result.best_valid_acc > 3 / tiny_store.n_classes


def test_a_time_budget_sizes_the_run_and_its_lr_schedule(tiny_store):
    """train.max_minutes: after the first evaluation window the run is cut to the steps that fit at its own
    measured speed (a whole number of evaluation windows), and the cosine reaches 0 there, not at max_steps."""
    cfg = tiny_config(max_steps=1_000_000, valid_steps=10, warmup_steps=5, max_minutes=0.04)
    result = train(cfg, tiny_store)
    assert 10 < result.budget_steps < 1_000_000 and result.budget_steps % 10 == 0
    assert result.steps_run == result.budget_steps == result.history[-1]["step"]
    assert result.history[-1]["lr"] < 1e-3 * cfg.train.lr  # the schedule ended with the budget
    assert result.history[0]["lr"] > 0.5 * cfg.train.lr  # and was not cut short at the start
    untimed = train(tiny_config(max_steps=40, valid_steps=20), tiny_store)
    assert untimed.budget_steps == untimed.steps_run == 40


def test_a_margin_warmup_fraction_scales_with_the_budget():
    """margin_warmup_fraction: the AM-Softmax margin warms up over that share of the steps the run really gets
    (max_steps, or what a time budget leaves), so a CPU-sized run does not end with half a margin."""
    from types import SimpleNamespace

    from search.train import _size_run

    cfg = RunConfig(model=ModelConfig(d_model=16, nhead=2, loss="am_softmax", classifier="cosine",
                                      margin_warmup_fraction=0.25), train=TrainConfig(max_steps=400))
    model = build_model(cfg.model, 8, 4)
    schedule = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW(model.parameters()), lambda step: 1.0)
    result = SimpleNamespace(budget_steps=0)
    _size_run(cfg, model, schedule, result, 400)
    assert model.criterion.warmup_steps == 100
    _size_run(cfg, model, schedule, result, 120)  # a time budget cut the run to 120 steps
    assert model.criterion.warmup_steps == 30 and result.budget_steps == 120
    model.criterion.set_step(30)
    assert model.criterion.current_margin == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="margin_warmup_steps and model.margin_warmup_fraction both set"):
        ModelConfig(loss="am_softmax", classifier="cosine", margin_warmup_steps=10, margin_warmup_fraction=0.1)
