"""Weighted CE (+ optional focal) + Dice on the target class (+ optional class 2) + boundary term.

All reductions run in fp32: under AMP, fp16 sums over millions of pixels overflow.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossConfig:
    class_weights: tuple | None = None
    dice_weight: float = 1.0
    dice_classes: tuple = (1,)
    focal_gamma: float = 0.0        # 0 = plain CE
    boundary_weight: float = 0.0    # extra CE weight on pixels at label boundaries
    score_weight: float = 1.0       # the score head's squared error on the mask IoU


def boundary_map(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood holds more than one label."""
    onehot = F.one_hot(targets.long(), num_classes).permute(0, 3, 1, 2).float()
    dil = F.max_pool2d(onehot, 3, 1, 1)
    ero = -F.max_pool2d(-onehot, 3, 1, 1)
    return (dil - ero).amax(1) > 0


def grid_mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N] IoU of each predicted target mask (class-1 probability > 0.5, the evaluator's rule) with
    the target person on the ROI grid: what the score head learns to predict.  Both empty: 1."""
    pred = logits.float().softmax(1)[:, 1] > 0.5
    gt = targets == 1
    inter = (pred & gt).sum((1, 2)).float()
    union = (pred | gt).sum((1, 2)).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


class SegLoss(torch.nn.Module):
    def __init__(self, cfg: LossConfig, num_classes: int):
        super().__init__()
        self.cfg, self.k = cfg, num_classes
        w = torch.tensor(cfg.class_weights, dtype=torch.float32) if cfg.class_weights else None
        self.register_buffer("weight", w, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, scores: torch.Tensor | None = None) -> dict:
        """``scores``: the score head's predicted mask IoUs [N] (trained on the detached masks)."""
        logits = logits.float()
        t = targets.long()
        ce = F.cross_entropy(logits, t, weight=self.weight, reduction="none")
        if self.cfg.focal_gamma > 0:
            pt = torch.exp(-F.cross_entropy(logits, t, reduction="none"))
            ce = ce * (1 - pt) ** self.cfg.focal_gamma
        wsum = self.weight[t].sum() if self.weight is not None else t.new_tensor(t.numel(), dtype=torch.float32)
        loss_ce = ce.sum() / wsum.clamp_min(1e-6)
        out = {"ce": loss_ce}
        total = loss_ce
        if self.cfg.dice_weight > 0:
            probs = logits.softmax(1)
            dice = []
            for c in self.cfg.dice_classes:
                if c >= self.k:
                    continue
                p, g = probs[:, c], (t == c).float()
                inter = (p * g).sum((1, 2))
                denom = p.sum((1, 2)) + g.sum((1, 2))
                dice.append(1 - (2 * inter + 1) / (denom + 1))
            if dice:
                out["dice"] = torch.stack(dice).mean()
                total = total + self.cfg.dice_weight * out["dice"]
        if self.cfg.boundary_weight > 0:
            edge = boundary_map(t, self.k)
            out["boundary"] = (ce * edge).sum() / edge.sum().clamp_min(1)
            total = total + self.cfg.boundary_weight * out["boundary"]
        if scores is not None:
            out["score"] = F.mse_loss(scores.float(), grid_mask_iou(logits.detach(), t))
            total = total + self.cfg.score_weight * out["score"]
        out["loss"] = total
        return out
