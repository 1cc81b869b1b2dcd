"""`predict` on real images with the extractor's own person boxes: mask AP over ../shared/realdata.

    uv run python bench/realdata_predict.py [--folds 5] [--procs 2]

5-fold CV by image (the folds of bench/cv.py): the default decoder is trained on 4 folds (seed 0,
checkpoints kept in bench/out/predict/ck) and `predict` runs on the held-out fold twice:
  * ``auto``: person boxes from YOLOX-Nano's own detection output (same ORT run as the features);
  * ``gt``:   the annotated person boxes (the protocol of `evaluate`).
Predictions of all folds are pooled into one COCO results file per protocol and scored with
pycocotools (mask AP) against the 61 images' annotations, next to two baselines with the same boxes:
the box filled as the mask, and the learned mean shape without features (``--model prior``).  For ``gt`` boxes
it also checks that predict's instance IoU equals `evaluate` on the cached fold.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import cv  # noqa: E402
from bench.realdata import ANN, IMAGES, ONNX  # noqa: E402

OUT = ROOT / "bench" / "out" / "predict"


def _train(job: dict) -> str:
    import torch
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    from trainer.config import make_config
    from trainer.loop import Trainer
    out = Path(job["out"])
    if (out / "done").exists():
        return str(out / "last.pth")
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    tr = Trainer(make_config(**job["config"]))
    tr.fit()
    tr.close()
    (out / "done").write_text("")
    return str(out / "last.pth")


def train_folds(store: Path, folds: int, procs: int, variants=("default", "prior")) -> dict:
    names = cv.make_folds(store, folds)
    jobs = []
    for f in range(folds):
        train = sorted(n for g, fold in enumerate(names) if g != f for n in fold)
        analysis = OUT / f"fold{f}_analyze.json"
        if not analysis.exists():
            cv.fold_analysis(OUT, train, f)
        for v in variants:
            cfg = dict(train_store=str(store), val_store=str(store), train_images=train, val_images=names[f],
                       analysis=str(analysis), seed=0, workers=0, resident="cpu", visualize=False,
                       tensorboard=False, device="cpu", out=str(OUT / "ck" / f"{v}_f{f}"))
            if v != "default":
                cfg["model"] = v
            jobs.append({"fold": f, "variant": v, "config": cfg, "out": cfg["out"]})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(procs) as pool:
        paths = list(pool.map(_train, jobs))
    return {(j["variant"], j["fold"]): (p, names[j["fold"]]) for j, p in zip(jobs, paths)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--conf", type=float, default=0.01, help="detection score threshold (low for AP, as YOLO val)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    OUT.mkdir(parents=True, exist_ok=True)
    store = OUT / "store.zarr"
    if not (store / ".zattrs").exists():
        cv.build_store(OUT)
    cks = train_folds(store, args.folds, args.procs)
    if args.train_only:
        return
    import torch
    torch.set_num_threads(2)
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from trainer.inference.detection import DetectionSettings
    from trainer.inference.evaluate import evaluate_checkpoint
    from trainer.inference.predict import PredictOptions, run_predict

    results = {}

    def score(pooled: list, key: str) -> dict:
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(ANN))
            e = COCOeval(gt, gt.loadRes(pooled), "segm")
            e.evaluate()
            e.accumulate()
            e.summarize()
        results[key] = {"AP": e.stats[0], "AP50": e.stats[1], "AP75": e.stats[2], "AP_S": e.stats[3],
                        "AP_M": e.stats[4], "AP_L": e.stats[5], "detections": len(pooled)}
        return results[key]

    def box_filled(pooled: list) -> list:
        """The same detections with the box filled as the mask (baseline)."""
        out = []
        for r in pooled:
            h, w = r["segmentation"]["size"]
            rle = mask_utils.frPyObjects(np.array([r["bbox"]], np.float64), h, w)[0]
            rle["counts"] = rle["counts"].decode()
            out.append({**r, "segmentation": rle})
        return out

    for v in ("default", "prior"):
        for boxes in ("auto", "gt"):
            pooled, iou_pred, iou_eval, seconds, images = [], [], [], 0.0, 0
            for f in range(args.folds):
                ck, names = cks[(v, f)]
                out = OUT / "pred" / f"{v}_{boxes}_f{f}"
                opts = PredictOptions(source=IMAGES, out=out, checkpoint=Path(ck), onnx=ONNX, boxes=boxes, ann=ANN,
                                      only=names, overlays=f == 0 and v == "default",
                                      detection=DetectionSettings(conf=args.conf), progress=False, provider="cpu")
                summary = run_predict(opts)
                seconds += summary["seconds"]
                images += summary["images"]
                pooled += json.loads((out / "predictions.json").read_text())
                if boxes == "gt":
                    iou_pred.append(summary["instance_mIoU"])
                    iou_eval.append(evaluate_checkpoint(Path(ck), val_store=store, val_images=names)["instance_mIoU"])
            key = f"{v} / {boxes} boxes"
            score(pooled, key)
            results[key]["images_per_s"] = round(images / seconds, 2)
            if iou_pred:
                results[key]["predict_instance_mIoU_per_fold"] = iou_pred
                results[key]["evaluate_instance_mIoU_per_fold"] = iou_eval
            print(key, json.dumps(results[key]), flush=True)
            if v == "default":
                print(f"box filled / {boxes} boxes", json.dumps(score(box_filled(pooled), f"box filled / {boxes} boxes")),
                      flush=True)
    (OUT / "realdata_predict.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
