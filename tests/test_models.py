import pytest
import torch
from torch import nn

from models import ConfigError, ModelConfig, build_model, count_parameters, padding_mask


def small(**kw) -> ModelConfig:
    return ModelConfig(**{"d_model": 16, "nhead": 2, "ff_mult": 2.0, **kw})


def test_output_shapes_with_padding():
    model = build_model(small(), n_mels=8, n_classes=5)
    logits = model(torch.randn(3, 20, 8), torch.tensor([20, 7, 1]))
    assert logits.shape == (3, 5)
    assert torch.isfinite(logits).all()


def test_padding_mask_marks_frames_beyond_length():
    mask = padding_mask(torch.tensor([3, 1]), 4)
    assert mask.tolist() == [[False, False, False, True], [False, True, True, True]]


@pytest.mark.parametrize("head", ["linear", "mlp-12", "mlp-12-6"])
def test_padded_utterance_equals_utterance_alone(head):
    torch.manual_seed(0)
    model = build_model(small(n_layers=2, head=head), n_mels=8, n_classes=5).eval()
    utterance = torch.randn(1, 9, 8)
    padded = torch.cat([utterance, torch.full((1, 11, 8), 123.0)], dim=1)  # garbage in the padding
    other = torch.randn(1, 20, 8)
    with torch.no_grad():
        alone = model(utterance, torch.tensor([9]))
        batched = model(torch.cat([padded, other]), torch.tensor([9, 20]))
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fill", [float("inf"), float("nan"), -float("inf")])
@pytest.mark.parametrize("pooling", ["mean", "stats", "attention", "attentive_stats"])
@pytest.mark.parametrize("encoder", [{"encoder": "transformer"}, {"encoder": "conformer"}, {"encoder": "none"},
                                     {"encoder": "transformer", "subsample": True}])
def test_padding_holding_inf_or_nan_changes_nothing(encoder, pooling, fill):
    torch.manual_seed(0)
    model = build_model(small(pooling=pooling, **encoder), n_mels=8, n_classes=5).eval()
    clean = torch.randn(2, 24, 8)
    clean[0, 13:] = 0.0
    dirty = clean.clone()
    dirty[0, 13:] = fill  # what a caller's own batching may leave in the padding
    lengths = torch.tensor([13, 24])
    with torch.no_grad():
        expected, got = model(clean, lengths), model(dirty, lengths)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected)


def test_head_layout_builds_the_sample_codes_mlp():
    model = build_model(ModelConfig(head="mlp-80", head_activation="sigmoid"), n_mels=40, n_classes=600)
    layers = [*model.head, model.classifier]
    assert [type(m) for m in layers] == [nn.Linear, nn.Sigmoid, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[2].out_features) == (80, 80, 600)
    assert model.encoder.layers.layers[0].linear1.out_features == 256  # ff_mult 3.2 * 80


def test_head_dropout_and_layers_are_used():
    model = build_model(small(head="mlp-8", head_dropout=0.3, n_layers=3), n_mels=8, n_classes=5)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model.head)
    assert len(model.encoder.layers.layers) == 3


def test_changing_a_size_changes_parameter_count():
    base = count_parameters(build_model(small(), 8, 5))
    assert count_parameters(build_model(small(d_model=32), 8, 5)) > base
    assert count_parameters(build_model(small(ff_mult=4.0), 8, 5)) > base


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"d_model": 80, "nhead": 3}, "model.nhead=3 must divide model.d_model=80; valid nhead: 1, 2, 4, 5"),
        ({"pooling": "max"}, "model.pooling='max' is not a known pooling; valid: attention, attentive_stats, mean"),
        ({"head": "mlp-x"}, "model.head='mlp-x' is not a head layout"),
        ({"head": "mlp"}, "model.head='mlp' is not a head layout"),
        ({"dropout": 1.5}, "model.dropout=1.5 must be a number in [0, 1)"),
        ({"d_model": 0}, "model.d_model=0 must be a positive integer"),
        ({"head_activation": "swish"}, "model.head_activation='swish' is not a known activation"),
        ({"loss": 3}, "model.loss=3 must be a string"),
    ],
)
def test_invalid_config_is_refused_with_the_key_named(kwargs, fragment):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**kwargs)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_label_smoothing_reaches_the_loss():
    model = build_model(small(label_smoothing=0.2), 8, 5)
    assert model.criterion.label_smoothing == 0.2


def test_forward_flops_match_a_hand_count():
    from models.flops import forward_flops

    T, n_mels, d, ff, C = 10, 8, 16, 32, 5
    model = build_model(ModelConfig(d_model=d, nhead=2, ff_mult=2.0, head="mlp-12"), n_mels, C).eval()
    attention = 2 * T * d * 3 * d + 2 * (2 * T * T * d) + 2 * T * d * d  # qkv, scores and weighted sum, out
    hand = 2 * T * n_mels * d + attention + 2 * (2 * T * d * ff) + 2 * d * 12 + 2 * 12 * C
    assert forward_flops(model, n_mels, T) == hand
    assert not model.training  # counted on a copy


def test_no_encoder_with_stats_pooling_is_the_classic_mean_std_linear_classifier():
    """encoder="none", prenet=false, stats pooling, linear head: logits = W [mean(x), std(x)] + b, over the
    utterance's own frames only (padding ignored); nothing else is learned."""
    cfg = ModelConfig(encoder="none", prenet=False, pooling="stats", head="linear", dropout=0.0)
    model = build_model(cfg, n_mels=8, n_classes=5).eval()
    assert count_parameters(model) == 2 * 8 * 5 + 5
    x = torch.randn(2, 12, 8)
    lengths = torch.tensor([12, 7])
    logits = model(x, lengths)
    for row, n in enumerate(lengths.tolist()):
        frames = x[row, :n]
        features = torch.cat([frames.mean(0), frames.var(0, unbiased=False).add(1e-5).sqrt()])
        expected = model.classifier(features)
        torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4)
    # with a projection first (the default prenet), any pooling; still no sequence model
    projected = build_model(ModelConfig(encoder="none", d_model=16, nhead=2, pooling="attention"), 8, 5)
    assert count_parameters(projected) == 8 * 16 + 16 + 16 + 16 * 5 + 5


def test_raw_features_need_the_no_encoder():
    with pytest.raises(ConfigError, match="model.prenet=false needs model.encoder='none'"):
        ModelConfig(encoder="transformer", prenet=False)
