"""All box/frame geometry in one place.

Frames:
  * original pixels  - COCO coordinates of the stored image (no EXIF rotation).
  * normalized       - original pixels divided by (width, height); what the loader hands out.
  * input pixels     - the extractor's input frame (e.g. 640x640) after the resize policy.
Boxes are ``x1, y1, x2, y2`` unless a name says ``cxcywh``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RESIZE_POLICIES = ("stretch", "letterbox")
LETTERBOX_PAD_VALUE = 114


def xyxy_to_cxcywh(boxes) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    out = np.empty_like(b)
    out[..., 0] = (b[..., 0] + b[..., 2]) / 2
    out[..., 1] = (b[..., 1] + b[..., 3]) / 2
    out[..., 2] = b[..., 2] - b[..., 0]
    out[..., 3] = b[..., 3] - b[..., 1]
    return out


def cxcywh_to_xyxy(boxes) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    out = np.empty_like(b)
    out[..., 0] = b[..., 0] - b[..., 2] / 2
    out[..., 1] = b[..., 1] - b[..., 3] / 2
    out[..., 2] = b[..., 0] + b[..., 2] / 2
    out[..., 3] = b[..., 1] + b[..., 3] / 2
    return out


def as_xyxy(boxes, fmt: str = "xyxy") -> np.ndarray:
    """Accept ROI boxes as normalized ``xyxy`` or ``cxcywh``; return ``xyxy``."""
    if fmt == "xyxy":
        return np.asarray(boxes, dtype=np.float64).copy()
    if fmt == "cxcywh":
        return cxcywh_to_xyxy(boxes)
    raise ValueError(f"unknown box format {fmt!r}; use 'xyxy' or 'cxcywh'")


def coco_xywh_to_xyxy(bbox) -> np.ndarray:
    x, y, w, h = (float(v) for v in bbox)
    return np.array([x, y, x + w, y + h])


def clip_xyxy(boxes, width: float, height: float) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).copy()
    b[..., 0::2] = b[..., 0::2].clip(0, width)
    b[..., 1::2] = b[..., 1::2].clip(0, height)
    return b


def pixel_to_normalized(boxes_px, width: int, height: int) -> np.ndarray:
    return np.asarray(boxes_px, dtype=np.float64) / np.array([width, height, width, height])


def normalized_to_pixel(boxes_norm, width: int, height: int) -> np.ndarray:
    return np.asarray(boxes_norm, dtype=np.float64) * np.array([width, height, width, height])


def pad_box(boxes, padding: float, lo=0.0, hi=1.0):
    """Grow xyxy boxes by ``padding`` of their width/height on each side, clipped to [lo, hi].

    The one ROI-padding rule: numpy arrays here (tables, predictor) and torch tensors inside the
    exported ONNX graph run the same expression.  Normalized original-image boxes clip to [0, 1];
    input-frame boxes clip to the image's content rectangle (``lo`` = its x1, y1 twice, ``hi`` =
    x2, y2 twice), which is the same box, since the frame change is affine per axis."""
    if hasattr(boxes, "new_tensor"):   # torch (export graph)
        b = boxes
        sign = b.new_tensor([-1.0, -1.0, 1.0, 1.0])
    else:
        b = np.asarray(boxes, dtype=np.float64)
        sign = np.array([-1.0, -1.0, 1.0, 1.0])
    wh = b[..., [2, 3, 2, 3]] - b[..., [0, 1, 0, 1]]
    return (b + sign * padding * wh).clip(lo, hi)


def mirror_boxes(boxes: np.ndarray) -> np.ndarray:
    """Normalized xyxy boxes of the horizontally mirrored frame."""
    out = boxes.copy()
    out[..., 0], out[..., 2] = 1 - boxes[..., 2], 1 - boxes[..., 0]
    return out


def content_rect(policy: "ResizePolicy", orig_w: int, orig_h: int) -> np.ndarray:
    """The image content inside the input frame, normalized xyxy ([0, 0, 1, 1] unless letterboxed)."""
    return policy.norm_to_input_norm(np.array([0.0, 0.0, 1.0, 1.0]), orig_w, orig_h)


def pixel_center_span(lo: float, hi: float, limit: int) -> tuple[int, int]:
    """Integer pixel range [a, b) of pixels whose centres (i + 0.5) lie in [lo, hi).

    The one rule used everywhere a box meets a pixel grid (cropping targets, counting pixels).
    """
    a = int(np.ceil(lo - 0.5))
    b = int(np.ceil(hi - 0.5))
    return max(a, 0), min(max(b, a), limit)


@dataclass(frozen=True)
class ResizePolicy:
    """How an original image is mapped into the extractor's input frame (a recorded setting)."""

    input_h: int = 640
    input_w: int = 640
    mode: str = "stretch"

    def __post_init__(self):
        if self.mode not in RESIZE_POLICIES:
            raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {self.mode!r}")

    def transform(self, orig_w: int, orig_h: int) -> tuple[float, float, float, float]:
        """(scale_x, scale_y, offset_x, offset_y): input_px = orig_px * scale + offset."""
        if self.mode == "stretch":
            return self.input_w / orig_w, self.input_h / orig_h, 0.0, 0.0
        s = min(self.input_w / orig_w, self.input_h / orig_h)
        new_w, new_h = round(orig_w * s), round(orig_h * s)
        return s, s, (self.input_w - new_w) // 2, (self.input_h - new_h) // 2

    def resized_size(self, orig_w: int, orig_h: int) -> tuple[int, int]:
        """(w, h) of the image content inside the input frame."""
        if self.mode == "stretch":
            return self.input_w, self.input_h
        s = min(self.input_w / orig_w, self.input_h / orig_h)
        return round(orig_w * s), round(orig_h * s)

    def norm_to_input_norm(self, boxes_norm, orig_w: int, orig_h: int) -> np.ndarray:
        """Normalized original-image boxes -> normalized input-frame boxes."""
        sx, sy, ox, oy = self.transform(orig_w, orig_h)
        b = normalized_to_pixel(boxes_norm, orig_w, orig_h)
        b = b * np.array([sx, sy, sx, sy]) + np.array([ox, oy, ox, oy])
        return b / np.array([self.input_w, self.input_h, self.input_w, self.input_h])

    def input_norm_to_norm(self, boxes_in, orig_w: int, orig_h: int) -> np.ndarray:
        """Inverse of :meth:`norm_to_input_norm`."""
        sx, sy, ox, oy = self.transform(orig_w, orig_h)
        b = np.asarray(boxes_in, dtype=np.float64) * np.array(
            [self.input_w, self.input_h, self.input_w, self.input_h])
        b = (b - np.array([ox, oy, ox, oy])) / np.array([sx, sy, sx, sy])
        return pixel_to_normalized(b, orig_w, orig_h)

    def to_dict(self) -> dict:
        return asdict(self)
