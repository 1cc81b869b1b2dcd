"""`export`: the decoder (and extractor + decoder) as ONNX graphs, checked against PyTorch before
anything is replaced."""
