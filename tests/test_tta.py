"""Flip test-time augmentation (`predict --tta flip`, `evaluate --tta flip`, `Segmenter(tta="flip")`):
each person's probabilities are the average of the image's and the mirrored image's (flipped back),
the certainty is that of the average, and predict and evaluate agree under it as they do without."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from clikit import cli, succeeded, user_error

BOXES = np.array([[0.10, 0.15, 0.45, 0.90], [0.40, 0.05, 0.80, 0.70], [0.0, 0.3, 0.2, 1.0]])


def test_numpy_certainty_is_the_torch_certainty():
    from roiseg.common.certainty import mask_certainty_np
    from roiseg.modeling.decoders import mask_certainty
    fg = np.random.default_rng(0).random((6, 28, 28), np.float32) ** 3
    fg[0] = 0                                                  # an empty mask scores 0
    got, want = mask_certainty_np(fg), mask_certainty(torch.from_numpy(fg)).numpy()
    assert got[0] == 0 and np.abs(got - want).max() < 1e-6


def _image(synth):
    return Image.open(sorted((synth["root"] / "images/val2017").glob("*.jpg"))[0]).convert("RGB")


def test_flip_tta_averages_the_image_and_its_mirror(trained, synth):
    from roiseg.common.geometry import mirror_boxes
    from roiseg.inference.torch_decoder import predictor_from_checkpoint
    pred = predictor_from_checkpoint(trained / "best.pth", provider="cpu")
    im = _image(synth)
    plain, both = pred.predict(im, BOXES), pred.predict(im, BOXES, tta="flip")
    mirrored = pred.predict(ImageOps.mirror(im), mirror_boxes(BOXES))
    w = im.width
    for k in range(len(BOXES)):
        x0, y0, x1, y1 = plain.windows[k]
        assert tuple(both.windows[k]) == (x0, y0, x1, y1)
        mx0, _, mx1, _ = mirrored.windows[k]
        assert (mx0, mx1) == (w - x1, w - x0)                  # the mirrored ROI's window is the mirror image
        want = (plain.probs[k] + mirrored.probs[k][:, ::-1]) / 2
        assert np.abs(both.probs[k] - want).max() < 1e-4
    assert not np.allclose(both.quality, plain.quality)        # the certainty of the average, not the plain one's
    with pytest.raises(Exception, match="tta must be one of none, flip"):
        pred.predict(im, BOXES, tta="mirror")


def test_flip_tta_is_the_same_with_the_exported_graph(trained, synth, tmp_path):
    from roiseg.inference.torch_decoder import predictor_from_checkpoint
    from roiseg.runtime.pipeline import Predictor
    succeeded(cli("export", "--checkpoint", trained / "best.pth", "--out", tmp_path / "d.decoder.onnx"))
    im = _image(synth)
    a = predictor_from_checkpoint(trained / "best.pth", provider="cpu").predict(im, BOXES, tta="flip")
    b = Predictor.from_onnx(tmp_path / "d.decoder.onnx", provider="cpu").predict(im, BOXES, tta="flip")
    assert max(np.abs(p - q).max() for p, q in zip(a.probs, b.probs)) < 1e-4
    assert np.allclose(a.quality, b.quality, atol=1e-4)


def test_predict_and_evaluate_agree_under_flip_tta(trained, synth, tmp_path):
    ck = trained / "best.pth"
    r = succeeded(cli("evaluate", "--checkpoint", ck, "--ann", synth["val"], "--images",
                      synth["root"] / "images/val2017", "--tta", "flip", "--provider", "cpu", "--device", "cpu",
                      "--json", tmp_path / "e.json"))
    ev = json.loads((tmp_path / "e.json").read_text())[0]
    assert ev["tta"] == "flip", r.output
    outs = {}
    for tta in ("none", "flip"):
        r = succeeded(cli("predict", "--source", synth["root"] / "images/val2017", "--checkpoint", ck, "--boxes", "gt",
                          "--ann", synth["val"], "--out", tmp_path / tta, "--provider", "cpu", "--no-overlays",
                          "--tta", tta))
        outs[tta] = float(r.output.split("instance mIoU with the GT boxes: ")[1].split()[0])
    assert outs["flip"] == pytest.approx(ev["instance_mIoU"], abs=2e-3)
    assert outs["flip"] != pytest.approx(outs["none"], abs=1e-4)      # it changed the masks


def test_evaluate_flip_tta_needs_the_mirrored_features(trained, stores, tmp_path):
    r = cli("evaluate", "--checkpoint", trained / "best.pth", "--val-store", stores["val"], "--tta", "flip",
            "--device", "cpu")
    user_error(r, "holds none: cache it with --flip")
    # the default (auto) scores such a store without TTA, and says so
    r = succeeded(cli("evaluate", "--checkpoint", trained / "best.pth", "--val-store", stores["val"], "--device", "cpu",
                      "--json", tmp_path / "e.json"))
    assert json.loads((tmp_path / "e.json").read_text())[0]["tta"] == "none" and "flip TTA: none" in r.output


def test_tta_defaults_are_flip_where_it_costs_no_extra_cache():
    from roiseg.inference.evaluate import resolve_tta
    from roiseg.runtime.predict import PredictOptions
    from roiseg.runtime.segmenter import Segmenter
    assert resolve_tta("auto", True) == "flip" and resolve_tta("auto", False) == "none"
    assert resolve_tta("none", True) == "none" and resolve_tta("flip", False) == "flip"
    with pytest.raises(Exception, match="tta must be auto, none or flip"):
        resolve_tta("mirror", True)
    import inspect
    assert PredictOptions.tta == "flip" and inspect.signature(Segmenter).parameters["tta"].default == "flip"


def test_a_graph_without_mask_score_metadata_is_recognised(trained, synth, tmp_path):
    """Graphs exported before the ``mask_score`` metadata: the first call tells a certainty (equal to
    the certainty of the graph's own logits) from a score head, so flip TTA recomputes it as for a
    new graph."""
    import onnx

    from roiseg.runtime.pipeline import Predictor
    succeeded(cli("export", "--checkpoint", trained / "best.pth", "--out", tmp_path / "d.decoder.onnx"))
    m = onnx.load(str(tmp_path / "d.decoder.onnx"))
    kept = [p for p in m.metadata_props if p.key != "mask_score"]
    assert len(kept) == len(m.metadata_props) - 1
    del m.metadata_props[:]
    m.metadata_props.extend(kept)
    onnx.save(m, str(tmp_path / "old.decoder.onnx"))
    im = _image(synth)
    new = Predictor.from_onnx(tmp_path / "d.decoder.onnx", provider="cpu")
    old = Predictor.from_onnx(tmp_path / "old.decoder.onnx", provider="cpu")
    assert old.decoder.mask_score is None
    a, b = new.predict(im, BOXES, tta="flip"), old.predict(im, BOXES, tta="flip")
    assert old.decoder.mask_score == "certainty" and np.allclose(a.quality, b.quality, atol=1e-6)
