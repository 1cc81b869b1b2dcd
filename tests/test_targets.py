import numpy as np

from roiseg.common.geometry import ResizePolicy
from roiseg.data.rasterize import masks_to_input_frame, roi_target, sample_masks


def _masks():
    m = np.zeros((3, 20, 30), bool)
    m[0, 5:15, 5:15] = True      # target
    m[1, 10:18, 10:25] = True    # overlaps the target
    m[2, 0:3, 27:30] = True      # far away
    return m


def test_target_priority_and_other_class():
    m = _masks()
    lab = roi_target(m, 0, (0, 0, 30, 20))
    assert lab.shape == (20, 30)
    assert (lab[5:15, 5:15] == 1).all()                     # target wins in the overlap
    assert (lab[15:18, 10:25] == 2).all()
    assert (lab[10:15, 15:25] == 2).all()
    assert (lab[0:3, 27:30] == 2).all()
    assert lab.sum() == 100 + 2 * (8 * 15 - 5 * 5 + 9)
    lab1 = roi_target(m, 1, (0, 0, 30, 20))
    assert (lab1[10:18, 10:25] == 1).all() and (lab1[5:10, 5:15] == 2).all()


def test_native_crop_uses_pixel_centres_and_clips():
    m = _masks()
    lab = roi_target(m, 0, (4.6, 4.4, 15.4, 15.6))   # centres 5..14 in x, 4..15 in y
    assert lab.shape == (12, 10)
    assert (lab[1:11] == 1).all()
    clipped = roi_target(m, 0, (-10, -10, 100, 100))
    assert clipped.shape == (20, 30)


def test_any_resolution_sampling():
    m = _masks()
    lab = roi_target(m, 0, (5, 5, 15, 15), out_hw=(4, 4))
    assert (lab == 1).all()
    lab = roi_target(m, 0, (0, 0, 30, 20), out_hw=(40, 60))  # 2x upsampled, nearest
    assert (lab[10:30, 10:30] == 1).all() and lab.shape == (40, 60)
    # ROI reaching outside the image: outside cells are background
    lab = roi_target(m, 0, (-10, 5, 10, 15), out_hw=(2, 4))
    assert (lab[:, :2] == 0).all() and (lab[:, 3] == 1).all()


def test_sample_masks_identity_at_native_grid():
    m = _masks()
    assert (sample_masks(m, (0, 0, 30, 20), 20, 30) == m).all()


def test_masks_to_input_frame_stretch_and_letterbox():
    m = np.zeros((1, 100, 200), bool)
    m[0, :, :100] = True   # left half
    s = masks_to_input_frame(m, ResizePolicy(64, 64, "stretch"))
    assert s.shape == (1, 64, 64) and s[0, :, :32].all() and not s[0, :, 32:].any()
    lb = masks_to_input_frame(m, ResizePolicy(64, 64, "letterbox"))
    assert lb.shape == (1, 64, 64)
    assert not lb[0, :16].any() and not lb[0, 48:].any()   # 32-row content centred
    assert lb[0, 16:48, :32].all() and not lb[0, 16:48, 32:].any()


def test_fast_rle_path_equals_rasterizer():
    from pycocotools import mask as mask_utils

    from roiseg.data.rasterize import rles_to_input_frame_packed
    rng = np.random.default_rng(3)
    m = np.zeros((3, 75, 130), np.uint8)
    for k in range(3):
        x, y = rng.integers(0, 100), rng.integers(0, 50)
        m[k, y:y + 20, x:x + 25] = 1
    rles = [mask_utils.encode(np.asfortranarray(x)) for x in m]
    for mode in ("stretch", "letterbox"):
        p = ResizePolicy(64, 48, mode)
        ref = np.packbits(masks_to_input_frame(m.astype(bool), p), axis=-1)
        assert (rles_to_input_frame_packed(rles, p) == ref).all()
