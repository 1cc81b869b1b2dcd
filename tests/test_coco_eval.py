"""COCO mask AP and boundary AP: faster-coco-eval's mask AP equals pycocotools' on the same
predictions, and boundary AP on a one-person case follows min(mask IoU, boundary IoU) by hand."""
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from roiseg.evaluation.boundary import boundary_band, boundary_width
from roiseg.evaluation.coco_eval import coco_stats


def _rle(m):
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode()}


def _dataset(rng, n_images=6):
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]}
    results = []
    for i in range(1, n_images + 1):
        h, w = (int(v) for v in rng.integers(60, 160, 2))
        gt["images"].append({"id": i, "width": w, "height": h})
        yy, xx = np.mgrid[:h, :w]
        for _ in range(int(rng.integers(1, 5))):
            cy, cx, ry, rx = rng.random() * h, rng.random() * w, 5 + rng.random() * h / 3, 5 + rng.random() * w / 3
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            if not m.any():
                continue
            r = _rle(m)
            enc = {"size": r["size"], "counts": r["counts"].encode()}
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": 1,
                                      "iscrowd": 0, "segmentation": r, "area": float(mask_utils.area(enc)),
                                      "bbox": [float(x) for x in mask_utils.toBbox(enc)]})
            for _ in range(int(rng.integers(0, 3))):      # noisy copies, some shifted, some spurious
                p = np.roll(m, tuple(int(v) for v in rng.integers(-6, 7, 2)), (0, 1)) ^ (rng.random((h, w)) < 0.02)
                results.append({"image_id": i, "category_id": 1, "segmentation": _rle(p), "score": float(rng.random())})
    return gt, results


def test_faster_coco_eval_mask_ap_equals_pycocotools():
    rng = np.random.default_rng(0)
    gt, results = _dataset(rng)
    ref = coco_stats(gt, results, "segm")
    assert 0.05 < ref[0] < 0.95                                     # a case with something to rank
    assert coco_stats(gt, results, "segm_faster") == pytest.approx(ref, abs=1e-12)
    boundary = coco_stats(gt, results, "boundary")
    assert (boundary[:3] <= ref[:3] + 1e-12).all() and boundary[0] < ref[0]   # min(mask, boundary) IoU
    assert coco_stats(gt, [], "boundary").tolist() == [0.0] * 6
    with pytest.raises(ValueError):
        coco_stats(gt, results, "bbox")


def test_boundary_ap_of_one_person_by_hand():
    h = w = 200
    gt_m = np.zeros((h, w), bool)
    gt_m[50:150, 50:150] = True
    pred = np.roll(gt_m, 6, 1)                                      # 6 px to the right: IoU 94/106
    gt = {"images": [{"id": 1, "width": w, "height": h}], "categories": [{"id": 1, "name": "person"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": _rle(gt_m),
                           "area": 10000.0, "bbox": [50.0, 50.0, 100.0, 100.0]}]}
    res = [{"image_id": 1, "category_id": 1, "segmentation": _rle(pred), "score": 0.9}]
    miou = 94 / 106
    d = boundary_width(h, w)
    bands = boundary_band(torch.from_numpy(np.stack([gt_m, pred])), d).numpy()
    biou = (bands[0] & bands[1]).sum() / (bands[0] | bands[1]).sum()
    assert biou < 0.5 < miou                                        # the outline is off by a whole band
    thresholds = np.linspace(0.5, 0.95, 10)
    assert coco_stats(gt, res, "segm")[0] == pytest.approx((thresholds <= miou).mean())
    assert coco_stats(gt, res, "boundary")[0] == pytest.approx((thresholds <= min(miou, biou)).mean())
