"""Inference with the PyTorch decoder of a checkpoint: the predictor, `evaluate`, the validation PNG."""
