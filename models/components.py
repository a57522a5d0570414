"""The Transformer encoder, heads, the linear classifier and cross-entropy, each registered under its study-file name.

Shapes at the seams: features (B, T, n_mels) -> encoder (B, T, D) -> pooling (B, D') -> head (B, E)
-> classifier (B, C) logits.
`mask` is (B, T) bool with True on padded frames (PyTorch's key_padding_mask convention).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.config import ModelConfig
from models.dropout import Dropout, dropout
from models.registry import ACTIVATIONS, CLASSIFIERS, ENCODERS, HEADS, LOSSES

for _name, _cls in {"relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "silu": nn.SiLU}.items():
    ACTIVATIONS.register(_name)(_cls)


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """PyTorch's layer (same parameters, same state dict, same function) with cheaper dropout on CPU.

    Training on CPU with attention dropout, torch's attention takes the math path and its dropout draws
    one random number per attention weight; this is that math with models.dropout's masks instead.
    Everywhere else (CUDA, inference, no attention dropout) it is torch's own code."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__(d_model, nhead, dim_feedforward=dim_feedforward, dropout=dropout, batch_first=True)
        self.dropout, self.dropout1, self.dropout2 = Dropout(dropout), Dropout(dropout), Dropout(dropout)

    def _sa_block(self, x: torch.Tensor, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                  is_causal: bool = False) -> torch.Tensor:
        attention = self.self_attn
        if not (self.training and attention.dropout > 0 and x.device.type == "cpu" and attn_mask is None):
            return super()._sa_block(x, attn_mask, key_padding_mask, is_causal)
        (b, t, d), h = x.shape, attention.num_heads
        q, k, v = F.linear(x, attention.in_proj_weight, attention.in_proj_bias).view(b, t, 3, h, d // h).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, d/H)
        scores = (q * (d // h) ** -0.5) @ k.transpose(-2, -1)  # (B, H, T, T)
        if key_padding_mask is not None:  # bool (True = padded) or additive float, as torch accepts it
            key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                                 other_type=None, other_name="", target_type=x.dtype)
            scores = scores + key_padding_mask[:, None, None, :]
        weights = dropout(scores.float().softmax(-1).to(v.dtype), attention.dropout, True)  # fp32 under autocast
        out = (weights @ v).transpose(1, 2).reshape(b, t, d)
        return self.dropout1(attention.out_proj(out))


class TransformerEncoder(nn.Module):
    """Batch-first Transformer encoder layers (the sample code's, stacked) honouring the padding mask."""

    def __init__(self, d_model: int, nhead: int, n_layers: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout)
        # The nested-tensor fast path drops padded positions and is not used in training anyway.
        self.layers = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers(x, src_key_padding_mask=mask), mask  # (B, T, D), (B, T)


@ENCODERS.register("transformer")
def _transformer(cfg: ModelConfig) -> nn.Module:
    return TransformerEncoder(cfg.d_model, cfg.nhead, cfg.n_layers, cfg.dim_feedforward, cfg.dropout)


class NoEncoder(nn.Module):
    """No sequence model: the (projected) frames go straight to pooling. With stats pooling and a linear head
    this is the classic per-utterance mean+std classifier: a floor that trains in seconds."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, mask


@ENCODERS.register("none")
def _no_encoder(cfg: ModelConfig) -> nn.Module:
    return NoEncoder()


class MLPHead(nn.Sequential):
    """The hidden layers between pooling and the classifier (none for the "linear" layout)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], activation: str, dropout: float) -> None:
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(in_dim, size), ACTIVATIONS.build(activation)]
            if dropout:
                layers.append(Dropout(dropout))
            in_dim = size
        super().__init__(*layers)
        self.out_dim = in_dim


@HEADS.register("linear")
@HEADS.register("mlp")
def _mlp(cfg: ModelConfig, in_dim: int) -> nn.Module:
    return MLPHead(in_dim, cfg.head_hidden, cfg.head_activation, cfg.head_dropout)


@CLASSIFIERS.register("linear")
def _linear(cfg: ModelConfig, in_dim: int, n_classes: int) -> nn.Module:
    return nn.Linear(in_dim, n_classes)


@LOSSES.register("ce")
def _cross_entropy(cfg: ModelConfig) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
