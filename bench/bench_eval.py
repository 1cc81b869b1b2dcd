"""Validation speed: the vectorized evaluator alone and a whole `evaluate` (decoder + evaluator).

    uv run python bench/bench_eval.py [--device cpu|cuda] [--repeat 3]

On the 61 real images (254 persons) cached by bench/realdata_predict.py (or bench/cv.py), with a
fold-0 checkpoint of that bench.  Reports ROIs/s and the projection for COCO val2017's ~11k person ROIs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from trainer.data import CacheIndex  # noqa: E402
from trainer.inference.evaluate import evaluate_checkpoint  # noqa: E402
from trainer.inference.evaluator import RoiEvaluator  # noqa: E402
from featcache.store import FeatureStore  # noqa: E402

OUT = ROOT / "bench" / "out" / "predict"
COCO_VAL_ROIS = 11_004


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store = OUT / "store.zarr"
    ck = OUT / "ck" / "default_f0" / "last.pth"
    if not ck.is_file():
        sys.exit("run bench/realdata_predict.py first (it caches the store and trains the checkpoints)")
    index = CacheIndex(store)
    rois = int(index.roi_start[index.images[-1] + 1] - index.roi_start[index.images[0]])
    dev = torch.device(args.device)
    ev = RoiEvaluator(index, FeatureStore(store), 3, dev)
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(rois)
    probs = torch.rand(rois, 3, 56, 56, generator=g).softmax(1).to(dev)
    best_e, best_w = 1e9, 1e9
    for _ in range(args.repeat):
        ev.reset()
        t = time.perf_counter()
        for a in range(0, rois, 32):        # batches of 32 ROIs (~8 images)
            ev.process(ids[a:a + 32], probs[a:a + 32])
        ev.result()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best_e = min(best_e, time.perf_counter() - t)
        t = time.perf_counter()
        evaluate_checkpoint(ck, store, list(FeatureStore(store).tables["file_name"]), device=args.device)
        best_w = min(best_w, time.perf_counter() - t)
    for name, s in (("evaluator alone", best_e), ("evaluate (decoder + evaluator)", best_w)):
        print(f"{name:32s} {rois} ROIs in {s:.2f} s = {rois / s:7.1f} ROIs/s -> COCO val "
              f"(~{COCO_VAL_ROIS} ROIs) ~{COCO_VAL_ROIS / (rois / s):.0f} s on {args.device}")


if __name__ == "__main__":
    main()
