"""The Transformer encoder, heads, the linear classifier and cross-entropy, each registered under its study-file name.

Shapes at the seams: features (B, T, n_mels) -> encoder (B, T, D) -> pooling (B, D') -> head (B, E)
-> classifier (B, C) logits.
`mask` is (B, T) bool with True on padded frames (PyTorch's key_padding_mask convention).
"""
from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.registry import ACTIVATIONS, CLASSIFIERS, ENCODERS, HEADS, LOSSES

for _name, _cls in {"relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "silu": nn.SiLU}.items():
    ACTIVATIONS.register(_name)(_cls)


class TransformerEncoder(nn.Module):
    """Batch-first Transformer encoder layers (the sample code's, stacked) honouring the padding mask."""

    def __init__(self, d_model: int, nhead: int, n_layers: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward=dim_feedforward, dropout=dropout, batch_first=True
        )
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
                layers.append(nn.Dropout(dropout))
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
