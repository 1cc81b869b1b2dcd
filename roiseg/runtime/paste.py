"""NumPy paste-back (no torch): the same separable bilinear weights as ``roiseg.modeling.decoders.paste_masks``."""
from __future__ import annotations

import numpy as np


def interp_weights(lo: np.ndarray, hi: np.ndarray, n_out: int, m: int) -> np.ndarray:
    """[N, n_out, m]: weight of ROI-grid cell j for frame pixel i along one axis (0 outside the ROI)."""
    c = np.arange(n_out, dtype=np.float32) + 0.5
    src = (c[None] - lo[:, None]) / np.maximum(hi - lo, 1e-6)[:, None] * m - 0.5
    return np.maximum(1 - np.abs(src[:, :, None] - np.arange(m, dtype=np.float32)), 0).astype(np.float32)


def paste_numpy(maps: np.ndarray, boxes_px: np.ndarray, height: int, width: int) -> np.ndarray:
    """ROI-grid maps [N, M, M] -> [N, height, width] frames; ``boxes_px`` xyxy in frame pixels."""
    b = np.asarray(boxes_px, np.float32)
    ay = interp_weights(b[:, 1], b[:, 3], height, maps.shape[-2])
    ax = interp_weights(b[:, 0], b[:, 2], width, maps.shape[-1])
    return ay @ maps.astype(np.float32) @ ax.transpose(0, 2, 1)


def softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)
