import pytest
import torch

from models import POOLINGS, ModelConfig, count_parameters, padding_mask
from models.pooling import STD_EPS

NAMES = ["stats", "attention", "attentive_stats"]


def pooling(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return POOLINGS.build(name, ModelConfig(**{"d_model": 6, "nhead": 2, "pool_hidden": 4, "pooling": name, **kw}))


@pytest.mark.parametrize(("name", "factor"), [("stats", 2), ("attention", 1), ("attentive_stats", 2)])
def test_shapes_with_padding(name, factor):
    pool = pooling(name)
    out = pool(torch.randn(3, 10, 6), padding_mask(torch.tensor([10, 4, 1]), 10))
    assert pool.out_dim == 6 * factor and out.shape == (3, 6 * factor)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["mean", *NAMES])
@pytest.mark.parametrize("garbage", [123.0, float("inf"), float("nan")])
def test_padded_utterance_pools_like_the_utterance_alone(name, garbage):
    pool = pooling(name)
    utterance = torch.randn(1, 7, 6)
    padded = torch.cat([utterance, torch.full((1, 5, 6), garbage)], dim=1)
    batch = torch.cat([padded, torch.randn(1, 12, 6)])
    alone = pool(utterance, padding_mask(torch.tensor([7]), 7))
    batched = pool(batch, padding_mask(torch.tensor([7, 12]), 12))
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-6, atol=1e-6)


def test_stats_pooling_is_masked_mean_and_population_std():
    x = torch.tensor([[[1.0, 2.0], [3.0, 2.0], [5.0, 2.0], [100.0, -7.0]]])
    out = POOLINGS.build("stats", ModelConfig(d_model=2, nhead=1))(x, padding_mask(torch.tensor([3]), 4))
    mean = torch.tensor([3.0, 2.0])
    std = torch.sqrt(torch.tensor([8.0 / 3.0, 0.0]) + STD_EPS)  # ((1-3)^2 + 0 + (5-3)^2) / 3
    torch.testing.assert_close(out[0], torch.cat([mean, std]))


def test_all_padded_row_gives_finite_output():
    for name in NAMES:
        out = pooling(name)(torch.randn(2, 4, 6), torch.tensor([[False] * 4, [True] * 4]))
        assert torch.isfinite(out).all(), name


def test_attention_weights_sum_to_one_over_valid_frames_and_vanish_on_padding():
    pool = pooling("attention")
    mask = padding_mask(torch.tensor([9, 3]), 9)
    w = pool.weights(torch.randn(2, 9, 6) * 5, mask)
    assert w.shape == (2, 9)
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    assert (w[mask] == 0).all() and (w[~mask] > 0).all()
    ws = pooling("attentive_stats").weights(torch.randn(2, 9, 6), mask)  # per channel
    assert ws.shape == (2, 9, 6)
    torch.testing.assert_close(ws.sum(1), torch.ones(2, 6))
    assert (ws[mask] == 0).all()


@pytest.mark.parametrize("name", ["attention", "attentive_stats"])
def test_gradients_reach_every_parameter_and_the_valid_frames_only(name):
    pool = pooling(name)
    x = torch.randn(2, 8, 6, requires_grad=True)
    mask = padding_mask(torch.tensor([8, 5]), 8)
    pool(x, mask).square().sum().backward()
    for pname, p in pool.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    assert (x.grad[mask] == 0).all() and (x.grad[~mask] != 0).any()


def test_pool_hidden_sizes_attentive_stats():
    small, large = pooling("attentive_stats", pool_hidden=4), pooling("attentive_stats", pool_hidden=32)
    assert count_parameters(large) > count_parameters(small)
    assert large.attention[0].out_features == 32
    assert count_parameters(pooling("stats")) == 0
