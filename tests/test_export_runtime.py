"""Exported graphs as the predictor's decoder: ONNX Runtime alone (no torch) gives the PyTorch
path's masks, for the decoder graph with the extractor and for the end-to-end graph."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from clikit import feature_source
from roiseg.data.extractor import Extractor
from roiseg.data.standin import FEATURE_NAME
from roiseg.export.export import (
    export_decoder,
    export_end_to_end,
    predictor_metadata,
)
from roiseg.export.graph import ExportSpec
from roiseg.export.parity import check_parity
from roiseg.inference.torch_decoder import TorchDecoder
from roiseg.modeling.decoders import build_model
from roiseg.runtime.pipeline import Predictor

ROOT = Path(__file__).resolve().parents[1]
NO_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision'):
            raise ImportError('torch is blocked in this test: ' + name)
sys.meta_path.insert(0, _Block())
sys.path.insert(0, {root!r})
from roiseg.cli import main
main({args!r}, standalone_mode=False)
assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')]
"""


@pytest.mark.parametrize("mode,scored", [("stretch", False), ("letterbox", True)])
def test_onnx_decoder_and_end_to_end_equal_torch_predictor(standin_onnx, tmp_path, mode, scored):
    torch.manual_seed(0)
    model = build_model("roialign", 16, hidden=16, roi_size=7, mask_size=28, score_head=scored,
                        feature_stats=(torch.randn(16), torch.rand(16) + 0.5)).eval()
    source = feature_source(mode, standin_onnx)
    spec = ExportSpec.from_source(source)
    dec = export_decoder(model, spec, tmp_path / "d.onnx", meta=predictor_metadata(source, "x.pth"))
    check_parity(model, dec, spec)          # scores [N] included: a float output, compared like the logits
    e2e = export_end_to_end(standin_onnx, source, dec, tmp_path / "e2e.onnx")
    ref = Predictor(TorchDecoder(model), source, Extractor(standin_onnx, FEATURE_NAME, "cpu"))
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (360, 800, 3), np.uint8))
    boxes = np.array([[0.0, 0.0, 0.3, 0.6], [0.5, 0.2, 1.0, 1.0], [0.3, 0.3, 0.45, 0.5]])
    want = ref.predict(im, boxes)
    for path in (dec, e2e):
        pred = Predictor.from_onnx(path, provider="cpu")
        assert (pred.extractor is None) == (path == e2e)
        got = pred.predict(im, boxes)
        assert np.array_equal(got.windows, want.windows)
        for g, w in zip(got.probs, want.probs):
            assert g.shape == w.shape and np.abs(g - w).max() < 1e-3
        # the score head's mask IoUs or the masks' certainty, the same through every path
        assert len(want.quality) == 3 and np.abs(np.array(got.quality) - want.quality).max() < 1e-4
    with pytest.raises(Exception, match="end-to-end graph"):
        Predictor.from_onnx(e2e, provider="cpu").predict(im)


@pytest.mark.slow
def test_predict_on_exported_graphs_without_torch(trained, synth, tmp_path):
    """`predict --exported` in a process where importing torch fails: same instance mIoU with the
    GT boxes as the checkpoint path, for the end-to-end graph and the decoder graph."""
    from roiseg.cli import main
    ck = trained / "best.pth"
    r = CliRunner().invoke(main, ["export", "--checkpoint", str(ck), "--out", str(tmp_path / "m.decoder.onnx"),
                                  "--end-to-end"])
    assert r.exit_code == 0, r.output
    common = ["--source", str(synth["root"] / "images/val2017"), "--boxes", "gt", "--ann", str(synth["val"]),
              "--provider", "cpu", "--no-overlays"]
    r = CliRunner().invoke(main, ["predict", "--checkpoint", str(ck), "--out", str(tmp_path / "t"), *common])
    assert r.exit_code == 0, r.output
    want = float(r.output.split("instance mIoU with the GT boxes: ")[1].split()[0])
    for name in ("m.e2e.onnx", "m.decoder.onnx"):
        out = tmp_path / name.split(".")[1]
        args = ["predict", "--exported", str(tmp_path / name), "--out", str(out), *common]
        p = subprocess.run([sys.executable, "-c", NO_TORCH.format(root=str(ROOT), args=args)],
                           capture_output=True, text=True, cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        got = float(p.stdout.split("instance mIoU with the GT boxes: ")[1].split()[0])
        assert got == pytest.approx(want, abs=1e-3)
        a = {(d["image_id"], tuple(d["bbox"])): d for d in json.loads((out / "predictions.json").read_text())}
        b = {(d["image_id"], tuple(d["bbox"])): d for d in json.loads((tmp_path / "t/predictions.json").read_text())}
        assert a.keys() == b.keys()


def test_half_export_reports_parity(trained, tmp_path):
    from roiseg.cli import main
    r = CliRunner().invoke(main, ["export", "--checkpoint", str(trained / "best.pth"), "--half", "--masks", "prob",
                                  "--out", str(tmp_path / "h.onnx")])
    assert r.exit_code == 0, r.output
    assert "fp16 conv stack" in r.output and "(tolerance 0.01)" in r.output
    import onnx
    m = onnx.load(str(tmp_path / "h.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer)
    out = {o.name: o.type.tensor_type.elem_type for o in m.graph.output}
    assert out["masks"] == onnx.TensorProto.FLOAT16 and out["logits"] == onnx.TensorProto.FLOAT
    assert json.loads({p.key: p.value for p in m.metadata_props}["half"]) is True


def test_export_without_metadata_is_refused_by_predict(tmp_path, standin_onnx, synth):
    """Everything else is valid (images, annotations): only the missing metadata can stop it."""
    from clikit import cli, user_error
    user_error(cli("predict", "--exported", standin_onnx, "--source", synth["root"] / "images/val2017", "--boxes",
                   "gt", "--ann", synth["val"], "--out", tmp_path / "o"), "no featcache metadata")
    assert not (tmp_path / "o").exists()


def test_numpy_paste_equals_torch_paste():
    """The ORT path's paste (roiseg/runtime/paste.py) is the PyTorch paste, without torch, into frames of
    any size."""
    from roiseg.modeling.decoders import paste_masks
    from roiseg.runtime.paste import paste_windows
    rng = np.random.default_rng(0)
    boxes = np.array([[-10, 5, 120, 90], [0, 0, 200, 150], [30.5, 40.25, 31.5, 60], [150, 100, 260, 210],
                      [50, 50, 50, 50.2]], np.float32)        # ... partly outside, under a pixel, all but empty
    maps = rng.random((len(boxes), 28, 28), np.float32)
    want = paste_masks(torch.from_numpy(maps)[:, None], torch.from_numpy(boxes), 160, 200, fill_background=False)
    got = np.stack(paste_windows(maps, boxes, [[160, 200]] * 5))
    assert got.shape == (5, 160, 200) and np.abs(got - want[:, 0].numpy()).max() < 1e-5
    assert got[0, :, 130:].max() == 0 and got[1, :150].min() > 0     # nothing outside a box, no hole inside
    cut = paste_windows(maps, boxes, [[90, 120], [150, 200], [60, 32], [160, 200], [51, 51]])     # own sizes
    assert [c.shape for c in cut] == [(90, 120), (150, 200), (60, 32), (160, 200), (51, 51)]
    assert all(np.array_equal(c, g[:c.shape[0], :c.shape[1]]) for c, g in zip(cut, got))
    assert paste_windows(maps[:0], boxes[:0], np.zeros((0, 2))) == []
