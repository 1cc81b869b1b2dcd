"""The data layer (the design's ``featcache``): COCO person annotations, target rasterization, class
analysis, ONNX feature extraction and the Zarr feature store `cache` writes (no torch)."""
