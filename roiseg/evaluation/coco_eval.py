"""Optional COCO mask AP and boundary AP of pasted masks.

Mask AP comes from pycocotools (the reference).  Boundary AP (Cheng et al.: a detection matches at a
threshold when min(mask IoU, boundary IoU) reaches it) comes from faster-coco-eval's
``iouType="boundary"``, the reference definition; ``tests/test_coco_eval.py`` checks that its mask AP
equals pycocotools' on the same predictions, so the two columns are comparable.
"""
from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
from pycocotools import mask as mask_utils

from roiseg.data.coco import window_rle

AP_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")


def coco_result(image_id: int, window, mask: np.ndarray, score: float, hw) -> dict:
    """One COCO result (full-image RLE) of a mask predicted on ``window`` of an ``hw`` image: a
    few hundred bytes, so per-rank detections can be gathered under DDP."""
    return {"image_id": image_id, "category_id": 1, "segmentation": window_rle(mask, window, hw), "score": score}


def store_ground_truth(store, images=None) -> dict:
    """A COCO annotation dict (person category only) of the store's GT masks of ``images``."""
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
    return gt


def coco_stats(gt: dict, results: list, iou_type: str = "segm") -> np.ndarray:
    """COCO's first six stats (``AP_NAMES``) of ``results`` against the annotation dict ``gt``:
    ``segm`` by pycocotools, ``boundary`` by faster-coco-eval.  No results: all zero."""
    if not results:
        return np.zeros(len(AP_NAMES))
    if iou_type == "segm":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval as Eval
    elif iou_type in ("boundary", "segm_faster"):
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as Eval
        logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
        iou_type = iou_type.replace("_faster", "")
    else:
        raise ValueError(f"iou_type {iou_type!r}: segm, segm_faster or boundary")
    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO()
        cg.dataset = gt
        cg.createIndex()
        # loadRes adds bbox/area/id to the dicts it gets: hand it copies, so the caller's list stays valid
        fresh = [{k: v for k, v in r.items() if k not in ("bbox", "area", "id")} for r in results]
        ev = Eval(cg, cg.loadRes(fresh), iou_type)
        if hasattr(ev, "boundary_cpu_count"):
            ev.boundary_cpu_count = 1     # no process pool inside a training or DDP process
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats[:len(AP_NAMES)], np.float64)


def coco_mask_ap(store, dets, images=None) -> dict:
    """Mask AP and boundary AP of ``dets`` (``coco_result`` dicts) against the store's GT of ``images``:
    ``{"coco_mask_AP": {...}, "coco_boundary_AP": {...}}`` keyed by ``AP_NAMES``."""
    gt = store_ground_truth(store, images)
    results = list(dets)
    return {key: dict(zip(AP_NAMES, (float(v) for v in coco_stats(gt, results, kind))))
            for key, kind in (("coco_mask_AP", "segm"), ("coco_boundary_AP", "boundary"))}
