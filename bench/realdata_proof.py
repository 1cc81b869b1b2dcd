"""Real-data proof: does the decoder learn from real features beyond a box-shaped prior?

    uv run python bench/realdata_proof.py [--epochs 60]
Splits ../shared/realdata (61 real COCO images) by image into train/val, caches both with the
YOLOX-Nano stand-in (/backbone/Concat_1_output_0, BGR, 0-255), trains the default decoder, trains
the same decoder with the features zeroed, and scores the "box filled as mask" baseline on the same
val persons.  Writes bench/out/realdata_proof.json and prints the per-epoch curves.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.realdata import ANN, FEATURE, IMAGES, ONNX  # noqa: E402
from featcache.analyze import run_analyze, write_json_atomic  # noqa: E402
from featcache.cache import CacheConfig, run_cache  # noqa: E402
from featcache.coco import load_person_records  # noqa: E402
from trainer.config import make_config  # noqa: E402
from trainer.loop import Trainer  # noqa: E402



def split_annotations(out: Path, val_every: int) -> dict:
    d = json.loads(ANN.read_text())
    ids = sorted(im["id"] for im in d["images"])
    val_ids = set(ids[1::val_every])
    paths = {}
    for split, keep in (("train", lambda i: i not in val_ids), ("val", lambda i: i in val_ids)):
        sub = {**d, "images": [im for im in d["images"] if keep(im["id"])],
               "annotations": [a for a in d["annotations"] if keep(a["image_id"])]}
        paths[split] = out / f"real_{split}.json"
        paths[split].write_text(json.dumps(sub))
    return paths


def box_baseline(ann: Path) -> float:
    """Mean IoU of 'the (unpadded) box filled as the mask' vs each person's GT mask."""
    recs, _ = load_person_records(ann)
    ious = []
    for r in recs:
        for inst in r.instances:
            x0, y0, x1, y1 = inst.box_norm * [r.width, r.height, r.width, r.height]
            box = mask_utils.frPyObjects(np.array([[x0, y0, x1 - x0, y1 - y0]]), r.height, r.width)[0]
            ious.append(float(mask_utils.iou([box], [inst.rle], [0])[0, 0]))
    return float(np.mean(ious))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--val-every", type=int, default=4, help="every Nth image (by id) goes to val")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/realdata")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    a.out.mkdir(parents=True, exist_ok=True)
    anns = split_annotations(a.out, a.val_every)
    stores = {}
    for split in ("train", "val"):
        stores[split] = a.out / f"{split}.zarr"
        run_cache(CacheConfig(ann=anns[split], images=IMAGES, onnx=ONNX,
                              out=stores[split], feature_name=FEATURE, channel_order="bgr", scale=1.0,
                              provider="cpu"), progress=False)
    analysis = a.out / "data_analyze.json"
    write_json_atomic(run_analyze(anns["train"], progress=False), analysis)
    runs = {}
    for name, zero in (("features", False), ("zeroed_features", True)):
        ck = a.out / f"ck_{name}"
        shutil.rmtree(ck, ignore_errors=True)
        cfg = make_config(train_store=str(stores["train"]), val_store=str(stores["val"]), out=str(ck),
                          analysis=str(analysis), epochs=a.epochs, hidden=a.hidden, batch_size=4,
                          lr=1e-3, samples_per_roi=4, jitter=0.1, workers=0, resident="cpu",
                          zero_features=zero, visualize=False, tensorboard=False, seed=0)
        hist = Trainer(cfg).fit()
        runs[name] = [{"epoch": h["epoch"], "loss": round(h["loss"], 4), "mIoU": round(h["mIoU"], 4),
                       **{f"iou_{k}": round(v, 4) for k, v in h["iou"].items()},
                       "instance_mIoU": round(h["instance_mIoU"], 4)} for h in hist]
    result = {
        "split": {k: len(load_person_records(v)[0]) for k, v in anns.items()},
        "box_filled_baseline_val": round(box_baseline(anns["val"]), 4),
        "box_filled_baseline_all": round(box_baseline(ANN), 4),
        "runs": runs,
    }
    recs, _ = load_person_records(anns["val"])
    result["val_persons"] = sum(len(r.instances) for r in recs)
    for name, hist in runs.items():
        best = max(hist, key=lambda h: h["instance_mIoU"])
        result[f"best_{name}"] = best
        result[f"last_{name}"] = hist[-1]
    (a.out.parent / "realdata_proof.json").write_text(json.dumps(result, indent=2))
    print(f"{'epoch':>5} | {'features: mIoU  bg    tgt   other inst':40} | zeroed: mIoU  inst")
    for f, z in zip(runs["features"], runs["zeroed_features"]):
        print(f"{f['epoch']:5d} | {f['mIoU']:.4f} {f['iou_background']:.3f} {f['iou_target']:.3f} "
              f"{f['iou_non_target']:.3f} {f['instance_mIoU']:.4f}{'':9} | {z['mIoU']:.4f} {z['instance_mIoU']:.4f}")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
