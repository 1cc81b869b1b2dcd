"""Plain one-process reference of analyze's counting: full-image annToMask per instance, then crop."""
from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO

from roiseg.common.geometry import normalized_to_pixel, pad_box
from roiseg.data.coco import SkipReport, _parse_instance
from roiseg.data.rasterize import labels_from_masks, native_crop


def reference_counts(ann_path, roi_padding: float = 0.1, image_ids=None) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_path))
    total = np.zeros(3, np.int64)
    for image_id in (image_ids if image_ids is not None else sorted(coco.imgs)):
        info = coco.imgs[image_id]
        w, h = info["width"], info["height"]
        anns = [a for a in coco.imgToAnns.get(image_id, [])
                if _parse_instance(a, w, h, SkipReport()) is not None]
        if not anns:
            continue
        masks = np.stack([coco.annToMask(a).astype(bool) for a in anns])
        for t, a in enumerate(anns):
            inst = _parse_instance(a, w, h, SkipReport())
            box = normalized_to_pixel(pad_box(inst.box_norm, roi_padding), w, h)
            x0, y0, x1, y1 = native_crop(box, h, w)
            lab = labels_from_masks(masks[:, y0:y1, x0:x1], t)
            total += np.bincount(lab.ravel(), minlength=3)
    return total
