"""Boundary IoU: the band by hand, and against the reference implementation (faster-coco-eval's
``rleToBoundaryCV``, the authors' ``mask_to_boundary``) on random masks."""
import numpy as np
import pytest
import torch
from faster_coco_eval.core.mask import rleToBoundaryCV
from pycocotools import mask as mask_utils

from roiseg.evaluation.boundary import boundary_band, boundary_width
from roiseg.evaluation.metrics import boundary_band_np, instance_boundary_iou


def _mask(h, w, rows, cols):
    m = np.zeros((h, w), bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


def test_band_width_by_hand():
    assert boundary_width(480, 640) == 16          # 0.02 * 800
    assert boundary_width(427, 640) == 15          # 0.02 * 769.4
    assert boundary_width(5, 5) == 1               # at least one pixel
    assert boundary_width(300, 400, ratio=0.05) == 25


def test_band_and_boundary_iou_by_hand():
    gt = _mask(5, 5, (1, 4), (1, 4))               # a 3x3 square: its band is the ring of 8
    pred = _mask(5, 5, (1, 4), (1, 5))             # 3x4, touching the right image border
    bands = boundary_band(torch.from_numpy(np.stack([gt, pred, np.ones((5, 5), bool)])), 1).numpy()
    assert bands[0].sum() == 8 and not bands[0][2, 2]
    # the pred's interior is (2,2) and (2,3); the image border counts as background, so (2,4) is band
    assert bands[1].sum() == 10 and not bands[1][2, 2] and not bands[1][2, 3] and bands[1][2, 4]
    assert bands[2].sum() == 16                    # a full mask: its band is the image's outer ring
    inter = (bands[0] & bands[1]).sum()
    assert inter == 7
    assert inter / (bands[0].sum() + bands[1].sum() - inter) == pytest.approx(7 / 11)
    # a wider band swallows the whole 3x3 square
    assert boundary_band(torch.from_numpy(gt)[None], 2)[0].numpy().sum() == 9


def test_band_equals_the_reference_implementation():
    rng = np.random.default_rng(0)
    for t in range(40):
        h, w = (int(v) for v in rng.integers(3, 120, 2))
        if t % 2:
            m = rng.random((h, w)) > rng.random()
        else:                                      # blobs, with holes and border contact
            yy, xx = np.mgrid[:h, :w]
            m = np.zeros((h, w), bool)
            for _ in range(3):
                cy, cx, r = rng.random() * h, rng.random() * w, rng.random() * max(h, w) / 2
                m ^= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        ratio = float(rng.choice([0.02, 0.05, 0.1]))
        ref = mask_utils.decode(rleToBoundaryCV(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))),
                                                ratio)).astype(bool)
        got = boundary_band(torch.from_numpy(m)[None], boundary_width(h, w, ratio))[0].numpy()
        assert np.array_equal(got, ref), (t, h, w, ratio)
        assert np.array_equal(boundary_band_np(m, boundary_width(h, w, ratio)), ref), (t, h, w, ratio)
    assert boundary_band(torch.zeros(0, 4, 4, dtype=torch.bool), 3).shape == (0, 4, 4)


def test_instance_boundary_iou_of_a_window_by_hand():
    """predict's torch-free boundary IoU: the prediction lives in a window of the image."""
    gt = np.zeros((5, 5), bool)
    gt[1:4, 1:4] = True
    rle = mask_utils.encode(np.asfortranarray(gt.astype(np.uint8)))
    gt_full = mask_utils.decode(rle)
    pred_window = np.ones((3, 4), bool)                 # rows 1-3, cols 1-4 of the image
    assert instance_boundary_iou(pred_window, (1, 1, 5, 4), gt_full) == pytest.approx(7 / 11)
    assert instance_boundary_iou(gt[1:4, 1:4], (1, 1, 4, 4), gt_full) == 1.0
    assert instance_boundary_iou(np.zeros((2, 2), bool), (0, 0, 2, 2), gt_full) == 0.0
