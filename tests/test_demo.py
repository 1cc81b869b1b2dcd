import json
import os

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from PIL import Image

from roiseg.modeling.checkpoint import load_checkpoint


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, monkeypatch):
    from roiseg.cli import main
    monkeypatch.chdir(tmp_path)          # anything written outside --dir would land here
    r = CliRunner().invoke(main, ["demo", "--dir", "demo", "--epochs", "2"])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert sorted(os.listdir(tmp_path)) == ["demo"]          # user folders untouched
    assert "mIoU epoch 1:" in r.output and "Next, on real data" in r.output
    with Image.open(s["png"]) as im:
        assert im.size[0] > 1000 and im.format == "PNG"
    pngs = sorted((tmp_path / "demo" / "checkpoints").glob("validation_all_images_epoch_*.png"))
    assert [p.name for p in pngs] == ["validation_all_images_epoch_0001.png", "validation_all_images_epoch_0002.png"]
    ck = load_checkpoint(s["checkpoint"])
    assert ck.epoch == 2 and ck.model
    sess = ort.InferenceSession(s["end_to_end_onnx"], providers=["CPUExecutionProvider"])
    masks, inst, logits, _, scores = sess.run(None, {"images": np.random.rand(1, 3, 640, 640).astype(np.float32),
                                             "rois": np.array([[0, 0.3, 0.2, 0.6, 0.9], [0, 0.1, 0.1, 0.2, 0.3]],
                                                              np.float32)})
    assert masks.shape == (2, 640, 640) and masks.dtype == np.uint8 and inst.shape == (1, 640, 640)
    assert logits.shape[:2] == (2, 3) and set(np.unique(inst)) <= {0, 1, 2}
    assert scores.shape == (2,) and ((scores >= 0) & (scores < 1)).all()
    dec = ort.InferenceSession(s["decoder_onnx"], providers=["CPUExecutionProvider"])
    assert [i.name for i in dec.get_inputs()] == ["features", "rois"]
    # it learns: the second epoch is far better than the first (0.27 -> 0.55 when written; the
    # demo is seeded), and the summary reports the checkpoint's own metric
    assert s["final_mIoU"] == ck.metrics["mIoU"]
    assert s["final_mIoU"] > s["first_epoch_mIoU"] + 0.1
    assert s["final_instance_mIoU"] > s["first_instance_mIoU"]
