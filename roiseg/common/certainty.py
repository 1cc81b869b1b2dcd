"""The mask-certainty score without torch (the runtime's twin of ``roiseg.modeling.decoders.mask_certainty``,
which the exported graphs compute in-graph): class-1 probabilities in (0.5 - UNSURE, 0.5 + UNSURE)
count as cells the decoder is unsure of, with linear ramps RAMP wide at the band's edges so that the
score is a continuous function of the logits (ONNX Runtime, NumPy and PyTorch then agree to within
rounding)."""
from __future__ import annotations

import numpy as np

UNSURE, RAMP = 0.25, 0.05


def mask_certainty_np(fg: np.ndarray) -> np.ndarray:
    """[N] in [0, 1) from the class-1 probabilities ``fg`` [N, M, M]: ``S / (S + U + 1)``, ``S`` the
    soft mask area in cells, ``U`` the unsure cells (ramped)."""
    p = np.asarray(fg, np.float32)
    soft_area = p.sum((1, 2))
    unsure = np.clip((UNSURE - np.abs(p - 0.5)) / RAMP + 0.5, 0, 1).sum((1, 2))
    return soft_area / (soft_area + unsure + 1)
