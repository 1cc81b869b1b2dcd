"""Validation metrics.

* ``mIoU``: per class, intersections and unions summed over all val ROIs, evaluated at model-input
  resolution inside each padded ROI (the decoder's probabilities pasted back bilinearly onto the
  ROI's pixels); IoU_c = sum(I_c) / sum(U_c); mIoU = mean over classes.
* ``instance_mIoU``: per val person, the class-1 probability pasted into the *original* image
  (inside its padded ROI, 0 elsewhere) thresholded at 0.5, IoU with the person's full GT mask,
  averaged over persons (the box-prompted protocol of SAM-style models on COCO).

Computed over a val store, vectorized, by ``trainer/inference/evaluator.py``; ``instance_iou`` is
the same IoU for one prediction (``predict --boxes gt``).
"""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


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
