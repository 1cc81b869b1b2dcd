"""Which ROIs an image contributes to a step, and how they are jittered (deterministic per image)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RoiSampling:
    jitter: float = 0.1          # each side moves by up to this fraction of the box size
    samples_per_roi: int = 1     # jittered copies of each ROI per read (each byte feeds several)
    min_roi_px: float = 8.0      # ROIs smaller than this (input px, either side) are not trained on
    max_rois_per_image: int = 64


def image_rng(seed: int, epoch: int, image: int) -> np.random.Generator:
    """Independent of worker count, rank and resume: the same (seed, epoch, image) -> same ROIs."""
    return np.random.default_rng([seed, epoch, image])


def jitter_boxes(boxes: np.ndarray, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """Normalized xyxy boxes, each side moved by U(-j, j) x box size, clipped to [0, 1]."""
    if jitter <= 0 or len(boxes) == 0:
        return boxes.copy()
    wh = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
    out = boxes + rng.uniform(-jitter, jitter, boxes.shape) * wh
    out = out.clip(0, 1)
    # keep x1 < x2 after jitter
    lo, hi = np.minimum(out[:, :2], out[:, 2:]), np.maximum(out[:, :2], out[:, 2:])
    return np.concatenate([lo, hi], axis=1)


def train_rois(padded: np.ndarray, input_hw, cfg: RoiSampling, rng: np.random.Generator):
    """-> (roi index within the image [R], jittered normalized boxes [R, 4])."""
    h, w = input_hw
    size_px = (padded[:, 2:] - padded[:, :2]) * np.array([w, h])
    keep = np.flatnonzero((size_px >= cfg.min_roi_px).all(axis=1))
    if len(keep) > cfg.max_rois_per_image:
        keep = np.sort(rng.choice(keep, cfg.max_rois_per_image, replace=False))
    idx = np.repeat(keep, cfg.samples_per_roi)
    boxes = jitter_boxes(padded[idx].astype(np.float64), cfg.jitter, rng)
    return idx, boxes
