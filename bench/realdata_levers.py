"""Which outline levers help?  The issue-21 table: 5-fold CV by image over $ROISEG_REALDATA.

    uv run python bench/realdata_levers.py [--variants default,fine-s4,...] [--seeds 0,1] [--procs 2]

Every variant is today's default `train` plus one lever (or a combination), trained on every fold
and seed like ``realdata_cv.py``.  Per variant: instance mIoU and boundary IoU with 95% bootstrap
CIs over images, the difference to the default (paired, per ROI, bootstrap over images), S / M / L,
and COCO mask AP / AP75 / boundary AP with the annotated boxes, each from the final epoch's masks of
all folds pooled (one COCO evaluation over all 61 images per seed; mean over seeds, then the seeds'
range), plus the cost: stored bytes per image (dense and ROI-sparse) and training ROIs/s.
Runs are cached in bench/out/levers/runs (delete to retrain).

The learning curve (the default on a quarter and a half of each fold's training images):

    uv run python bench/realdata_levers.py --variants default,train-1/4,train-1/2 --report realdata_learning_curve
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import cv  # noqa: E402
from roiseg.data.sparse import DEFAULT_MARGIN, readable_cells  # noqa: E402
from roiseg.data.store import FeatureStore  # noqa: E402
from roiseg.evaluation.coco_eval import coco_stats, store_ground_truth  # noqa: E402

FINE = {"s4": "/backbone/backbone/dark2/dark2.1/conv3/act/Mul_output_0",   # [32, 160, 160]
        "s2": "/backbone/backbone/stem/conv/act/Mul_output_0",             # [16, 320, 320]
        "rgb": "input"}                                                     # [3, 640, 640]
# variant -> (fine map of its store or None, train settings over the default)
VARIANTS = {
    "default": (None, {}),
    "prior": (None, {"model": "prior"}),
    "score-head": (None, {"score_head": True}),
    "boundary-loss": (None, {"boundary_weight": 1.0}),
    "mask-112": (None, {"mask_size": 112}),
    "fine-s4": ("s4", {}),
    "fine-s2": ("s2", {}),
    "rgb": ("rgb", {}),
    "fine-s4+112": ("s4", {"mask_size": 112}),
    "fine-s4+boundary": ("s4", {"boundary_weight": 1.0}),
    # the learning curve: the default on a quarter and a half of each fold's training images
    "train-1/4": (None, {"train_share": 0.25}),
    "train-1/2": (None, {"train_share": 0.5}),
    # ... or on a fixed number of them (nested: 12 of the 24, 24 of the 48 ...)
    "train-12": (None, {"train_count": 12}),
    "train-24": (None, {"train_count": 24}),
    "train-48": (None, {"train_count": 48}),
    "train-96": (None, {"train_count": 96}),
    # the seed's ablations (each one default reverted)
    "2-classes": (None, {"classes": 2}),
    "ce-only": (None, {"dice_weight": 0.0}),
    "no-class-weights": (None, {"class_weights": "none"}),
    "global": (None, {"model": "global"}),
    "zero-features": (None, {"zero_features": True}),
}


def fmt(x, nd=3):
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{nd}f}"


def pooled_ap(results: list[dict], variant: str, gt: dict) -> dict:
    """Per seed: COCO mask AP, AP75 and boundary AP of all folds' final masks pooled."""
    per_seed = {}
    for r in results:
        if r["variant"] == variant and "coco_dets" in r:
            per_seed.setdefault(r["seed"], []).extend(r["coco_dets"])
    out = {}
    for seed, dets in sorted(per_seed.items()):
        segm, bnd = coco_stats(gt, dets, "segm"), coco_stats(gt, dets, "boundary")
        out[seed] = {"AP": segm[0], "AP75": segm[2], "AP_S": segm[3], "bAP": bnd[0], "bAP75": bnd[2]}
    return out


def store_bytes(store: Path) -> dict:
    """Stored bytes per image of the maps (unmirrored) and their ROI-sparse share of cells."""
    fs = FeatureStore(store)
    n = len(fs.valid_images())
    size = lambda a: sum(p.stat().st_size for p in (store / a).iterdir() if p.name[0].isdigit())  # noqa: E731
    out = {"features_per_image": size("features") / n}
    policy = fs.meta.source.policy
    t = fs.tables
    for name, shape in (("features", fs.meta.source.feature_shape),) + (
            (("fine", fs.meta.fine.shape),) if fs.has_fine else ()):
        share = []
        for i in fs.valid_images():
            a, b = t["image_roi_start"][i], t["image_roi_start"][i + 1]
            h, w = (int(v) for v in t["orig_hw"][i])
            share.append(readable_cells(t["roi_box"][a:b], (w, h), policy, DEFAULT_MARGIN, fs.meta.source.roi_padding,
                                        shape[1:]).mean())
        out[f"{name}_raw_per_image"] = int(np.prod(shape)) * 2
        out[f"{name}_sparse_share"] = float(np.mean(share))
    if fs.has_fine:
        out["fine_per_image"] = size("fine") / n
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--only-folds", help="run only these folds of the k (a screen: e.g. 0,1)")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep each run's last checkpoint in <out>/kept (for predict and other later evaluations)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/levers")
    ap.add_argument("--report", default="realdata_levers", help="name of the .md/.json written next to --out")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    a.out.mkdir(parents=True, exist_ok=True)
    names = [v for v in a.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    seeds = [int(s) for s in a.seeds.split(",")]
    base = cv.build_store(a.out)
    stores = {None: base}
    for v in names:
        tag = VARIANTS[v][0]
        if tag not in stores:
            stores[tag] = cv.build_store(a.out, FINE[tag], tag)
    jobs = {v: {**VARIANTS[v][1], "train_store": str(stores[VARIANTS[v][0]]),
                "val_store": str(stores[VARIANTS[v][0]])} for v in names}
    only = [int(f) for f in a.only_folds.split(",")] if a.only_folds else None
    results = cv.run_jobs(jobs, base, a.out, a.folds, seeds, 0, a.procs, raw_curve=False, coco_dets=True,
                          only_folds=only, keep_checkpoints=a.keep_checkpoints)
    results = [r for r in results if r["seed"] in seeds and (only is None or r["fold"] in only)]
    fs = FeatureStore(base)
    roi_image = fs.tables["roi_image"]
    if only is None:
        gt = store_ground_truth(fs)
    else:   # a screen on some folds: AP over their images only
        val = {n for f in only for n in cv.make_folds(base, a.folds)[f]}
        gt = store_ground_truth(fs, [i for i in fs.valid_images() if fs.tables["file_name"][i] in val])
    pooled = {v: cv.pooled_table(results, v) for v in names}
    ref = "default" if "default" in names else names[0]
    rows = []
    summary = {}
    for v in names:
        recs = pooled[v]
        m = cv.metrics_of(list(recs.values()))
        ci = cv.bootstrap_ci(recs, roi_image, "instance_mIoU")
        bci = cv.bootstrap_ci(recs, roi_image, "boundary_IoU")
        d = cv.bootstrap_diff(recs, pooled[ref], roi_image) if v != ref else None
        db = cv.bootstrap_diff({r: {**x, "iou": x["biou"]} for r, x in recs.items()},
                               {r: {**x, "iou": x["biou"]} for r, x in pooled[ref].items()}, roi_image) if v != ref else None
        aps = pooled_ap(results, v, gt)
        apm = {k: float(np.mean([s[k] for s in aps.values()])) for k in ("AP", "AP75", "AP_S", "bAP", "bAP75")} \
            if aps else {}
        aprange = {k: [float(min(s[k] for s in aps.values())), float(max(s[k] for s in aps.values()))]
                   for k in apm}
        rps = float(np.mean([r["rois_per_s"] for r in results if r["variant"] == v]))
        st = store_bytes(stores[VARIANTS[v][0]])
        summary[v] = {**m, "instance_ci": ci, "boundary_ci": bci, "diff_default": d, "diff_default_boundary": db,
                      "ap": apm, "ap_seed_range": aprange, "rois_per_s": rps, "store": st}
        dtxt = lambda x: f"{x[0]:+.3f} [{x[1]:+.3f}, {x[2]:+.3f}]" if x else ""  # noqa: E731
        rows.append("| " + " | ".join([
            v, f"**{fmt(m['instance_mIoU'])}** [{fmt(ci[0])}, {fmt(ci[1])}]", dtxt(d),
            f"{fmt(m['boundary_IoU'])} [{fmt(bci[0])}, {fmt(bci[1])}]", dtxt(db),
            f"{fmt(m['S'])} / {fmt(m['M'])} / {fmt(m['L'])}",
            " / ".join(f"{fmt(apm.get(k))}" for k in ("AP", "AP75", "bAP")) if apm else "n/a",
            f"{rps:.0f}"]) + " |")
    header = ("| variant | instance mIoU [95% CI] | - default [CI] | boundary IoU [CI] | - default [CI] | "
              "instance S / M / L | mask AP / AP75 / boundary AP (annotated boxes, pooled folds, mean of seeds) | "
              "train ROIs/s (1 thread) |\n|---|---|---|---|---|---|---|---|")
    title = (f"{a.folds}-fold CV by image over {len(np.unique(roi_image))} real images ({len(roi_image)} persons), "
             f"seeds {seeds}, auto epochs, final epoch, YOLOX-Nano features; fine maps: "
             + ", ".join(f"{k} = {FINE[k]}" for k in sorted({VARIANTS[v][0] for v in names} - {None})))
    costs = ["| store | feature bytes/image (lz4) | fine bytes/image (lz4) | fine raw / feature raw | "
             "sparse share: features / fine |", "|---|---|---|---|---|"]
    for tag, store in stores.items():
        st = store_bytes(store)
        ratio = st.get("fine_raw_per_image", 0) / st["features_raw_per_image"]
        costs.append(f"| {tag or 'default'} | {st['features_per_image'] / 1e6:.2f} MB | "
                     f"{st.get('fine_per_image', 0) / 1e6:.2f} MB | {ratio:.2f} | "
                     f"{st['features_sparse_share']:.2f} / {st.get('fine_sparse_share', float('nan')):.2f} |")
    text = f"{title}\n\n{header}\n" + "\n".join(rows) + "\n\nStorage:\n\n" + "\n".join(costs) + "\n"
    print(text)
    (a.out.parent / f"{a.report}.md").write_text(text)
    (a.out.parent / f"{a.report}.json").write_text(json.dumps(summary, indent=2, default=float))


if __name__ == "__main__":
    main()
