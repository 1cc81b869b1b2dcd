"""roi-seg-featcache: an offline feature cache and a trainer for an ROI-conditioned person
instance-segmentation decoder.  The package's layers, bottom up (imports run one way; import-linter
checks it, ``pyproject.toml``):

    common      the shared layer: errors, atomic files and folder claims, geometry, ONNX Runtime
                providers, the config schema, thread settings                       (no torch)
    data        COCO reading, target rasterization, analysis, ONNX extraction, the Zarr store
                (``cache``)                                                        (no torch)
    modeling    the decoders, checkpoints, devices
    loader      store -> training batches: sources, ROI sampling, targets
    evaluation  the evaluator (metrics, boundary IoU, COCO AP)
    training    the loop, resume, hooks, losses, DDP, the train config
    runtime     image -> extractor -> decoder -> masks with ONNX Runtime, predict     (no torch)
    export      decoder (+ extractor) -> ONNX, parity checks
    inference   the PyTorch predictor, evaluate, the validation PNG
    cli, demo   the command line

The Python API is ``roiseg.Segmenter`` (``runtime/segmenter.py``): person masks for your boxes, with
ONNX Runtime alone (``docs/python.md``).
"""
from roiseg.common.threads import configure_threads

configure_threads()  # before torch is imported anywhere (OpenMP reads its wait policy once)

from roiseg.common.version import __version__  # noqa: E402


def __getattr__(name: str):
    """``roiseg.Segmenter`` and ``roiseg.Result``, imported when first used (``import roiseg`` stays
    light: no ONNX Runtime until then)."""
    if name in ("Segmenter", "Result"):
        from roiseg.runtime import segmenter
        return getattr(segmenter, name)
    raise AttributeError(f"module 'roiseg' has no attribute {name!r}")


__all__ = ["Result", "Segmenter", "__version__"]
