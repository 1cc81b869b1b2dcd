import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from roiseg.data.rasterize import roi_target
from roiseg.loader.targets import sample_roi_targets, union_packed
from roiseg.modeling.decoders import (
    GlobalContextDecoder,
    RoiAlignDecoder,
    paste_masks,
    roi_features,
)
from roiseg.training.losses import LossConfig, SegLoss


def _coord_features():
    """Channel 0: 1 on cells x 20..29, y 40..59; channels 1/2: the cell's x / y index."""
    f = torch.zeros(1, 3, 80, 80)
    f[0, 0, 40:60, 20:30] = 1
    f[0, 1] = torch.arange(80.0)[None, :]
    f[0, 2] = torch.arange(80.0)[:, None]
    return f


def test_roi_box_samples_exactly_its_cells():
    f = _coord_features()
    rois = torch.tensor([[0, 20 / 80, 40 / 80, 30 / 80, 60 / 80]])   # normalized, the 10x20 cells
    out = roi_features(f, rois, 10)[0]
    # bilinear interpolation reproduces linear maps: bin centres in cell-index coordinates
    assert torch.allclose(out[1], torch.arange(20.0, 30.0)[None].expand(10, 10), atol=1e-5)
    assert torch.allclose(out[2], (40 + 2 * torch.arange(10.0) + 0.5)[:, None].expand(10, 10), atol=1e-5)
    # the whole interior is the marked block; the first and last bins are not 5% of the box
    assert out[0][1:-1, 1:-1].min() == 1
    assert out[1].min() >= 20 and out[1].max() <= 29 and out[2].max() <= 59


def test_roi_features_match_torchvision_pixel_boxes():
    f = torch.randn(2, 4, 80, 80)
    rois = torch.tensor([[1, 0.1, 0.2, 0.6, 0.9], [0, 0.0, 0.0, 1.0, 1.0]])
    ref = roi_align(f, torch.cat([rois[:, :1], rois[:, 1:] * 640], 1), 14, spatial_scale=1 / 8,
                    sampling_ratio=2, aligned=True)
    assert torch.allclose(roi_features(f, rois, 14), ref, atol=1e-5)


def test_batched_sampler_equals_rasterizer():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 64, 72), bool)
    for k in range(4):
        x, y = rng.integers(0, 50, 2)
        masks[k, y:y + rng.integers(5, 30), x:x + rng.integers(5, 30)] = True
    packed = torch.from_numpy(np.packbits(masks, axis=-1))
    union = union_packed(packed)[None]
    boxes = np.array([[3.2, 4.7, 40.1, 50.3], [-10, -5, 30, 20], [60, 50, 90, 80], [0, 0, 72, 64]])
    for m in (7, 28, 56):
        got = sample_roi_targets(packed, union, torch.tensor([0, 1, 2, 3]), torch.zeros(4, dtype=torch.long),
                                 torch.tensor(boxes), m, m, 72)
        for r in range(4):
            assert (got[r].numpy() == roi_target(masks, r, boxes[r], (m, m))).all()


@pytest.mark.parametrize("hw,box", [((480, 640), (100, 50, 300, 400)), ((640, 427), (10.5, 20.5, 200.5, 600)),
                                    ((300, 1000), (900, 0, 1000, 300))])
def test_paste_places_mask_at_box(hw, box):
    h, w = hw
    probs = torch.zeros(1, 3, 28, 28)
    probs[:, 1] = 1                                 # the whole ROI is the target
    out = paste_masks(probs, torch.tensor([box], dtype=torch.float32), h, w)[0]
    assert out.shape == (3, h, w)
    fg = out[1] > 0.5
    ys, xs = torch.nonzero(fg, as_tuple=True)
    assert abs(xs.min().item() - box[0]) <= 1 and abs(xs.max().item() + 1 - box[2]) <= 1
    assert abs(ys.min().item() - box[1]) <= 1 and abs(ys.max().item() + 1 - box[3]) <= 1
    assert torch.allclose(out.sum(0), torch.ones(h, w), atol=1e-5)
    assert (out[0][~fg] >= 0.5 - 1e-6).all()   # a pixel centre exactly on the edge is a tie


def test_models_shapes_and_gradients():
    f = torch.randn(2, 8, 80, 80)
    rois = torch.tensor([[0, 0.1, 0.1, 0.4, 0.8], [1, 0.5, 0.2, 0.9, 0.9], [1, 0.0, 0.0, 0.05, 0.05]])
    for m in (RoiAlignDecoder(8, hidden=16, roi_size=7, mask_size=28), GlobalContextDecoder(8, hidden=8, mask_size=28)):
        out = m(f, rois)
        assert out.shape == (3, 3, 28, 28)
        out.sum().backward()
        assert all(p.grad is not None for p in m.parameters())
    with pytest.raises(ValueError):
        RoiAlignDecoder(8, roi_size=14, mask_size=40)


def test_loss_reductions_fp32_under_fp16():
    torch.manual_seed(0)
    logits = (torch.randn(64, 3, 56, 56) * 30).half()
    t = torch.randint(0, 3, (64, 56, 56))
    loss = SegLoss(LossConfig((0.5, 1.0, 2.0), 1.0, (1, 2), focal_gamma=2.0, boundary_weight=0.5), 3)
    out = loss(logits, t)
    assert all(torch.isfinite(v) for v in out.values()) and out["loss"].dtype == torch.float32
    perfect = torch.nn.functional.one_hot(t, 3).permute(0, 3, 1, 2).float() * 50
    assert loss(perfect, t)["loss"] < 0.05
