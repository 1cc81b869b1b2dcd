import numpy as np
import pytest

from roiseg.common.geometry import (
    ResizePolicy,
    as_xyxy,
    cxcywh_to_xyxy,
    normalized_to_pixel,
    pad_box,
    pixel_center_span,
    pixel_to_normalized,
    xyxy_to_cxcywh,
)


def test_xyxy_cxcywh_round_trip():
    rng = np.random.default_rng(0)
    b = np.sort(rng.random((50, 2, 2)), axis=1).transpose(0, 2, 1).reshape(50, 4)[:, [0, 2, 1, 3]]
    c = xyxy_to_cxcywh(b)
    assert np.allclose(c[:, 2], b[:, 2] - b[:, 0])
    assert np.allclose(cxcywh_to_xyxy(c), b)
    assert np.allclose(as_xyxy(c, "cxcywh"), b)
    with pytest.raises(ValueError):
        as_xyxy(b, "xywh")


def test_pixel_normalized_round_trip():
    b = np.array([10.0, 20.0, 110.0, 220.0])
    n = pixel_to_normalized(b, 640, 480)
    assert np.allclose(n, [10 / 640, 20 / 480, 110 / 640, 220 / 480])
    assert np.allclose(normalized_to_pixel(n, 640, 480), b)


def test_pad_box_grows_and_clips():
    assert np.allclose(pad_box([0.4, 0.4, 0.6, 0.8], 0.1), [0.38, 0.36, 0.62, 0.84])
    assert np.allclose(pad_box([0.0, 0.1, 0.5, 1.0], 0.1), [0.0, 0.01, 0.55, 1.0])


def test_pixel_center_span():
    assert pixel_center_span(0.0, 10.0, 100) == (0, 10)
    assert pixel_center_span(0.5, 1.5, 100) == (0, 1)    # centre 0.5 inside, 1.5 not
    assert pixel_center_span(0.6, 1.4, 100) == (1, 1)    # no centre inside
    assert pixel_center_span(-5, 500, 100) == (0, 100)


def test_stretch_policy_keeps_normalized_boxes():
    p = ResizePolicy(640, 640, "stretch")
    b = np.array([0.1, 0.2, 0.5, 0.9])
    assert np.allclose(p.norm_to_input_norm(b, 500, 333), b)


@pytest.mark.parametrize("w,h", [(640, 480), (333, 500), (640, 640), (1000, 200)])
def test_letterbox_round_trip_and_content(w, h):
    p = ResizePolicy(640, 640, "letterbox")
    b = np.array([[0.0, 0.0, 1.0, 1.0], [0.25, 0.1, 0.75, 0.6]])
    inp = p.norm_to_input_norm(b, w, h)
    cw, ch = p.resized_size(w, h)
    _, _, ox, oy = p.transform(w, h)
    # the whole image maps to the centred content rectangle
    assert np.allclose(inp[0] * 640, [ox, oy, ox + cw, oy + ch], atol=0.51)
    assert max(cw, ch) == 640
    assert np.allclose(p.input_norm_to_norm(inp, w, h), b)


def test_bad_policy_rejected():
    with pytest.raises(ValueError):
        ResizePolicy(640, 640, "crop")
