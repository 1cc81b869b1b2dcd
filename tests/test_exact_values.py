"""Core formulas checked against hand-computed values, each where a plausible one-line bug (a
constant, a swapped axis, a dropped argument) would otherwise go unnoticed."""
import math

import numpy as np
import pytest
import torch


def test_every_class_weight_variant_by_hand():
    from roiseg.data.analyze import class_weights
    r = {"background": 0.5, "target": 0.4, "non_target": 0.1}
    w = class_weights(r)
    inv = [1 / 0.5, 1 / 0.4, 1 / 0.1]
    m = sum(inv) / 3
    assert [w["inverse_frequency"][k] for k in r] == pytest.approx([x / m for x in inv], abs=1e-6)
    ls = [1 / math.log(1.02 + v) for v in r.values()]            # ENet's constant is 1.02
    m = sum(ls) / 3
    assert [w["log_scaled"][k] for k in r] == pytest.approx([x / m for x in ls], abs=1e-6)
    inv_n = [x / (sum(inv) / 3) for x in inv]
    assert [w["inverse_clipped"][k] for k in r] == pytest.approx([min(max(x, 0.2), 5.0) for x in inv_n], abs=1e-6)


def test_feature_boxes_on_a_non_square_map():
    """x scales with the map's width, y with its height (a swap would pass on any square map)."""
    from roiseg.modeling.decoders import roi_features, rois_to_feature_boxes
    rois = torch.tensor([[1.0, 0.25, 0.5, 0.75, 1.0]])
    assert rois_to_feature_boxes(rois, (40, 100)).tolist() == [[1.0, 25.0, 20.0, 75.0, 40.0]]
    h, w = 30, 90
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    feats = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w)])[None]      # channel 0: x, channel 1: y
    out = roi_features(feats, torch.tensor([[0.0, 0.2, 0.4, 0.6, 0.8]]), 2)
    # bins sample at the centres of the box's quarters: x in cells 18..54, y in cells 12..24
    assert out[0, 0].mean().item() == pytest.approx((0.2 + 0.6) / 2 * w, abs=1e-4)
    assert out[0, 1].mean().item() == pytest.approx((0.4 + 0.8) / 2 * h, abs=1e-4)


def test_cross_entropy_uses_the_class_weights():
    from roiseg.training.losses import LossConfig, SegLoss
    logits = torch.tensor([[[[2.0]], [[0.5]], [[-1.0]]], [[[0.1]], [[1.5]], [[0.3]]]])     # [2, 3, 1, 1]
    t = torch.tensor([[[0]], [[2]]])
    weights = (0.5, 1.0, 3.0)
    loss = SegLoss(LossConfig(weights, dice_weight=0.0), 3)(logits, t)["loss"]
    lp = torch.log_softmax(logits[:, :, 0, 0], 1)
    want = -(weights[0] * lp[0, 0] + weights[2] * lp[1, 2]) / (weights[0] + weights[2])
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    plain = SegLoss(LossConfig(None, dice_weight=0.0), 3)(logits, t)["loss"]
    assert plain.item() == pytest.approx(-(lp[0, 0] + lp[1, 2]).item() / 2, rel=1e-6)


def test_coco_size_ranges_are_areas():
    """COCO's small/medium/large are mask areas below 32^2 and 96^2 pixels."""
    from roiseg.evaluation.evaluator import MEDIUM, SMALL, RoiEvaluator
    assert (SMALL, MEDIUM) == (32 ** 2, 96 ** 2)

    class Index:
        has_other = np.array([False, True, False, False, False])
    ev = RoiEvaluator.__new__(RoiEvaluator)
    ev.index = Index()
    areas = np.array([1023.0, 1024.0, 9215.0, 9216.0, 40.0])
    m = ev._membership(np.arange(5), areas)
    assert m[:, 1].tolist() == [1, 0, 0, 0, 1]         # small: area < 1024
    assert m[:, 2].tolist() == [0, 1, 1, 0, 0]         # medium: 1024 <= area < 9216
    assert m[:, 3].tolist() == [0, 0, 0, 1, 0]
    assert m[:, 4].tolist() == [0, 1, 0, 0, 0]         # overlapped


@pytest.mark.parametrize("max_jitter", [0.02, 0.1])
def test_training_rois_stay_within_max_jitter(max_jitter):
    """Jittered person boxes are clamped into the box grown by ``max_jitter`` (not a fixed margin)."""
    from roiseg.common.geometry import ResizePolicy, pad_box
    from roiseg.loader.sampling import RoiSampling, train_rois
    person = np.array([[0.3, 0.3, 0.5, 0.7]])
    cfg = RoiSampling(jitter=0.5, jitter_scale=0.5, samples_per_roi=400, max_jitter=max_jitter)
    policy = ResizePolicy(640, 640)
    s = train_rois(person, pad_box(person, 0.1), np.array([False]), (640, 640), policy, 0.0, cfg,
                   np.random.default_rng(0))
    lo = pad_box(person, max_jitter)
    assert (s.boxes >= lo[:, [0, 1, 0, 1]] - 1e-9).all() and (s.boxes <= lo[:, [2, 3, 2, 3]] + 1e-9).all()
    assert np.isclose(s.boxes, lo).any()      # the wide jitter does reach the clamp


def test_ema_follows_the_weights_during_training(stores, tmp_path):
    from roiseg.training.config import make_config
    from roiseg.training.loop import Trainer
    t = Trainer(make_config(train_store=str(stores["train"]), val_store=str(stores["val"]), out=str(tmp_path),
                            analysis=str(stores["analysis"]), hidden=8, roi_size=7, mask_size=14, epochs=1,
                            batch_size=4, workers=0, resident="cpu", tensorboard=False, visualize=False, ema=0.9))
    start = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.train_epoch(1)
    ema = t.ema.module.state_dict()
    moved = [k for k, v in ema.items() if v.dtype.is_floating_point and not torch.equal(v, start[k])
             and not k.startswith("norm.")]
    assert moved, "the EMA never moved"
    now = t.model.state_dict()
    assert any(not torch.equal(ema[k], now[k]) for k in moved)      # an average, not a copy
