"""Inference, apart from training: checkpoint -> decoder, detection decoding, predictor,
evaluation, the validation PNG, and ONNX export."""
