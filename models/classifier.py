"""The speaker classifier assembled from registered components, and build_model()."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from models.config import ModelConfig
from models.frontend import ConvSubsampling
from models.registry import CLASSIFIERS, ENCODERS, HEADS, LOSSES, POOLINGS


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B, T) bool, True on padded frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


class SpeakerClassifier(nn.Module):
    """features (B, T, n_mels) + lengths (B,) -> logits (B, n_classes); `criterion` turns logits into the loss."""

    def __init__(self, cfg: ModelConfig, n_mels: int, n_classes: int) -> None:
        super().__init__()
        self.config = cfg
        if cfg.prenet:
            self.prenet = nn.Linear(n_mels, cfg.d_model)
        else:  # the features themselves: everything after sees n_mels-wide frames
            self.prenet = nn.Identity()
            cfg = dataclasses.replace(cfg, d_model=n_mels, nhead=1)
        if cfg.subsample:  # only then, so the state-dict keys of other models are unchanged
            self.subsample = ConvSubsampling(cfg.d_model)
        self.encoder = ENCODERS.build(cfg.encoder, cfg)
        self.pooling = POOLINGS.build(cfg.pooling, cfg)
        self.head = HEADS.build(cfg.head_kind, cfg, self.pooling.out_dim)
        self.classifier = CLASSIFIERS.build(cfg.classifier, cfg, self.head.out_dim, n_classes)
        self.criterion = LOSSES.build(cfg.loss, cfg)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = padding_mask(lengths, x.shape[1])
        # Zeroed here for every encoder: attention multiplies padded values by a zero weight, and 0 * inf = NaN.
        h = self.prenet(x.masked_fill(mask[..., None], 0.0))  # (B, T, D)
        if self.config.subsample:
            h, mask = self.subsample(h, mask)  # (B, T', D), T' = about T / 4
        h, mask = self.encoder(h, mask)  # (B, T', D); T' < T when the encoder subsamples
        return self.classifier(self.head(self.pooling(h, mask)))  # (B, C)


def build_model(cfg: ModelConfig, n_mels: int, n_classes: int) -> SpeakerClassifier:
    return SpeakerClassifier(cfg, n_mels, n_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
