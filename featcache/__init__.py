"""Offline feature cache: COCO person data, ROI targets, analysis, ONNX extraction, Zarr store."""

from .threads import configure_threads

configure_threads()  # before torch is imported anywhere

__version__ = "0.1.0"
