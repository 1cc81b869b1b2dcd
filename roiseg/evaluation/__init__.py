"""Scoring a decoder: per-ROI metrics, boundary IoU, the evaluator validation and `evaluate` share,
COCO mask / boundary AP."""
