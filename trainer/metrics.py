"""Validation metrics.

* ``mIoU``: per class, intersections and unions summed over all val ROIs, evaluated at model-input
  resolution inside each padded ROI (the decoder's probabilities pasted back bilinearly onto the
  ROI's pixels); IoU_c = sum(I_c) / sum(U_c); mIoU = mean over classes.
* ``instance_mIoU``: per val person, the class-1 probability pasted into the *original* image
  (inside its padded ROI, 0 elsewhere) thresholded at 0.5, IoU with the person's full GT mask,
  averaged over persons (the box-prompted protocol of SAM-style models on COCO).

Computed by ``trainer/inference/evaluator.py``.
"""
from __future__ import annotations

import numpy as np


def miou4(miou: float) -> int:
    """The checkpoint name's 4 digits: mIoU truncated (not rounded) to 4 decimals."""
    return int(np.floor(miou * 10000 + 1e-9))
