"""The contract between the inference pipeline and a decoder: one input record per call, one
protocol both decoders (an exported graph in ONNX Runtime, a checkpoint's PyTorch module) follow.
No torch here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class DecoderInput:
    """One image's persons, as the pipeline hands them to a decoder (coordinates normalized to the
    model input frame unless said)."""
    image: np.ndarray               # [1, C, Hf, Wf] features (an end-to-end graph: the preprocessed image)
    boxes: np.ndarray               # [N, 4] person boxes (a graph pads them itself)
    rois: np.ndarray                # [N, 4] the boxes padded by the training ROI padding
    content_rect: np.ndarray        # [4] where the image lies in the input frame (letterbox)
    windows: np.ndarray             # [N, 4] each padded ROI in its window's pixels (where to paste)
    window_hw: tuple[int, int]      # the paste frame: as big as the largest window
    fine: np.ndarray | None = None  # [1, Cf, Hs, Ws] the fine map, for a decoder that fuses one

    def __len__(self) -> int:
        return len(self.boxes)


class RoiDecoder(Protocol):
    """Each person's class-1 probability pasted into its window, and each mask's quality score
    (None: a graph exported before decoders gave one)."""
    provider: str                   # where it runs, in words
    fine: bool                      # it fuses a fine map (the pipeline then passes one)

    def __call__(self, inp: DecoderInput) -> tuple[np.ndarray, np.ndarray | None]: ...
