import math

import pytest
import torch
import torch.nn.functional as F

from models import CLASSIFIERS, LOSSES, ConfigError, ModelConfig, build_model
from models.margins import AAMSoftmaxLoss, AMSoftmaxLoss, CosineClassifier
from search.config import DataConfig, RunConfig, TrainConfig
from search.train import train


def cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"d_model": 16, "nhead": 2, "classifier": "cosine", "loss": "am_softmax", **kw})


def scaled_cosines(scale: float = 30.0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return scale * (torch.rand(4, 5) * 2 - 1), torch.tensor([0, 3, 4, 1])


def test_am_softmax_with_margin_zero_is_cross_entropy_on_the_scaled_cosines():
    logits, y = scaled_cosines()
    loss = LOSSES.build("am_softmax", cfg(margin=0.0))
    torch.testing.assert_close(loss(logits, y), F.cross_entropy(logits, y))


def test_am_softmax_lowers_only_the_target_logit_by_scale_times_margin():
    logits, y = scaled_cosines(16.0)
    loss = LOSSES.build("am_softmax", cfg(scale=16.0, margin=0.25))
    out = loss.margin_logits(logits, y)
    target = F.one_hot(y, 5).bool()
    torch.testing.assert_close(out[target], logits[target] - 16.0 * 0.25)
    assert torch.equal(out[~target], logits[~target])
    torch.testing.assert_close(loss(logits, y), F.cross_entropy(logits - 4.0 * target, y))


def test_aam_softmax_target_logit_is_scale_times_cos_theta_plus_m():
    loss = AAMSoftmaxLoss(scale=10.0, margin=0.2)
    logits = 10.0 * torch.tensor([[0.6, -0.3, 0.1], [0.2, 0.9, -0.99], [0.5, 0.0, -0.99]])
    y = torch.tensor([0, 1, 2])
    out = loss.margin_logits(logits, y)
    cos_m, sin_m = math.cos(0.2), math.sin(0.2)
    assert out[0, 0].item() == pytest.approx(10 * (0.6 * cos_m - 0.8 * sin_m), abs=1e-5)  # 4.29105
    assert out[0, 0].item() == pytest.approx(10 * math.cos(math.acos(0.6) + 0.2), abs=1e-5)
    assert out[1, 1].item() == pytest.approx(10 * math.cos(math.acos(0.9) + 0.2), abs=1e-5)
    # theta + m > pi: the ArcFace threshold fallback cos - m sin(m) keeps the logit decreasing in theta.
    assert out[2, 2].item() == pytest.approx(10 * (-0.99 - 0.2 * sin_m), abs=1e-5)
    off_target = ~F.one_hot(y, 3).bool()
    assert torch.equal(out[off_target], logits[off_target])


def test_aam_softmax_is_finite_with_finite_gradients_at_cos_one():
    loss = AAMSoftmaxLoss(scale=30.0, margin=0.3)
    logits = torch.tensor([[30.0, -30.0, 0.0], [-30.0, 30.0, 0.0]], requires_grad=True)
    value = loss(logits, torch.tensor([0, 0]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("cls", [AMSoftmaxLoss, AAMSoftmaxLoss])
def test_margin_warms_up_linearly_from_zero(cls):
    loss = cls(scale=30.0, margin=0.2, warmup_steps=100)
    seen = []
    for step in (0, 50, 100, 1000):
        loss.set_step(step)
        seen.append(loss.current_margin)
    assert seen == pytest.approx([0.0, 0.1, 0.2, 0.2])
    assert cls(scale=30.0, margin=0.2).current_margin == 0.2  # no warm-up: full margin from the start
    logits, y = scaled_cosines()
    loss.set_step(0)
    torch.testing.assert_close(loss(logits, y), F.cross_entropy(logits, y))  # margin 0 at step 0


def test_cosine_classifier_outputs_scale_times_cosine():
    clf = CLASSIFIERS.build("cosine", cfg(scale=12.0), 6, 4)
    assert isinstance(clf, CosineClassifier) and [n for n, _ in clf.named_parameters()] == ["weight"]  # no bias
    x = torch.randn(10, 6) * 50
    out = clf(x)
    assert out.shape == (10, 4) and (out.abs() <= 12.0 + 1e-5).all()
    expected = 12.0 * F.normalize(x, dim=-1) @ F.normalize(clf.weight, dim=-1).T
    torch.testing.assert_close(out, expected)
    aligned = clf(clf.weight[2:3].detach() * 3.7)
    assert aligned[0, 2].item() == pytest.approx(12.0, abs=1e-5)
    assert aligned.argmax().item() == 2


@pytest.mark.parametrize("loss", ["am_softmax", "aam_softmax"])
def test_margin_losses_refuse_a_linear_classifier(loss):
    with pytest.raises(ConfigError, match=rf"model.loss='{loss}' needs model.classifier='cosine'") as err:
        cfg(loss=loss, classifier="linear")  # refused by ModelConfig, so a study file fails at load
    assert "\n" not in str(err.value) and "model.classifier='linear'" in str(err.value)


@pytest.mark.parametrize("loss", ["am_softmax", "aam_softmax"])
def test_label_smoothing_applies(loss):
    logits, y = scaled_cosines()
    plain = LOSSES.build(loss, cfg(loss=loss))
    smooth = LOSSES.build(loss, cfg(loss=loss, label_smoothing=0.1))
    margin_logits = plain.margin_logits(logits, y)
    torch.testing.assert_close(smooth(logits, y), F.cross_entropy(margin_logits, y, label_smoothing=0.1))
    assert smooth(logits, y).item() != pytest.approx(plain(logits, y).item())


def test_end_to_end_attentive_stats_cosine_aam_gives_every_parameter_a_gradient():
    torch.manual_seed(0)
    config = cfg(pooling="attentive_stats", loss="aam_softmax", margin_warmup_steps=10)
    model = build_model(config, n_mels=8, n_classes=5)
    model.criterion.set_step(5)
    assert model.criterion.current_margin == pytest.approx(0.1)
    logits = model(torch.randn(3, 20, 8), torch.tensor([20, 11, 4]))
    assert logits.shape == (3, 5) and (logits.abs() <= config.scale + 1e-4).all()
    model.criterion(logits, torch.tensor([0, 4, 2])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_train_with_attention_pooling_and_am_softmax_beats_chance(tiny_store):
    config = RunConfig(
        model=ModelConfig(d_model=32, nhead=2, ff_mult=2.0, dropout=0.0, pooling="attention", classifier="cosine",
                          loss="am_softmax", scale=16.0, margin=0.2, margin_warmup_steps=40),
        train=TrainConfig(max_steps=120, valid_steps=40, warmup_steps=10, lr=3e-3, segment_len=48, batch_size=16,
                          seed=1),
        data=DataConfig(valid_fraction=0.25),
    )
    result = train(config, tiny_store)
    assert result.steps_run == 120 and [h["step"] for h in result.history] == [40, 80, 120]
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert result.best_valid_acc > 2.5 / tiny_store.n_classes
