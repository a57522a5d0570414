"""FLOPs of one forward pass, counted by torch's own FlopCounterMode (matmuls and convolutions)."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def forward_flops(model: nn.Module, n_mels: int, segment_len: int) -> int:
    """FLOPs (2 per multiply-add) of one forward pass on one unpadded segment of `segment_len` frames.

    Counted on a copy in train mode with the math attention kernel: eval-mode fast paths and fused
    attention kernels are invisible to the counter, and train mode must not touch the real model's
    BatchNorm statistics. Elementwise work (norms, activations, softmax) is not counted.
    """
    probe = copy.deepcopy(model).train()
    device = next(probe.parameters()).device
    x = torch.zeros(1, segment_len, n_mels, device=device)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        probe(x, torch.tensor([segment_len], device=device))
    return int(counter.get_total_flops())
