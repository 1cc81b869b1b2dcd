"""The contract between the inference pipeline and a decoder: one input record per call, one
answer record, one protocol both decoders (an exported graph in ONNX Runtime, a checkpoint's
PyTorch module) follow.  No torch here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from roiseg.common.certainty import mask_certainty_np


@dataclass(frozen=True)
class DecoderInput:
    """One image's persons, as the pipeline hands them to a decoder (coordinates normalized to the
    model input frame)."""
    image: np.ndarray               # [1, C, Hf, Wf] features (an end-to-end graph: the preprocessed image)
    boxes: np.ndarray               # [N, 4] person boxes (a graph pads them itself)
    rois: np.ndarray                # [N, 4] the boxes padded by the training ROI padding
    content_rect: np.ndarray        # [4] where the image lies in the input frame (letterbox)
    fine: np.ndarray | None = None  # [1, Cf, Hs, Ws] the fine map, for a decoder that fuses one

    def __len__(self) -> int:
        return len(self.boxes)


@dataclass(frozen=True)
class RoiGrids:
    """A decoder's answer on each ROI's grid, before the paste: the class-1 probabilities and how
    each mask's quality score is had."""
    fg: np.ndarray                  # [N, M, M] class-1 probabilities
    head: np.ndarray | None         # [N] scores the decoder gives itself (a score head; an older graph's scores)
    certainty: bool                 # the quality score is the certainty of ``fg`` (then ``head`` is None)

    def quality(self) -> np.ndarray | None:
        """[N] quality scores, or None (a graph exported before decoders gave one)."""
        return mask_certainty_np(self.fg) if self.certainty else self.head

    def with_mirror(self, mirrored: RoiGrids) -> RoiGrids:
        """Flip test-time augmentation: averaged with the grids of the mirrored image's mirrored
        ROIs (flipped back); the certainty is then that of the average (where the two passes
        disagree, cells become unsure)."""
        head = None if self.head is None else (self.head + mirrored.head) / 2
        return RoiGrids((self.fg + mirrored.fg[..., ::-1]) / 2, head, self.certainty)


class RoiDecoder(Protocol):
    """Each person's class-1 probability on its ROI grid, and its quality score's source."""
    provider: str                   # where it runs, in words
    fine: bool                      # it fuses a fine map (the pipeline then passes one)

    def __call__(self, inp: DecoderInput) -> RoiGrids: ...
