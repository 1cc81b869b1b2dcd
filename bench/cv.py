"""K-fold cross-validation by image over $ROISEG_REALDATA, shared by realdata_cv.py and ablate.py.

One feature store (YOLOX-Nano stand-in, with mirrored features) holds all 61 images; each fold
trains on the other folds' images and validates on its own (``train_images``/``val_images``), so every
image is validated exactly once per seed.  Per-ROI validation records of the final epoch are pooled
over folds; confidence intervals come from a bootstrap over *images*.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from bench.realdata import realdata
from roiseg.common.files import write_json_atomic
from roiseg.data.analyze import run_analyze
from roiseg.data.cache import CacheConfig, run_cache
from roiseg.data.store import FeatureStore

log = logging.getLogger("cv")
AREA_S, AREA_M = 32 ** 2, 96 ** 2     # COCO small / medium limits (original pixels)


def build_store(out: Path, fine: str | None = None, tag: str = "") -> Path:
    """The CV store (mirrored features included); ``fine``: with that fine map (``store_<tag>.zarr``)."""
    store = out / (f"store_{tag}.zarr" if tag else "store.zarr")
    run_cache(CacheConfig(ann=realdata().ann, images=realdata().images, onnx=realdata().onnx, out=store, feature_name=realdata().feature, fine_feature=fine,
                          channel_order="bgr", scale=1.0, provider="cpu", flip=True), progress=False)
    return store


def make_folds(store: Path, k: int, seed: int = 0) -> list[list[str]]:
    names = sorted(FeatureStore(store).tables["file_name"])
    order = np.random.default_rng(seed).permutation(len(names))
    return [sorted(names[j] for j in order[f::k]) for f in range(k)]


def fold_analysis(out: Path, train_names: list[str], fold: int) -> Path:
    """data_analyze.json (class weights) of the fold's training images only."""
    d = json.loads(realdata().ann.read_text())
    keep = {im["id"] for im in d["images"] if im["file_name"] in set(train_names)}
    sub = {**d, "images": [im for im in d["images"] if im["id"] in keep],
           "annotations": [a for a in d["annotations"] if a["image_id"] in keep]}
    ann = out / f"fold{fold}_train.json"
    ann.write_text(json.dumps(sub))
    path = out / f"fold{fold}_analyze.json"
    write_json_atomic(path, run_analyze(ann, workers=1, progress=False))
    return path


def box_filled_ious(store: Path) -> tuple[dict[int, float], dict[int, float]]:
    """Per ROI: mask IoU and boundary IoU (bands as in the evaluator) of the (unpadded) person box
    filled as the mask with the GT mask."""
    import torch

    from roiseg.evaluation.boundary import boundary_band, boundary_width
    fs = FeatureStore(store)
    t = fs.tables
    iou, biou = {}, {}
    for i in fs.valid_images():
        h, w = (int(v) for v in t["orig_hw"][i])
        a = int(t["image_roi_start"][i])
        d = boundary_width(h, w)
        for k, rle in enumerate(fs.gt_rles(i)):
            x0, y0, x1, y1 = t["roi_box"][a + k].astype(np.float64) * [w, h, w, h]
            box = mask_utils.frPyObjects(np.array([[x0, y0, x1 - x0, y1 - y0]]), h, w)[0]
            gt = {"size": rle["size"], "counts": rle["counts"].encode()}
            iou[a + k] = float(mask_utils.iou([box], [gt], [0])[0, 0])
            masks = torch.from_numpy(np.stack([mask_utils.decode(box), mask_utils.decode(gt)]).astype(bool))
            b = boundary_band(masks, d).numpy()
            u = (b[0] | b[1]).sum()
            biou[a + k] = float((b[0] & b[1]).sum() / u) if u else 1.0
    return iou, biou


def _train_job(job: dict) -> dict:
    """One (variant, fold, seed) training run in its own single-threaded process."""
    import torch
    torch.set_num_threads(1)
    from roiseg.training.config import make_config
    from roiseg.training.loop import Trainer
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    shutil.rmtree(job["out"], ignore_errors=True)
    cfg = make_config(**job["config"])
    raw_curve = []

    def raw_validation(epoch, path, metrics, trainer):  # the EMA run's own weights, every epoch
        if trainer.ema is not None and job.get("raw_curve", True):
            raw_curve.append(trainer.validate(trainer.model)["instance_mIoU"])

    tr = Trainer(cfg, hooks=[raw_validation])
    hist = tr.fit()
    tr.evaluator.coco_eval = bool(job.get("coco_dets"))   # the final epoch's COCO results, for pooled AP
    final = tr.validate(details=True)
    res = {"variant": job["variant"], "fold": job["fold"], "seed": job["seed"],
           "curve": [h["instance_mIoU"] for h in hist], "miou_curve": [h["mIoU"] for h in hist],
           "other_curve": [h["iou"].get("non_target", float("nan")) for h in hist], "raw_curve": raw_curve,
           "per_roi": final["per_roi"], "steps_per_epoch": hist[-1].get("steps"),
           "rois_per_s": float(np.mean([h["rois_per_s"] for h in hist])), "seconds": 0.0}
    if job.get("coco_dets"):
        res["coco_dets"] = tr.evaluator.coco_dets
        tr.evaluator.coco_eval = False
    if tr.ema is not None:  # the same run scored without EMA: EMA measured at no extra training
        res["per_roi_raw"] = tr.validate(tr.model, details=True)["per_roi"]
    res["seconds"] = round(time.perf_counter() - t0, 1)
    if job.get("keep"):
        Path(job["keep"]).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tr.last_checkpoint or Path(job["out"]) / "last.pth", job["keep"])
        res["checkpoint"] = job["keep"]
    shutil.rmtree(job["out"], ignore_errors=True)
    return res


def train_subset(train: list[str], share: float, fold: int, count: int | None = None) -> list[str]:
    """``share`` of ``train`` (or ``count`` images) drawn without replacement, the same for every seed
    of a fold (the seed varies the training run, not its data); smaller subsets are prefixes of the
    same permutation, so a learning curve's sets are nested."""
    n = len(train) if share >= 1.0 and count is None else max(1, min(count or round(share * len(train)), len(train)))
    if n >= len(train):
        return train
    pick = np.random.default_rng(1000 + fold).permutation(len(train))[:n]
    return sorted(train[k] for k in pick)


def run_jobs(variants: dict[str, dict], store: Path, out: Path, folds: int, seeds: list[int],
             epochs: int, procs: int, common: dict | None = None, only_folds: list[int] | None = None,
             raw_curve: bool = True, coco_dets: bool = False, keep_checkpoints: bool = False) -> list[dict]:
    """Train every variant on every fold (or ``only_folds`` of the k) and seed; results cached per
    job in ``out/runs``.  ``raw_curve``: EMA runs also validate their raw weights every epoch;
    ``keep_checkpoints``: each run's last checkpoint is kept as ``out/kept/<key>.pth`` (for predict)."""
    names = make_folds(store, folds)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for f in (range(folds) if only_folds is None else only_folds):
        val = names[f]
        train = sorted(n for g, fold in enumerate(names) if g != f for n in fold)
        analysis = out / f"fold{f}_analyze.json"
        if not analysis.exists():
            fold_analysis(out, train, f)
        for seed in seeds:
            for variant, over in variants.items():
                key = f"{re.sub(r'[^A-Za-z0-9_.+-]+', '-', variant)}_f{f}_s{seed}_e{epochs}"
                over = dict(over)
                share = over.pop("train_share", 1.0)   # a learning curve: part of the fold's training images
                count = over.pop("train_count", None)
                cfg = dict(train_store=str(store), val_store=str(store), val_images=val,
                           train_images=train_subset(train, share, f, count),
                           analysis=str(analysis), epochs=epochs, seed=seed, workers=0, resident="cpu",
                           visualize=False, tensorboard=False, device="cpu", out=str(out / "ck" / key))
                cfg.update(common or {})
                cfg.update(over)
                jobs.append({"key": key, "variant": variant, "fold": f, "seed": seed, "config": cfg,
                             "out": cfg["out"], "raw_curve": raw_curve, "coco_dets": coco_dets,
                             "keep": str(out / "kept" / f"{key}.pth") if keep_checkpoints else None})
    done, todo = [], []
    for j in jobs:
        p = runs_dir / f"{j['key']}.json"
        (done if p.exists() else todo).append(j)
    results = [json.loads((runs_dir / f"{j['key']}.json").read_text()) for j in done]
    log.warning("%d runs cached, %d to train (%d processes)", len(done), len(todo), procs)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(procs) as pool:
        for j, res in zip(todo, pool.map(_train_job, todo)):
            (runs_dir / f"{j['key']}.json").write_text(json.dumps(res))
            log.warning("%s: final instance_mIoU %.4f (%.0f s)", j["key"], res["curve"][-1], res["seconds"])
            results.append(res)
    return results


# ---- statistics ---------------------------------------------------------------------------------
def pooled_table(results: list[dict], variant: str, key: str = "per_roi") -> dict:
    """Per-ROI records of a variant, averaged over seeds: roi -> record (iou, iu, area, ...)."""
    acc: dict[int, dict] = {}
    for r in results:
        if r["variant"] != variant:
            continue
        for rec in r[key]:
            a = acc.setdefault(rec["roi"], {**rec, "iou": [], "iu": [], "biou": []})
            a["iou"].append(rec["iou"])
            a["biou"].append(rec.get("biou", np.nan))      # runs cached before boundary IoU have none
            a["iu"].append(rec["iu"])
    for a in acc.values():
        a["iou"] = float(np.mean(a["iou"]))
        a["biou"] = float(np.mean(a["biou"]))
        a["iu"] = np.mean(np.asarray(a["iu"], np.float64), 0)
    return acc


def metrics_of(recs: list[dict], classes: int = 3) -> dict:
    iou = np.array([r["iou"] for r in recs])
    biou = np.array([r.get("biou", np.nan) for r in recs], np.float64)
    iu = np.sum([r["iu"] for r in recs], 0) if recs else np.zeros((2, classes))
    per_class = iu[0] / np.maximum(iu[1], 1)
    area = np.array([r["area"] for r in recs])
    other = np.array([r["has_other"] for r in recs], bool)
    sub = lambda m: float(iou[m].mean()) if m.any() else float("nan")  # noqa: E731
    return {"instance_mIoU": float(iou.mean()), "boundary_IoU": float(biou.mean()) if len(biou) else np.nan,
            "mIoU": float(per_class.mean()),
            "iou_bg": float(per_class[0]), "iou_target": float(per_class[1]),
            "iou_other": float(per_class[2]) if len(per_class) > 2 else float("nan"),
            "S": sub(area < AREA_S), "M": sub((area >= AREA_S) & (area < AREA_M)), "L": sub(area >= AREA_M),
            "overlapped": sub(other), "n": len(recs)}


def bootstrap_diff(a: dict[int, dict], b: dict[int, float | dict], roi_image: np.ndarray,
                   n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean instance IoU of ``a`` minus ``b`` over common ROIs, with a 95% bootstrap CI over images."""
    rois = sorted(set(a) & set(b))
    val = lambda x: x["iou"] if isinstance(x, dict) else x  # noqa: E731
    d = np.array([val(a[r]) - val(b[r]) for r in rois])
    img = roi_image[np.array(rois)]
    uniq, inv = np.unique(img, return_inverse=True)
    sums = np.bincount(inv, d, len(uniq))
    cnts = np.bincount(inv, None, len(uniq))
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(uniq), (n, len(uniq)))
    boots = sums[pick].sum(1) / cnts[pick].sum(1)
    return float(d.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def bootstrap_ci(recs: dict[int, dict], roi_image: np.ndarray, key: str, n: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """95% CI over images of a pooled metric (``instance_mIoU`` or a class IoU)."""
    rois = np.array(sorted(recs))
    img = roi_image[rois]
    uniq = np.unique(img)
    by_img = {u: [recs[r] for r in rois[img == u]] for u in uniq}
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        sample = [rec for u in rng.choice(uniq, len(uniq)) for rec in by_img[u]]
        vals.append(metrics_of(sample)[key])
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def curve_stability(results: list[dict], variant: str) -> dict:
    """Per run: how far the last 5 epochs' instance_mIoU fall below the run's best epoch; and the
    run-averaged curve (runs differ in length under auto epochs: aligned at their last epoch)."""
    curves = [np.asarray(r["curve"]) for r in results if r["variant"] == variant]
    drops = [float(c.max() - c[-5:].min()) for c in curves]
    n = min(len(c) for c in curves)
    mean = np.mean([c[-n:] for c in curves], 0)
    return {"curve_from_end": [round(float(v), 4) for v in mean], "epochs": sorted({len(c) for c in curves}),
            "best_epoch_from_end": int(n - mean.argmax()), "last5_drop": float(mean.max() - mean[-5:].min()),
            "per_run_drop_mean": float(np.mean(drops)), "per_run_drop_max": float(np.max(drops)),
            "best_epoch": int(np.mean([c.argmax() + 1 for c in curves]))}
