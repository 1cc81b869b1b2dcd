"""NumPy paste-back (no torch): the same separable bilinear weights as ``roiseg.modeling.decoders.paste_masks``,
applied as their two taps per pixel instead of as matrices."""
from __future__ import annotations

import numpy as np


def axis_taps(lo: np.ndarray, hi: np.ndarray, n_out: int, m: int) -> tuple[np.ndarray, ...]:
    """Along one axis, for ROI k and frame pixel i: the two ROI-grid cells that bilinear
    interpolation reads and their weights ([N, n_out] each; a cell outside the grid weighs 0, so a
    pixel outside the ROI gets 0)."""
    c = np.arange(n_out, dtype=np.float32) + 0.5
    src = (c[None] - lo[:, None]) / np.maximum(hi - lo, 1e-6)[:, None] * m - 0.5
    j0 = np.floor(src)
    f = (src - j0).astype(np.float32)
    j0 = j0.astype(np.int64)
    w0 = np.where((j0 >= 0) & (j0 < m), 1 - f, 0).astype(np.float32)
    w1 = np.where((j0 + 1 >= 0) & (j0 + 1 < m), f, 0).astype(np.float32)
    return np.clip(j0, 0, m - 1), np.clip(j0 + 1, 0, m - 1), w0, w1


def paste_windows(maps: np.ndarray, boxes_px: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """ROI-grid maps [N, M, M] -> one [h_k, w_k] array per ROI; ``boxes_px`` xyxy in each window's
    pixels, ``sizes`` [N, 2] the windows' (height, width).

    Gathers, not matmuls: numpy's stacked matmul runs on OpenBLAS's threads, which fight ONNX
    Runtime's spinning ones on a small CPU (2x the whole call on 2 cores, bench/bench_api.py)."""
    b = np.asarray(boxes_px, np.float32)
    maps = maps.astype(np.float32, copy=False)
    out = []
    for k, (grid, (h, w)) in enumerate(zip(maps, np.asarray(sizes, np.int64).reshape(-1, 2))):
        y0, y1, wy0, wy1 = (t[0] for t in axis_taps(b[k:k + 1, 1], b[k:k + 1, 3], int(h), grid.shape[0]))
        x0, x1, wx0, wx1 = (t[0] for t in axis_taps(b[k:k + 1, 0], b[k:k + 1, 2], int(w), grid.shape[1]))
        rows = grid[y0] * wy0[:, None] + grid[y1] * wy1[:, None]          # [h, M]
        out.append(rows[:, x0] * wx0 + rows[:, x1] * wx1)
    return out


def softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)
