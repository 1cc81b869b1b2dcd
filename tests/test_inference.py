import json
import logging

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from clikit import feature_source
from roiseg.data.coco import load_person_records
from roiseg.data.extractor import Extractor
from roiseg.data.standin import FEATURE_NAME
from roiseg.inference.torch_decoder import TorchDecoder
from roiseg.inference.visualize import (
    BOX_RED,
    CAPTION_H,
    CELL_H,
    CELL_W,
    MARGIN,
    TITLE_H,
    choose_images,
    person_colour,
    render_validation_png,
)
from roiseg.modeling.checkpoint import list_checkpoints
from roiseg.modeling.decoders import mask_certainty
from roiseg.runtime.pipeline import Predictor


@pytest.mark.parametrize("size", [(640, 480), (300, 500), (800, 200)])
@pytest.mark.parametrize("mode", ["stretch", "letterbox"])
def test_predictor_pastes_at_original_resolution(standin_onnx, target_everywhere, size, mode):
    w, h = size
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), np.uint8))
    pred = Predictor(TorchDecoder(target_everywhere), feature_source(mode), Extractor(standin_onnx, FEATURE_NAME, "cpu"))
    boxes = np.array([[0.2, 0.3, 0.5, 0.7], [0.6, 0.1, 0.9, 0.4]])
    res = pred.predict(im, boxes)
    masks = res.full_masks()
    assert masks.shape == (2, h, w) and len(res.probs) == 2
    for k, b in enumerate(boxes):
        bw, bh = b[2] - b[0], b[3] - b[1]
        roi = np.array([b[0] - 0.1 * bw, b[1] - 0.1 * bh, b[2] + 0.1 * bw, b[3] + 0.1 * bh]) * [w, h, w, h]
        ys, xs = np.nonzero(masks[k])
        assert abs(xs.min() - roi[0]) <= 1 and abs(xs.max() + 1 - roi[2]) <= 1
        assert abs(ys.min() - roi[1]) <= 1 and abs(ys.max() + 1 - roi[3]) <= 1
        x0, y0, x1, y1 = res.windows[k]   # the mask lives in its window only
        assert res.probs[k].shape == (y1 - y0, x1 - x0)
    cx = pred.predict(im, [[0.35, 0.5, 0.3, 0.4]], box_format="cxcywh")
    assert (cx.full_masks()[0] == masks[0]).all()
    empty = pred.predict(im, np.zeros((0, 4)))
    assert len(empty) == 0 and empty.full_masks().shape == (0, h, w)


def test_validation_png_layout_and_colours(tmp_path):
    h, w = 200, 300
    base = np.full((h, w, 3), 100, np.uint8)
    gt = np.zeros((2, h, w), bool)
    gt[0, 50:150, 40:120] = True
    gt[1, 60:160, 180:260] = True
    cols = [{"file_name": f"img{c}.jpg", "image": Image.fromarray(base), "gt_masks": gt,
             "boxes_px": np.array([[40, 50, 120, 150], [180, 60, 260, 160]], float), "pred_masks": gt}
            for c in range(4)]
    out = render_validation_png(cols, tmp_path / "v.png", "Validation Results")
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (TITLE_H + 2 * (CAPTION_H + CELL_H) + 2 * MARGIN, MARGIN + 4 * (CELL_W + MARGIN), 3)
    s = min(CELL_W / w, CELL_H / h)
    ox = MARGIN + (CELL_W - round(w * s)) // 2
    oy = TITLE_H + CAPTION_H + (CELL_H - round(h * s)) // 2
    # GT box 1's left edge is red, halfway down the box
    y_mid = int(oy + 110 * s)
    assert tuple(img[y_mid, int(round(ox + 180 * s))]) == BOX_RED
    # inside GT mask 0 (top row): the person's colour blended over the image
    col0 = np.array(person_colour(0)) * 0.55 + 100 * 0.45
    assert np.abs(img[int(oy + 120 * s), int(ox + 80 * s)] - col0).max() <= 3
    # bottom row: the same person's colour, and no red boxes
    oy2 = oy + CAPTION_H + CELL_H + MARGIN
    col1 = np.array(person_colour(1)) * 0.55 + 100 * 0.45
    assert np.abs(img[int(oy2 + 110 * s), int(ox + 220 * s)] - col1).max() <= 3
    bottom = img[oy2:oy2 + int(h * s), ox:ox + int(w * s)]
    assert not (bottom == BOX_RED).all(-1).any()


def test_choose_images_falls_back_by_person_count(synth, caplog):
    recs, _ = load_person_records(synth["val"])
    kept = [r for r in recs if r.file_name != "000000109118.jpg"]   # the 3-person image is missing
    with caplog.at_level(logging.INFO):
        chosen = choose_images(kept)
    assert [r.file_name for r in chosen][:2] == ["000000020992.jpg", "000000413552.jpg"]
    assert len(chosen) == 4 and "000000109118.jpg is not in the val annotations" in caplog.text
    others = {c.file_name for c in chosen[:2] + chosen[3:]}
    best = min(abs(len(r.instances) - 3) for r in kept if r.file_name not in others)
    assert abs(len(chosen[2].instances) - 3) == best


def test_training_writes_png_and_visualize_by_epoch(trained, tmp_path):
    from roiseg.cli import main
    assert (trained / "validation_all_images_epoch_0001.png").is_file()
    r = CliRunner().invoke(main, ["visualize", "--epoch", "1", "--checkpoints", str(trained),
                                  "--out-dir", str(tmp_path), "--provider", "cpu"])
    assert r.exit_code == 0, r.output
    png = tmp_path / "validation_all_images_epoch_0001.png"
    assert Image.open(png).size == Image.open(trained / png.name).size
    r = CliRunner().invoke(main, ["visualize", "--epoch", "9", "--checkpoints", str(trained)])
    assert r.exit_code == 1 and "no checkpoint for epoch 9" in r.output


@pytest.mark.slow
def test_export_parity_dynamic_shapes_and_end_to_end(trained, synth, tmp_path):
    """Compact outputs at every batch/ROI count: masks equal the full-probs paste's class 1 above
    the threshold, the instance map points at the most probable person, logits/boxes as before."""
    from roiseg.cli import main
    ck = list_checkpoints(trained)[0][1]
    out = tmp_path / "dec.onnx"
    r = CliRunner().invoke(main, ["export", "--checkpoint", str(ck), "--out", str(out), "--end-to-end",
                                  "--full-probs"])
    assert r.exit_code == 0, r.output
    assert "parity vs PyTorch" in r.output and "latency" in r.output
    s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in s.get_outputs()] == ["masks", "instance_map", "logits", "roi_boxes", "probs", "scores"]
    meta = s.get_modelmeta().custom_metadata_map
    assert json.loads(meta["mask_threshold"]) == 0.5 and meta["mask_format"] == "binary"
    assert set(json.loads(meta["outputs"])) == {"masks", "instance_map", "logits", "roi_boxes", "probs", "scores"}
    rng = np.random.default_rng(0)
    for b, n in ((1, 0), (2, 5), (3, 1)):
        feats = rng.random((b, 16, 80, 80), np.float32)
        rois = np.array([[k % b, 0.1 + 0.05 * k, 0.1, 0.5 + 0.05 * k, 0.6] for k in range(n)], np.float32).reshape(n, 5)
        masks, inst, logits, boxes, probs, scores = s.run(None, {"features": feats, "rois": rois})
        assert boxes.shape == (n, 4) and logits.shape == (n, 3, 28, 28)
        assert masks.shape == (n, 640, 640) and masks.dtype == np.uint8 and inst.shape == (b, 640, 640)
        assert inst.dtype == np.int16 and probs.shape == (n, 3, 640, 640)
        # each mask's certainty, computed in the graph from its own ROI grid
        assert scores.shape == (n,) and np.allclose(
            scores, mask_certainty(torch.from_numpy(logits).softmax(1)[:, 1]).numpy(), atol=1e-5)
        fg = probs[:, 1]
        assert np.array_equal(masks, fg > 0.5)
        for i in range(b):
            mine = np.flatnonzero(rois[:, 0] == i)
            want = np.zeros((640, 640), np.int16)
            if len(mine):
                score = np.where(fg[mine] > 0.5, fg[mine], 0)
                want = np.where(score.max(0) > 0, mine[score.argmax(0)] + 1, 0)
            assert np.array_equal(inst[i], want)
    e2e = ort.InferenceSession(str(tmp_path / "dec.e2e.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in e2e.get_inputs()] == ["images", "rois"]
    assert e2e.get_modelmeta().custom_metadata_map["mask_format"] == "binary"
    masks, inst, *_ = e2e.run(None, {"images": np.random.rand(1, 3, 640, 640).astype(np.float32),
                                     "rois": np.array([[0, 0.2, 0.2, 0.6, 0.9]], np.float32)})
    assert masks.shape == (1, 640, 640) and inst.shape == (1, 640, 640)
    assert np.array_equal(inst[0] == 1, masks[0] == 1)
