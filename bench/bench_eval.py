"""Validation speed: the vectorized evaluator alone and decoder + evaluator (what `evaluate` runs).

    uv run python bench/bench_eval.py [--device cpu|cuda] [--repeat 3]        # 61 real images
    uv run python bench/bench_eval.py --synthetic 2000 --channels 1024 --device cuda   # GPU, val-like size

Real: the 61 images (254 persons) cached by bench/realdata_predict.py with its fold-0 checkpoint.
Synthetic: a store of N synthetic images at the real feature size and a fresh roialign decoder
(hidden 128).  Reports ROIs/s and the projection for COCO val2017's ~11k person ROIs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from roiseg.data.store import FeatureStore  # noqa: E402
from roiseg.evaluation.evaluator import RoiEvaluator  # noqa: E402
from roiseg.inference.evaluate import (  # noqa: E402
    evaluate_checkpoint,
    run_evaluator,
    val_batches,
)
from roiseg.loader.sources import CacheIndex  # noqa: E402
from roiseg.modeling.decoders import build_model  # noqa: E402

OUT = ROOT / "bench" / "out" / "predict"
COCO_VAL_ROIS = 11_004


def timed(fn, device, repeat: int) -> float:
    best = 1e9
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--synthetic", type=int, default=0, help="a synthetic store of N images instead")
    ap.add_argument("--channels", type=int, default=1024)
    ap.add_argument("--keep-store", type=Path, help="build the synthetic store here once and reuse it")
    ap.add_argument("--batch-size", type=int, default=0, help="images per batch [64 CUDA, 8 CPU]")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    bs = args.batch_size or (64 if dev.type == "cuda" else 8)
    if args.synthetic:
        from bench.bench_train import synthetic_store
        store = synthetic_store(args.synthetic, args.channels, 4, args.keep_store)
        ck = None
    else:
        store, ck = OUT / "store.zarr", OUT / "ck" / "default_f0" / "last.pth"
        if not ck.is_file():
            sys.exit("run bench/realdata_predict.py first (it caches the store and trains the checkpoints)")
    index = CacheIndex(store)
    rois = int(index.roi_start[index.images[-1] + 1] - index.roi_start[index.images[0]])
    ev = RoiEvaluator(index, FeatureStore(store), 3, dev)
    probs = torch.rand(rois, 3, 56, 56, generator=torch.Generator().manual_seed(0)).softmax(1).to(dev)
    ids = torch.arange(rois)

    def evaluator_alone():
        ev.reset()
        for a in range(0, rois, 4 * bs):       # ~4 ROIs per image
            ev.process(ids[a:a + 4 * bs], probs[a:a + 4 * bs])
        ev.result()

    if ck is not None:
        def whole():
            evaluate_checkpoint(ck, store, list(FeatureStore(store).tables["file_name"]), device=args.device)
    else:
        model = build_model("roialign", index.feature_shape[0], hidden=128).to(dev).eval()

        def whole():
            run_evaluator(model, val_batches(index, dev, bs, 56), ev, amp=dev.type == "cuda").result()
    for name, fn in (("evaluator alone", evaluator_alone), ("decoder + evaluator", whole)):
        s = timed(fn, dev, args.repeat)
        print(f"{name:22s} {rois} ROIs in {s:.2f} s = {rois / s:8.1f} ROIs/s -> COCO val (~{COCO_VAL_ROIS} ROIs) "
              f"~{COCO_VAL_ROIS / (rois / s):.0f} s on {args.device}", flush=True)


if __name__ == "__main__":
    main()
