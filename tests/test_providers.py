"""Provider choice: TensorRT only when its libraries load, one clear line otherwise."""
import logging

import onnx
import pytest

from roiseg.common import providers
from roiseg.common.providers import ProviderError, provider_chain, trt_profiles


def test_without_gpu_auto_is_cpu_and_gpu_providers_are_refused(monkeypatch):
    monkeypatch.setattr(providers, "cuda_available", lambda: False)
    assert provider_chain("auto") == ["CPUExecutionProvider"]
    assert provider_chain("cpu") == ["CPUExecutionProvider"]
    for p in ("cuda", "tensorrt"):
        with pytest.raises(ProviderError, match="needs a CUDA GPU"):
            provider_chain(p)


def test_tensorrt_without_its_libraries(monkeypatch, caplog):
    """A GPU but no TensorRT wheel: --provider tensorrt is an error naming the extra; auto says in
    one line why it skipped TensorRT and runs CUDA."""
    import onnxruntime as ort
    monkeypatch.setattr(providers, "cuda_available", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(providers, "load_tensorrt", lambda: "the TensorRT libraries are not installed "
                                                            "(uv sync --extra tensorrt)")
    with pytest.raises(ProviderError, match="uv sync --extra tensorrt"):
        provider_chain("tensorrt")
    with caplog.at_level(logging.WARNING, logger="roiseg.common.providers"):
        assert provider_chain("auto") == [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    assert [r.message for r in caplog.records] == [
        "provider auto: TensorRT skipped (the TensorRT libraries are not installed (uv sync --extra tensorrt)) -> CUDA"]


def test_load_tensorrt_names_the_extra_when_missing():
    import importlib.util
    if importlib.util.find_spec("tensorrt_libs") is not None:
        pytest.skip("TensorRT libraries installed here")
    assert "uv sync --extra tensorrt" in providers.load_tensorrt()


def test_trt_profiles_cover_dynamic_batch_and_rois(tmp_path):
    from roiseg.export.export import export_decoder
    from roiseg.export.graph import ExportSpec
    from roiseg.modeling.decoders import build_model
    spec = ExportSpec(4, (640, 640), (80, 80), 0.1, letterbox=True)
    m = onnx.load(str(export_decoder(build_model("roialign", 4, hidden=8, roi_size=7, mask_size=14), spec,
                                     tmp_path / "d.onnx")))
    p = trt_profiles(m)
    assert p["trt_profile_min_shapes"] == "features:1x4x80x80,rois:1x5,image_rects:1x4"
    assert p["trt_profile_opt_shapes"] == "features:1x4x80x80,rois:20x5,image_rects:1x4"
    assert p["trt_profile_max_shapes"] == "features:8x4x80x80,rois:256x5,image_rects:8x4"
