"""Does default `train` learn from real features?  5-fold CV by image over $ROISEG_REALDATA.

    uv run python bench/realdata_cv.py [--folds 5] [--seeds 0,1] [--epochs 12] [--procs 2] [--global]

Trains the default decoder (no tuning flags) and the learned mean-shape prior (``--model prior``: one
3xMxM logit map for every ROI, no features) on every fold and seed, scores "the box filled as the
mask" on the same persons, and prints a markdown table: pooled instance_mIoU / 3-class mIoU / class
IoUs / COCO S-M-L / overlapped persons, 95% bootstrap CIs over images, and the differences
features - prior and features - box.  Runs are cached in bench/out/cv/runs (delete to retrain).
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
from roiseg.data.store import FeatureStore  # noqa: E402


def fmt(x, nd=3):
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{nd}f}"


def variant_rows(results, variants, store, box, roi_image, ref="default", prior="prior", key="per_roi"):
    """Markdown rows: metrics, CI, difference vs prior and box, curve stability."""
    rows, summary = [], {}
    pooled = {v: cv.pooled_table(results, v, key) for v in variants}
    for v in variants:
        recs = pooled[v]
        m = cv.metrics_of(list(recs.values()))
        lo, hi = cv.bootstrap_ci(recs, roi_image, "instance_mIoU")
        b_lo, b_hi = cv.bootstrap_ci(recs, roi_image, "boundary_IoU")
        d_prior = cv.bootstrap_diff(recs, pooled[prior], roi_image) if prior in pooled and v != prior else None
        d_box = cv.bootstrap_diff(recs, box, roi_image)
        st = cv.curve_stability(results, v)
        o_lo, o_hi = cv.bootstrap_ci(recs, roi_image, "iou_other") if v != prior else (np.nan, np.nan)
        summary[v] = {**m, "instance_ci": [lo, hi], "boundary_ci": [b_lo, b_hi], "diff_prior": d_prior, "diff_box": d_box,
                      "stability": st, "other_ci": [o_lo, o_hi]}
        dp = f"{d_prior[0]:+.3f} [{d_prior[1]:+.3f}, {d_prior[2]:+.3f}]" if d_prior else ""
        db = f"{d_box[0]:+.3f} [{d_box[1]:+.3f}, {d_box[2]:+.3f}]"
        cells = [v, f"**{fmt(m['instance_mIoU'])}** [{fmt(lo)}, {fmt(hi)}]",
                 f"{fmt(m['boundary_IoU'])} [{fmt(b_lo)}, {fmt(b_hi)}]", fmt(m["mIoU"]),
                 f"{fmt(m['iou_bg'])} / {fmt(m['iou_target'])} / {fmt(m['iou_other'])}",
                 f"{fmt(m['S'])} / {fmt(m['M'])} / {fmt(m['L'])}", fmt(m["overlapped"]), dp, db,
                 f"{fmt(st['last5_drop'])} / {fmt(st['per_run_drop_mean'])} / {fmt(st['per_run_drop_max'])}"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows, summary


HEADER = ("| variant | instance_mIoU [95% CI] | boundary IoU [95% CI] | 3-class mIoU | IoU bg / target / other | "
          "instance S / M / L | overlapped | - prior [CI] | - box [CI] | last-5 drop: mean curve / per run mean / max |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def box_row(box, box_b, recs_ref, roi_image):
    rois = sorted(recs_ref)
    as_recs = {r: {**recs_ref[r], "iou": box[r], "biou": box_b[r]} for r in rois}
    m = cv.metrics_of(list(as_recs.values()))
    lo, hi = cv.bootstrap_ci(as_recs, roi_image, "instance_mIoU")
    b_lo, b_hi = cv.bootstrap_ci(as_recs, roi_image, "boundary_IoU")
    return (f"| box filled | **{fmt(m['instance_mIoU'])}** [{fmt(lo)}, {fmt(hi)}] | "
            f"{fmt(m['boundary_IoU'])} [{fmt(b_lo)}, {fmt(b_hi)}] | | | "
            f"{fmt(m['S'])} / {fmt(m['M'])} / {fmt(m['L'])} | {fmt(m['overlapped'])} | | | |"), m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, default=0, help="0 = train's default (auto)")
    ap.add_argument("--procs", type=int, default=2, help="single-threaded training processes")
    ap.add_argument("--global", dest="with_global", action="store_true", help="also --model global")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/cv")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    a.out.mkdir(parents=True, exist_ok=True)
    store = cv.build_store(a.out)
    seeds = [int(s) for s in a.seeds.split(",")]
    variants = {"default": {}, "prior": {"model": "prior"}}
    if a.with_global:
        variants["global"] = {"model": "global"}
    results = cv.run_jobs(variants, store, a.out, a.folds, seeds, a.epochs, a.procs, raw_curve=False)
    roi_image = FeatureStore(store).tables["roi_image"]
    box, box_b = cv.box_filled_ious(store)
    rows, summary = variant_rows(results, list(variants), store, box, roi_image)
    brow, bm = box_row(box, box_b, cv.pooled_table(results, "default"), roi_image)
    table = "\n".join([HEADER, *rows, brow])
    n_ep = "-".join(str(e) for e in sorted({len(r["curve"]) for r in results}))
    title = (f"{a.folds}-fold CV by image over {len(np.unique(roi_image))} real images "
             f"({len(box)} persons), seeds {seeds}, {n_ep} epochs ({'auto' if not a.epochs else 'set'}), "
             f"final epoch, YOLOX-Nano features")
    text = f"{title}\n\n{table}\n"
    print(text)
    (a.out.parent / "realdata_cv.md").write_text(text)
    (a.out.parent / "realdata_cv.json").write_text(json.dumps(
        {"settings": vars(a) | {"out": str(a.out)}, "summary": summary, "box": bm}, indent=2, default=float))


if __name__ == "__main__":
    main()
