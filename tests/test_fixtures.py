import numpy as np
import onnx
import onnxruntime as ort

from roiseg.data.standin import FEATURE_NAME, build_standin_extractor


def test_standin_has_inner_feature_tensor(tmp_path):
    p = build_standin_extractor(tmp_path / "s.onnx", channels=8, dynamic_batch=True)
    m = onnx.load(str(p))
    outputs = [o.name for o in m.graph.output]
    assert FEATURE_NAME not in outputs and outputs == ["output0"]
    assert any(FEATURE_NAME in n.output for n in m.graph.node)
    s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    assert s.get_inputs()[0].shape == ["N", 3, 640, 640]
    out = s.run(None, {"images": np.zeros((2, 3, 640, 640), np.float32)})[0]
    assert out.shape == (2, 8, 1, 1)
