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

Computed over a val store, vectorized, by ``roiseg/evaluation/evaluator.py`` (with ``roiseg/evaluation/boundary.py``);
``instance_iou`` and ``instance_boundary_iou`` are the same IoUs for one prediction (``predict
--boxes gt``, no torch).
"""
from __future__ import annotations

import math

import cv2
import numpy as np

DILATION_RATIO = 0.02


def _window_iou(pred_window: np.ndarray, window, full: np.ndarray) -> float:
    """IoU of a mask living in ``window`` (x0, y0, x1, y1) of the image (zero elsewhere) with the
    full-image mask ``full``."""
    x0, y0, x1, y1 = window
    inter = int(np.logical_and(pred_window, full[y0:y1, x0:x1]).sum())
    union = int(pred_window.sum()) + int(full.sum()) - inter
    return inter / union if union else 1.0


def instance_iou(pred_window: np.ndarray, window, gt: np.ndarray) -> float:
    """IoU of a predicted mask living in ``window`` of the original image with the decoded
    full-image GT mask ``gt`` [H, W]."""
    return _window_iou(pred_window, window, gt)


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


def instance_boundary_iou(pred_window: np.ndarray, window, gt: np.ndarray) -> float:
    """Boundary IoU of a predicted mask living in ``window`` of the original image (zero elsewhere,
    so its band can be taken inside the window) with the decoded full-image GT mask ``gt``."""
    d = boundary_width(*gt.shape)
    return _window_iou(boundary_band_np(pred_window, d), window, boundary_band_np(gt, d))

