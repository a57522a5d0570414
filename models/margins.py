"""The cosine classifier and the margin losses defined on its cosines (AM-Softmax, AAM-Softmax).

The classifier's logits are scale * cos(theta_j) (no bias); the margin lives only in the loss, so the
validation accuracy (argmax of the same logits) is computed without margin. A margin loss recovers the
cosines as logits / model.scale, puts the margin on the target class only, and applies cross-entropy
(with model.label_smoothing). The margin can be warmed up linearly from 0: train() calls
`criterion.set_step(step)` before every training step.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.registry import CLASSIFIERS, LOSSES

COS_EPS = 1e-6  # AAM clamps cos to [-1 + eps, 1 - eps]: finite d/dcos of sin(theta) = sqrt(1 - cos^2)


class CosineClassifier(nn.Module):
    """logits = scale * <x / |x|, w_j / |w_j|>: L2-normalised embedding times L2-normalised class weights."""

    def __init__(self, in_dim: int, n_classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, in_dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 under autocast too: the margin losses work on these cosines, where bf16 steps of 1/128 are large.
        with torch.autocast(x.device.type, enabled=False):
            return self.scale * F.linear(F.normalize(x.float(), dim=-1), F.normalize(self.weight.float(), dim=-1))


@CLASSIFIERS.register("cosine")
def _cosine(cfg: ModelConfig, in_dim: int, n_classes: int) -> nn.Module:
    return CosineClassifier(in_dim, n_classes, cfg.scale)


class MarginLoss(nn.Module):
    """Cross-entropy on scale * cosines with a margin on the target class (subclasses say which).

    Input: the cosine classifier's logits (B, C) = scale * cos. `set_step(step)` sets the current margin
    to margin * min(1, step / warmup_steps) (the full margin when warmup_steps == 0). Without any
    set_step call the margin is the one for step 0 (0 with a warm-up, else the full margin).
    """

    name = "margin"

    def __init__(self, scale: float, margin: float, warmup_steps: int = 0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.scale, self.margin, self.warmup_steps = float(scale), float(margin), int(warmup_steps)
        self.label_smoothing = float(label_smoothing)
        self.current_margin = 0.0
        self.set_step(0)

    def set_step(self, step: int) -> None:
        ramp = 1.0 if self.warmup_steps <= 0 else min(1.0, max(0, step) / self.warmup_steps)
        self.current_margin = self.margin * ramp

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        """scale * psi(cos) for the target class; cos (B,) float."""
        raise NotImplementedError

    def margin_logits(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The logits the cross-entropy sees: the target class replaced by its margin logit, others unchanged."""
        logits = logits.float()
        target = logits.gather(1, y[:, None]).squeeze(1)
        return logits.scatter(1, y[:, None], self.target_logit(target / self.scale)[:, None])

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.margin_logits(logits, y), y, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return (f"scale={self.scale}, margin={self.margin}, warmup_steps={self.warmup_steps}, "
                f"current_margin={self.current_margin:.4g}")


class AMSoftmaxLoss(MarginLoss):
    """AM-Softmax / CosFace: target logit scale * (cos - m), i.e. exactly scale * m below the plain one."""

    name = "am_softmax"

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        return self.scale * (cos - self.current_margin)


class AAMSoftmaxLoss(MarginLoss):
    """AAM-Softmax / ArcFace: target logit scale * cos(theta + m).

    cos is clamped to [-1 + eps, 1 - eps] and cos(theta + m) = cos cos(m) - sin(theta) sin(m) with
    sin(theta) = sqrt(1 - cos^2), so gradients stay finite. Where theta + m > pi (cos < cos(pi - m)),
    cos(theta + m) would start increasing again with theta; there the standard ArcFace threshold
    fallback (insightface's, not "easy margin") uses the CosFace-like cos - m sin(m) instead, which keeps
    the target logit decreasing in theta (it is about m^2 / 2 below cos(theta + m) = -1 at the threshold).
    """

    name = "aam_softmax"

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        m = self.current_margin
        cos = cos.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS)
        sin = torch.sqrt(1.0 - cos * cos)
        phi = cos * math.cos(m) - sin * math.sin(m)
        phi = torch.where(cos > math.cos(math.pi - m), phi, cos - m * math.sin(m))
        return self.scale * phi


def _margin_loss(cls: type[MarginLoss]):
    def build(cfg: ModelConfig) -> nn.Module:
        return cls(cfg.scale, cfg.margin, cfg.margin_warmup_steps, cfg.label_smoothing)

    return build


# Margins are defined on cosines: ModelConfig refuses these losses without the cosine classifier.
LOSSES.register("am_softmax", requires={"classifier": "cosine"})(_margin_loss(AMSoftmaxLoss))
LOSSES.register("aam_softmax", requires={"classifier": "cosine"})(_margin_loss(AAMSoftmaxLoss))
