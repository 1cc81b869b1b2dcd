"""Flip TTA's cost in ``predict``'s own pipeline: a real-data checkpoint (``bench/realdata_levers.py
--keep-checkpoints``) and the live YOLOX-Nano extractor on real photos, ``tta="none"`` against
``"flip"``, rounds interleaved, the median per image.

    ROISEG_REALDATA=../shared/realdata uv run python bench/bench_tta.py --checkpoint <kept .pth>
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.realdata import realdata  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    from PIL import Image

    from roiseg.inference.torch_decoder import predictor_from_checkpoint
    data = realdata()
    predictor = predictor_from_checkpoint(a.checkpoint, data.onnx, "cpu", "cpu")
    images = [Image.open(f).convert("RGB") for f in sorted(data.images.glob("*.jpg"))[:a.images]]
    boxes = np.array([[0.1, 0.1, 0.4, 0.9], [0.3, 0.2, 0.6, 0.8], [0.5, 0.1, 0.9, 0.95]])
    for im in images:                                   # warm-up: sessions, allocations
        predictor.predict(im, boxes, tta="flip")
    ms: dict[str, list[float]] = {"none": [], "flip": []}
    for r in range(a.rounds):
        for mode in ("none", "flip") if r % 2 == 0 else ("flip", "none"):
            t0 = time.perf_counter()
            for im in images:
                predictor.predict(im, boxes, tta=mode)
            ms[mode].append((time.perf_counter() - t0) / len(images) * 1000)
    none, flip = np.median(ms["none"]), np.median(ms["flip"])
    print(f"per image ({len(images)} photos, {len(boxes)} boxes, median of {a.rounds} interleaved rounds): "
          f"tta none {none:.1f} ms, flip {flip:.1f} ms = {flip / none:.2f}x")


if __name__ == "__main__":
    main()
