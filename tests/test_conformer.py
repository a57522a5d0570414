import pytest
import torch
from torch import nn

from models import ENCODERS, ModelConfig, build_model, count_parameters
from models.conformer import MaskedBatchNorm1d, rel_shift
from models.frontend import ConvSubsampling
from search.config import DataConfig, RunConfig, TrainConfig
from search.train import train


def small(**kw) -> ModelConfig:
    return ModelConfig(**{"encoder": "conformer", "d_model": 16, "nhead": 2, "ff_mult": 2.0, "conv_kernel": 5, **kw})


def no_mask(b: int, t: int) -> torch.Tensor:
    return torch.zeros(b, t, dtype=torch.bool)


def mask_from(lengths: list[int], t: int) -> torch.Tensor:
    return torch.arange(t)[None, :] >= torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("subsample", [False, True])
def test_output_shapes_with_padding(subsample):
    cfg = small(subsample=subsample, n_layers=2)
    model = build_model(cfg, n_mels=8, n_classes=5)
    logits = model(torch.randn(3, 20, 8), torch.tensor([20, 7, 1]))
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    h, mask = ENCODERS.build("conformer", cfg)(torch.randn(3, 20, 16), mask_from([20, 7, 1], 20))
    assert h.shape == (3, 20, 16) and mask.shape == (3, 20)


@pytest.mark.parametrize(
    ("encoder", "subsample"), [("conformer", False), ("conformer", True), ("transformer", True)]
)
def test_padded_utterance_equals_utterance_alone(encoder, subsample):
    torch.manual_seed(0)
    model = build_model(small(encoder=encoder, subsample=subsample, n_layers=2), n_mels=8, n_classes=5)
    # A training step first, so the masked BatchNorm's running statistics are not the identity.
    model(torch.randn(4, 30, 8), torch.tensor([30, 12, 5, 1])).sum().backward()
    model.eval()
    for length in (1, 2, 3, 9, 14):
        utterance = torch.randn(1, length, 8)
        padded = torch.cat([utterance, torch.full((1, 25 - length, 8), 123.0)], dim=1)  # garbage padding
        other = torch.randn(1, 25, 8)
        with torch.no_grad():
            alone = model(utterance, torch.tensor([length]))
            batched = model(torch.cat([padded, other]), torch.tensor([length, 25]))
        torch.testing.assert_close(batched[0], alone[0], rtol=1e-5, atol=1e-5)


def test_each_utterance_is_independent_of_the_others_batch_first():
    """The encoder is batch-first: feeding (T, B, D) would mix utterances along the time axis."""
    torch.manual_seed(0)
    encoder = ENCODERS.build("conformer", small(n_layers=2)).eval()
    x = torch.randn(3, 11, 16)  # (B, T, D)
    changed = x.clone()
    changed[1:] = torch.randn(2, 11, 16)  # other utterances replaced
    with torch.no_grad():
        out, _ = encoder(x, no_mask(3, 11))
        out_changed, _ = encoder(changed, no_mask(3, 11))
        alone, _ = encoder(x[:1], no_mask(1, 11))
        # The public solution's bug: (T, B, D) into a batch-first model. Utterance 0 is then column 0.
        wrong, _ = encoder(x.transpose(0, 1), no_mask(11, 3))
        wrong_changed, _ = encoder(changed.transpose(0, 1), no_mask(11, 3))
    torch.testing.assert_close(out[0], out_changed[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], alone[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(wrong[:, 0], wrong_changed[:, 0], atol=1e-3)  # the test would catch the bug


def test_rel_shift_is_the_explicit_gather():
    b, h, t = 2, 3, 6
    scores = torch.randn(b, h, t, 2 * t - 1)  # column m is distance T-1-m
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    expected = scores.gather(-1, (t - 1 - i + j).expand(b, h, t, t))
    torch.testing.assert_close(rel_shift(scores), expected)


def test_masked_batch_norm_is_batch_norm_over_the_valid_frames():
    torch.manual_seed(0)
    x, mask = torch.randn(3, 7, 4) * 3 + 1, mask_from([7, 2, 5], 7)
    x = x.masked_fill(mask.unsqueeze(-1), 1e3)  # padding would dominate unmasked statistics
    ours, reference = MaskedBatchNorm1d(channels=4), nn.BatchNorm1d(4)
    valid = x[~mask]  # (N, C)
    torch.testing.assert_close(ours(x, mask)[~mask], reference(valid))
    torch.testing.assert_close(ours.running_mean, reference.running_mean)
    torch.testing.assert_close(ours.running_var, reference.running_var)
    ours.eval(), reference.eval()
    torch.testing.assert_close(ours(x, mask)[~mask], reference(valid))


def test_attention_position_term_depends_on_relative_distance_only():
    """Shifting an utterance inside a longer unpadded window leaves attention among its frames unchanged."""
    torch.manual_seed(0)
    cfg = small()
    encoder = ENCODERS.build("conformer", cfg).eval()
    attn = encoder.blocks[0].attn
    x = torch.randn(1, 8, 16)
    pos8, pos12 = encoder.pos_encoding(8, x.dtype), encoder.pos_encoding(12, x.dtype)
    with torch.no_grad():
        short = attn(x, pos8, no_mask(1, 8))
        # Same frames at offset 0 of a 12-frame window whose last 4 keys are masked.
        long = attn(torch.cat([x, torch.randn(1, 4, 16)], 1), pos12, mask_from([8], 12))
    torch.testing.assert_close(long[:, :8], short, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 7, 8, 9, 16, 33, 128])
def test_subsampled_lengths_follow_the_conv_arithmetic(length):
    def conv(n: int) -> int:
        return max(1, (n - 3 + 2 * 1) // 2 + 1)

    expected = conv(conv(length))
    assert ConvSubsampling.output_lengths(torch.tensor([length])).item() == expected
    front = ConvSubsampling(16)
    t = length + 5
    out, mask = front(torch.randn(2, t, 16), mask_from([length, t], t))
    assert out.shape == (2, conv(conv(t)), 16)
    assert (~mask).sum(1).tolist() == [expected, conv(conv(t))]
    alone, alone_mask = front(torch.randn(1, length, 16), no_mask(1, length))
    assert alone.shape[1] == expected and not alone_mask.any()
    assert {1: 1, 2: 1, 3: 1, 7: 2}.get(length, expected) == expected  # hand-computed values


@pytest.mark.parametrize("subsample", [False, True])
def test_gradients_reach_every_parameter(subsample):
    torch.manual_seed(0)
    model = build_model(small(subsample=subsample, n_layers=2, head="mlp-8"), n_mels=8, n_classes=5)
    x, y = torch.randn(4, 24, 8), torch.tensor([0, 1, 2, 3])
    model.criterion(model(x, torch.tensor([24, 13, 6, 2])), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def signature(model: nn.Module) -> tuple:
    shapes = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    dropouts = tuple(m.p for m in model.modules() if isinstance(m, nn.Dropout))
    heads = tuple(getattr(m, "nhead", None) for m in model.modules())
    return shapes, dropouts, heads


@pytest.mark.parametrize(
    "change",
    [{"n_layers": 2}, {"ff_mult": 3.0}, {"conv_kernel": 7}, {"conv_expansion": 4}, {"nhead": 4},
     {"dropout": 0.3}, {"attn_dropout": 0.3}, {"conv_dropout": 0.3}],
)
def test_every_option_changes_the_model(change):
    base_cfg = small(dropout=0.0, attn_dropout=0.0, conv_dropout=0.0)
    changed_cfg = small(**{"dropout": 0.0, "attn_dropout": 0.0, "conv_dropout": 0.0, **change})
    base, changed = (ENCODERS.build("conformer", c) for c in (base_cfg, changed_cfg))
    assert signature(base) != signature(changed)
    key = next(iter(change))
    if key.endswith("dropout"):  # and it acts: train-mode outputs differ, eval-mode outputs agree
        changed.load_state_dict(base.state_dict())
        x = torch.randn(2, 10, 16)
        with torch.no_grad():  # before the train-mode passes, which update BatchNorm running statistics
            torch.testing.assert_close(base.eval()(x, no_mask(2, 10))[0], changed.eval()(x, no_mask(2, 10))[0])
        torch.manual_seed(0)
        out_base, _ = base.train()(x, no_mask(2, 10))
        torch.manual_seed(0)
        out_changed, _ = changed.train()(x, no_mask(2, 10))
        assert not torch.allclose(out_base, out_changed)


def test_conv_expansion_sets_the_depthwise_width_and_subsample_adds_parameters():
    conv = ENCODERS.build("conformer", small(conv_expansion=4, conv_kernel=9)).blocks[0].conv
    assert (conv.pointwise_in.out_features, conv.depthwise.in_channels, conv.depthwise.kernel_size) == (64, 32, (9,))
    assert conv.depthwise.groups == 32
    assert count_parameters(build_model(small(subsample=True), 8, 5)) > count_parameters(build_model(small(), 8, 5))
    assert not hasattr(build_model(small(), 8, 5), "subsample")  # state-dict keys unchanged without it


def test_small_conformer_beats_chance(tiny_store):
    cfg = RunConfig(
        model=ModelConfig(encoder="conformer", d_model=32, nhead=2, n_layers=1, conv_kernel=7, ff_mult=2.0),
        train=TrainConfig(max_steps=120, valid_steps=40, warmup_steps=10, lr=3e-3, segment_len=48,
                          batch_size=16, seed=1),
        data=DataConfig(valid_fraction=0.25),
    )
    result = train(cfg, tiny_store)
    assert result.best_valid_acc > 2.5 / tiny_store.n_classes
    assert result.steps_run == 120
