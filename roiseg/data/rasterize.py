"""3-class ROI targets: 0 background, 1 the target person, 2 any other person (target wins).

One sampler serves every resolution: a grid of ``out_h x out_w`` cells laid over the ROI, each cell
taking the mask value at its centre (nearest pixel).  Points outside the mask frame are background.
"""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from roiseg.common.geometry import ResizePolicy, pixel_center_span

BACKGROUND, TARGET, NON_TARGET = 0, 1, 2


def _cell_centres(lo: float, hi: float, n: int) -> np.ndarray:
    return lo + (np.arange(n) + 0.5) * ((hi - lo) / n)


def sample_masks(masks: np.ndarray, box_px, out_h: int, out_w: int) -> np.ndarray:
    """Nearest-sample ``[K, H, W]`` masks on an out_h x out_w grid over ``box_px`` (x1,y1,x2,y2)."""
    k, h, w = masks.shape
    x1, y1, x2, y2 = (float(v) for v in box_px)
    xs = np.floor(_cell_centres(x1, x2, out_w)).astype(np.int64)
    ys = np.floor(_cell_centres(y1, y2, out_h)).astype(np.int64)
    vx = (xs >= 0) & (xs < w)
    vy = (ys >= 0) & (ys < h)
    out = masks[:, ys.clip(0, h - 1)][:, :, xs.clip(0, w - 1)]
    return out & vy[None, :, None] & vx[None, None, :]


def labels_from_masks(sampled: np.ndarray, target_index: int) -> np.ndarray:
    """[K, h, w] sampled instance masks -> uint8 0/1/2 labels for ``target_index``."""
    others = np.delete(sampled, target_index, axis=0).any(axis=0) if len(sampled) > 1 \
        else np.zeros(sampled.shape[1:], bool)
    labels = np.where(others, NON_TARGET, BACKGROUND).astype(np.uint8)
    labels[sampled[target_index]] = TARGET
    return labels


def native_crop(box_px, h: int, w: int) -> tuple[int, int, int, int]:
    """Integer pixel window (x0, y0, x1, y1) of a box at the mask's own resolution."""
    x0, x1 = pixel_center_span(box_px[0], box_px[2], w)
    y0, y1 = pixel_center_span(box_px[1], box_px[3], h)
    return x0, y0, x1, y1


def native_windows(boxes_px, hw) -> np.ndarray:
    """``native_crop`` of many boxes: [N, 4] int64 windows; ``hw`` one (h, w) or one per box."""
    boxes_px = np.asarray(boxes_px, np.float64).reshape(-1, 4)
    hw = np.broadcast_to(np.asarray(hw, np.int64).reshape(-1, 2), (len(boxes_px), 2))
    return np.array([native_crop(b, int(h), int(w)) for b, (h, w) in zip(boxes_px, hw)], np.int64).reshape(-1, 4)


def roi_target(masks: np.ndarray, target_index: int, box_px, out_hw: tuple[int, int] | None = None
               ) -> np.ndarray:
    """0/1/2 target of one ROI (padded, jittered, anything) over instance masks ``[K, H, W]``.

    ``box_px`` is in the masks' pixel frame.  ``out_hw=None`` gives the native-resolution crop
    (pixels whose centres fall in the box); otherwise the ROI is sampled on an out_h x out_w grid.
    """
    if out_hw is None:
        x0, y0, x1, y1 = native_crop(box_px, masks.shape[1], masks.shape[2])
        sampled = masks[:, y0:y1, x0:x1]
    else:
        sampled = sample_masks(masks, box_px, out_hw[0], out_hw[1])
    return labels_from_masks(sampled, target_index)


def masks_to_input_frame(masks: np.ndarray, policy: ResizePolicy) -> np.ndarray:
    """Original-resolution masks ``[K, H, W]`` -> masks in the extractor's input frame."""
    k, h, w = masks.shape
    cw, ch = policy.resized_size(w, h)
    _, _, ox, oy = policy.transform(w, h)
    content = sample_masks(masks, (0, 0, w, h), ch, cw)
    if (cw, ch) == (policy.input_w, policy.input_h):
        return content
    frame = np.zeros((k, policy.input_h, policy.input_w), bool)
    frame[:, int(oy):int(oy) + ch, int(ox):int(ox) + cw] = content
    return frame


def rles_to_input_frame_packed(rles: list[dict], policy: ResizePolicy) -> np.ndarray:
    """Fast path of :func:`masks_to_input_frame` for the cache: original-resolution RLEs ->
    row-bit-packed ``[K, H_in, ceil(W_in/8)]`` masks, one instance at a time.

    pycocotools decodes column-major, so the gather runs on the transposed (contiguous) mask;
    the sampled cells are exactly those of ``sample_masks``.
    """
    h, w = rles[0]["size"]
    cw, ch = policy.resized_size(w, h)
    _, _, ox, oy = policy.transform(w, h)
    xs = np.floor(_cell_centres(0, w, cw)).astype(np.intp).clip(0, w - 1)
    ys = np.floor(_cell_centres(0, h, ch)).astype(np.intp).clip(0, h - 1)
    full = (cw, ch) == (policy.input_w, policy.input_h)
    out = np.zeros((len(rles), policy.input_h, (policy.input_w + 7) // 8), np.uint8)
    for k, rle in enumerate(rles):
        content = mask_utils.decode(rle).T[xs][:, ys].T.view(bool)
        if full:
            out[k] = np.packbits(content, axis=-1)
        else:
            frame = np.zeros((policy.input_h, policy.input_w), bool)
            frame[int(oy):int(oy) + ch, int(ox):int(ox) + cw] = content
            out[k] = np.packbits(frame, axis=-1)
    return out
