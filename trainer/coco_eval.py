"""Optional COCO mask AP of the pasted val masks (GT boxes as detections), via pycocotools."""
from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from roiseg.featcache.coco import window_rle


def coco_result(image_id: int, window, mask: np.ndarray, score: float, hw) -> dict:
    """One COCO result (full-image RLE) of a mask predicted on ``window`` of an ``hw`` image: a
    few hundred bytes, so per-rank detections can be gathered under DDP."""
    return {"image_id": image_id, "category_id": 1, "segmentation": window_rle(mask, window, hw), "score": score}


def coco_mask_ap(store, dets, images=None) -> dict:
    """Mask AP of ``dets`` (``coco_result`` dicts) against the store's GT of ``images``."""
    t = store.tables
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]}
    for i in (store.valid_images() if images is None else images):
        h, w = (int(v) for v in t["orig_hw"][i])
        gt["images"].append({"id": int(t["image_id"][i]), "width": w, "height": h})
        a = int(t["image_roi_start"][i])
        for k, rle in enumerate(store.gt_rles(i)):
            r = {"size": rle["size"], "counts": rle["counts"].encode()}
            gt["annotations"].append({"id": int(t["roi_ann_id"][a + k]), "image_id": int(t["image_id"][i]),
                                      "category_id": 1, "iscrowd": 0, "segmentation": rle,
                                      "area": float(mask_utils.area(r)),
                                      "bbox": [float(x) for x in mask_utils.toBbox(r)]})
    results = list(dets)
    if not results:
        return {"AP": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO()
        cg.dataset = gt
        cg.createIndex()
        cd = cg.loadRes(results)
        ev = COCOeval(cg, cd, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    names = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"]
    return {n: float(v) for n, v in zip(names, ev.stats[:6])}
