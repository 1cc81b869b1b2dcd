"""ONNX Runtime execution providers: which one runs, the TensorRT libraries, the engine cache.

``auto`` = TensorRT (fp16, engines cached) when a CUDA GPU is visible and the TensorRT 10 libraries
load (``uv sync --extra tensorrt`` installs them), else CUDA when a GPU is visible, else CPU; it
says in one line why it skipped TensorRT.  Every session is created through :func:`make_session`,
which also warns before TensorRT builds an engine for a graph for the first time (minutes).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
from functools import lru_cache
from pathlib import Path

from .errors import FeatCacheError

log = logging.getLogger(__name__)
TRT_CACHE = Path("cache/trt_engines")
TRT_LIBS = ("libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10")
TRT_INSTALL = "uv sync --extra tensorrt"
# TensorRT optimization profile for dynamic dims: batch B and ROI count N (the predictor never
# runs the decoder with N = 0; --max-det stays under N_MAX).
B_MAX, N_OPT, N_MAX = 8, 20, 256


class ProviderError(FeatCacheError):
    pass


@lru_cache(maxsize=1)
def cuda_available() -> bool:
    """A CUDA GPU is visible.  Through torch when it is installed (which also loads the CUDA 12
    libraries onnxruntime-gpu needs), else through the driver and ``onnxruntime.preload_dlls``."""
    try:
        import torch
        return bool(torch.cuda.is_available())
    except ImportError:
        pass
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        ok = cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except OSError:
        return False
    if ok:
        import onnxruntime as ort
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
    return ok


@lru_cache(maxsize=1)
def load_tensorrt() -> str | None:
    """Load the TensorRT 10 libraries of the ``tensorrt-cu12-libs`` wheel globally, so the TensorRT
    provider's dlopen finds them.  None when loaded, else why not (one line)."""
    try:
        import tensorrt_libs
    except ImportError:
        return f"the TensorRT libraries are not installed ({TRT_INSTALL})"
    folder = Path(tensorrt_libs.__file__).parent
    for name in TRT_LIBS:
        try:
            ctypes.CDLL(str(folder / name), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            return f"cannot load {name} from {folder}: {exc}"
    return None


def _tensorrt_missing(available: set) -> str | None:
    """Why the TensorRT provider cannot run (one line), or None."""
    if "TensorrtExecutionProvider" not in available:
        return "this onnxruntime has no TensorRT provider"
    return load_tensorrt()


def provider_chain(provider: str = "auto", trt_options: dict | None = None) -> list:
    """Providers for ``InferenceSession``: the chosen one first, CPU last."""
    import onnxruntime as ort
    if provider not in ("auto", "tensorrt", "cuda", "cpu"):
        raise ProviderError(f"unknown provider {provider!r} (auto, tensorrt, cuda, cpu)")
    avail = set(ort.get_available_providers())
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    gpu = cuda_available()
    if provider == "auto":
        if not gpu:
            log.info("provider auto: no CUDA GPU visible -> CPU")
            return ["CPUExecutionProvider"]
        why = _tensorrt_missing(avail)
        if why:
            log.warning("provider auto: TensorRT skipped (%s) -> CUDA", why)
        provider = "cuda" if why else "tensorrt"
    if not gpu:
        raise ProviderError(f"--provider {provider} needs a CUDA GPU, and none is visible (use --provider cpu or auto)")
    if provider == "tensorrt":
        why = _tensorrt_missing(avail)
        if why:
            raise ProviderError(f"--provider tensorrt: {why}")
        trt = {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(TRT_CACHE),
               "trt_timing_cache_enable": True, "trt_timing_cache_path": str(TRT_CACHE), **(trt_options or {})}
        Path(trt["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        return [("TensorrtExecutionProvider", trt), "CUDAExecutionProvider", "CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in avail:
        raise ProviderError(f"onnxruntime has no CUDA provider here (available: {sorted(avail)})")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def trt_profiles(model) -> dict:
    """Optimization-profile options for the graph's dynamic input dims (B: images, N: ROIs)."""
    shapes = {"min": [], "opt": [], "max": []}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            continue
        for kind, (b, n) in (("min", (1, 1)), ("opt", (1, N_OPT)), ("max", (B_MAX, N_MAX))):
            vals = [str(d.dim_value) if d.HasField("dim_value") else str(n if vi.name == "rois" else b)
                    for d in dims]
            shapes[kind].append(f"{vi.name}:{'x'.join(vals)}")
    if not shapes["min"]:
        return {}
    return {f"trt_profile_{k}_shapes": ",".join(v) for k, v in shapes.items()}


def make_session(model, opts=None, provider: str = "auto", trt_cache: Path | None = None, label: str = "model"):
    """``onnxruntime.InferenceSession`` for an ``onnx.ModelProto`` on the chosen provider; before
    TensorRT builds an engine for this graph for the first time, a one-line warning."""
    import onnxruntime as ort
    data = model.SerializeToString()
    trt_options = {"trt_engine_cache_path": str(trt_cache or TRT_CACHE),
                   "trt_timing_cache_path": str(trt_cache or TRT_CACHE), **trt_profiles(model)}
    chain = provider_chain(provider, trt_options)
    marker = None
    if chain[0][0] == "TensorrtExecutionProvider":
        marker = Path(trt_options["trt_engine_cache_path"]) / f"{hashlib.sha256(data).hexdigest()[:20]}.built"
        if not marker.exists():
            log.warning("TensorRT builds an engine for %s now (first use: this takes minutes); it is cached in %s",
                        label, marker.parent)
    try:
        sess = ort.InferenceSession(data, opts or ort.SessionOptions(), providers=chain)
    except Exception as exc:
        raise ProviderError(f"onnxruntime cannot load {label}: {exc}") from exc
    if marker is not None and sess.get_providers()[0] == "TensorrtExecutionProvider":
        marker.touch()
    return sess
