"""Validation metrics.

* ``mIoU``: per class, intersections and unions summed over all val ROIs, evaluated at model-input
  resolution inside each padded ROI (the decoder's probabilities pasted back bilinearly onto the
  ROI's pixels); IoU_c = sum(I_c) / sum(U_c); mIoU = mean over classes.
* ``instance_mIoU``: per val person, the class-1 probability pasted into the *original* image
  (inside its padded ROI, 0 elsewhere) thresholded at 0.5, IoU with the person's full GT mask,
  averaged over persons (the box-prompted protocol of SAM-style models on COCO).
"""
from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils


class IoUAccumulator:
    def __init__(self, num_classes: int, device="cpu"):
        self.k = num_classes
        self.inter = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.union = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.inst_iou_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.inst_count = torch.zeros((), dtype=torch.float64, device=device)

    def add_labels(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Adds one ROI's labels; returns its [2, K] intersections and unions."""
        p = pred[None] == torch.arange(self.k, device=pred.device)[:, None, None]
        g = gt[None] == torch.arange(self.k, device=gt.device)[:, None, None]
        iu = torch.stack([(p & g).sum((1, 2)), (p | g).sum((1, 2))]).to(self.inter.dtype)
        self.inter += iu[0]
        self.union += iu[1]
        return iu

    def add_instance(self, iou: float) -> None:
        self.inst_iou_sum += iou
        self.inst_count += 1

    def tensors(self) -> list[torch.Tensor]:
        return [self.inter, self.union, self.inst_iou_sum, self.inst_count]

    def result(self) -> dict:
        iou = (self.inter / self.union.clamp_min(1)).cpu().numpy()
        names = ["background", "target", "non_target"][: self.k]
        return {"mIoU": float(iou.mean()), "iou": {n: float(v) for n, v in zip(names, iou)},
                "instance_mIoU": float(self.inst_iou_sum / self.inst_count.clamp_min(1)),
                "instances": int(self.inst_count)}


def instance_iou(pred_window: np.ndarray, window, gt_rle: dict) -> float:
    """IoU of a predicted mask living in ``window`` (x0, y0, x1, y1) of the original image (zero
    elsewhere) with the full-image GT RLE."""
    x0, y0, x1, y1 = window
    gt = mask_utils.decode(gt_rle)
    inter = int(np.logical_and(pred_window, gt[y0:y1, x0:x1]).sum())
    union = int(pred_window.sum()) + int(mask_utils.area(gt_rle)) - inter
    return inter / union if union else 1.0


def miou4(miou: float) -> int:
    """The checkpoint name's 4 digits: mIoU truncated (not rounded) to 4 decimals."""
    return int(np.floor(miou * 10000 + 1e-9))
