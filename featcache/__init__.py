"""Offline feature cache: COCO person data, ROI targets, analysis, ONNX extraction, Zarr store."""

__version__ = "0.1.0"
