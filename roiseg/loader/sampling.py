"""Which ROIs an image contributes to a step, how they are jittered and whether the image is
mirrored (deterministic per (seed, epoch, image), whatever the data path, worker count or rank).

Jitter imitates detector boxes: the *person* box (original image, before the ROI padding) moves its
centre by N(0, jitter) x its size and scales each side by exp(N(0, jitter_scale)); it is then
clamped into the person box grown by ``max_jitter`` x its size (so a ROI-sparse store can hold every
cell a training ROI reads: ``roiseg/data/sparse.py``; at the defaults 0.4% of box sides reach it),
padded, clipped and mapped to the model-input frame exactly as at inference.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from roiseg.common.geometry import ResizePolicy, pad_box
from roiseg.data.sparse import DEFAULT_MARGIN, clamp_to_margin


@dataclass(frozen=True)
class RoiSampling:
    jitter: float = 0.05          # centre shift sigma, fraction of the person box size
    jitter_scale: float = 0.10    # log-size sigma (width and height independently)
    samples_per_roi: int = 2      # jittered copies of each ROI per read (each byte feeds several)
    overlap_boost: int = 2        # ROIs with another person inside get this many times the copies
    min_roi_px: float = 8.0       # ROIs smaller than this (input px, either side) are not trained on
    max_rois_per_image: int = 64
    hflip: float = 0.0            # probability that an image is used mirrored
    hflip_map: bool = False       # mirror the feature map itself instead of reading stored flipped features
    max_jitter: float = DEFAULT_MARGIN   # jittered person boxes stay within the box grown by this (each side)


@dataclass
class ImageSample:
    local: np.ndarray     # [R] ROI index within the image
    boxes: np.ndarray     # [R, 4] normalized input-frame ROIs of the *unmirrored* image (targets)
    flip: bool            # the image is used mirrored: model boxes are mirror_boxes(boxes)


def image_rng(seed: int, epoch: int, image: int) -> np.random.Generator:
    """Independent of worker count, rank and resume: the same (seed, epoch, image) -> same ROIs."""
    return np.random.default_rng([seed, epoch, image])


def jitter_person_boxes(boxes: np.ndarray, jitter: float, jitter_scale: float,
                        rng: np.random.Generator) -> np.ndarray:
    """Normalized xyxy person boxes -> jittered ones (centre ~ N(0, jitter) x size, size x
    exp(N(0, jitter_scale))), clipped to the image."""
    if len(boxes) == 0 or (jitter <= 0 and jitter_scale <= 0):
        return boxes.copy()
    wh = boxes[:, 2:] - boxes[:, :2]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 + rng.normal(0, max(jitter, 0), wh.shape) * wh
    half = wh * np.exp(rng.normal(0, max(jitter_scale, 0), wh.shape)) / 2
    return np.concatenate([centre - half, centre + half], 1).clip(0, 1)


def roi_copies(padded_input: np.ndarray, has_other: np.ndarray, policy: ResizePolicy,
               cfg: RoiSampling) -> tuple[np.ndarray, np.ndarray]:
    """(ROIs large enough to train on [K], jittered copies each gets [K]); before the
    ``max_rois_per_image`` draw."""
    size_px = (padded_input[:, 2:] - padded_input[:, :2]) * np.array([policy.input_w, policy.input_h])
    keep = np.flatnonzero((size_px >= cfg.min_roi_px).all(axis=1))
    copies = np.where(has_other[keep], cfg.samples_per_roi * max(1, cfg.overlap_boost), cfg.samples_per_roi)
    return keep, copies


def train_rois(person_boxes: np.ndarray, padded_input: np.ndarray, has_other: np.ndarray,
               orig_wh, policy: ResizePolicy, padding: float, cfg: RoiSampling,
               rng: np.random.Generator) -> ImageSample:
    """One image's training ROIs.  ``person_boxes``: normalized original-frame person boxes [R, 4];
    ``padded_input``: their stored padded input-frame ROIs (size filter); ``has_other``: [R] another
    person inside the padded ROI (those ROIs teach class 2 and get ``overlap_boost`` x the copies)."""
    keep, copies = roi_copies(padded_input, has_other, policy, cfg)
    if len(keep) > cfg.max_rois_per_image:
        pick = np.sort(rng.choice(len(keep), cfg.max_rois_per_image, replace=False))
        keep, copies = keep[pick], copies[pick]
    idx = np.repeat(keep, copies)
    person = person_boxes[idx].astype(np.float64)
    jittered = clamp_to_margin(jitter_person_boxes(person, cfg.jitter, cfg.jitter_scale, rng), person, cfg.max_jitter)
    boxes = policy.norm_to_input_norm(pad_box(jittered, padding), *orig_wh)
    flip = bool(rng.random() < cfg.hflip) if cfg.hflip > 0 else False
    return ImageSample(idx, boxes, flip)


def rois_with_others(boxes: np.ndarray, padded: np.ndarray, roi_start: np.ndarray) -> np.ndarray:
    """[R] bool: another person's box of the same image overlaps this ROI's padded box."""
    out = np.zeros(len(boxes), bool)
    for a, b in zip(roi_start[:-1], roi_start[1:]):
        if b - a < 2:
            continue
        p, o = padded[a:b], boxes[a:b]
        iw = np.minimum(p[:, None, 2], o[None, :, 2]) - np.maximum(p[:, None, 0], o[None, :, 0])
        ih = np.minimum(p[:, None, 3], o[None, :, 3]) - np.maximum(p[:, None, 1], o[None, :, 1])
        hit = (iw > 0) & (ih > 0)
        np.fill_diagonal(hit, False)
        out[a:b] = hit.any(1)
    return out
