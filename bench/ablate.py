"""The seed's ablation table as one command, over the same k folds as bench/realdata_cv.py.

    uv run python bench/ablate.py [--variants all|a,b,...] [--folds 5] [--seeds 0] [--epochs 12]

Each variant changes one thing against the default recipe; every row reports pooled instance_mIoU
with a 95% bootstrap CI over images, the class IoUs, COCO S/M/L, overlapped persons, and the
difference to the default (paired, same persons, CI over images).  Output: markdown on stdout and
bench/out/ablation.md.  Runs are cached per (variant, fold, seed, epochs) in bench/out/cv/runs.
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
from bench.realdata_cv import fmt  # noqa: E402
from roiseg.data.store import FeatureStore  # noqa: E402

VARIANTS = {
    "default": {},
    # the recipe's own choices (each default reverted)
    "no feature norm": {"feature_norm": "none"},
    "no flip": {"hflip": 0.0},
    "flip = mirrored map": {"hflip_source": "map"},
    "64 ROIs/step": {"rois_per_step": 64, "min_steps": 150},   # same epochs, 4x fewer steps
    "min 1000 steps": {"min_steps": 1000},
    "Dice on class 2 too": {"dice_classes": [1, 2]},
    "no overlap boost": {"overlap_boost": 1},
    # the seed's ablations
    "CE only": {"dice_weight": 0.0},
    "2 classes": {"classes": 2},
    "no class weights": {"class_weights": "none"},
    "CE+Dice+boundary": {"boundary_weight": 1.0},
    "mean-shape prior": {"model": "prior"},
    "hidden 256": {"hidden": 256},
    "global context": {"model": "global"},
}
HEADER = ("| variant | instance_mIoU [95% CI] | vs default [CI] | 3-class mIoU | IoU bg / target / other | "
          "instance S / M / L | overlapped | epoch of class 2 > 0 |\n|---|---|---|---|---|---|---|---|")


def first_other_epoch(results, variant) -> str:
    if variant == "no EMA":
        return "n/a"
    curves = [r["other_curve"] for r in results if r["variant"] == variant]
    firsts = [next((e + 1 for e, v in enumerate(c) if v > 0.01), None) for c in curves]
    if any(f is None for f in firsts):
        return "never" if all(f is None for f in firsts) else "some runs never"
    return f"{np.mean(firsts):.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="all", help="comma-separated names (see VARIANTS) or all")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=0, help="0 = train's default (auto)")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--only-folds", help="run only these folds of the k (e.g. 0,1,2: fewer runs, same "
                                         "split; every row, the default's too, is then over those persons)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/cv")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = list(VARIANTS) if a.variants == "all" else ["default"] + [
        v.strip() for v in a.variants.split(",") if v.strip() and v.strip() != "default"]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    store = cv.build_store(a.out)
    seeds = [int(s) for s in a.seeds.split(",")]
    only = [int(f) for f in a.only_folds.split(",")] if a.only_folds else None
    results = cv.run_jobs({n: VARIANTS[n] for n in names}, store, a.out, a.folds, seeds, a.epochs, a.procs,
                          only_folds=only, raw_curve=False)
    results = [r for r in results if only is None or r["fold"] in only]
    roi_image = FeatureStore(store).tables["roi_image"]
    ref = cv.pooled_table(results, "default")
    rows, summary = [], {}
    # EMA changes nothing in training: the default runs scored with their raw weights are "no EMA"
    with_raw = [r for r in results if r["variant"] == "default" and "per_roi_raw" in r]
    if len(with_raw) == len([r for r in results if r["variant"] == "default"]):
        results = results + [{**r, "variant": "no EMA", "per_roi": r["per_roi_raw"]} for r in with_raw]
        names = names + ["no EMA"]
        VARIANTS["no EMA"] = {"ema": 0.0}
    for n in names:
        recs = cv.pooled_table(results, n)
        m = cv.metrics_of(list(recs.values()))
        lo, hi = cv.bootstrap_ci(recs, roi_image, "instance_mIoU")
        d = cv.bootstrap_diff(recs, ref, roi_image) if n != "default" else None
        summary[n] = {**m, "ci": [lo, hi], "diff_default": d}
        cells = [n, f"**{fmt(m['instance_mIoU'])}** [{fmt(lo)}, {fmt(hi)}]",
                 f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" if d else "",
                 fmt(m["mIoU"]), f"{fmt(m['iou_bg'])} / {fmt(m['iou_target'])} / {fmt(m['iou_other'])}",
                 f"{fmt(m['S'])} / {fmt(m['M'])} / {fmt(m['L'])}", fmt(m["overlapped"]),
                 first_other_epoch(results, n) if VARIANTS[n].get("classes", 3) == 3 else "n/a"]
        rows.append("| " + " | ".join(cells) + " |")
    persons = len(ref)
    title = (f"Ablations: {a.folds}-fold CV by image over $ROISEG_REALDATA (YOLOX-Nano features)"
             f"{f', folds {only} only' if only else ''} ({persons} persons), seeds {seeds}, {a.epochs or 'auto'} epochs, "
             f"final epoch; CIs: 95% bootstrap over images; each row changes one default")
    text = f"{title}\n\n{HEADER}\n" + "\n".join(rows) + "\n"
    print(text)
    (a.out.parent / "ablation.md").write_text(text)
    (a.out.parent / "ablation.json").write_text(json.dumps({"settings": {**vars(a), "out": str(a.out)},
                                                            "summary": summary}, indent=2, default=float))


if __name__ == "__main__":
    main()
