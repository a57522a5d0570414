"""Convolutional subsampling front end: two stride-2 convolutions over time (T -> about T/4).

Design: Conv1d over the d_model channels of the prenet output (not the Conformer paper's Conv2d over
(time, mel)): the prenet has already mixed the mel bins, and a Conv2d with C channels on a d_model-wide
"frequency" axis costs about C * F / 4 times more (C * C * 9 per output cell) -- far too slow on the
CPU budget this harness targets. Each conv is kernel 3, stride 2, padding 1, so for a valid length L

    L' = floor((L + 2 * 1 - 3) / 2) + 1 = floor((L - 1) / 2) + 1    (>= 1 for every L >= 1)

and padded frames are zeroed before each conv, so a padded utterance gives exactly the frames it gives
alone (the conv's own zero padding and the zeroed padding look the same to it).
"""
from __future__ import annotations

import torch
from torch import nn


class ConvSubsampling(nn.Module):
    """(B, T, D) + mask (B, T) -> (B, T', D) + mask (B, T'), T' = conv_length(conv_length(T))."""

    KERNEL = 3
    STRIDE = 2
    PADDING = 1

    def __init__(self, d_model: int) -> None:
        super().__init__()
        conv = {"kernel_size": self.KERNEL, "stride": self.STRIDE, "padding": self.PADDING}
        self.conv1 = nn.Conv1d(d_model, d_model, **conv)
        self.conv2 = nn.Conv1d(d_model, d_model, **conv)
        self.activation = nn.ReLU()
        self.out = nn.Linear(d_model, d_model)  # back to a signed representation after the ReLU

    @classmethod
    def conv_length(cls, lengths: torch.Tensor) -> torch.Tensor:
        """One conv's output length, floor((L - k + 2p) / s) + 1, clamped to >= 1."""
        return (torch.div(lengths - cls.KERNEL + 2 * cls.PADDING, cls.STRIDE, rounding_mode="floor") + 1).clamp_min(1)

    @classmethod
    def output_lengths(cls, lengths: torch.Tensor) -> torch.Tensor:
        return cls.conv_length(cls.conv_length(lengths))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = (~mask).sum(1)  # (B,)
        h = x.masked_fill(mask.unsqueeze(-1), 0.0).transpose(1, 2)  # (B, D, T)
        for conv in (self.conv1, self.conv2):
            h = self.activation(conv(h))  # (B, D, T_next)
            lengths = self.conv_length(lengths)
            mask = torch.arange(h.shape[-1], device=h.device)[None, :] >= lengths[:, None]  # (B, T_next)
            h = h.masked_fill(mask.unsqueeze(1), 0.0)
        return self.out(h.transpose(1, 2)), mask  # (B, T', D), (B, T')
