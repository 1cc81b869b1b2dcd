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
import os
import sys
from functools import lru_cache
from pathlib import Path

from roiseg.common.errors import RoisegError

log = logging.getLogger(__name__)
TRT_CACHE = Path("cache/trt_engines")
TRT_LIBS = ("libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10")
TRT_INSTALL = "uv sync --extra tensorrt"
PROVIDERS = ("auto", "tensorrt", "cuda", "cpu")     # --provider: auto tries TensorRT, CUDA, then CPU
# TensorRT optimization profile for dynamic dims: batch B and ROI count N (the predictor never
# runs the decoder with N = 0; --max-det stays under N_MAX).
B_MAX, N_OPT, N_MAX = 8, 20, 256


class ProviderError(RoisegError):
    pass


@lru_cache(maxsize=1)
def cuda_available() -> bool:
    """A CUDA GPU is visible.  In a process that has torch loaded (training, a checkpoint's
    predictor) torch answers, and it has loaded the CUDA 12 libraries onnxruntime-gpu needs; this
    package never imports torch itself (an import contract checks that), so elsewhere the driver
    answers and ``onnxruntime.preload_dlls`` loads those libraries."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.cuda.is_available())
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


def device_id_for(device=None) -> int:
    """The CUDA device index ONNX Runtime should use: the torch device's (``cuda:1`` -> 1), else
    this process's ``LOCAL_RANK`` under torchrun, else 0.  Without it every session runs on GPU 0."""
    text = str(device) if device is not None else ""
    if text.startswith("cuda:"):
        return int(text.split(":", 1)[1])
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def provider_chain(provider: str = "auto", trt_options: dict | None = None, device_id: int = 0) -> list:
    """Providers for ``InferenceSession``: the chosen one first, CPU last."""
    import onnxruntime as ort
    if provider not in PROVIDERS:
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
    cuda = ("CUDAExecutionProvider", {"device_id": device_id})
    if provider == "tensorrt":
        why = _tensorrt_missing(avail)
        if why:
            raise ProviderError(f"--provider tensorrt: {why}")
        trt = {"device_id": device_id, "trt_fp16_enable": True, "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(TRT_CACHE), "trt_timing_cache_enable": True,
               "trt_timing_cache_path": str(TRT_CACHE), **(trt_options or {})}
        Path(trt["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        return [("TensorrtExecutionProvider", trt), cuda, "CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in avail:
        raise ProviderError(f"onnxruntime has no CUDA provider here (available: {sorted(avail)})")
    return [cuda, "CPUExecutionProvider"]


def trt_profiles(model, batch_max: int = B_MAX, rois_max: int = N_MAX) -> dict:
    """Optimization-profile options for the graph's dynamic input dims (B: images, N: ROIs): the
    largest batch must cover every batch the caller sends (``cache --flip`` runs 2 x ``--batch``)."""
    shapes = {"min": [], "opt": [], "max": []}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            continue
        for kind, (b, n) in (("min", (1, 1)), ("opt", (1, min(N_OPT, rois_max))), ("max", (batch_max, rois_max))):
            vals = [str(d.dim_value) if d.HasField("dim_value") else str(n if vi.name == "rois" else b)
                    for d in dims]
            shapes[kind].append(f"{vi.name}:{'x'.join(vals)}")
    if not shapes["min"]:
        return {}
    return {f"trt_profile_{k}_shapes": ",".join(v) for k, v in shapes.items()}


def tensorrt_options(model, model_bytes: bytes, cache_root: Path | None = None, batch_max: int = B_MAX,
                     fp16: bool = True) -> dict:
    """TensorRT provider options for one graph (a pure function; tests read it).

    * Engines are cached per model: a folder named by the sha256 of the model's bytes.  ORT names
      an engine by the graph's structure, so two checkpoints (or extractors) with the same
      architecture would otherwise share one engine, and the second would run the first's weights.
      The timing cache (kernel timings per layer shape) is safe to share.
    * The profile covers every batch the caller sends (``batch_max``).
    * ``fp16`` only where the graph tolerates it: the extractor (its features are stored as fp16
      anyway), not the decoder graphs, whose ROI geometry and paste are fp32 on purpose (a 640-px
      coordinate in fp16 is only good to 0.5 px; ``export --half`` puts fp16 in the graph itself)."""
    root = Path(cache_root or TRT_CACHE)
    return {"trt_fp16_enable": bool(fp16), "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(root / hashlib.sha256(model_bytes).hexdigest()[:20]),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(root),
            **trt_profiles(model, batch_max)}


def make_session(model, opts=None, provider: str = "auto", trt_cache: Path | None = None, label: str = "model",
                 batch_max: int = B_MAX, fp16: bool = True, device_id: int | None = None):
    """``onnxruntime.InferenceSession`` for an ``onnx.ModelProto`` on the chosen provider, on GPU
    ``device_id`` (default: ``device_id_for()``).  Before TensorRT builds an engine for this model
    for the first time, a one-line warning; with ``auto``, an engine build that fails falls back to
    CUDA with one line saying so."""
    import onnxruntime as ort
    data = model.SerializeToString()
    dev = device_id_for() if device_id is None else int(device_id)
    chain = provider_chain(provider, tensorrt_options(model, data, trt_cache, batch_max, fp16), dev)
    opts = opts or ort.SessionOptions()
    if chain[0][0] == "TensorrtExecutionProvider":
        engines = Path(chain[0][1]["trt_engine_cache_path"])
        if not any(engines.glob("*.engine")):
            log.warning("TensorRT builds an engine for %s now (first use: this takes minutes); it is cached in %s",
                        label, engines)
        try:
            return ort.InferenceSession(data, opts, providers=chain)
        except Exception as exc:  # noqa: BLE001 - the TensorRT provider's own errors
            if provider != "auto":
                raise ProviderError(f"TensorRT cannot build an engine for {label}: {_first_line(exc)}") from exc
            log.warning("provider auto: TensorRT failed for %s (%s) -> CUDA", label, _first_line(exc))
            chain = chain[1:]
    try:
        return ort.InferenceSession(data, opts, providers=chain)
    except Exception as exc:
        raise ProviderError(f"onnxruntime cannot load {label}: {exc}") from exc


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
