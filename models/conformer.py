"""Conformer encoder (Gulati et al. 2020), batch-first, registered as encoder "conformer".

Block: x + 0.5 FFN(x) -> x + MHSA(LN(x)) with Transformer-XL relative positions -> x + Conv(x)
-> x + 0.5 FFN(x) -> LayerNorm. Every tensor is (B, T, D) between modules; mask is (B, T) bool,
True on padded frames.

Padding never reaches valid frames: attention gives padded keys -inf before the softmax, the
convolution module zeroes padded frames before its depthwise conv, and its norm is a masked
BatchNorm (statistics over valid frames only in training, running statistics in eval), so in eval a
padded utterance gives exactly what it gives alone. Relative positions depend only on i - j, so the
amount of padding does not change the position terms either.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from models.config import ModelConfig
from models.dropout import Dropout
from models.registry import ENCODERS


class FeedForward(nn.Sequential):
    """LayerNorm -> Linear(d, ff) -> Swish -> Dropout -> Linear(ff, d) -> Dropout; (B, T, D) -> (B, T, D)."""

    def __init__(self, *, d_model: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__(
            nn.LayerNorm(d_model),
            nn.Linear(d_model, dim_feedforward),
            nn.SiLU(),
            Dropout(dropout),
            nn.Linear(dim_feedforward, d_model),
            Dropout(dropout),
        )


class RelativePositionalEncoding(nn.Module):
    """Sinusoidal embeddings of the relative distances T-1, T-2, ..., -(T-1): (2T - 1, D)."""

    def __init__(self, *, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (ceil(D / 2),)

    def forward(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        distance = torch.arange(length - 1, -length, -1, device=self.inv_freq.device, dtype=torch.float32)
        angles = distance[:, None] * self.inv_freq[None, :]  # (2T - 1, ceil(D / 2))
        emb = torch.zeros(2 * length - 1, self.d_model, device=angles.device)
        emb[:, 0::2] = torch.sin(angles)
        emb[:, 1::2] = torch.cos(angles[:, : self.d_model // 2])
        return emb.to(dtype)  # (2T - 1, D)


def rel_shift(scores: torch.Tensor) -> torch.Tensor:
    """(B, H, T, 2T - 1) scores against distances T-1 .. -(T-1) -> (B, H, T, T) with out[i, j] = scores[i, T-1-i+j].

    The Transformer-XL pad-and-reshape trick; tests check it against the explicit gather.
    """
    b, h, t, n = scores.shape
    padded = nn.functional.pad(scores, (1, 0))  # (B, H, T, 2T)
    return padded.view(b, h, n + 1, t)[:, :, 1:].reshape(b, h, t, n)[..., :t]


class RelativeMultiHeadAttention(nn.Module):
    """Self-attention with Transformer-XL relative positions: scores = (q + u) k^T + (q + v) (W_p r_{i-j})^T."""

    def __init__(self, *, d_model: int, nhead: int, dropout: float) -> None:
        super().__init__()
        self.nhead = nhead
        self.d_head = d_model // nhead
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.pos_proj = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(nhead, self.d_head))  # content bias
        self.pos_bias_v = nn.Parameter(torch.empty(nhead, self.d_head))  # position bias
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)
        self.dropout = Dropout(dropout)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # (B, T, D); pos (2T - 1, D); mask (B, T)
        q, k, v = self.qkv(x).view(b, t, 3, self.nhead, self.d_head).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, dh)
        p = self.pos_proj(pos).view(-1, self.nhead, self.d_head).transpose(0, 1)  # (H, 2T - 1, dh)
        content = (q + self.pos_bias_u[:, None]) @ k.transpose(-2, -1)  # (B, H, T, T)
        position = rel_shift((q + self.pos_bias_v[:, None]) @ p.transpose(-2, -1))  # (B, H, T, T)
        scores = (content + position) / math.sqrt(self.d_head)
        scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))  # padded keys
        weights = self.dropout(scores.softmax(-1))
        return self.out((weights @ v).transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class MaskedBatchNorm1d(nn.Module):
    """BatchNorm over the channels of (B, T, C) whose batch statistics use valid frames only; running stats in eval."""

    def __init__(self, *, channels: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # statistics in float32 under autocast too
        if self.training:
            valid = (~mask).unsqueeze(-1).float()  # (B, T, 1)
            n = valid.sum()
            mean = (x * valid).sum((0, 1)) / n  # (C,)
            var = (((x - mean) * valid) ** 2).sum((0, 1)) / n  # biased, as BatchNorm normalises
            with torch.no_grad():
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(unbiased.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return ((x - mean) * (self.weight * torch.rsqrt(var + self.eps)) + self.bias).to(dtype)  # (B, T, C)


class ConvolutionModule(nn.Module):
    """LN -> pointwise conv -> GLU -> depthwise conv -> masked BatchNorm -> Swish -> pointwise conv -> Dropout.

    The pointwise conv expands d to 2 * c channels with c = expansion * d // 2, the GLU halves them to c
    (c = d for the paper's expansion 2), and the depthwise conv runs on those c channels. The pointwise
    (kernel-1) convs are written as nn.Linear on (B, T, C), the same map, and faster on CPU.
    """

    def __init__(self, *, d_model: int, kernel_size: int, expansion: int, dropout: float) -> None:
        super().__init__()
        channels = max(1, expansion * d_model // 2)
        self.norm = nn.LayerNorm(d_model)
        self.pointwise_in = nn.Linear(d_model, 2 * channels)
        self.glu = nn.GLU(dim=-1)
        self.depthwise = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.batch_norm = MaskedBatchNorm1d(channels=channels)
        self.activation = nn.SiLU()
        self.pointwise_out = nn.Linear(channels, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.glu(self.pointwise_in(self.norm(x)))  # (B, T, C)
        h = h.masked_fill(mask.unsqueeze(-1), 0.0)  # padding must not leak into valid frames
        h = self.depthwise(h.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        h = self.activation(self.batch_norm(h, mask))
        return self.dropout(self.pointwise_out(h))  # (B, T, D)


class ConformerBlock(nn.Module):
    def __init__(
        self, *, d_model: int, nhead: int, dim_feedforward: int, dropout: float, attn_dropout: float,
        conv_kernel: int, conv_expansion: int, conv_dropout: float,
    ) -> None:
        super().__init__()
        self.ff1 = FeedForward(d_model=d_model, dim_feedforward=dim_feedforward, dropout=dropout)
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = RelativeMultiHeadAttention(d_model=d_model, nhead=nhead, dropout=attn_dropout)
        self.attn_dropout = Dropout(dropout)  # residual dropout on the attention output
        self.conv = ConvolutionModule(d_model=d_model, kernel_size=conv_kernel, expansion=conv_expansion,
                                      dropout=conv_dropout)
        self.ff2 = FeedForward(d_model=d_model, dim_feedforward=dim_feedforward, dropout=dropout)
        self.out_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)  # (B, T, D)
        x = x + self.attn_dropout(self.attn(self.attn_norm(x), pos, mask))
        x = x + self.conv(x, mask)
        x = x + 0.5 * self.ff2(x)
        return self.out_norm(x)  # (B, T, D)


class ConformerEncoder(nn.Module):
    """cfg.n_layers Conformer blocks sharing one relative positional encoding; (B, T, D) -> (B, T, D)."""

    def __init__(
        self, *, n_layers: int, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
        attn_dropout: float, conv_kernel: int, conv_expansion: int, conv_dropout: float,
    ) -> None:
        super().__init__()
        self.pos_encoding = RelativePositionalEncoding(d_model=d_model)
        self.blocks = nn.ModuleList(
            ConformerBlock(
                d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout,
                attn_dropout=attn_dropout, conv_kernel=conv_kernel, conv_expansion=conv_expansion,
                conv_dropout=conv_dropout,
            )
            for _ in range(n_layers)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.masked_fill(mask.unsqueeze(-1), 0.0)  # (B, T, D); no non-finite garbage from the padding
        pos = self.pos_encoding(x.shape[1], x.dtype)  # (2T - 1, D)
        for block in self.blocks:
            x = block(x, pos, mask)
        return x, mask  # (B, T, D), (B, T)


@ENCODERS.register("conformer")
def _conformer(cfg: ModelConfig) -> nn.Module:
    return ConformerEncoder(
        n_layers=cfg.n_layers, d_model=cfg.d_model, nhead=cfg.nhead, dim_feedforward=cfg.dim_feedforward,
        dropout=cfg.dropout, attn_dropout=cfg.attn_dropout, conv_kernel=cfg.conv_kernel,
        conv_expansion=cfg.conv_expansion, conv_dropout=cfg.conv_dropout,
    )
