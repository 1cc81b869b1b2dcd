"""`predict` on real images with the extractor's own person boxes: mask AP over $ROISEG_REALDATA.

    uv run python bench/realdata_predict.py [--folds 5] [--procs 2]

5-fold CV by image (the folds of bench/cv.py): the default decoder is trained on 4 folds (seed 0,
checkpoints kept in bench/out/predict/ck) and `predict` runs on the held-out fold twice:
  * ``auto``: person boxes from YOLOX-Nano's own detection output (same ORT run as the features);
  * ``gt``:   the annotated person boxes (the protocol of `evaluate`).
Predictions of all folds are pooled into one COCO results file per protocol and scored with
pycocotools (mask AP) and faster-coco-eval (boundary AP) against the 61 images' annotations, next to two baselines with the same boxes:
the box filled as the mask, and the learned mean shape without features (``--model prior``).  For ``gt`` boxes
it also checks that predict's instance IoU equals `evaluate` on the cached fold.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import cv  # noqa: E402
from bench.realdata import realdata  # noqa: E402

OUT = ROOT / "bench" / "out" / "predict"


def _train(job: dict) -> str:
    import torch
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    from roiseg.training.config import make_config
    from roiseg.training.loop import Trainer
    out = Path(job["out"])
    if (out / "done").exists():
        return str(out / "last.pth")
    shutil.rmtree(out, ignore_errors=True)
    tr = Trainer(make_config(**job["config"]))
    tr.fit()
    tr.close()
    (out / "done").write_text("")
    return str(out / "last.pth")


def ck_dir(variant: str, fold: int, seed: int) -> Path:
    return OUT / "ck" / (f"{variant.replace(' ', '_')}_f{fold}" + (f"_s{seed}" if seed else ""))


VARIANTS = {"default": {}, "prior": {"model": "prior"}, "score head": {"score_head": True}, "fine s4": {}}
# variants trained on a store with a fine map (cache --fine-feature): variant -> (tag, tensor)
FINE_STORES = {"fine s4": ("s4", "/backbone/backbone/dark2/dark2.1/conv3/act/Mul_output_0")}
BASELINES = ("default", "prior")     # the rows every run needs


def variant_store(v: str) -> Path:
    """The store variant ``v`` trains and is evaluated on (built on first use)."""
    if v not in FINE_STORES:
        return OUT / "store.zarr"
    tag, tensor = FINE_STORES[v]
    store = OUT / f"store_{tag}.zarr"
    if not (store / ".zattrs").exists():
        cv.build_store(OUT, tensor, tag)
    return store


def train_folds(store: Path, folds: int, procs: int, seeds, variants=tuple(VARIANTS)) -> dict:
    names = cv.make_folds(store, folds)
    jobs = []
    for f, seed in ((f, s) for s in seeds for f in range(folds)):
        train = sorted(n for g, fold in enumerate(names) if g != f for n in fold)
        analysis = OUT / f"fold{f}_analyze.json"
        if not analysis.exists():
            cv.fold_analysis(OUT, train, f)
        for v in variants:
            vs = variant_store(v)
            cfg = dict(train_store=str(vs), val_store=str(vs), train_images=train, val_images=names[f],
                       analysis=str(analysis), seed=seed, workers=0, resident="cpu", visualize=False,
                       tensorboard=False, device="cpu", out=str(ck_dir(v, f, seed)))
            cfg.update(VARIANTS[v])
            jobs.append({"fold": f, "seed": seed, "variant": v, "config": cfg, "out": cfg["out"]})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(procs) as pool:
        paths = list(pool.map(_train, jobs))
    return {(j["variant"], j["fold"], j["seed"]): (p, names[j["fold"]]) for j, p in zip(jobs, paths)}


def quiet_ap(gt: dict, results: list, iou_type: str = "segm") -> np.ndarray:
    """COCO stats[:6] of ``results`` against the annotation dict ``gt``: mask AP (pycocotools) or
    boundary AP (faster-coco-eval), as `evaluate --coco-eval` computes them."""
    from roiseg.evaluation.coco_eval import coco_stats
    return coco_stats(gt, results, iou_type)


def true_ious(gt: dict, results: list) -> np.ndarray:
    """Per result: its mask IoU with the best-matching GT person of its image (what a perfect
    mask-quality score would be)."""
    from pycocotools import mask as mask_utils
    hw = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    by_image: dict[int, list] = {}
    for a in gt["annotations"]:
        seg = a["segmentation"]
        if isinstance(seg, list):                      # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, *hw[a["image_id"]]))
        elif isinstance(seg["counts"], list):          # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, *seg["size"])
        else:
            rle = {**seg, "counts": seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]}
        by_image.setdefault(a["image_id"], []).append(rle)
    out = np.zeros(len(results))
    for k, r in enumerate(results):
        g = by_image.get(r["image_id"], [])
        if g:
            seg = {**r["segmentation"], "counts": r["segmentation"]["counts"].encode()}
            out[k] = float(np.max(mask_utils.iou([seg], g, [0] * len(g))))
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (ties broken by order; scores are continuous)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 1 else float("nan")


def resample(gt: dict, results: list, pick: np.ndarray) -> tuple[dict, list]:
    """The data set made of images ``pick`` (repeats become new images with new ids)."""
    ims = {im["id"]: im for im in gt["images"]}
    anns, res = {}, {}
    for a in gt["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    for r in results:
        res.setdefault(r["image_id"], []).append(r)
    ids = sorted(ims)
    out_gt = {"images": [], "annotations": [], "categories": gt["categories"]}
    out_res = []
    for new_id, k in enumerate(pick, 1):
        old = ids[k]
        out_gt["images"].append({**ims[old], "id": new_id})
        out_gt["annotations"] += [{**a, "image_id": new_id, "id": len(out_gt["annotations"]) + j + 1}
                                  for j, a in enumerate(anns.get(old, []))]
        out_res += [{**r, "image_id": new_id} for r in res.get(old, [])]
    return out_gt, out_res


def watched(make_predictor, seen: list):
    """``make_predictor`` whose predictor also appends every ``Prediction`` to ``seen``."""
    def make(detection):
        predictor = make_predictor(detection)
        predict = predictor.predict

        def predict_and_keep(*a, **k):
            seen.append(predict(*a, **k))
            return seen[-1]
        predictor.predict = predict_and_keep
        return predictor
    return make


def score_before(pred) -> list[float]:
    """Each person's score as predict gave it before mask certainty: the rule predict still applies
    to a graph without a scores output (the detector's score, or the mask's mean probability)."""
    from roiseg.runtime.predict import person_records
    return [r.score for r in person_records(dataclasses.replace(pred, quality=None), 0, 1, 0.5)]


def bootstrap_ap(gt: dict, runs: dict[str, list[list]], n: int, seed: int = 0) -> dict:
    """AP (mean over seeds) of each protocol with a 95% CI over images, and the differences to
    the baselines with the same resampled images.  ``runs``: name -> one results list per seed."""
    rng = np.random.default_rng(seed)
    n_img = len(gt["images"])
    boots = {k: [] for k in runs}
    for _ in range(n):
        pick = rng.integers(0, n_img, n_img)
        for k, per_seed in runs.items():
            boots[k].append(np.mean([quiet_ap(*resample(gt, r, pick))[0] for r in per_seed]))
    return {k: np.asarray(v) for k, v in boots.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--boot", type=int, default=200, help="bootstrap resamples of the images")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="decoders to compare (default and prior always)")
    ap.add_argument("--conf", type=float, default=0.01, help="detection score threshold (low for AP, as YOLO val)")
    args = ap.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    logging.basicConfig(level=logging.WARNING)
    OUT.mkdir(parents=True, exist_ok=True)
    store = OUT / "store.zarr"
    if not (store / ".zattrs").exists():
        cv.build_store(OUT)
    variants = list(dict.fromkeys([*BASELINES, *args.variants.split(",")]))
    cks = train_folds(store, args.folds, args.procs, seeds, variants)
    if args.train_only:
        return
    import torch
    torch.set_num_threads(2)
    from pycocotools import mask as mask_utils

    from roiseg.inference.evaluate import evaluate_checkpoint
    from roiseg.inference.torch_decoder import checkpoint_predictor
    from roiseg.runtime.detection import DetectionSettings
    from roiseg.runtime.predict import PredictOptions, run_predict

    def box_filled(pooled: list) -> list:
        """The same detections with the box filled as the mask (baseline)."""
        out = []
        for r in pooled:
            h, w = r["segmentation"]["size"]
            rle = mask_utils.frPyObjects(np.array([r["bbox"]], np.float64), h, w)[0]
            rle["counts"] = rle["counts"].decode()
            out.append({**r, "segmentation": rle})
        return out

    gt = json.loads(realdata().ann.read_text())
    runs, info = {}, {}
    for v in variants:
        for boxes in ("auto", "gt"):
            key = f"{v} / {boxes} boxes"
            runs[key], info[key] = [], {"images_per_s": [], "predict_vs_evaluate_max_diff": 0.0}
            for seed in seeds:
                pooled = []
                for f in range(args.folds):
                    ck, names = cks[(v, f, seed)]
                    out = OUT / "pred" / f"{v}_{boxes}_f{f}_s{seed}"
                    opts = PredictOptions(source=realdata().images, out=out, checkpoint=Path(ck), onnx=realdata().onnx, boxes=boxes,
                                          ann=realdata().ann, only=names, overlays=f == 0 and v == "default" and seed == 0,
                                          detection=DetectionSettings(conf=args.conf), progress=False,
                                          provider="cpu")
                    shutil.rmtree(out, ignore_errors=True)   # predict would start out2 next to a used folder
                    seen = []
                    summary = run_predict(opts, watched(checkpoint_predictor(opts), seen))
                    info[key]["images_per_s"].append(summary["images_per_s"])
                    preds = json.loads((Path(summary["out"]) / "predictions.json").read_text())
                    before = [b for pr in seen for b in score_before(pr)]
                    assert len(before) == len(preds)
                    pooled += [{**r, "score_before": b} for r, b in zip(preds, before)]
                    if boxes == "gt":   # predict with GT boxes == evaluate on the cached fold
                        ev = evaluate_checkpoint(Path(ck), val_store=variant_store(v), val_images=names)
                        info[key]["predict_vs_evaluate_max_diff"] = max(
                            info[key]["predict_vs_evaluate_max_diff"],
                            abs(summary["instance_mIoU"] - ev["instance_mIoU"]),
                            abs(summary["boundary_IoU"] - ev["boundary_IoU"]))
                runs[key].append(pooled)
            ious = [true_ious(gt, p) for p in runs[key]]    # how well the scores rank the masks
            info[key]["score_vs_true_iou_spearman"] = float(np.mean(
                [spearman(np.array([r["score"] for r in p]), iou) for p, iou in zip(runs[key], ious)]))
            if v == "default":
                runs[f"box filled / {boxes} boxes"] = [box_filled(p) for p in runs[key]]
                # today's masks with other scores: the true IoU (the ceiling of a mask-quality
                # score) and a constant (no ranking at all)
                runs[f"default, oracle score / {boxes} boxes"] = [
                    [{**r, "score": float(t)} for r, t in zip(p, iou)] for p, iou in zip(runs[key], ious)]
                runs[f"default, constant score / {boxes} boxes"] = [[{**r, "score": 1.0} for r in p]
                                                                    for p in runs[key]]
                runs[f"default, score before certainty / {boxes} boxes"] = [
                    [{**r, "score": r["score_before"]} for r in p] for p in runs[key]]
    results = {}
    for key, per_seed in runs.items():
        stats = np.mean([quiet_ap(gt, r) for r in per_seed], 0)
        b_stats = np.mean([quiet_ap(gt, r, "boundary") for r in per_seed], 0)
        results[key] = {"AP": stats[0], "AP50": stats[1], "AP75": stats[2], "AP_S": stats[3], "AP_M": stats[4],
                        "AP_L": stats[5], "boundary_AP": b_stats[0], "boundary_AP75": b_stats[2],
                        "detections_per_seed": len(per_seed[0]), **info.get(key, {})}
    # CIs for the protocols and baselines; the re-scored rows are bounds, not protocols
    rescored = ("oracle score", "constant score")
    boots = bootstrap_ap(gt, {k: v for k, v in runs.items() if not any(x in k for x in rescored)}, args.boot)
    ci = lambda a: [float(np.percentile(a, 2.5)), float(np.percentile(a, 97.5))]  # noqa: E731
    for key in runs:
        results[key]["AP_CI"] = ci(boots[key]) if key in boots else [float("nan")] * 2
    for boxes in ("auto", "gt"):
        d = f"default / {boxes} boxes"
        for base in (f"box filled / {boxes} boxes", f"prior / {boxes} boxes",
                     f"default, score before certainty / {boxes} boxes"):
            results[d][f"minus {base.split(' /')[0]}"] = [results[d]["AP"] - results[base]["AP"],
                                                          *ci(boots[d] - boots[base])]
        for v in variants:
            if v in BASELINES:
                continue
            o = f"{v} / {boxes} boxes"
            results[o]["minus default"] = [results[o]["AP"] - results[d]["AP"], *ci(boots[o] - boots[d])]
    lines = ["| boxes | decoder | mask AP [95% CI] | AP50 | AP75 | AP S/M/L | boundary AP | boundary AP75 | images/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        v, boxes = key.split(" / ")
        speed = f"{np.mean(r['images_per_s']):.1f}" if "images_per_s" in r else "-"
        lines.append(f"| {boxes} | {v} | {r['AP']:.3f} [{r['AP_CI'][0]:.3f}, {r['AP_CI'][1]:.3f}] | {r['AP50']:.3f} | "
                     f"{r['AP75']:.3f} | {r['AP_S']:.3f}/{r['AP_M']:.3f}/{r['AP_L']:.3f} | "
                     f"{r['boundary_AP']:.3f} | {r['boundary_AP75']:.3f} | {speed} |")
    for boxes in ("auto", "gt"):
        r = results[f"default / {boxes} boxes"]
        for k in ("minus box filled", "minus prior", "minus default, score before certainty"):
            lines.append(f"\n{boxes} boxes, default {k}: {r[k][0]:+.3f} [{r[k][1]:+.3f}, {r[k][2]:+.3f}]")
        lines.append(f"\n{boxes} boxes, rank correlation of the score with the true mask IoU: "
                     + ", ".join(f"{v} {results[f'{v} / {boxes} boxes']['score_vs_true_iou_spearman']:.3f}"
                                 for v in variants if v != "prior"))
        for v in variants:
            if v not in BASELINES:
                o = results[f"{v} / {boxes} boxes"]
                lines.append(f"\n{boxes} boxes, {v} minus default: {o['minus default'][0]:+.3f} "
                             f"[{o['minus default'][1]:+.3f}, {o['minus default'][2]:+.3f}]")
        if boxes == "gt":
            lines.append(f"\npredict --boxes gt vs evaluate, instance mIoU and boundary IoU: max |difference| over folds and seeds "
                         f"{r['predict_vs_evaluate_max_diff']:.1e}")
    text = "\n".join(lines)
    print(text)
    (OUT / "realdata_predict.md").write_text(text + "\n")
    (OUT / "realdata_predict.json").write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
