"""ROI-sparse feature maps: the cells any training or validation ROI can read, and nothing else.

A person box ``b`` (normalized, original image) is read by ROIs that training derives from it: the
box is jittered (``roiseg.loader.sampling``), the jittered box is clamped to ``b`` grown by ``margin`` x its
size on each side (``clamp_to_margin``, applied by every store layout so sparse and dense training
see the same ROIs), padded by the ROI padding (``pad_box``) and mapped to the model-input frame.
So every ROI lies in the *readable region* ``R = pad_box(pad_box(b, margin), padding)``, and
ROIAlign (aligned=True, bilinear) reads cells ``floor(x - 0.5)`` and ``floor(x - 0.5) + 1`` for its
samples ``x``, which lie strictly inside the ROI (at least 1/56 of its size from the edges, far more
than float32 rounding of its corners).  The mirrored-map flip reads the same cells with non-zero
weight.  ``readable_cells`` marks exactly those cells; a sparse store zeroes every other cell before
compressing, so an image costs only its readable share.
"""
from __future__ import annotations

import numpy as np

from roiseg.common.geometry import ResizePolicy, pad_box

DEFAULT_MARGIN = 0.2   # cache --sparse-margin and train --max-jitter


def clamp_to_margin(jittered: np.ndarray, person: np.ndarray, margin: float) -> np.ndarray:
    """Jittered person boxes (within the image) clamped into their person box grown by ``margin``
    (each side)."""
    g = pad_box(person, margin)
    lo, hi = g[..., [0, 1, 0, 1]], g[..., [2, 3, 2, 3]]
    return np.minimum(np.maximum(jittered, lo), hi)


def readable_regions(person_boxes: np.ndarray, margin: float, padding: float) -> np.ndarray:
    """[R, 4] normalized original-frame regions that contain every ROI of each person."""
    return pad_box(pad_box(person_boxes, margin), padding)


def readable_cells(person_boxes: np.ndarray, orig_wh, policy: ResizePolicy, margin: float, padding: float,
                   feat_hw, mirrored: bool = False) -> np.ndarray:
    """[Hf, Wf] bool: the cells ROIAlign can read for this image's persons (``mirrored``: on the
    features of the mirrored input, where ROIs are mirrored too)."""
    hf, wf = feat_hw
    keep = np.zeros((hf, wf), bool)
    if len(person_boxes) == 0:
        return keep
    r = policy.norm_to_input_norm(readable_regions(np.asarray(person_boxes, np.float64).reshape(-1, 4),
                                                   margin, padding), *orig_wh)
    if mirrored:
        r = np.stack([1 - r[:, 2], r[:, 1], 1 - r[:, 0], r[:, 3]], 1)
    f = r * np.array([wf, hf, wf, hf])
    lo = np.maximum(np.floor(f[:, :2] - 0.5).astype(np.int64), 0)
    hi = np.minimum(np.floor(f[:, 2:] - 0.5).astype(np.int64) + 1, [wf - 1, hf - 1])
    for (x0, y0), (x1, y1) in zip(lo, hi):
        keep[y0:y1 + 1, x0:x1 + 1] = True
    return keep


def zero_unreadable(features: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Copy of ``features`` [C, Hf, Wf] with the cells outside ``keep`` set to 0."""
    return np.where(keep[None], features, np.zeros((), features.dtype))
