"""The shared layer every other part stands on: one error type, atomic files, folder claims and
the output rule, box geometry, ONNX Runtime sessions, the config schema, thread settings (no torch)."""
