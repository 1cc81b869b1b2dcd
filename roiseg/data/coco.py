"""COCO person annotations -> clean per-image records (normalized boxes, RLE masks).

pycocotools does the parsing and mask encoding.  Bad instances (crowd, empty or degenerate
segmentation, zero-area box) are skipped and counted, never fatal.  No EXIF rotation is applied:
COCO coordinates refer to the pixel layout as stored in the file.
"""
from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from roiseg.common.errors import RoisegError
from roiseg.common.geometry import clip_xyxy, coco_xywh_to_xyxy, pixel_to_normalized

log = logging.getLogger(__name__)
# The four COCO val2017 images the validation PNG shows by default, with their person counts
# (1, 2, 3, 5 persons; the synthetic data set of the demo and the tests names four images so too).
VALIDATION_PNG_IMAGES = {"000000020992.jpg": 1, "000000413552.jpg": 2,
                         "000000109118.jpg": 3, "000000162732.jpg": 5}


@dataclass
class Instance:
    ann_id: int
    box_norm: np.ndarray  # xyxy, normalized to the original image, clipped to [0, 1]
    rle: dict  # compressed COCO RLE at original resolution


@dataclass
class ImageRecord:
    image_id: int
    file_name: str
    width: int
    height: int
    instances: list[Instance] = field(default_factory=list)


@dataclass
class SkipReport:
    counts: Counter = field(default_factory=Counter)

    def add(self, reason: str) -> None:
        self.counts[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items())) or "none"


class AnnotationError(RoisegError, ValueError):
    """The annotation file itself is unusable (missing, not JSON, not COCO)."""


def segmentation_to_rle(segm, height: int, width: int) -> dict | None:
    """Polygon list, uncompressed RLE or compressed RLE -> one compressed RLE; None if unusable."""
    if isinstance(segm, list):
        polys = [p for p in segm if isinstance(p, (list, tuple)) and len(p) >= 6 and len(p) % 2 == 0]
        if not polys:
            return None
        rles = mask_utils.frPyObjects([list(map(float, p)) for p in polys], height, width)
        return mask_utils.merge(rles)
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [height, width]:
            return None
        if isinstance(segm["counts"], list):
            return mask_utils.frPyObjects(segm, height, width)
        counts = segm["counts"]
        counts = counts.encode() if isinstance(counts, str) else bytes(counts)
        runs = decode_rle_counts(counts)
        if runs is None or (runs < 0).any() or int(runs.sum()) != height * width:
            return None
        return {"size": [height, width], "counts": counts}
    return None


def decode_rle_counts(s: bytes) -> np.ndarray | None:
    """Run lengths of a compressed COCO RLE string (maskApi.c ``rleFrString``, vectorized)."""
    c = np.frombuffer(s, np.uint8).astype(np.int64) - 48
    if len(c) == 0 or (c < 0).any() or (c > 63).any() or c[-1] & 0x20:
        return None
    ends = np.flatnonzero((c & 0x20) == 0)
    starts = np.concatenate([[0], ends[:-1] + 1])
    k = np.arange(len(c)) - np.repeat(starts, ends - starts + 1)
    vals = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    sign = (c[ends] & 0x10) != 0
    vals[sign] -= np.left_shift(1, 5 * (ends - starts + 1))[sign]
    vals[2::2] = vals[2::2].cumsum()  # counts from the 4th on are deltas to counts[m-2]
    vals[1::2] = vals[1::2].cumsum()
    return vals


def load_coco(path: str | Path) -> COCO:
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"annotation file not found: {path}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
            coco = COCO(str(path))
    except Exception as exc:  # json errors, missing keys
        raise AnnotationError(f"cannot read COCO annotations from {path}: {exc}") from exc
    # pycocotools silently accepts a file without them (and everything downstream becomes empty)
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(coco.dataset.get(k), list)]
    if missing:
        raise AnnotationError(f"{path} is not a COCO instances file: no {' or '.join(repr(m) for m in missing)} list"
                              + (" (a person-only file names its class: [{\"id\": 1, \"name\": \"person\"}])"
                                 if "categories" in missing else ""))
    person_category_ids(coco, path)   # checked once, here, for every command that reads the file
    return coco


def person_category_ids(coco: COCO, path: str | Path | None = None) -> set[int]:
    """The ids of the category named "person": a file without one holds no persons for this
    project (its only category may be anything else), so it is refused, never taken as persons."""
    cats = [c for c in coco.dataset.get("categories", []) if isinstance(c, dict)]
    ids = {c["id"] for c in cats if str(c.get("name", "")).strip().lower() == "person" and "id" in c}
    if not ids:
        names = ", ".join(sorted({str(c.get("name")) for c in cats})[:8]) or "none"
        raise AnnotationError(f"{path or 'the annotation file'} has no category named 'person' (its categories: "
                              f"{names}): this project segments persons; use a COCO person file")
    return ids


def load_person_records(path: str | Path, keep_empty_images: bool = False
                        ) -> tuple[list[ImageRecord], SkipReport]:
    """All images with at least one usable person instance, sorted by image id."""
    coco = load_coco(path)
    cats = person_category_ids(coco, path)
    skips = SkipReport()
    records = []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        w, h = int(info["width"]), int(info["height"])
        rec = ImageRecord(image_id, info["file_name"], w, h)
        for ann in coco.imgToAnns.get(image_id, []):
            if ann.get("category_id") not in cats:
                continue
            inst = _parse_instance(ann, w, h, skips)
            if inst is not None:
                rec.instances.append(inst)
        if rec.instances or keep_empty_images:
            records.append(rec)
        else:
            skips.add("image without usable person")
    if skips.total:
        log.warning("skipped while loading %s: %s", Path(path).name, skips.summary())
    return records, skips


def _parse_instance(ann: dict, w: int, h: int, skips: SkipReport) -> Instance | None:
    if ann.get("iscrowd", 0):
        skips.add("iscrowd")
        return None
    bbox = ann.get("bbox")
    if not bbox or len(bbox) != 4:
        skips.add("missing bbox")
        return None
    box = clip_xyxy(coco_xywh_to_xyxy(bbox), w, h)
    if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
        skips.add("zero-area box")
        return None
    try:
        rle = segmentation_to_rle(ann.get("segmentation"), h, w)
    except Exception:  # malformed polygons/RLE strings
        rle = None
    if rle is None:
        skips.add("invalid segmentation")
        return None
    if int(mask_utils.area(rle)) == 0:
        skips.add("empty segmentation")
        return None
    return Instance(int(ann["id"]), pixel_to_normalized(box, w, h), rle)


def decode_masks(instances: list[Instance]) -> np.ndarray:
    """[K, H, W] bool masks at original resolution."""
    if not instances:
        raise ValueError("no instances to decode")
    return mask_utils.decode([i.rle for i in instances]).transpose(2, 0, 1).astype(bool)


def window_rle(mask: np.ndarray, window, hw) -> dict:
    """The full-image COCO RLE (``counts`` as text, JSON-ready) of a mask that lives in ``window``
    (x0, y0, x1, y1) of an image of size ``hw``: how predictions are written and scored."""
    h, w = hw
    x0, y0, x1, y1 = (int(v) for v in window)
    full = np.zeros((h, w), np.uint8, order="F")
    full[y0:y1, x0:x1] = mask
    rle = mask_utils.encode(full)
    rle["counts"] = rle["counts"].decode()
    return rle
