"""Inference with ONNX Runtime alone (no torch): image -> extractor -> person boxes -> decoder ->
masks pasted at the original resolution, and `predict`'s sources and outputs."""
