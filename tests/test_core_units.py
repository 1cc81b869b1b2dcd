"""The core modules against independent references and hand-computed values: the LR schedule, ROI
sampling, target sampling from packed bits, the decoders' geometry and paste, the losses, the
evaluator (against a per-ROI loop written from the metric definitions) and checkpoint files.
Fast (no training runs): bench/mutation.sh runs them against every mutant."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from roiseg.common.geometry import (
    ResizePolicy,
    normalized_to_pixel,
    pad_box,
    pixel_center_span,
)
from roiseg.data.rasterize import native_crop, roi_target


# ---- the LR schedule --------------------------------------------------------------------------
def test_warmup_cosine_values():
    from roiseg.training.schedule import warmup_cosine
    assert warmup_cosine(0.0, 10, 0.5) == 1e-3                       # never exactly 0
    assert warmup_cosine(0.25, 10, 0.5) == pytest.approx(0.5)
    assert warmup_cosine(0.5, 10, 0.5) == pytest.approx(1.0)
    assert warmup_cosine(5.25, 10, 0.5) == pytest.approx(0.5)         # half-way through the cosine
    assert warmup_cosine(10.0, 10, 0.5) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(12.0, 10, 0.5) == pytest.approx(0.0, abs=1e-12)   # clamped past the end
    assert warmup_cosine(2.0, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert warmup_cosine(0.2, 1, 1.0) == pytest.approx(0.2)


def test_auto_epochs_scaled_lr_and_step_counts():
    from roiseg.training.schedule import auto_epochs, rois_before_step, scaled_lr
    assert auto_epochs(100_000, 16, 600) == 12
    assert auto_epochs(100, 16, 600) == 96                  # ceil(600 * 16 / 100)
    assert auto_epochs(0, 16, 600) == 9600                  # no ROIs: as if one
    assert scaled_lr(1e-3, 16) == pytest.approx(1e-3) and scaled_lr(1e-3, 64) == pytest.approx(2e-3)
    for counts, k in (([10], 3), ([7, 0, 12], 4), ([5, 5], 1)):
        for j in range(k + 1):
            want = sum(sum(len(c) for c in torch.tensor_split(torch.arange(n), k)[:j]) for n in counts)
            assert rois_before_step(counts, k, j) == want, (counts, k, j)


# ---- ROI sampling -----------------------------------------------------------------------------
def test_mirror_and_jitter():
    from roiseg.common.geometry import mirror_boxes
    from roiseg.loader.sampling import jitter_person_boxes
    b = np.array([[0.1, 0.2, 0.4, 0.9], [0.5, 0.0, 1.0, 0.3]])
    assert np.allclose(mirror_boxes(b), [[0.6, 0.2, 0.9, 0.9], [0.0, 0.0, 0.5, 0.3]])
    assert np.array_equal(jitter_person_boxes(b, 0, 0, np.random.default_rng(0)), b)
    rng = np.random.default_rng(1)
    big = np.repeat([[0.4, 0.4, 0.6, 0.6]], 20000, 0)
    j = jitter_person_boxes(big, 0.05, 0.1, rng)
    c, wh = (j[:, :2] + j[:, 2:]) / 2, j[:, 2:] - j[:, :2]
    assert np.std(c[:, 0] - 0.5) == pytest.approx(0.05 * 0.2, rel=0.05)       # sigma x the box size
    assert np.std(np.log(wh[:, 1] / 0.2)) == pytest.approx(0.1, rel=0.05)
    assert abs(np.mean(c[:, 1] - 0.5)) < 1e-3
    edge = jitter_person_boxes(np.repeat([[0.0, 0.0, 0.1, 1.0]], 100, 0), 0.3, 0.3, rng)
    assert edge.min() >= 0 and edge.max() <= 1                               # clipped to the image


def test_roi_copies_and_train_rois():
    from roiseg.loader.sampling import RoiSampling, roi_copies, train_rois
    policy = ResizePolicy(640, 640)
    padded = np.array([[0, 0, 0.5, 0.5], [0, 0, 0.01, 0.5], [0, 0, 0.5, 0.011], [0.2, 0.2, 0.3, 0.3]])
    other = np.array([False, False, False, True])
    cfg = RoiSampling(samples_per_roi=3, overlap_boost=2, min_roi_px=7.0)
    keep, copies = roi_copies(padded, other, policy, cfg)
    assert keep.tolist() == [0, 2, 3] and copies.tolist() == [3, 3, 6]        # 6.4 px wide is too small
    assert roi_copies(padded, other, policy, RoiSampling(samples_per_roi=2, overlap_boost=1, min_roi_px=0))[1].tolist() \
        == [2, 2, 2, 2]
    person = np.array([[0.1, 0.1, 0.4, 0.4]] * 100)
    many = pad_box(person, 0.1)
    s = train_rois(person, many, np.zeros(100, bool), (640, 640), policy, 0.1,
                   RoiSampling(jitter=0, jitter_scale=0, samples_per_roi=1, max_rois_per_image=7),
                   np.random.default_rng(0))
    assert len(s.local) == 7 and len(set(s.local.tolist())) == 7 and not s.flip
    assert np.allclose(s.boxes, many[:7])                                     # no jitter: the stored ROI
    flips = [train_rois(person[:1], many[:1], np.zeros(1, bool), (640, 640), policy, 0.1,
                        RoiSampling(hflip=0.5), np.random.default_rng(k)).flip for k in range(200)]
    assert 60 < sum(flips) < 140
    s = train_rois(person[:1], many[:1], np.zeros(1, bool), (320, 640), ResizePolicy(640, 640, "letterbox"), 0.1,
                   RoiSampling(jitter=0, jitter_scale=0, samples_per_roi=1), np.random.default_rng(0))
    assert np.allclose(s.boxes, ResizePolicy(640, 640, "letterbox").norm_to_input_norm(many[:1], 320, 640))


def test_rois_with_others():
    from roiseg.loader.sampling import rois_with_others
    boxes = np.array([[0.0, 0.0, 0.2, 0.2], [0.3, 0.0, 0.5, 0.2], [0.21, 0.0, 0.29, 0.2],   # image 0
                      [0.0, 0.0, 1.0, 1.0]])                                                  # image 1
    padded = np.array([[0.0, 0.0, 0.2, 0.2], [0.3, 0.0, 0.5, 0.2], [0.19, 0.0, 0.31, 0.2], [0, 0, 1, 1]])
    out = rois_with_others(boxes, padded, np.array([0, 3, 4]))
    assert out.tolist() == [False, False, True, False]     # touching edges do not overlap; alone in image 1


# ---- targets from packed bits -----------------------------------------------------------------
def test_sample_roi_targets_equal_the_reference():
    from roiseg.loader.targets import gather_bits, sample_roi_targets, union_packed
    rng = np.random.default_rng(0)
    h, w = 37, 53                                   # width not a multiple of 8: the last byte is partial
    masks = rng.random((4, h, w)) < 0.3
    packed = torch.from_numpy(np.packbits(masks, axis=-1))
    union = union_packed(packed)
    assert torch.equal(union, torch.from_numpy(np.packbits(masks.any(0), axis=-1)))
    ys = torch.tensor([[0, 5, 36]])
    xs = torch.tensor([[0, 7, 8, 52, 53, -1]])
    got = gather_bits(packed, torch.tensor([2]), ys, xs, w)[0]
    want = np.array([[masks[2, y, x] if 0 <= x < w else False for x in [0, 7, 8, 52, 53, -1]] for y in [0, 5, 36]])
    assert np.array_equal(got.numpy(), want)
    boxes = np.array([[3.2, 4.7, 40.1, 30.2], [-10, -5, 20, 12], [30, 20, 70, 50], [0, 0, w, h]])
    for t in range(4):
        lab = sample_roi_targets(packed, union[None], torch.full((4,), t), torch.zeros(4, dtype=torch.long),
                                 torch.from_numpy(boxes), 11, 9, w)
        for r, b in enumerate(boxes):
            assert np.array_equal(lab[r].numpy(), roi_target(masks, t, b, (11, 9))), (t, r)
    assert sample_roi_targets(packed, union[None], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                              torch.zeros(0, 4), 5, 6, w).shape == (0, 5, 6)


def test_cropped_masks_read_like_full_frames():
    """Resident masks are cropped to their set bits; every pixel (inside, outside the crop, off the
    frame) reads as from the full frame, for blobs, an empty mask and one touching the last byte."""
    from roiseg.loader.targets import (
        CropsBuilder,
        PackedCrops,
        gather_bits,
        sample_roi_targets,
        union_packed,
    )
    rng = np.random.default_rng(1)
    h, w = 41, 61
    masks = np.zeros((5, h, w), bool)
    masks[0, 3:9, 10:17] = rng.random((6, 7)) < 0.7
    masks[1, 20:41, 45:61] = True                       # touches the bottom edge and the partial last byte
    masks[3, 0, 0] = True                               # masks[2] stays empty
    masks[4] = rng.random((h, w)) < 0.2
    packed = np.packbits(masks, axis=-1)
    crops = PackedCrops.crop(packed)
    assert crops.bits.numel() < packed.size / 2 and crops.geom[2, 3] == 0   # smaller; the empty mask has 0 rows
    builder = CropsBuilder()                        # two images' crops in one buffer: offsets shift
    builder.append(PackedCrops.crop(packed[:2]))
    builder.append(PackedCrops.crop(packed[2:]))
    parts = builder.build()
    ys = torch.arange(-2, h + 2)[None].repeat(5, 1)
    xs = torch.arange(-9, w + 9)[None].repeat(5, 1)
    full = gather_bits(torch.from_numpy(packed), torch.arange(5), ys, xs, w)
    assert torch.equal(gather_bits(crops, torch.arange(5), ys, xs, w), full)
    assert torch.equal(gather_bits(parts, torch.arange(5), ys, xs, w), full)
    union = union_packed(packed)[None]
    boxes = torch.tensor([[3.2, 4.7, 40.1, 30.2], [-10, -5, 20, 12], [30, 20, 70, 50], [0, 0, w, h], [44, 19, 62, 42]])
    for t in range(5):
        args = (torch.full((5,), t), torch.zeros(5, dtype=torch.long), boxes, 13, 17, w)
        assert torch.equal(sample_roi_targets(crops, PackedCrops.crop(union), *args),
                           sample_roi_targets(torch.from_numpy(packed), torch.from_numpy(union), *args)), t


# ---- decoders: geometry, paste, normalization ---------------------------------------------------
def test_paste_equals_grid_sample_and_fills_background():
    from roiseg.modeling.decoders import interp_weights, paste_masks
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 2, 7, 7, generator=g)
    boxes = torch.tensor([[3.5, 2.0, 20.25, 15.0], [-4.0, -2.0, 10.0, 30.0], [0.0, 0.0, 31.0, 23.0]])
    out = paste_masks(probs, boxes, 23, 31, fill_background=False)
    ys = (torch.arange(23) + 0.5)
    xs = (torch.arange(31) + 0.5)
    for n, b in enumerate(boxes):
        gy = (ys - b[1]) / (b[3] - b[1]) * 2 - 1
        gx = (xs - b[0]) / (b[2] - b[0]) * 2 - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None]
        ref = F.grid_sample(probs[n:n + 1], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        assert torch.allclose(out[n], ref[0], atol=1e-5), n
    full = paste_masks(probs.softmax(1), boxes, 23, 31)
    assert torch.allclose(full.sum(1), torch.ones(3, 23, 31), atol=1e-5)
    w = interp_weights(torch.tensor([2.5]), torch.tensor([6.5]), 8, 4, torch.float32)[0]   # cell = 1 px
    assert w.shape == (8, 4) and w[:2].sum() == 0
    assert w[2].tolist() == [0.5, 0, 0, 0] and w[3].tolist() == [0.5, 0.5, 0, 0] and w[6].tolist() == [0, 0, 0, 0.5]
    assert w[7].sum() == 0


def test_roi_features_feature_norm_and_state_loading():
    from roiseg.modeling.decoders import (
        FeatureNorm,
        GlobalContextDecoder,
        RoiAlignDecoder,
        build_model,
        load_decoder_state,
        roi_features,
    )
    h, w = 20, 40
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5,
                            indexing="ij")
    feats = torch.stack([xs, ys])[None].repeat(2, 1, 1, 1)
    feats[1] *= -1
    rois = torch.tensor([[1.0, 0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 0.0, 0.5, 0.5]])
    out = roi_features(feats, rois, 4)
    # bin (i, j) covers the box's (i, j) quarter: centres at x = 10 + (j + 0.5) * 5 (image 1 negated)
    assert torch.allclose(out[0, 0, 0], -torch.tensor([12.5, 17.5, 22.5, 27.5]), atol=1e-4)
    assert torch.allclose(out[0, 1, :, 0], -torch.tensor([11.25, 13.75, 16.25, 18.75]), atol=1e-4)
    assert torch.allclose(out[1, 0, 0], torch.tensor([2.5, 7.5, 12.5, 17.5]), atol=1e-4)
    norm = FeatureNorm(2)
    norm.set([1.0, -2.0], [2.0, 4.0])
    x = torch.ones(1, 2, 1, 1)
    assert torch.allclose(norm(x)[0, :, 0, 0], torch.tensor([0.0, 0.75]))
    m = build_model("roialign", 2, (np.array([1.0, 2.0]), np.array([3.0, 4.0])), hidden=8, roi_size=7, mask_size=28)
    assert m.norm.mean.tolist() == [1.0, 2.0] and m.norm.std.tolist() == [3.0, 4.0]
    assert m(feats, rois).shape == (2, 3, 28, 28) and m.norm_conv is m.convs[0][0]
    with pytest.raises(ValueError, match="power of 2"):
        RoiAlignDecoder(2, roi_size=7, mask_size=21)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("unet", 2)
    fresh = build_model("roialign", 2, hidden=8, roi_size=7, mask_size=28)
    state = {k: v for k, v in m.state_dict().items() if not k.startswith("norm.")}
    load_decoder_state(fresh, state)                    # an old checkpoint without the normalization
    assert fresh.norm.mean.tolist() == [0.0, 0.0] and torch.equal(fresh.convs[1][0].weight, m.convs[1][0].weight)
    # the global decoder's ROI channels on a 4x8 map: inside flag, x and y relative to the ROI, its size
    ch = GlobalContextDecoder.roi_channels(torch.tensor([[0.0, 0.25, 0.5, 0.75, 1.0]]), (4, 8), torch.float32)[0]
    assert ch[0].tolist() == [[0] * 8, [0] * 8, [0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0]]
    assert ch[1, 0].tolist() == pytest.approx([-1.75, -1.25, -0.75, -0.25, 0.25, 0.75, 1.25, 1.75], abs=1e-6)
    assert ch[2, :, 0].tolist() == pytest.approx([-2.5, -1.5, -0.5, 0.5], abs=1e-6)
    assert torch.allclose(ch[3], torch.full((4, 8), 0.5)) and torch.allclose(ch[4], torch.full((4, 8), 0.5))
    far = GlobalContextDecoder.roi_channels(torch.tensor([[0.0, 0.9, 0.9, 0.95, 0.95]]), (4, 8), torch.float32)[0]
    assert far[1].min() == -4 and far[2].min() == -4                       # clamped to +-4


# ---- losses -------------------------------------------------------------------------------------
def test_dice_focal_and_boundary_terms_by_hand():
    from roiseg.training.losses import LossConfig, SegLoss, boundary_map
    t = torch.tensor([[[0, 1], [1, 2]]])
    logits = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.5, 0.0]], [[0.0, 0.0], [0.0, 3.0]]]])
    p = logits.softmax(1)
    ce = F.cross_entropy(logits, t, reduction="none")
    dice_only = SegLoss(LossConfig(None, 1.0, (1,), 0.0, 0.0), 3)(logits, t)
    g = (t == 1).float()
    want_dice = 1 - (2 * (p[:, 1] * g).sum() + 1) / (p[:, 1].sum() + g.sum() + 1)
    assert dice_only["dice"].item() == pytest.approx(want_dice.item(), rel=1e-6)
    assert dice_only["loss"].item() == pytest.approx(ce.mean().item() + want_dice.item(), rel=1e-6)
    both = SegLoss(LossConfig(None, 0.5, (1, 2), 0.0, 0.0), 3)(logits, t)
    g2 = (t == 2).float()
    d2 = 1 - (2 * (p[:, 2] * g2).sum() + 1) / (p[:, 2].sum() + g2.sum() + 1)
    assert both["dice"].item() == pytest.approx(((want_dice + d2) / 2).item(), rel=1e-6)
    focal = SegLoss(LossConfig(None, 0.0, (1,), 2.0, 0.0), 3)(logits, t)
    pt = torch.exp(-ce)
    assert focal["loss"].item() == pytest.approx((ce * (1 - pt) ** 2).mean().item(), rel=1e-6)
    assert boundary_map(torch.tensor([[[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]]), 3).int().tolist() == \
        [[[0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 0]]]          # a pixel whose 3x3 neighbours all agree is inside
    edge = boundary_map(t, 3)
    bnd = SegLoss(LossConfig(None, 0.0, (1,), 0.0, 2.0), 3)(logits, t)
    assert bnd["boundary"].item() == pytest.approx((ce * edge).sum().item() / edge.sum().item(), rel=1e-6)
    assert bnd["loss"].item() == pytest.approx(ce.mean().item() + 2 * bnd["boundary"].item(), rel=1e-6)
    two = SegLoss(LossConfig(None, 1.0, (1, 2), 0.0, 0.0), 2)(logits[:, :2], torch.where(t == 2, 0, t))
    assert "dice" in two and two["dice"].item() > 0               # class 2 is skipped, not an error


# ---- checkpoint files ---------------------------------------------------------------------------
def _at(ck, epoch: int, miou: float):
    """A checkpoint record as another epoch's, with another mIoU (what its file name shows)."""
    import dataclasses
    return dataclasses.replace(ck, epoch=epoch, metrics={**ck.metrics, "mIoU": miou})


def test_checkpoint_names_digests_and_files(trained, tmp_path):
    from roiseg.modeling import checkpoint as C
    assert C.checkpoint_name(7, (640, 480), 0.42609) == "checkpoint_epoch_0007_640x480_4260.pth"
    assert C.checkpoint_name(12, (640, 640), 0.99999) == "checkpoint_epoch_0012_640x640_9999.pth"
    base = {"model": {"w": torch.ones(3)}, "opt": [torch.zeros(2, dtype=torch.int64)], "x": 1}
    d = C.tensor_digest(base)
    for changed in ({"model": {"w": torch.ones(3) * 2}}, {"model": {"v": torch.ones(3)}},
                    {"model": {"w": torch.ones(3, dtype=torch.float64)}}, {"model": {"w": torch.ones(1, 3)}},
                    {"opt": [torch.zeros(2, dtype=torch.int64), torch.zeros(1)]}):
        assert C.tensor_digest({**base, **changed}) != d, changed
    assert C.tensor_digest({**base, "checksum": "x"}) == d and C.tensor_digest({**base, "x": 2}) == d
    rec = C.load_checkpoint(trained / "best.pth")
    path = C.save_checkpoint(_at(rec, 3, 0.5), tmp_path)
    assert path.name == f"checkpoint_epoch_0003_{rec.input_hw[0]}x{rec.input_hw[1]}_5000.pth"
    ck = C.load_checkpoint(path)
    assert ck.checksum == C.tensor_digest(_at(rec, 3, 0.5).to_dict()) and ck.epoch == 3
    assert all(torch.equal(ck.model[k], v) for k, v in rec.model.items())
    C.save_checkpoint(_at(rec, 10, 0.25), tmp_path)
    assert [e for e, _ in C.list_checkpoints(tmp_path)] == [3, 10]
    assert C.find_checkpoint(tmp_path).name.startswith("checkpoint_epoch_0010")
    assert C.find_checkpoint(tmp_path, 3) == path
    with pytest.raises(C.CheckpointError, match="epochs: 3, 10"):
        C.find_checkpoint(tmp_path, 4)
    C.save_checkpoint(_at(rec, 10, 0.75), tmp_path)
    with pytest.raises(C.CheckpointError, match="several checkpoints"):
        C.find_checkpoint(tmp_path, 10)
    with pytest.raises(C.CheckpointError, match="no checkpoint_epoch"):
        C.find_checkpoint(tmp_path / "none")
    alias = C.publish_alias(path, tmp_path / "best.pth")
    assert alias.read_bytes() == path.read_bytes()
    torch.save({"nomodel": 1}, tmp_path / "x.pth")
    with pytest.raises(C.CheckpointError, match="no model state"):
        C.load_checkpoint(tmp_path / "x.pth")
    with pytest.raises(C.CheckpointError, match="not found"):
        C.load_checkpoint(tmp_path / "missing.pth")


def test_decoder_rules_on_a_store(stores):
    import dataclasses

    from roiseg.data.store import FeatureStore, StoreError
    from roiseg.data.store_meta import FINGERPRINT_KEYS
    from roiseg.modeling.checkpoint import check_decoder_on_store
    meta = FeatureStore(stores["val"]).meta
    fp = meta.fingerprint()
    assert sorted(fp) == sorted(FINGERPRINT_KEYS) and fp["feature_name"] == meta.source.feature_name
    sparse = dataclasses.replace(meta, sparse_margin=0.2)
    check_decoder_on_store("global", fp, meta, "x")            # dense: fine
    check_decoder_on_store("roialign", fp, sparse, "x")
    with pytest.raises(Exception, match="ROI-sparse"):
        check_decoder_on_store("global", fp, sparse, "x")
    padded = dataclasses.replace(meta, source=dataclasses.replace(meta.source, roi_padding=0.3))
    with pytest.raises(StoreError, match=f"roi_padding: checkpoint has {meta.source.roi_padding!r}, store has 0.3"):
        check_decoder_on_store("roialign", fp, padded, "x")


# ---- the evaluator, against a loop written from the metric definitions -------------------------------
def _reference(store, index, roi_ids, probs, k):
    """Per ROI, the definitions: 3-class argmax labels pasted at input resolution inside the
    padded ROI's window vs the store's targets; class-1 probability pasted at original resolution,
    > 0.5, IoU with the full GT mask; the GT box filled as the mask."""
    from roiseg.modeling.decoders import paste_masks
    h, w = index.input_hw
    t = index.tables
    from faster_coco_eval.core.mask import rleToBoundaryCV
    inter, union = np.zeros(k), np.zeros(k)
    ious, boxes, areas, bious = [], [], [], []
    for r, p in zip(roi_ids, probs):
        i, local = int(t["roi_image"][r]), int(t["roi_inst"][r])
        box = normalized_to_pixel(index.padded_input[r], w, h)
        x0, y0, x1, y1 = native_crop(box, h, w)
        lab = paste_masks(p[None], torch.tensor(box - [x0, y0, x0, y0], dtype=torch.float32)[None],
                          y1 - y0, x1 - x0)[0].argmax(0).numpy()
        gt = roi_target(store.masks(i), local, box)
        if k == 2:
            gt = np.where(gt == 2, 0, gt)
        for c in range(k):
            inter[c] += ((lab == c) & (gt == c)).sum()
            union[c] += ((lab == c) | (gt == c)).sum()
        oh, ow = (int(v) for v in t["orig_hw"][i])
        rle = store.gt_rles(i)[local]
        rle = {"size": rle["size"], "counts": rle["counts"].encode()}
        full = mask_utils.decode(rle).astype(bool)
        ob = t["roi_padded"][r] * [ow, oh, ow, oh]
        a0, b0, a1, b1 = native_crop(ob, oh, ow)
        fg = paste_masks(p[None, 1:2], torch.tensor(ob - [a0, b0, a0, b0], dtype=torch.float32)[None], b1 - b0,
                         a1 - a0, fill_background=False)[0, 0].numpy() > 0.5
        pred = np.zeros_like(full)
        pred[b0:b1, a0:a1] = fg
        u = (pred | full).sum()
        ious.append((pred & full).sum() / u if u else 1.0)
        band = lambda m: mask_utils.decode(rleToBoundaryCV(mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))))  # noqa: E731
        pb_, gb_ = band(pred).astype(bool), band(full).astype(bool)
        bu = (pb_ | gb_).sum()
        bious.append((pb_ & gb_).sum() / bu if bu else 1.0)
        pb = normalized_to_pixel(t["roi_box"][r], ow, oh)
        bx0, bx1 = pixel_center_span(pb[0], pb[2], ow)
        by0, by1 = pixel_center_span(pb[1], pb[3], oh)
        filled = np.zeros_like(full)
        filled[by0:by1, bx0:bx1] = True
        boxes.append((filled & full).sum() / (filled | full).sum())
        areas.append(full.sum())
    return inter, union, np.array(ious), np.array(boxes), np.array(areas), np.array(bious)


@pytest.mark.parametrize("classes,budget", [(3, None), (3, 5000), (2, None)])
def test_evaluator_equals_the_definitions(stores, classes, budget):
    from roiseg.data.store import FeatureStore
    from roiseg.evaluation.evaluator import MEDIUM, SMALL, RoiEvaluator
    from roiseg.loader.sources import CacheIndex
    index = CacheIndex(stores["val"])
    store = FeatureStore(stores["val"])
    n = int(index.roi_start[-1])
    g = torch.Generator().manual_seed(classes)
    probs = (torch.randn(n, classes, 14, 14, generator=g) * 3).softmax(1)
    ev = RoiEvaluator(index, store, classes, "cpu", pixel_budget=budget).keep_records(True)
    ids = np.arange(n)
    ev.process(ids[: n // 2], probs[: n // 2])
    ev.process(ids[n // 2:], probs[n // 2:])
    ev.process(np.zeros(0, np.int64), probs[:0])
    res = ev.result()
    inter, union, ious, boxes, areas, bious = _reference(store, index, ids, probs, classes)
    assert [res["iou"][c] for c in list(res["iou"])] == pytest.approx(list(inter / np.maximum(union, 1)), abs=1e-9)
    assert res["mIoU"] == pytest.approx(float(np.mean(inter / np.maximum(union, 1))), abs=1e-9)
    assert res["instance_mIoU"] == pytest.approx(ious.mean(), abs=1e-9)
    assert res["box_instance_mIoU"] == pytest.approx(boxes.mean(), abs=1e-9)
    assert res["boundary_IoU"] == pytest.approx(bious.mean(), abs=1e-9)
    assert 0 < res["boundary_IoU"] < res["instance_mIoU"]           # the outline is the hard part
    subsets = {"small": areas < SMALL, "medium": (areas >= SMALL) & (areas < MEDIUM), "large": areas >= MEDIUM,
               "overlapped": index.has_other[ids]}
    for name, sel in subsets.items():
        s = res["instance_subsets"][name]
        assert s["persons"] == int(sel.sum()), name
        if sel.any():
            assert s["instance_mIoU"] == pytest.approx(ious[sel].mean(), abs=1e-9), name
            assert s["box_mIoU"] == pytest.approx(boxes[sel].mean(), abs=1e-9), name
            assert s["boundary_IoU"] == pytest.approx(bious[sel].mean(), abs=1e-9), name
    assert res["instances"] == n and sorted(r["roi"] for r in res["per_roi"]) == ids.tolist()
    rec = {r["roi"]: r for r in res["per_roi"]}
    assert all(rec[i]["iou"] == pytest.approx(ious[i], abs=1e-9) for i in ids)
    assert all(rec[i]["biou"] == pytest.approx(bious[i], abs=1e-9) for i in ids)
    ev.reset()
    assert ev.result()["instances"] == 0 and ev.count.sum() == 0


def test_evaluator_helpers():
    from roiseg.evaluation.evaluator import _chunks, _valid, first_argmax
    x = torch.tensor([[[0.2, 0.5]], [[0.5, 0.5]], [[0.3, 0.1]]])[None].permute(0, 1, 2, 3)   # [1, 3, 1, 2]
    assert first_argmax(x).tolist() == [[[1, 0]]]                           # ties go to the first class
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 3, (4, 5, 6, 7), generator=g).float()
    assert torch.equal(first_argmax(r).long(), r.argmax(1))
    v = _valid(torch.tensor([[2, 3], [0, 1]]), 3, 4)
    assert v[0].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]] and not v[1].any()
    sizes = np.array([[10, 10], [2, 2], [30, 30], [3, 3], [10, 10]])
    groups = list(_chunks(sizes, 300))
    assert sorted(np.concatenate(groups).tolist()) == list(range(5))
    for grp in groups:
        hm, wm = sizes[grp, 0].max(), sizes[grp, 1].max()
        assert len(grp) == 1 or len(grp) * hm * wm <= 300
    flat = np.concatenate(groups)
    areas = sizes[flat].prod(1)
    assert (np.diff(areas) >= 0).all()                                      # smallest windows first
    assert [len(gr) for gr in _chunks(sizes, 10 ** 9)] == [5]


# ---- geometry, by hand ------------------------------------------------------------------------------
def test_box_helpers_by_hand():
    from roiseg.common import geometry as G
    xyxy = np.array([[10.0, 20.0, 50.0, 100.0]])
    cx = G.xyxy_to_cxcywh(xyxy)
    assert cx.tolist() == [[30.0, 60.0, 40.0, 80.0]] and G.cxcywh_to_xyxy(cx).tolist() == xyxy.tolist()
    assert G.as_xyxy([[30, 60, 40, 80]], "cxcywh").tolist() == xyxy.tolist()
    same = G.as_xyxy(xyxy, "xyxy")
    assert same.tolist() == xyxy.tolist() and same is not xyxy and same.dtype == np.float64
    with pytest.raises(ValueError, match="unknown box format 'xywh'"):
        G.as_xyxy(xyxy, "xywh")
    assert G.coco_xywh_to_xyxy([5, 6, 7, 8]).tolist() == [5.0, 6.0, 12.0, 14.0]
    clipped = G.clip_xyxy(np.array([[-5.0, -6.0, 120.0, 90.0], [10.0, 20.0, 30.0, 40.0]]), 100, 80)
    assert clipped.tolist() == [[0.0, 0.0, 100.0, 80.0], [10.0, 20.0, 30.0, 40.0]]
    assert G.pixel_to_normalized([[10, 20, 50, 60]], 100, 200).tolist() == [[0.1, 0.1, 0.5, 0.3]]
    assert np.allclose(G.normalized_to_pixel([[0.1, 0.1, 0.5, 0.3]], 100, 200), [[10, 20, 50, 60]])
    assert G.pad_box(np.array([0.2, 0.4, 0.6, 0.5]), 0.25).tolist() == pytest.approx([0.1, 0.375, 0.7, 0.525])
    assert G.pad_box(np.array([0.0, 0.0, 0.9, 1.0]), 0.5).tolist() == [0.0, 0.0, 1.0, 1.0]
    rect = np.array([0.0, 0.25, 1.0, 0.75])
    lo, hi = rect[[0, 1, 0, 1]], rect[[2, 3, 2, 3]]
    assert G.pad_box(np.array([0.1, 0.3, 0.5, 0.7]), 0.25, lo, hi).tolist() == pytest.approx([0.0, 0.25, 0.6, 0.75])
    t = G.pad_box(torch.tensor([[0.2, 0.4, 0.6, 0.5]]), 0.25, 0.0, 1.0)
    assert torch.allclose(t, torch.tensor([[0.1, 0.375, 0.7, 0.525]]))
    assert G.pixel_center_span(0.4, 3.6, 10) == (0, 4) and G.pixel_center_span(0.6, 3.4, 10) == (1, 3)
    assert G.pixel_center_span(-5, 50, 10) == (0, 10) and G.pixel_center_span(5.0, 4.0, 10) == (5, 5)


def test_resize_policies_by_hand():
    from roiseg.common.geometry import ResizePolicy, content_rect
    lb = ResizePolicy(640, 640, "letterbox")
    assert lb.transform(320, 640) == (1.0, 1.0, 160, 0) and lb.resized_size(320, 640) == (320, 640)
    assert lb.transform(1280, 640) == (0.5, 0.5, 0, 160) and lb.resized_size(1280, 640) == (640, 320)
    st = ResizePolicy(480, 640)
    assert st.transform(320, 240) == (2.0, 2.0, 0.0, 0.0) and st.resized_size(100, 100) == (640, 480)
    assert content_rect(lb, 1280, 640).tolist() == [0.0, 0.25, 1.0, 0.75]
    assert content_rect(st, 100, 300).tolist() == [0.0, 0.0, 1.0, 1.0]
    box = np.array([[0.5, 0.5, 1.0, 1.0]])
    assert lb.norm_to_input_norm(box, 1280, 640).tolist() == [[0.5, 0.5, 1.0, 0.75]]
    assert np.allclose(lb.input_norm_to_norm(lb.norm_to_input_norm(box, 333, 777), 333, 777), box)
    assert lb.to_dict() == {"input_h": 640, "input_w": 640, "mode": "letterbox"}


# ---- rasterization ---------------------------------------------------------------------------------
def test_rasterized_targets_by_hand():
    from roiseg.data.rasterize import (
        labels_from_masks,
        masks_to_input_frame,
        native_windows,
        rles_to_input_frame_packed,
        sample_masks,
    )
    m = np.zeros((2, 4, 6), bool)
    m[0, 1:3, 1:4] = True
    m[1, 2:4, 3:6] = True
    lab = labels_from_masks(m, 0)
    assert lab.tolist() == [[0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 2, 2], [0, 0, 0, 2, 2, 2]]
    assert labels_from_masks(m[:1], 0).max() == 1
    s = sample_masks(m, (0, 0, 6, 4), 2, 3)          # cell centres at x 1, 3, 5 and y 1, 3
    assert s[0].tolist() == [[True, True, False], [False, False, False]]
    assert not sample_masks(m, (-8, -8, -2, -2), 2, 2).any() and not sample_masks(m, (7, 5, 9, 9), 2, 2).any()
    w = native_windows([[0.4, 0.6, 3.6, 3.4], [-3, -3, 100, 100]], [(4, 6), (5, 7)])
    assert w.tolist() == [[0, 1, 4, 3], [0, 0, 7, 5]]      # pixel centres 0.5 .. 3.5 lie in [0.4, 3.6)
    assert native_windows(np.zeros((0, 4)), (4, 4)).shape == (0, 4)
    policy = ResizePolicy(8, 12)
    rles = [mask_utils.encode(np.asfortranarray(x.astype(np.uint8))) for x in m]
    packed = rles_to_input_frame_packed(rles, policy)
    frame = masks_to_input_frame(m, policy)
    assert frame.shape == (2, 8, 12) and np.array_equal(np.unpackbits(packed, axis=-1, count=12).astype(bool), frame)
    assert frame[0].sum() == m[0].sum() * 4                 # 2x in each axis, nearest
    lb = ResizePolicy(8, 12, "letterbox")                   # 4x6 -> 8x12 fills the frame: no bands
    assert np.array_equal(np.unpackbits(rles_to_input_frame_packed(rles, lb), axis=-1, count=12).astype(bool),
                          masks_to_input_frame(m, lb))
    tall = ResizePolicy(8, 16, "letterbox")                 # bands left and right
    got = np.unpackbits(rles_to_input_frame_packed(rles, tall), axis=-1, count=16).astype(bool)
    assert np.array_equal(got, masks_to_input_frame(m, tall)) and not got[:, :, :2].any()


# ---- sparse cells ----------------------------------------------------------------------------------
def test_readable_cells_one_person_and_mirrored():
    from roiseg.data.sparse import clamp_to_margin, readable_cells, zero_unreadable
    policy = ResizePolicy(640, 640)
    one = np.array([[0.25, 0.25, 0.5, 0.5]])
    keep = readable_cells(one, (640, 640), policy, 0.0, 0.0, (8, 8))
    assert keep.sum() > 0 and keep[2:4, 2:4].all() and not keep[6:, :].any() and not keep[:, 6:].any()
    mirrored = readable_cells(one, (640, 640), policy, 0.0, 0.0, (8, 8), mirrored=True)
    assert np.array_equal(mirrored, keep[:, ::-1])
    assert not readable_cells(np.zeros((0, 4)), (640, 640), policy, 0.2, 0.1, (8, 8)).any()
    wide = readable_cells(one, (640, 640), policy, 0.2, 0.1, (8, 8))
    assert wide.sum() > keep.sum() and (wide | keep).sum() == wide.sum()
    f = np.arange(2 * 8 * 8, dtype=np.float16).reshape(2, 8, 8) + 1
    z = zero_unreadable(f, keep)
    assert z.dtype == np.float16 and (z[:, keep] == f[:, keep]).all() and (z[:, ~keep] == 0).all()
    j = clamp_to_margin(np.array([[0.0, 0.3, 0.9, 0.45]]), one, 0.2)
    assert np.allclose(j, [[0.2, 0.3, 0.55, 0.45]])


# ---- the decoders' layout (what checkpoints hold) ----------------------------------------------------
def test_decoder_layouts():
    """The state-dict layout of each decoder, as the architecture is described: old checkpoints
    load only while it holds (1x1 conv to ``hidden``, 4 3x3 convs, a x2 up-stage per doubling down to
    16 channels, a 1x1 classifier; GroupNorm of min(32, C/4) groups)."""
    from roiseg.modeling.decoders import (
        GlobalContextDecoder,
        MeanShapePrior,
        RoiAlignDecoder,
        conv_gn_relu,
    )
    m = RoiAlignDecoder(16, hidden=32, roi_size=7, mask_size=28)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["convs.0.0.weight"] == (32, 16, 1, 1) and "convs.0.0.bias" not in shapes
    assert [shapes[f"convs.{i}.0.weight"] for i in range(1, 5)] == [(32, 32, 3, 3)] * 4 and "convs.5.0.weight" not in shapes
    assert shapes["upsample.0.weight"] == (32, 16, 2, 2) and shapes["upsample.2.0.weight"] == (16, 16, 3, 3)
    assert shapes["upsample.3.weight"] == (16, 16, 2, 2) and "upsample.6.0.weight" not in shapes
    assert shapes["classifier.weight"] == (3, 16, 1, 1) and m.num_classes == 3 and m.sampling_ratio == 2
    assert m.convs[1][1].num_groups == 8 and conv_gn_relu(4, 4)[1].num_groups == 1
    assert conv_gn_relu(64, 64)[1].num_groups == 16 and conv_gn_relu(256, 256)[1].num_groups == 32
    assert isinstance(conv_gn_relu(4, 4)[2], torch.nn.ReLU) and conv_gn_relu(4, 4, 5)[0].padding == (2, 2)
    assert RoiAlignDecoder(8, hidden=64, roi_size=14, mask_size=14).upsample.__len__() == 0
    x = torch.randn(1, 16, 20, 20)
    r = torch.tensor([[0.0, 0.1, 0.1, 0.6, 0.9]])
    assert m(x, r).shape == (1, 3, 28, 28)
    g = GlobalContextDecoder(16, hidden=8, mask_size=14, num_classes=2)
    gs = {k: tuple(v.shape) for k, v in g.state_dict().items()}
    assert gs["reduce.0.weight"] == (8, 16, 1, 1) and gs["enc1.0.0.weight"] == (8, 13, 3, 3)
    assert gs["enc2.0.0.weight"] == (16, 8, 3, 3) and gs["dec2.0.0.weight"] == (16, 32, 3, 3)
    assert gs["dec1.0.0.weight"] == (8, 16, 3, 3) and gs["classifier.weight"] == (2, 8, 1, 1)
    out = g(x, torch.tensor([[0.0, 0.1, 0.1, 0.6, 0.9], [0.0, 0.5, 0.5, 0.9, 0.9]]))
    assert out.shape == (2, 2, 14, 14) and not torch.allclose(out[0], out[1])     # the ROI matters
    g.set_norm_conv(torch.nn.Conv2d(16, 8, 1))
    assert g.norm_conv is g.reduce[0]
    m.set_norm_conv(torch.nn.Conv2d(16, 32, 1))
    assert m.norm_conv is m.convs[0][0] and m.convs[0][0].bias is not None
    p = MeanShapePrior(4, mask_size=6, num_classes=2)
    assert p.logits.shape == (2, 6, 6) and p.num_classes == 2 and p.norm.mean.shape == (4,)
    torch.nn.init.normal_(p.logits)
    y = p(torch.zeros(3, 4, 5, 5, dtype=torch.float64), torch.zeros(5, 5))
    assert y.shape == (5, 2, 6, 6) and y.dtype == torch.float64 and torch.allclose(y[4].float(), 50 * p.logits)


def test_roi_align_keeps_fp32_boxes_for_half_features():
    from torchvision.ops import roi_align

    from roiseg.modeling.decoders import roi_align_fp32_boxes
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 3, 16, 16, generator=g)
    boxes = torch.tensor([[1.0, 3.3, 2.1, 11.7, 9.9], [0.0, 0.0, 0.0, 16.0, 16.0]])
    ref = roi_align(f.half().float(), boxes, 5, 1.0, 2, True)
    got = roi_align_fp32_boxes(f.half(), boxes, 5)
    assert got.dtype == torch.float16 and torch.allclose(got.float(), ref, atol=2e-3)
    assert torch.allclose(roi_align_fp32_boxes(f, boxes.double(), 5), roi_align(f, boxes, 5, 1.0, 2, True))
    assert torch.allclose(roi_align_fp32_boxes(f, boxes, 3, sampling_ratio=1), roi_align(f, boxes, 3, 1.0, 1, True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = roi_align_fp32_boxes(f.bfloat16(), boxes, 5)
    assert torch.allclose(auto.float(), roi_align(f.bfloat16().float(), boxes, 5, 1.0, 2, True), atol=3e-2)


# ---- sampling, exactly --------------------------------------------------------------------------------
def test_jitter_formula_with_the_same_draws():
    """centre += N(0, jitter) x size, size x= exp(N(0, jitter_scale)), clipped to [0, 1]."""
    from roiseg.loader.sampling import jitter_person_boxes
    b = np.array([[0.2, 0.3, 0.4, 0.7], [0.5, 0.1, 0.9, 0.3]])
    got = jitter_person_boxes(b, 0.1, 0.2, np.random.default_rng(4))
    rng = np.random.default_rng(4)
    wh = b[:, 2:] - b[:, :2]
    c = (b[:, :2] + b[:, 2:]) / 2 + rng.normal(0, 0.1, wh.shape) * wh
    half = wh * np.exp(rng.normal(0, 0.2, wh.shape)) / 2
    assert np.allclose(got, np.concatenate([c - half, c + half], 1).clip(0, 1))
    one = jitter_person_boxes(b[:1], 0.1, 0.0, np.random.default_rng(0))
    assert not np.allclose(one, b[:1]) and np.allclose(one[0, 2:] - one[0, :2], wh[0])   # scale sigma 0: size kept
    only_scale = jitter_person_boxes(b[:1], 0.0, 0.3, np.random.default_rng(0))
    assert np.allclose((only_scale[0, :2] + only_scale[0, 2:]) / 2, (b[0, :2] + b[0, 2:]) / 2)
    assert jitter_person_boxes(np.zeros((0, 4)), 0.1, 0.1, np.random.default_rng(0)).shape == (0, 4)


def test_train_rois_selection_and_flips():
    from roiseg.loader.sampling import RoiSampling, roi_copies, train_rois
    policy = ResizePolicy(100, 100)
    padded = np.array([[0.0, 0.0, 0.08, 0.5], [0.0, 0.0, 0.5, 0.08], [0.0, 0.0, 0.5, 0.5]])
    keep, _ = roi_copies(padded, np.zeros(3, bool), policy, RoiSampling(min_roi_px=8.0))
    assert keep.tolist() == [0, 1, 2]                       # exactly 8 px passes (>=)
    person = np.array([[0.1, 0.1, 0.3, 0.3]] * 5)
    cfg = RoiSampling(jitter=0, jitter_scale=0, samples_per_roi=1, max_rois_per_image=5)
    s = train_rois(person, pad_box(person, 0.1), np.zeros(5, bool), (100, 100), policy, 0.1, cfg,
                   np.random.default_rng(0))
    assert sorted(s.local.tolist()) == [0, 1, 2, 3, 4]        # exactly the cap: every ROI, no draw
    cfg = RoiSampling(jitter=0, jitter_scale=0, samples_per_roi=1, max_rois_per_image=3)
    picks = {tuple(train_rois(person, pad_box(person, 0.1), np.zeros(5, bool), (100, 100), policy, 0.1, cfg,
                              np.random.default_rng(k)).local.tolist()) for k in range(30)}
    assert all(len(set(p)) == 3 and list(p) == sorted(p) for p in picks) and len(picks) > 3
    never = [train_rois(person[:1], pad_box(person[:1], 0.1), np.zeros(1, bool), (100, 100), policy, 0.1,
                        RoiSampling(hflip=0.0), np.random.default_rng(k)).flip for k in range(50)]
    always = [train_rois(person[:1], pad_box(person[:1], 0.1), np.zeros(1, bool), (100, 100), policy, 0.1,
                         RoiSampling(hflip=1.0), np.random.default_rng(k)).flip for k in range(50)]
    assert not any(never) and all(always)
    # the hflip draw comes after the jitter draws: with hflip off the boxes equal an hflip run's
    a = train_rois(person[:1], pad_box(person[:1], 0.1), np.zeros(1, bool), (100, 100), policy, 0.1,
                   RoiSampling(), np.random.default_rng(9))
    b = train_rois(person[:1], pad_box(person[:1], 0.1), np.zeros(1, bool), (100, 100), policy, 0.1,
                   RoiSampling(hflip=0.5), np.random.default_rng(9))
    assert np.array_equal(a.boxes, b.boxes)


def test_rois_with_others_per_image_and_per_axis():
    from roiseg.loader.sampling import rois_with_others
    boxes = np.array([[0.0, 0.0, 0.2, 0.2], [0.0, 0.3, 0.2, 0.5],           # image 0: apart in y only
                      [0.5, 0.5, 0.6, 0.6],                                 # image 1: alone
                      [0.0, 0.0, 0.4, 0.4], [0.3, 0.3, 0.5, 0.5], [0.9, 0.0, 1.0, 0.1]])   # image 2
    padded = boxes.copy()
    padded[1] = [0.0, 0.19, 0.2, 0.5]                                       # grows into box 0 in y
    out = rois_with_others(boxes, padded, np.array([0, 2, 3, 6]))
    assert out.tolist() == [False, True, False, True, True, False]


# ---- targets on a grid -----------------------------------------------------------------------------
def test_target_grid_cell_centres():
    from roiseg.loader.targets import _grid
    ys, xs = _grid(torch.tensor([[2.0, 10.0, 12.0, 14.0]]), 2, 5)
    assert xs.tolist() == [[3, 5, 7, 9, 11]] and ys.tolist() == [[11, 13]]
    ys, xs = _grid(torch.tensor([[-4.0, -1.0, 0.0, 3.0]]), 2, 2)
    assert xs.tolist() == [[-3, -1]] and ys.tolist() == [[0, 2]]


# ---- checkpoints: messages and what a decoder is loaded from -----------------------------------------
def test_load_failure_words():
    from roiseg.modeling.checkpoint import _load_failure
    assert "other than tensors" in _load_failure(RuntimeError("Weights only load failed ... weights_only=False"))
    assert "other than tensors" in _load_failure(Exception("Unsupported global: GLOBAL x.Y"))
    for text in ("PytorchStreamReader failed reading zip archive", "failed finding central directory",
                 "invalid load key, magic number mismatch", "Ran out of input (EOF)"):
        assert "damaged or truncated" in _load_failure(RuntimeError(text)), text
    assert _load_failure(ValueError("odd")) == "not a checkpoint of this project, or damaged (ValueError)"


def test_checkpoint_errors_and_decoder_loading(trained, tmp_path, monkeypatch):
    from roiseg.modeling import checkpoint as C
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(C.CheckpointError, match=r"is empty \(0 bytes\)"):
        C.load_checkpoint(tmp_path / "empty.pth")
    (tmp_path / "one.pth").write_bytes(b"\x01\xfe\xff")
    with pytest.raises(C.CheckpointError, match="cannot load checkpoint .*one.pth"):
        C.load_checkpoint(tmp_path / "one.pth")
    (tmp_path / "notes.pth").write_text("my notes")
    with pytest.raises(C.CheckpointError, match="not a checkpoint of this project: it is a text file"):
        C.load_checkpoint(tmp_path / "notes.pth")
    raw = torch.load(trained / "best.pth", weights_only=True)      # the file as stored: a dict
    raw["model"][next(iter(raw["model"]))] += 1
    torch.save(raw, tmp_path / "bad.pth")
    with pytest.raises(C.CheckpointError, match="is corrupted"):
        C.load_checkpoint(tmp_path / "bad.pth")
    del raw["checksum"]
    torch.save(raw, tmp_path / "unsummed.pth")                            # without a checksum: accepted
    assert C.load_checkpoint(tmp_path / "unsummed.pth").checksum is None
    raw["format"] = "roiseg-checkpoint-v0"
    torch.save(raw, tmp_path / "other.pth")
    with pytest.raises(C.CheckpointError, match="not a checkpoint this version reads.*retrain"):
        C.load_checkpoint(tmp_path / "other.pth")
    assert C.load_checkpoint(trained / "best.pth", map_location="cpu").epoch == 1
    ck = C.load_checkpoint(trained / "best.pth")
    model, source = C.decoder_from_checkpoint(trained / "best.pth")
    raw_model, _ = C.decoder_from_checkpoint(ck, use_ema=False)
    assert source == ck.train_meta.source and not model.training
    ema = {k[len("module."):]: v for k, v in ck.ema.items() if k.startswith("module.")}
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, ck.model[k]) for k, v in raw_model.state_dict().items())
    assert any(not torch.equal(ema[k], ck.model[k]) for k in ema)
    import dataclasses
    m3, _ = C.decoder_from_checkpoint(dataclasses.replace(ck, ema=None))
    assert all(torch.equal(v, ck.model[k]) for k, v in m3.state_dict().items())

    def full(obj, f, *a, **k):
        raise OSError(28, "No space left on device", str(f))
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(C.CheckpointError, match=r"could not write checkpoint .*\(No space left on device\); "
                                                r"earlier checkpoints in .* are kept"):
        C.save_checkpoint(_at(ck, 1, 0.5), tmp_path / "deep" / "er")
    monkeypatch.undo()
    assert C.save_checkpoint(_at(ck, 1, 0.5), tmp_path / "deep" / "er").is_file()   # parents made
    monkeypatch.setattr("os.link", lambda *a: (_ for _ in ()).throw(OSError("no hard links here")))
    copy = C.publish_alias(trained / "best.pth", tmp_path / "last.pth")
    assert copy.read_bytes() == (trained / "best.pth").read_bytes() and not copy.is_symlink()


def test_latest_checkpoint_is_the_highest_epoch(trained, tmp_path):
    from roiseg.modeling import checkpoint as C
    rec = C.load_checkpoint(trained / "best.pth")
    for e in (2, 10, 3):
        C.save_checkpoint(_at(rec, e, 0.5), tmp_path)
    assert C.find_checkpoint(tmp_path).name.startswith("checkpoint_epoch_0010")
    C.save_checkpoint(_at(rec, 10, 0.6), tmp_path)
    with pytest.raises(C.CheckpointError, match=r"several checkpoints for epoch 10 in .*: checkpoint_epoch_0010.*, "
                                                r"checkpoint_epoch_0010.* - pass --checkpoint PATH"):
        C.find_checkpoint(tmp_path)
    assert C.list_checkpoints(tmp_path / "nothing") == []


# ---- the evaluator's batches and records ------------------------------------------------------------
@pytest.mark.parametrize("resident", ["off", "cpu"])
def test_val_batches_cover_every_roi_in_store_order(stores, resident):
    from roiseg.data.store import FeatureStore
    from roiseg.evaluation.evaluator import val_batches
    from roiseg.loader.sources import CacheIndex
    index = CacheIndex(stores["val"])
    store = FeatureStore(stores["val"])
    h, w = index.input_hw
    batches = list(val_batches(index, torch.device("cpu"), 3, 14, resident=resident))
    assert len(batches) == -(-len(index.images) // 3)
    ids = torch.cat([b["roi_ids"] for b in batches]).tolist()
    assert ids == list(range(int(index.roi_start[-1])))
    for b in batches:
        assert b["features"].shape[0] == len(b["images"]) and b["targets"].shape[1:] == (14, 14)
        for r, roi, tgt in zip(b["roi_ids"].tolist(), b["rois"], b["targets"]):
            assert torch.allclose(roi[1:].double(), torch.from_numpy(index.padded_input[r]), atol=1e-6)
            i = int(index.tables["roi_image"][r])
            assert int(b["images"][int(roi[0])]) == i
            ref = roi_target(store.masks(i), int(index.tables["roi_inst"][r]),
                             normalized_to_pixel(index.padded_input[r], w, h), (14, 14))
            assert np.array_equal(tgt.numpy(), ref)


def test_run_evaluator_feeds_softmax_and_zeroed_features(stores):
    from roiseg.data.store import FeatureStore
    from roiseg.evaluation.evaluator import RoiEvaluator, run_evaluator, val_batches
    from roiseg.loader.sources import CacheIndex
    index = CacheIndex(stores["val"])
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, scored=False):
            super().__init__()
            self.scored = scored

        def forward(self, f, rois, with_scores=False):
            seen.append((f.dtype, float(f.abs().sum()), self.training, with_scores))
            logits = torch.zeros(len(rois), 3, 14, 14).index_fill_(1, torch.tensor([1]), 5.0)
            scores = rois[:, 3] - rois[:, 1] if self.scored else None      # a score: the box width
            return (logits, scores) if with_scores else logits
    spy = Spy().train()
    ev = RoiEvaluator(index, FeatureStore(stores["val"]), 3, "cpu")
    out = run_evaluator(spy, val_batches(index, torch.device("cpu"), 4, 14), ev, zero_features=True)
    assert out is ev and spy.training and all(s[1] == 0 and not s[2] and s[0] == torch.float32 for s in seen)
    assert ev.result()["iou"]["background"] < 0.5 and ev.result()["instances"] == int(index.roi_start[-1])
    assert -1 <= ev.result()["score_rank_corr"] <= 1     # without a head: the masks' certainty
    seen.clear()
    run_evaluator(spy, val_batches(index, torch.device("cpu"), 4, 14), ev)
    assert all(s[1] > 0 and s[3] for s in seen)
    # with a score head: the predicted scores are paired with the true IoUs of the same ROIs
    ev.keep_records(True)
    run_evaluator(Spy(scored=True), val_batches(index, torch.device("cpu"), 4, 14), ev)
    res = ev.result()
    recs = res["per_roi"]
    width = {r: float(index.padded_input[r][2] - index.padded_input[r][0]) for r in range(int(index.roi_start[-1]))}
    assert all(rec["score"] == pytest.approx(width[rec["roi"]], abs=1e-6) for rec in recs)
    pred, true = np.array([r["score"] for r in recs]), np.array([r["iou"] for r in recs])
    assert res["score_mae"] == pytest.approx(np.abs(pred - true).mean())
    assert -1 <= res["score_rank_corr"] <= 1


def test_evaluator_records_coco_detections_and_single_rois(stores):
    from roiseg.data.coco import window_rle
    from roiseg.data.store import FeatureStore
    from roiseg.evaluation.evaluator import RoiEvaluator
    from roiseg.loader.sources import CacheIndex
    from roiseg.modeling.decoders import mask_certainty, paste_masks
    index = CacheIndex(stores["val"])
    store = FeatureStore(stores["val"])
    t = index.tables
    n = int(index.roi_start[-1])
    g = torch.Generator().manual_seed(7)
    probs = (torch.randn(n, 3, 14, 14, generator=g) * 3).softmax(1)
    ev = RoiEvaluator(index, store, 3, "cpu", coco_eval=True).keep_records()
    assert ev.budget == 1 << 22
    ev.process(torch.arange(n), probs)
    res = ev.result()
    inter, union, ious, boxes, areas, bious = _reference(store, index, np.arange(n), probs, 3)
    assert len(ev.coco_dets) == n and "coco_mask_AP" in res and 0 <= res["coco_mask_AP"]["AP"] <= 1
    # boundary AP matches on min(mask IoU, boundary IoU): never above mask AP
    assert set(res["coco_boundary_AP"]) == set(res["coco_mask_AP"])
    assert all(res["coco_boundary_AP"][k] <= res["coco_mask_AP"][k] + 1e-9 for k in ("AP", "AP50", "AP75"))
    dets = {(d["image_id"], d["segmentation"]["counts"]): d for d in ev.coco_dets}
    for r in range(n):
        rec = res["per_roi"][[x["roi"] for x in res["per_roi"]].index(r)]
        i = int(t["roi_image"][r])
        assert rec["image"] == i and rec["area"] == pytest.approx(areas[r]) and rec["box_iou"] == pytest.approx(boxes[r])
        assert rec["has_other"] == bool(index.has_other[r]) and len(rec["iu"]) == 2 and len(rec["iu"][0]) == 3
        oh, ow = (int(v) for v in t["orig_hw"][i])
        ob = t["roi_padded"][r] * [ow, oh, ow, oh]
        a0, b0, a1, b1 = native_crop(ob, oh, ow)
        fg = paste_masks(probs[r:r + 1, 1:2], torch.tensor(ob - [a0, b0, a0, b0], dtype=torch.float32)[None],
                         b1 - b0, a1 - a0, fill_background=False)[0, 0].numpy()
        m = fg > 0.5
        d = dets[(int(t["image_id"][i]), window_rle(m, (a0, b0, a1, b1), (oh, ow))["counts"])]
        assert d["score"] == pytest.approx(float(mask_certainty(probs[r:r + 1, 1])[0]), abs=1e-6)
    # one ROI alone: every subset it belongs to has exactly one person
    one = RoiEvaluator(index, store, 3, "cpu")
    big = int(np.argmax(areas))
    one.process([big], probs[big:big + 1])
    r1 = one.result()
    assert r1["instances"] == 1 and r1["instance_mIoU"] == pytest.approx(ious[big])
    assert r1["instance_subsets"]["large"]["instance_mIoU"] == pytest.approx(ious[big])
    assert r1["box_instance_mIoU"] == pytest.approx(boxes[big])
    assert r1["boundary_IoU"] == pytest.approx(bious[big])
    u = union.copy()
    single_inter, single_union, *_ = _reference(store, index, [big], probs[big:big + 1], 3)
    assert [r1["iou"][c] for c in r1["iou"]] == pytest.approx(list(single_inter / np.maximum(single_union, 1)))
    assert u.sum() > 0


def test_paste_on_non_square_grids_and_sub_pixel_boxes():
    from roiseg.modeling.decoders import interp_weights, paste_masks
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(1, 1, 4, 9, generator=g)                 # 4 rows, 9 columns
    box = torch.tensor([[2.0, 1.0, 20.0, 9.0]])
    out = paste_masks(probs, box, 12, 24, fill_background=False)
    gy = ((torch.arange(12) + 0.5) - 1.0) / 8.0 * 2 - 1
    gx = ((torch.arange(24) + 0.5) - 2.0) / 18.0 * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None]
    assert torch.allclose(out[0], F.grid_sample(probs, grid, align_corners=False)[0], atol=1e-5)
    tiny = interp_weights(torch.tensor([3.0]), torch.tensor([3.5]), 6, 2, torch.float32)[0]   # half a pixel
    assert tiny[3].tolist() == pytest.approx([0.0, 0.5]) and tiny[2].sum() == 0   # centre 3.5: the last cell's edge
    assert interp_weights(torch.tensor([3.0]), torch.tensor([3.0]), 6, 2, torch.float32).isfinite().all()


def test_results_csv_keeps_columns_aligned_when_a_column_appears():
    import csv
    import io

    from roiseg.training.hooks import _csv_with_row
    first = _csv_with_row("", {"epoch": 1, "loss": 0.5, "steps": None})
    assert first == "epoch,loss,steps\n1,0.5,\n"
    resumed = _csv_with_row(first, {"epoch": 2, "loss": 0.25, "boundary_IoU": 0.3125, "steps": 7})
    rows = list(csv.DictReader(io.StringIO(resumed)))
    assert list(rows[0]) == ["epoch", "loss", "steps", "boundary_IoU"]
    assert rows[0] == {"epoch": "1", "loss": "0.5", "steps": "", "boundary_IoU": ""}
    assert rows[1] == {"epoch": "2", "loss": "0.25", "steps": "7", "boundary_IoU": "0.3125"}
    assert _csv_with_row("epoch,loss\n", {"epoch": 1, "loss": 1.0}) == "epoch,loss\n1,1\n"
