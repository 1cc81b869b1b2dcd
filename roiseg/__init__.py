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
"""
from roiseg.common.threads import configure_threads

configure_threads()  # before torch is imported anywhere (OpenMP reads its wait policy once)

__version__ = "0.1.0"
