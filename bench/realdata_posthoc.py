"""Issue 32's evaluations of trained decoders, after training: the learning curve with detected
boxes and its power-law projection, and the levers that need no retraining (flip TTA, the mask
threshold, the certainty band, a fitted score calibration), on the checkpoints
``bench/realdata_levers.py --keep-checkpoints`` kept (5-fold CV by image over $ROISEG_REALDATA).

    uv run python bench/realdata_posthoc.py [--levers bench/out/levers] [--seeds 0,1]
        [--curve default,train-12,train-24,train-48,train-96] [--levers-of default]

For every kept checkpoint, ``predict``'s own pipeline (``Predictor``: the checkpoint's decoder, the
live YOLOX-Nano extractor) runs on the images of the fold it did not train on, with the annotated
person boxes and with the extractor's own (conf 0.01, as YOLO's val), without and with flip TTA.
Per person it keeps the mask at every threshold of ``THRESHOLDS``, its IoU and boundary IoU with the
annotated mask, and the ROI-grid probabilities (for the certainty bands and the calibration
features).  Runs are cached in <levers>/../posthoc/runs.

Choices made on data are nested: for test fold f, the threshold, the band and the calibration are
chosen / fitted on the other folds' held-out predictions (each from the model that did not train on
them), never on fold f.  Figures pool the 5 folds (one COCO evaluation over all images per seed,
then the mean of the seeds); CIs are 95% bootstrap over images; differences are paired.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import cv  # noqa: E402
from bench.realdata import realdata  # noqa: E402
from bench.realdata_predict import quiet_ap, resample, true_ious  # noqa: E402

THRESHOLDS = [0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7]
BANDS = [0.15, 0.2, 0.25, 0.3, 0.35]              # half-widths of the certainty's unsure band (today 0.25)
T_DEFAULT, BAND_DEFAULT = THRESHOLDS.index(0.5), BANDS.index(0.25)
AREA_S, AREA_M = 32 ** 2, 96 ** 2
log = logging.getLogger("posthoc")


# ---- one checkpoint on its held-out fold ---------------------------------------------------------
def band_certainty(fg: np.ndarray, half: float, ramp: float = 0.05) -> np.ndarray:
    """The certainty S / (S + U + 1) with an unsure band of half-width ``half`` (today's: 0.25)."""
    p = fg.astype(np.float32)
    unsure = np.clip((half - np.abs(p - 0.5)) / ramp + 0.5, 0, 1).sum((1, 2))
    return p.sum((1, 2)) / (p.sum((1, 2)) + unsure + 1)


def grid_features(fg: np.ndarray) -> np.ndarray:
    """Per ROI: mean probability inside the grid mask, soft area share, share of unsure cells."""
    inside = fg > 0.5
    mean_in = np.where(inside.any((1, 2)), (fg * inside).sum((1, 2)) / np.maximum(inside.sum((1, 2)), 1), 0)
    return np.stack([mean_in, fg.mean((1, 2)), ((fg > 0.25) & (fg < 0.75)).mean((1, 2))], 1)


def person_rows(pred, grids: np.ndarray, image: dict, gts: list, det_scores: np.ndarray) -> list[dict]:
    """One row per predicted person: masks (RLE) at every threshold, IoUs with its annotation
    (annotated boxes: ``gts`` in the same order), quality scores and calibration features."""
    from pycocotools import mask as mask_utils

    from roiseg.evaluation.metrics import instance_boundary_iou, instance_iou
    from roiseg.runtime.predict import person_records
    h, w = pred.size
    rows = []
    feats = grid_features(grids)
    bands = np.stack([band_certainty(grids, b) for b in BANDS], 1)
    recs = {t: person_records(pred, image["id"], 1, t, file_name=image["file_name"]) for t in THRESHOLDS}
    for k in range(len(pred)):
        bx = pred.boxes[k] * [w, h, w, h]
        row = {"image_id": image["id"], "det": float(det_scores[k]), "bands": bands[k].tolist(),
               "feats": feats[k].tolist(), "box_area": float((bx[2] - bx[0]) * (bx[3] - bx[1]) / (w * h)),
               "aspect": float(np.log((bx[3] - bx[1] + 1) / (bx[2] - bx[0] + 1))),
               "rle": [recs[t][k].coco_result()["segmentation"] for t in THRESHOLDS], "bbox": recs[0.5][k].bbox}
        if gts:
            gt = gts[k]
            full = mask_utils.decode(gt["rle"]).astype(bool)
            box = box_in_window(bx, pred.windows[k])           # the baseline: the box filled as the mask
            row.update(area=gt["area"], ann_id=gt["id"],
                       iou=[instance_iou(pred.probs[k] > t, pred.windows[k], full) for t in THRESHOLDS],
                       biou=[instance_boundary_iou(pred.probs[k] > t, pred.windows[k], full) for t in THRESHOLDS],
                       box_iou=instance_iou(box, pred.windows[k], full),
                       box_biou=instance_boundary_iou(box, pred.windows[k], full))
        rows.append(row)
    return rows


def box_in_window(box_px: np.ndarray, window) -> np.ndarray:
    """The pixels whose centres lie in the box, on the window's grid (bool [h, w])."""
    x0, y0, x1, y1 = (int(v) for v in window)
    xs, ys = np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5
    return ((ys >= box_px[1]) & (ys < box_px[3]))[:, None] & ((xs >= box_px[0]) & (xs < box_px[2]))[None]


def annotations(gt: dict) -> dict[int, list[dict]]:
    """image id -> its persons (bbox, area, RLE), in annotation order."""
    from pycocotools import mask as mask_utils
    hw = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    out: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        h, w = hw[a["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w))
        out.setdefault(a["image_id"], []).append({"id": a["id"], "bbox": a["bbox"], "area": a["area"], "rle": rle})
    return out


def run_checkpoint(ck: Path, names: list[str], boxes: str, tta: str, gt: dict, anns: dict) -> list[dict]:
    """Every person of the images ``names`` through the checkpoint's pipeline."""
    import roiseg.runtime.pipeline as pipeline
    from roiseg.data.images import load_rgb
    from roiseg.inference.torch_decoder import predictor_from_checkpoint
    from roiseg.runtime.detection import DetectionSettings
    data = realdata()
    det = DetectionSettings(conf=0.01) if boxes == "auto" else None
    predictor = predictor_from_checkpoint(ck, data.onnx, "cpu", "cpu", det)
    grids: list[np.ndarray] = []
    paste = pipeline.paste_windows

    def keep(maps, *a):                                  # the (averaged) ROI grids, before the paste
        grids.append(np.asarray(maps, np.float32))
        return paste(maps, *a)
    pipeline.paste_windows = keep
    by_name = {im["file_name"]: im for im in gt["images"]}
    rows = []
    try:
        for name in names:
            image = by_name[name]
            im = load_rgb(data.images / name)
            grids.clear()
            if boxes == "gt":
                persons = anns.get(image["id"], [])
                b = np.array([[x / im.width, y / im.height, (x + bw) / im.width, (y + bh) / im.height]
                              for x, y, bw, bh in (p["bbox"] for p in persons)]).reshape(-1, 4)
                pred = predictor.predict(im, b, tta=tta)
            else:
                persons, pred = [], predictor.predict(im, tta=tta)
            g = np.concatenate(grids) if grids else np.zeros((0, 1, 1), np.float32)
            rows += person_rows(pred, g, image, persons, pred.scores)
    finally:
        pipeline.paste_windows = paste
    return rows


def cached_run(out: Path, ck: Path, names, boxes, tta, gt, anns) -> list[dict]:
    grid = hashlib.sha1(repr((THRESHOLDS, BANDS)).encode()).hexdigest()[:6]      # rows hold every threshold
    path = out / "runs" / f"{ck.stem}_{boxes}_{tta}_{grid}.json"
    if path.exists():
        return json.loads(path.read_text())
    rows = run_checkpoint(ck, names, boxes, tta, gt, anns)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    log.warning("%s %s boxes, tta %s: %d persons", ck.stem, boxes, tta, len(rows))
    return rows


# ---- scoring -------------------------------------------------------------------------------------
def results_of(rows: list[dict], t: list[int] | int, score) -> list[dict]:
    """COCO results of ``rows`` with each row's mask at threshold index ``t`` (one per row, or one
    for all) and ``score(row)``."""
    ts = t if isinstance(t, list) else [t] * len(rows)
    return [{"image_id": r["image_id"], "category_id": 1, "segmentation": r["rle"][k], "bbox": r["bbox"],
             "score": float(score(r))} for r, k in zip(rows, ts)]


def quality(row: dict, band: int = BAND_DEFAULT) -> float:
    return row["det"] * row["bands"][band]


def instance_metrics(rows: list[dict], t: list[int] | int = T_DEFAULT) -> dict:
    ts = t if isinstance(t, list) else [t] * len(rows)
    iou = np.array([r["iou"][k] for r, k in zip(rows, ts)])
    biou = np.array([r["biou"][k] for r, k in zip(rows, ts)])
    area = np.array([r["area"] for r in rows])
    large = area >= AREA_M
    return {"instance_mIoU": float(iou.mean()), "boundary_IoU": float(biou.mean()),
            "boundary_IoU_L": float(biou[large].mean()), "instance_L": float(iou[large].mean()),
            "S": float(iou[area < AREA_S].mean()), "M": float(iou[(area >= AREA_S) & ~large].mean()), "persons": len(rows)}


def boot_images(gt: dict, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, len(gt["images"]), len(gt["images"])) for _ in range(n)]


def ap_with_ci(gt: dict, per_seed: list[list[dict]], picks, base: list[list[dict]] | None = None) -> dict:
    """Mask AP / AP75 (mean over seeds) with a bootstrap CI over images; with ``base``: the paired
    difference to it and its CI."""
    stats = np.mean([quiet_ap(gt, r) for r in per_seed], 0)
    out = {"AP": float(stats[0]), "AP75": float(stats[2])}
    boots = [np.mean([quiet_ap(*resample(gt, r, p))[0] for r in per_seed]) for p in picks]
    out["AP_CI"] = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]
    if base is not None:
        b_stats = np.mean([quiet_ap(gt, r) for r in base], 0)
        diff = [a - np.mean([quiet_ap(*resample(gt, r, p))[0] for r in base]) for a, p in zip(boots, picks)]
        out["minus_base"] = [float(stats[0] - b_stats[0]), float(np.percentile(diff, 2.5)),
                             float(np.percentile(diff, 97.5))]
    return out


def paired_instance(gt_ids: np.ndarray, a: np.ndarray, b: np.ndarray, picks_images: list[np.ndarray],
                    images: list[int]) -> list[float]:
    """Mean of a - b over persons with a bootstrap CI over images (``gt_ids``: each person's image)."""
    d = a - b
    index = {im: k for k, im in enumerate(images)}
    img = np.array([index[i] for i in gt_ids])
    sums = np.bincount(img, d, len(images))
    cnts = np.bincount(img, None, len(images))
    boots = [sums[p].sum() / max(cnts[p].sum(), 1) for p in picks_images]
    return [float(d.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]


# ---- choices nested in the folds -----------------------------------------------------------------
def gt_subset(gt: dict, image_ids: set) -> dict:
    return {"images": [im for im in gt["images"] if im["id"] in image_ids], "categories": gt["categories"],
            "annotations": [a for a in gt["annotations"] if a["image_id"] in image_ids]}


def nested_threshold(rows: list[dict]) -> list[int]:
    """Per row: the threshold index that maximizes the mean instance IoU of the other folds' persons."""
    pick = {}
    for f in {r["fold"] for r in rows}:
        others = np.array([r["iou"] for r in rows if r["fold"] != f])
        pick[f] = int(others.mean(0).argmax())
    return [pick[r["fold"]] for r in rows]


def nested_band(rows: list[dict], gt: dict, fold_ids: dict[int, set]) -> list[int]:
    """Per row: the certainty band that maximizes mask AP on the other folds' images."""
    pick = {}
    for f in sorted(fold_ids):
        others = [r for r in rows if r["fold"] != f]
        sub = gt_subset(gt, set().union(*(ids for g, ids in fold_ids.items() if g != f)))
        aps = [quiet_ap(sub, results_of(others, T_DEFAULT, lambda r, b=b: quality(r, b)))[0]
               for b in range(len(BANDS))]
        pick[f] = int(np.argmax(aps))
    return [pick[r["fold"]] for r in rows]


def calibration_features(r: dict) -> list[float]:
    return [1.0, r["bands"][BAND_DEFAULT], *r["feats"], r["box_area"], r["aspect"]]


def nested_calibration(rows: list[dict], target: np.ndarray) -> np.ndarray:
    """Per row: its mask's IoU as predicted by a ridge fit on the other folds' persons (features:
    certainty, mean probability inside, soft area, unsure share, box area and aspect), times the
    detector's score."""
    X = np.array([calibration_features(r) for r in rows])
    fold = np.array([r["fold"] for r in rows])
    out = np.zeros(len(rows))
    for f in np.unique(fold):
        tr = fold != f
        w = np.linalg.solve(X[tr].T @ X[tr] + 1e-3 * np.eye(X.shape[1]), X[tr].T @ target[tr])
        out[~tr] = np.clip(X[~tr] @ w, 0, 1)
    return out * np.array([r["det"] for r in rows])


# ---- the learning curve's fit ------------------------------------------------------------------------
def fit_power(n: np.ndarray, metric: np.ndarray) -> dict:
    """Two fits of the error 1 - metric against the number of training images: a pure power law
    ``a n^b`` (b < 0; no floor: the optimistic one) and ``c + a n^b`` with the floor c >= 0 chosen by
    least squares on a grid (the pessimistic one)."""
    err = 1 - metric
    out = {}
    for name, floors in (("power", [0.0]), ("power+floor", np.linspace(0, err.min() * 0.99, 100))):
        best = None
        for c in floors:
            y = np.log(np.maximum(err - c, 1e-9))
            b, loga = np.polyfit(np.log(n), y, 1)
            sse = float(((c + np.exp(loga) * n ** b) - err) @ ((c + np.exp(loga) * n ** b) - err))
            if best is None or sse < best[0]:
                best = (sse, c, float(np.exp(loga)), float(b))
        out[name] = {"floor": best[1], "a": best[2], "b": best[3]}
    return out


def project(fit: dict, n: float) -> float:
    return 1 - (fit["floor"] + fit["a"] * n ** fit["b"])


def images_for(fit: dict, target: float) -> float:
    """Training images at which the fit reaches ``target`` (inf if its floor forbids it)."""
    need = (1 - target) - fit["floor"]
    if need <= 0 or fit["b"] >= 0:
        return float("inf")
    return float((need / fit["a"]) ** (1 / fit["b"]))


# ---- main ----------------------------------------------------------------------------------------
TARGETS = {"instance_mIoU": 0.66, "boundary_IoU_L": 0.45, "AP": 0.30, "AP75": 0.13, "AP_detected": 0.22}


class Runs:
    """The cached predict runs of every (variant, seed, boxes, tta), all folds pooled."""

    def __init__(self, levers: Path, out: Path, seeds: list[int], folds: int, only_folds: list[int] | None = None):
        self.levers, self.out, self.seeds = levers, out, seeds
        gt = json.loads(realdata().ann.read_text())
        self.anns = annotations(gt)
        self.names = cv.make_folds(levers / "store.zarr", folds)
        self.folds = list(range(folds)) if only_folds is None else only_folds     # a preview: some folds only
        ids = {im["file_name"]: im["id"] for im in gt["images"]}
        self.fold_ids = {f: {ids[n] for n in self.names[f]} for f in self.folds}
        self.gt = gt_subset(gt, set().union(*self.fold_ids.values()))
        self.images = sorted(set().union(*self.fold_ids.values()))
        self.picks = None

    def rows(self, variant: str, seed: int, boxes: str, tta: str) -> list[dict]:
        rows = []
        for f in self.folds:
            names = self.names[f]
            ck = self.levers / "kept" / f"{variant}_f{f}_s{seed}_e0.pth"
            if not ck.exists():
                raise SystemExit(f"{ck} is missing: run bench/realdata_levers.py --variants {variant} "
                                 f"--keep-checkpoints first")
            rows += [{**r, "fold": f} for r in cached_run(self.out, ck, names, boxes, tta, self.gt, self.anns)]
        return rows

    def seeds_of(self, variant: str) -> list[int]:
        """The asked seeds whose checkpoints exist on every fold (a seed short of a fold is left out,
        not mixed in: every figure pools whole 5-fold runs)."""
        have = [s for s in self.seeds if all((self.levers / "kept" / f"{variant}_f{f}_s{s}_e0.pth").exists()
                                             for f in self.folds)]
        if not have:
            raise SystemExit(f"{variant}: no seed of {self.seeds} has a kept checkpoint on all {len(self.folds)} "
                             f"folds: run bench/realdata_levers.py --variants {variant} --keep-checkpoints first")
        return have

    def per_seed(self, variant: str, boxes: str, tta: str) -> list[list[dict]]:
        return [self.rows(variant, s, boxes, tta) for s in self.seeds_of(variant)]

    def prefetch(self, variants: list[str], ttas: dict[str, list[str]]) -> int:
        """Run (and cache) every kept checkpoint of ``variants`` there is so far, fold by fold, so a
        later report only reads: ``ttas`` maps a variant to its TTA modes (default: none)."""
        done = 0
        for v in variants:
            for f, names in enumerate(self.names):
                for s in self.seeds:
                    ck = self.levers / "kept" / f"{v}_f{f}_s{s}_e0.pth"
                    if not ck.exists():
                        continue
                    for tta in ttas.get(v, ["none"]):
                        for boxes in ("gt", "auto"):
                            cached_run(self.out, ck, names, boxes, tta, self.gt, self.anns)
                            done += 1
        return done

    def image_picks(self, n: int) -> list[np.ndarray]:
        if self.picks is None or len(self.picks) != n:
            self.picks = boot_images(self.gt, n)
        return self.picks


def seed_mean(per_seed: list[list[dict]], t: list[list[int]] | None = None) -> list[dict]:
    """Annotated-box rows averaged over seeds person by person (the same persons in the same order);
    ``t``: per seed, each row's threshold index (default 0.5)."""
    out = []
    for k, row in enumerate(per_seed[0]):
        ts = [T_DEFAULT if t is None else t[s][k] for s in range(len(per_seed))]
        out.append({**row, "iou": float(np.mean([rows[k]["iou"][i] for rows, i in zip(per_seed, ts)])),
                    "biou": float(np.mean([rows[k]["biou"][i] for rows, i in zip(per_seed, ts)]))})
    return out


def instance_summary(rows: list[dict], runs: Runs, n_boot: int, base: list[dict] | None = None) -> dict:
    """Instance metrics of seed-averaged rows (``iou``/``biou`` scalars) with CIs over images."""
    one = [{**r, "iou": [r["iou"]], "biou": [r["biou"]]} for r in rows]
    m = instance_metrics(one, 0)
    img = np.array([r["image_id"] for r in rows])
    picks = [np.concatenate([np.flatnonzero(img == runs.images[i]) for i in p]) for p in runs.image_picks(n_boot)]
    iou, biou = np.array([r["iou"] for r in rows]), np.array([r["biou"] for r in rows])
    large = np.array([r["area"] for r in rows]) >= AREA_M
    m["instance_CI"] = list(np.percentile([iou[p].mean() for p in picks], [2.5, 97.5]))
    m["boundary_L_CI"] = list(np.percentile([biou[p][large[p]].mean() for p in picks], [2.5, 97.5]))
    if base is not None:
        pim = runs.image_picks(n_boot)
        m["instance_minus_base"] = paired_instance(img, iou, np.array([r["iou"] for r in base]), pim, runs.images)
        lb = np.array([r["biou"] for r in base])
        m["boundary_L_minus_base"] = paired_instance(img[large], biou[large], lb[large], pim, runs.images)
    return m


def ap_table(runs: Runs, per_seed: list[list[dict]], n_boot: int, base=None, t=None,
             score=quality) -> tuple[dict, list[list[dict]]]:
    """Mask AP / AP75 of the rows of each seed (pooled folds, mean of seeds) with its CI, and the
    COCO results (``base``: another protocol's results, for the paired difference)."""
    res = [results_of(rows, T_DEFAULT if t is None else t[s], score) for s, rows in enumerate(per_seed)]
    return ap_with_ci(runs.gt, res, runs.image_picks(n_boot), base), res


def n_train(variant: str, runs: Runs) -> float:
    """Training images per fold: a learning-curve variant's count, else all the other folds'."""
    if variant.startswith("train-") and variant[6:].isdigit():
        return float(variant[6:])
    return float(np.mean([len(runs.images) - len(n) for n in runs.names]))


def curve_rows(runs: Runs, variants: list[str], tta: str, n_boot: int) -> dict:
    """Per learning-curve variant: instance metrics (annotated boxes) and mask AP / AP75 with
    annotated and with detected boxes."""
    out = {}
    for v in variants:
        gt_rows = runs.per_seed(v, "gt", tta)
        m = instance_summary(seed_mean(gt_rows), runs, n_boot)
        ap, _ = ap_table(runs, gt_rows, n_boot)
        det, _ = ap_table(runs, runs.per_seed(v, "auto", tta), n_boot)
        out[v] = {"n": n_train(v, runs), "seeds": len(runs.seeds_of(v)), **m, **ap, "AP_detected": det["AP"], "AP75_detected": det["AP75"],
                  "AP_detected_CI": det["AP_CI"]}
        log.warning("curve %s tta %s: %s", v, tta, {k: round(x, 3) for k, x in out[v].items() if isinstance(x, float)})
    return out


def box_filled(runs: Runs, n_boot: int) -> dict:
    """The baseline every figure needs: each person's box filled as its mask (the default decoder's
    rows give the boxes; annotated boxes score 1, detected ones their detector's score)."""
    from pycocotools import mask as mask_utils
    hw = {im["id"]: (im["height"], im["width"]) for im in runs.gt["images"]}

    def filled(rows):
        out = []
        for r in rows:
            rle = mask_utils.frPyObjects(np.array([r["bbox"]], np.float64), *hw[r["image_id"]])[0]
            out.append({"image_id": r["image_id"], "category_id": 1, "bbox": r["bbox"], "score": r["det"],
                        "segmentation": {**rle, "counts": rle["counts"].decode()}})
        return out
    gt_rows = runs.per_seed("default", "gt", "none")[:1]
    m = instance_summary([{**r, "iou": r["box_iou"], "biou": r["box_biou"]} for r in gt_rows[0]], runs, n_boot)
    ap = ap_with_ci(runs.gt, [filled(gt_rows[0])], runs.image_picks(n_boot))
    det = ap_with_ci(runs.gt, [filled(runs.per_seed("default", "auto", "none")[0])], runs.image_picks(n_boot))
    return {"n": float("nan"), **m, **ap, "AP_detected": det["AP"], "AP75_detected": det["AP75"],
            "AP_detected_CI": det["AP_CI"]}


def curve_fits(curve: dict, runs: Runs) -> dict:
    """Each target metric against the training images: both fits, their projections to 5k and 64k
    images and the images at which they reach the target."""
    n = np.array([c["n"] for c in curve.values()])
    fits = {}
    for key, target in TARGETS.items():
        y = np.array([c[key] for c in curve.values()])
        f = fit_power(n, y)
        fits[key] = {name: {**p, "at_5k": project(p, 5000), "at_64k": project(p, 64000),
                            "images_for_target": images_for(p, target)} for name, p in f.items()}
        fits[key]["target"] = target
        fits[key]["best_measured"] = float(y.max())
    return fits


def lever_rows(runs: Runs, variant: str, n_boot: int) -> dict:
    """The levers that need no retraining, each against today's default (no TTA, threshold 0.5,
    band 0.25, the certainty as the score), paired."""
    out = {}
    base = {b: runs.per_seed(variant, b, "none") for b in ("gt", "auto")}
    base_inst = seed_mean(base["gt"])
    base_ap = {b: ap_table(runs, base[b], n_boot) for b in base}
    out["today's default"] = {**instance_summary(base_inst, runs, n_boot), **{
        f"{b}_{k}": v for b in base for k, v in base_ap[b][0].items()}}
    flip = {b: runs.per_seed(variant, b, "flip") for b in ("gt", "auto")}
    cases = {"flip TTA": (flip, None, quality)}
    cases["threshold chosen on the other folds"] = (base, {b: [nested_threshold(r) if b == "gt" else
                                                               _auto_thresholds(r, g) for r, g in
                                                               zip(base[b], base["gt"])] for b in base}, quality)
    cases["flip TTA + threshold chosen on the other folds"] = (flip, {b: [nested_threshold(r) if b == "gt" else
                                                                        _auto_thresholds(r, g) for r, g in
                                                                        zip(flip[b], flip["gt"])] for b in flip},
                                                               quality)
    cases["certainty band chosen on the other folds"] = (
        {b: [_with(r, "band", nested_band(r, runs.gt, runs.fold_ids)) for r in base[b]] for b in base}, None,
        lambda r: quality(r, r["band"]))
    cases["calibrated score (ridge on the other folds)"] = (
        {b: [_with(r, "calib", nested_calibration(r, _targets(r, runs, b))) for r in base[b]] for b in base}, None,
        lambda r: r["calib"])
    for name, (rows, t, score) in cases.items():
        inst = seed_mean(rows["gt"], None if t is None else t["gt"])
        out[name] = {**instance_summary(inst, runs, n_boot, base_inst)}
        for b in ("gt", "auto"):
            ap, _ = ap_table(runs, rows[b], n_boot, base_ap[b][1], None if t is None else t[b], score)
            out[name].update({f"{b}_{k}": v for k, v in ap.items()})
        if t is not None:
            out[name]["thresholds"] = sorted({THRESHOLDS[i] for ts in t["gt"] for i in ts})
        log.warning("lever %s: %s", name, out[name])
    return out


def _with(rows: list[dict], key: str, values) -> list[dict]:
    return [{**r, key: v} for r, v in zip(rows, values)]


def _auto_thresholds(auto_rows: list[dict], gt_rows: list[dict]) -> list[int]:
    """Detected boxes take the threshold the annotated boxes chose for their fold."""
    chosen = dict(zip((r["fold"] for r in gt_rows), nested_threshold(gt_rows)))
    return [chosen[r["fold"]] for r in auto_rows]


def _targets(rows: list[dict], runs: Runs, boxes: str) -> np.ndarray:
    """Each mask's true IoU at threshold 0.5 (detected boxes: with its best-matching person)."""
    if boxes == "gt":
        return np.array([r["iou"][T_DEFAULT] for r in rows])
    return true_ious(runs.gt, results_of(rows, T_DEFAULT, quality))


def fmt_ci(x: float, ci) -> str:
    return f"{x:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def fmt_diff(d) -> str:
    return f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" if d else ""


def curve_markdown(curve: dict, tta: str) -> list[str]:
    lines = [f"Learning curve, flip TTA {tta} (predict's pipeline, threshold 0.5):", "",
             "| variant | training images per fold | seeds | instance mIoU [95% CI] | boundary IoU | boundary IoU, large "
             "[CI] | mask AP [CI] | AP75 | detected boxes: mask AP [CI] | AP75 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for v, c in curve.items():
        n = "-" if np.isnan(c["n"]) else f"{c['n']:.0f}"
        lines.append(f"| {v} | {n} | {c.get('seeds', '-')} | {fmt_ci(c['instance_mIoU'], c['instance_CI'])} | {c['boundary_IoU']:.3f} | "
                     f"{fmt_ci(c['boundary_IoU_L'], c['boundary_L_CI'])} | {fmt_ci(c['AP'], c['AP_CI'])} | "
                     f"{c['AP75']:.3f} | {fmt_ci(c['AP_detected'], c['AP_detected_CI'])} | {c['AP75_detected']:.3f} |")
    return lines


def fits_markdown(fits: dict, boot: dict) -> list[str]:
    lines = ["Projection (a fit, not a measurement): error = 1 - metric against training images n, `a n^b` (no "
             "floor: the optimistic fit) and `c + a n^b` (a floor c >= 0 by least squares: the pessimistic one); in brackets the 2.5-97.5 % range over bootstrap "
             "resamples of the images (each refitted).", "",
             "| metric | target | best measured | fit | at 5k images | at 64k images | images to reach the target |",
             "|---|---|---|---|---|---|---|"]
    for key, f in fits.items():
        for name in ("power", "power+floor"):
            p = f[name]
            rng = lambda k: boot.get(key, {}).get(name, {}).get(k)  # noqa: E731
            cell = lambda k, v: f"{v:.3f}" + (f" [{rng(k)[0]:.3f}, {rng(k)[1]:.3f}]" if rng(k) else "")  # noqa: E731
            need = p["images_for_target"]
            need_txt = "never (floor)" if not np.isfinite(need) else f"{need:,.0f}"
            if rng("images_for_target"):
                lo, hi = rng("images_for_target")
                need_txt += f" [{lo:,.0f}, {'never' if not np.isfinite(hi) else f'{hi:,.0f}'}]"
            lines.append(f"| {key} | {f['target']} | {f['best_measured']:.3f} | {name} (b = {p['b']:.2f}, c = "
                         f"{p['floor']:.3f}) | {cell('at_5k', p['at_5k'])} | {cell('at_64k', p['at_64k'])} | {need_txt} |")
    return lines


def levers_markdown(levers: dict) -> list[str]:
    lines = ["Levers without retraining, on the default decoder (5 folds x seeds; paired differences to today's "
             "default with 95% CIs over images):", "",
             "| lever | instance mIoU | - default | boundary IoU, large | - default | mask AP | - default | "
             "detected: mask AP | - default |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in levers.items():
        lines.append(f"| {name} | {r['instance_mIoU']:.3f} | {fmt_diff(r.get('instance_minus_base'))} | "
                     f"{r['boundary_IoU_L']:.3f} | {fmt_diff(r.get('boundary_L_minus_base'))} | "
                     f"{fmt_ci(r['gt_AP'], r['gt_AP_CI'])} | {fmt_diff(r.get('gt_minus_base'))} | "
                     f"{fmt_ci(r['auto_AP'], r['auto_AP_CI'])} | {fmt_diff(r.get('auto_minus_base'))} |")
    notes = [f"{name}: thresholds chosen per fold {r['thresholds']}" for name, r in levers.items() if "thresholds" in r]
    return lines + ([""] + notes if notes else [])       # after the table: a line inside would end it


def fit_bootstrap(runs: Runs, variants: list[str], tta: str, n_boot: int) -> dict:
    """The fits refitted on bootstrap resamples of the images (instance metrics: all resamples;
    AP: the first 50), as percentile ranges."""
    n = np.array([n_train(v, runs) for v in variants])
    per_v = {v: seed_mean(runs.per_seed(v, "gt", tta)) for v in variants}
    res = {v: {b: [results_of(r, T_DEFAULT, quality) for r in runs.per_seed(v, b, tta)] for b in ("gt", "auto")}
           for v in variants}
    samples: dict[str, list] = {k: [] for k in TARGETS}
    for k, pick in enumerate(runs.image_picks(n_boot)):
        ys = {key: [] for key in TARGETS}
        for v in variants:
            rows = per_v[v]
            img = np.array([r["image_id"] for r in rows])
            idx = np.concatenate([np.flatnonzero(img == runs.images[i]) for i in pick])
            iou, biou = np.array([r["iou"] for r in rows])[idx], np.array([r["biou"] for r in rows])[idx]
            large = np.array([r["area"] for r in rows])[idx] >= AREA_M
            ys["instance_mIoU"].append(iou.mean())
            ys["boundary_IoU_L"].append(biou[large].mean())
            if k < 50:
                g = [np.mean([quiet_ap(*resample(runs.gt, r, pick))[[0, 2]] for r in res[v][b]], 0) for b in ("gt", "auto")]
                ys["AP"].append(g[0][0])
                ys["AP75"].append(g[0][1])
                ys["AP_detected"].append(g[1][0])
        for key, y in ys.items():
            if len(y) == len(variants):
                f = fit_power(n, np.array(y))
                samples[key].append({name: {"at_5k": project(p, 5000), "at_64k": project(p, 64000),
                                            "images_for_target": images_for(p, TARGETS[key])} for name, p in f.items()})
    out = {}
    for key, ss in samples.items():
        out[key] = {name: {q: [float(np.percentile([s[name][q] for s in ss], 2.5)),
                               float(np.percentile([s[name][q] for s in ss], 97.5))] for q in ss[0][name]}
                    for name in ss[0]} if ss else {}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levers", type=Path, default=ROOT / "bench/out/levers", help="realdata_levers.py's --out")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--curve", default="train-12,train-24,train-48,train-96,default",
                    help="learning-curve variants, fewest training images first ('' to skip)")
    ap.add_argument("--curve-tta", default="none,flip")
    ap.add_argument("--baselines", default="zero-features", help="variants shown beside the curve (not fitted)")
    ap.add_argument("--levers-of", default="default", help="the variant whose levers are judged ('' to skip)")
    ap.add_argument("--boot", type=int, default=200)
    ap.add_argument("--report", default="realdata_posthoc")
    ap.add_argument("--prefetch", action="store_true",
                    help="only run and cache the checkpoints kept so far (while training goes on), no report")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only-folds", help="a preview on these folds of the k (e.g. 0,1,2): not the report's protocol")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch
    torch.set_num_threads(a.threads)
    out = a.levers.parent / "posthoc"
    only = [int(f) for f in a.only_folds.split(",")] if a.only_folds else None
    runs = Runs(a.levers, out, [int(s) for s in a.seeds.split(",")], a.folds, only)
    if a.prefetch:
        names = [v for v in (a.curve + "," + a.baselines + "," + a.levers_of).split(",") if v]
        ttas = {v: [t for t in a.curve_tta.split(",") if t] for v in a.curve.split(",") if v}
        if a.levers_of:
            ttas[a.levers_of] = ["none", "flip"]
        print(f"{runs.prefetch(list(dict.fromkeys(names)), ttas)} runs cached in {out / 'runs'}")
        return
    report, lines = {}, []
    curve_variants = [v for v in a.curve.split(",") if v]
    for tta in [t for t in a.curve_tta.split(",") if t] if curve_variants else []:
        curve = curve_rows(runs, curve_variants, tta, a.boot)
        fits = curve_fits(curve, runs)
        boot = fit_bootstrap(runs, curve_variants, tta, a.boot)
        shown = {**curve, **curve_rows(runs, [v for v in a.baselines.split(",") if v], tta, a.boot)}
        if tta == "none":
            shown["box filled (baseline)"] = box_filled(runs, a.boot)
        report[f"curve_{tta}"] = {"curve": shown, "fits": fits, "fit_ranges": boot}
        lines += curve_markdown(shown, tta) + [""] + fits_markdown(fits, boot) + [""]
    if a.levers_of:
        report["levers"] = lever_rows(runs, a.levers_of, a.boot)
        lines += levers_markdown(report["levers"])
    text = "\n".join(lines) + "\n"
    print(text)
    (a.levers.parent / f"{a.report}.md").write_text(text)
    (a.levers.parent / f"{a.report}.json").write_text(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()
