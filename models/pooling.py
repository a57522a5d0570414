"""Poolings: mean, statistics, self-attentive and attentive statistics pooling.

Every pooling maps encoder frames x (B, T, D) and the padding mask (B, T) bool (True = padded) to one
vector per utterance (B, out_dim), and ignores padded frames exactly: padded frames are zeroed before
any arithmetic and get attention weight exactly 0, so an utterance pooled inside a padded batch equals
the same utterance pooled alone (up to float summation order), whatever the padding holds.

An utterance with no valid frame at all (possible only with a subsampling front end on a very short
input) pools to zeros (plus sqrt(eps) for a std part) instead of NaN.
"""
from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.registry import POOLINGS

STD_EPS = 1e-5  # inside the sqrt of every std: finite gradient for constant (or single-frame) inputs


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over time (dim 1) of scores (B, T) or (B, T, C), weight exactly 0 on padded frames.

    Padded scores are set to the dtype's lowest finite value (not -inf), so exp() underflows to exactly
    0 when a row has a valid frame, and a row without one gives zeros instead of NaN.
    """
    pad = mask if scores.dim() == 2 else mask.unsqueeze(-1)
    scores = scores.float()  # in fp32 under autocast too
    weights = torch.softmax(scores.masked_fill(pad, torch.finfo(scores.dtype).min), dim=1)
    return weights.masked_fill(pad, 0.0)


def _zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(mask.unsqueeze(-1), 0.0)  # 0 * inf in the padding would otherwise be NaN


def weighted_stats(x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and std over time of x (B, T, D) with weights (B, T, 1) or (B, T, D) summing to 1
    over valid frames (0 on padding): mean = sum w x, std = sqrt(sum w (x - mean)^2 + eps)."""
    mean = (weights * x).sum(1)  # (B, D)
    var = (weights * (x - mean.unsqueeze(1)).square()).sum(1)
    return mean, torch.sqrt(var.clamp_min(0.0) + STD_EPS)


class MeanPooling(nn.Module):
    """Mean over the valid frames only (the sample code averaged the padding too)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.out_dim = d_model

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = (~mask).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        return _zero_padding(x, mask).sum(1) / keep.sum(1).clamp_min(1.0)  # (B, D)


@POOLINGS.register("mean")
def _mean(cfg: ModelConfig) -> nn.Module:
    return MeanPooling(cfg.d_model)


class StatsPooling(nn.Module):
    """Mean || std over the valid frames (population std, i.e. divided by n, eps inside the sqrt)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.out_dim = 2 * d_model

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = (~mask).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        weights = keep / keep.sum(1, keepdim=True).clamp_min(1.0)  # uniform over valid frames
        mean, std = weighted_stats(_zero_padding(x, mask), weights)
        return torch.cat([mean, std], dim=-1)  # (B, 2D)


class AttentionPooling(nn.Module):
    """Self-attention pooling (the seed's): softmax over time of Linear(D, 1) scores, weighted sum."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.score = nn.Linear(d_model, 1, bias=False)  # a bias cancels in the softmax over time
        self.out_dim = d_model

    def weights(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) attention weights: sum to 1 over valid frames, exactly 0 on padded ones."""
        return masked_softmax(self.score(_zero_padding(x, mask)).squeeze(-1), mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = _zero_padding(x, mask)
        return (self.weights(x, mask).unsqueeze(-1) * x).sum(1)  # (B, D)


class AttentiveStatsPooling(nn.Module):
    """ECAPA-TDNN attentive statistics pooling, per-channel variant WITHOUT global context: scores
    Linear(D, H) -> tanh -> Linear(H, D) give one attention distribution over time per channel
    (masked softmax), then weighted mean || weighted std. H = model.pool_hidden (ECAPA uses 128).
    The last score layer has no bias: a per-channel constant cancels in the softmax over time."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.attention = nn.Sequential(nn.Linear(d_model, hidden), nn.Tanh(), nn.Linear(hidden, d_model, bias=False))
        self.out_dim = 2 * d_model

    def weights(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, D) per-channel weights: each channel sums to 1 over valid frames, 0 on padded ones."""
        return masked_softmax(self.attention(_zero_padding(x, mask)), mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = _zero_padding(x, mask)
        mean, std = weighted_stats(x, self.weights(x, mask))
        return torch.cat([mean, std], dim=-1)  # (B, 2D)


@POOLINGS.register("stats")
def _stats(cfg: ModelConfig) -> nn.Module:
    return StatsPooling(cfg.d_model)


@POOLINGS.register("attention")
def _attention(cfg: ModelConfig) -> nn.Module:
    return AttentionPooling(cfg.d_model)


@POOLINGS.register("attentive_stats")
def _attentive_stats(cfg: ModelConfig) -> nn.Module:
    return AttentiveStatsPooling(cfg.d_model, cfg.pool_hidden)
