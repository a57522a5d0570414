"""The cheap CPU dropout and the Transformer layer that uses it compute what torch's do."""
import pytest
import torch
from torch import nn

import models.components as components
from models import ModelConfig, build_model
from models.components import TransformerEncoderLayer
from models.dropout import Dropout, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_keep_mask_keeps_1_minus_p_scaled_by_its_inverse(p):
    torch.manual_seed(0)
    mask = keep_mask((64, 128, 129), p, torch.float32)  # an odd count: the last draw is cut
    assert mask.shape == (64, 128, 129)
    assert mask.unique().tolist() == pytest.approx([0.0, 1 / (1 - p)])
    kept = (mask > 0).double()
    n = kept.numel()
    assert abs(kept.mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5  # 5 sigma
    assert abs(mask.double().mean().item() - 1.0) < 5 * (p / (1 - p) / n) ** 0.5  # unbiased: E[x * mask] = x
    # neighbouring lanes of one draw are independent: P(both kept) = (1 - p)^2
    pairs = kept.flatten()[: n // 2 * 2].view(-1, 2)
    assert abs((pairs[:, 0] * pairs[:, 1]).mean().item() - (1 - p) ** 2) < 5 * (1 / n) ** 0.5


def test_dropout_follows_torch_seed_and_is_torch_off_cpu_training():
    x = torch.randn(8, 300)
    torch.manual_seed(3)
    a = dropout(x, 0.2, True)
    torch.manual_seed(3)
    assert torch.equal(a, dropout(x, 0.2, True))
    assert not torch.equal(a, dropout(x, 0.2, True))
    assert torch.equal(dropout(x, 0.2, False), x)
    assert torch.equal(dropout(x, 0.0, True), x)
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))
    module = Dropout(0.2).eval()
    assert torch.equal(module(x), x)


def test_dropout_gradient_is_the_mask():
    x = torch.randn(4, 50, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x, 0.25, True)
    y.sum().backward()
    assert torch.equal(x.grad, torch.where(y != 0, 1 / 0.75, 0.0))


def _pair(dropout_p: float):
    torch.manual_seed(0)
    ours = TransformerEncoderLayer(32, 4, 64, dropout_p)
    ref = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def test_layer_attention_math_equals_torchs_with_a_padding_mask(monkeypatch):
    """Training on CPU with attention dropout our layer runs its own attention: with the dropout masks
    replaced by identity it must give torch's outputs and gradients (bool and float masks alike)."""
    ours, ref = _pair(0.1)
    monkeypatch.setattr(components, "dropout", lambda x, p, training: x)
    for name in ("dropout", "dropout1", "dropout2"):
        setattr(ours, name, nn.Identity())
    lengths = torch.tensor([20, 13, 7])
    pad = torch.arange(20)[None, :] >= lengths[:, None]
    for mask in (pad, torch.zeros(3, 20).masked_fill(pad, float("-inf"))):
        x = torch.randn(3, 20, 32, requires_grad=True)
        out = ours.train()(x, src_key_padding_mask=mask)
        out.square().sum().backward()
        grads = [p.grad.clone() for p in ours.parameters()], x.grad.clone()
        ours.zero_grad(), x.grad.zero_()
        expected = ref.train()(x, src_key_padding_mask=mask)
        expected.square().sum().backward()
        torch.testing.assert_close(out, expected)
        for g, p in zip(grads[0], ref.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grads[1], x.grad, rtol=1e-4, atol=1e-5)
        ref.zero_grad(), x.grad.zero_()


def test_layer_in_eval_is_torchs_and_state_dict_is_unchanged():
    ours, ref = _pair(0.3)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x, mask = torch.randn(2, 9, 32), torch.tensor([[False] * 9, [False] * 5 + [True] * 4])
    torch.testing.assert_close(ours.eval()(x, src_key_padding_mask=mask), ref.eval()(x, src_key_padding_mask=mask))


@pytest.mark.parametrize("encoder", ["transformer", "conformer"])
def test_training_dropout_changes_outputs_and_is_seeded(encoder):
    model = build_model(ModelConfig(encoder=encoder, d_model=32, nhead=4, n_layers=1, dropout=0.2), 20, 5).train()
    x, lengths = torch.randn(3, 16, 20), torch.tensor([16, 10, 4])
    torch.manual_seed(5)
    a = model(x, lengths)
    torch.manual_seed(5)
    assert torch.equal(a, model(x, lengths))
    assert not torch.equal(a, model(x, lengths))
