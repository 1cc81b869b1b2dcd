"""Validation metrics.

* ``mIoU``: per class, intersections and unions summed over all val ROIs, evaluated at model-input
  resolution inside each padded ROI (the decoder's probabilities pasted back bilinearly onto the
  ROI's pixels); IoU_c = sum(I_c) / sum(U_c); mIoU = mean over classes.
* ``instance_mIoU``: per val person, the class-1 probability pasted into the *original* image
  (inside its padded ROI, 0 elsewhere) thresholded at 0.5, IoU with the person's full GT mask,
  averaged over persons (the box-prompted protocol of SAM-style models on COCO).

* ``boundary_IoU`` (Cheng et al., CVPR 2021): per val person, the IoU of the predicted and the GT
  mask's boundary bands.  A band is a mask's pixels within ``d`` pixels (chessboard distance) of the
  background, the outside of the image counting as background; ``d = round(0.02 * image diagonal)``,
  at least 1.

Computed over a val store, vectorized, by ``trainer/scoring.py`` (with ``trainer/boundary.py``);
``instance_iou`` and ``instance_boundary_iou`` are the same IoUs for one prediction (``predict
--boxes gt``, no torch).
"""
from __future__ import annotations

import math

import cv2
import numpy as np
from pycocotools import mask as mask_utils

DILATION_RATIO = 0.02


def instance_iou(pred_window: np.ndarray, window, gt_rle: dict) -> float:
    """IoU of a predicted mask living in ``window`` (x0, y0, x1, y1) of the original image (zero
    elsewhere) with the full-image GT RLE."""
    x0, y0, x1, y1 = window
    gt = mask_utils.decode(gt_rle)
    inter = int(np.logical_and(pred_window, gt[y0:y1, x0:x1]).sum())
    union = int(pred_window.sum()) + int(mask_utils.area(gt_rle)) - inter
    return inter / union if union else 1.0


def boundary_width(height: int, width: int, ratio: float = DILATION_RATIO) -> int:
    """The band width ``d`` in pixels of an ``height`` x ``width`` image."""
    return max(1, int(round(ratio * math.sqrt(height ** 2 + width ** 2))))


def boundary_band_np(mask: np.ndarray, d: int) -> np.ndarray:
    """The boundary band of one [H, W] mask (outside the array is background): the authors'
    ``mask_to_boundary`` (a 1-pixel zero border, then erosion), with one (2d+1)^2 erosion in place
    of d 3x3 ones (the same set)."""
    h, w = mask.shape
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((2 * d + 1, 2 * d + 1), np.uint8))[1:h + 1, 1:w + 1]
    return mask.astype(bool) & ~eroded.astype(bool)


def instance_boundary_iou(pred_window: np.ndarray, window, gt_rle: dict) -> float:
    """Boundary IoU of a predicted mask living in ``window`` of the original image (zero elsewhere,
    so its band can be taken inside the window) with the full-image GT RLE."""
    x0, y0, x1, y1 = window
    gt = mask_utils.decode(gt_rle)
    d = boundary_width(*gt.shape)
    gt_band, pred_band = boundary_band_np(gt, d), boundary_band_np(pred_window, d)
    inter = int(np.logical_and(pred_band, gt_band[y0:y1, x0:x1]).sum())
    union = int(pred_band.sum()) + int(gt_band.sum()) - inter
    return inter / union if union else 1.0


def miou4(miou: float) -> int:
    """The checkpoint name's 4 digits: mIoU truncated (not rounded) to 4 decimals."""
    return int(np.floor(miou * 10000 + 1e-9))
