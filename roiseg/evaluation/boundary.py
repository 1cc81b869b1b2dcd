"""Boundary IoU (Cheng et al., CVPR 2021), vectorized over masks.

A mask's boundary band is its pixels within ``d`` pixels (chessboard distance, as an iterated 3x3
erosion) of a background pixel, where everything outside the image counts as background and
``d = round(0.02 * image diagonal)``, at least 1.  Boundary IoU of a prediction is the IoU of its band
with the GT mask's band.  This is the reference definition (``boundary_iou`` of the authors and
faster-coco-eval's ``rleToBoundaryCV``); ``tests/test_boundary.py`` checks it against that code and
against ``roiseg.evaluation.metrics.boundary_band_np`` (the torch-free one ``predict`` uses).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from roiseg.evaluation.metrics import boundary_width

__all__ = ["boundary_band", "boundary_width"]


def _window_sum(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Sums of ``k`` consecutive entries along ``dim`` (output shorter by ``k - 1``), by a cumsum:
    the cost does not grow with the band width."""
    c = x.cumsum(dim)
    zero = torch.zeros_like(c.narrow(dim, 0, 1))
    c = torch.cat([zero, c], dim)
    n = c.shape[dim]
    return c.narrow(dim, k, n - k) - c.narrow(dim, 0, n - k)


def boundary_band(masks: torch.Tensor, d: int) -> torch.Tensor:
    """``masks`` [n, H, W] bool -> their boundary bands of width ``d`` (pixels outside the frame are
    background).  A pixel stays inside the eroded mask iff its (2d+1)^2 neighbourhood holds no
    background, which the separable window sums of the background count test exactly."""
    if masks.numel() == 0:
        return masks.clone()
    k = 2 * d + 1
    background = F.pad((~masks).to(torch.int32), (d, d, d, d), value=1)
    count = _window_sum(_window_sum(background, k, 1), k, 2)
    return masks & (count > 0)
