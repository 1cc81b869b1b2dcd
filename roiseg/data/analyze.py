"""`cli.py analyze`: class pixel statistics inside padded ROIs -> data_analyze.json.

Counts are exact and made with RLE algebra (pycocotools merge/area on run-length codes), so no
mask is ever decoded: a padded ROI becomes a rectangle RLE, and

    target     = |t ∩ roi|
    non_target = |(all persons) ∩ roi| - target        (the target wins where persons overlap)
    background = |roi| - target - non_target

Pixels belong to the ROI when their centres do (``geometry.pixel_center_span``).
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from roiseg.common.files import file_sha256
from roiseg.common.geometry import ResizePolicy, normalized_to_pixel, pad_box
from roiseg.common.version import __version__
from roiseg.data.coco import (
    AnnotationError,
    SkipReport,
    _parse_instance,
    load_coco,
    person_category_ids,
)
from roiseg.data.rasterize import native_crop
from roiseg.data.sparse import DEFAULT_MARGIN, readable_cells

CLASS_NAMES = ("background", "target", "non_target")
SIZE_BINS_PX = (0, 16, 32, 64, 128, 256, 512, 10_000)
_COCO = None  # set in the parent before forking workers (copy-on-write, no pickling)


def rect_rle(x0: int, y0: int, x1: int, y1: int, h: int, w: int) -> dict:
    return mask_utils.frPyObjects(np.array([[x0, y0, x1 - x0, y1 - y0]], float), h, w)[0]


def roi_counts(rles: list[dict], union: dict, target: int, window, h: int, w: int) -> tuple:
    """(background, target, non_target, persons_in_roi) pixel counts for one ROI window."""
    x0, y0, x1, y1 = window
    area = (x1 - x0) * (y1 - y0)
    if area <= 0:
        return 0, 0, 0, 1
    rect = rect_rle(x0, y0, x1, y1, h, w)
    tgt = int(mask_utils.area(mask_utils.merge([rles[target], rect], intersect=True)))
    fg = tgt if len(rles) == 1 else int(mask_utils.area(mask_utils.merge([union, rect], intersect=True)))
    persons = 1
    if len(rles) > 1:
        for k, rle in enumerate(rles):
            if k != target and mask_utils.area(mask_utils.merge([rle, rect], intersect=True)) > 0:
                persons += 1
    return area - fg, tgt, fg - tgt, persons


def analyze_image(image_id: int, roi_padding: float, policy: ResizePolicy) -> dict:
    coco = _COCO
    info = coco.imgs[image_id]
    w, h = int(info["width"]), int(info["height"])
    skips = SkipReport()
    cats = person_category_ids(coco)
    insts = [i for a in coco.imgToAnns.get(image_id, []) if a.get("category_id") in cats
             if (i := _parse_instance(a, w, h, skips)) is not None]
    rois = []
    if insts:
        rles = [i.rle for i in insts]
        union = mask_utils.merge(rles) if len(rles) > 1 else rles[0]
        sx, sy, _, _ = policy.transform(w, h)
        for t, inst in enumerate(insts):
            padded = normalized_to_pixel(pad_box(inst.box_norm, roi_padding), w, h)
            counts = roi_counts(rles, union, t, native_crop(padded, h, w), h, w)
            size_in = ((padded[2] - padded[0]) * sx, (padded[3] - padded[1]) * sy)
            rois.append((*counts, *size_in))
    kept = None
    if insts:   # what a `cache --sparse` store keeps of this image's stride-8 map
        kept = float(readable_cells(np.array([i.box_norm for i in insts]), (w, h), policy, DEFAULT_MARGIN,
                                    roi_padding, (policy.input_h // 8, policy.input_w // 8)).mean())
    return {"n_instances": len(insts), "rois": rois, "skips": dict(skips.counts), "kept_cells": kept}


def _work(args):
    ids, padding, policy = args
    return [analyze_image(i, padding, policy) for i in ids]


def class_weights(ratios: dict[str, float]) -> dict:
    """Weight variants for the classes named in ``ratios`` (3 classes, or 2 for the ablation)."""
    names = list(ratios)
    r = np.array([max(ratios[c], 1e-6) for c in names])
    inv = 1.0 / r
    inv = inv / inv.mean()
    log_scaled = 1.0 / np.log(1.02 + r)
    log_scaled = log_scaled / log_scaled.mean()
    clipped = np.clip(inv, 0.2, 5.0)

    def named(v):
        return {c: round(float(x), 6) for c, x in zip(names, v)}
    return {
        "source": "roi_mean_ratios",
        "formulas": {
            "inverse_frequency": "w_c = (1/r_c) / mean_k(1/r_k)",
            "log_scaled": "w_c = (1/ln(1.02 + r_c)) / mean_k(1/ln(1.02 + r_k))  (ENet)",
            "inverse_clipped": "w_c = clip(inverse_frequency_c, 0.2, 5.0)",
        },
        "inverse_frequency": named(inv),
        "log_scaled": named(log_scaled),
        "inverse_clipped": named(clipped),
    }


def summarize(results: list[dict], settings: dict) -> dict:
    """The analysis file: counts, class pixel ratios (whole ROIs and per-ROI means), the loss's
    class weights, ROI size statistics in the input frame, and what a sparse store would keep."""
    rois = np.array([r for res in results for r in res["rois"]], dtype=np.float64).reshape(-1, 6)
    per_image = [res["n_instances"] for res in results if res["n_instances"] > 0]
    counts = rois[:, :3].sum(axis=0)
    roi_area = rois[:, :3].sum(axis=1, keepdims=True)
    valid = roi_area[:, 0] > 0
    roi_ratios = rois[valid, :3] / roi_area[valid]
    roi_mean = roi_ratios.mean(axis=0) if len(roi_ratios) else np.zeros(3)
    roi_mean_ratios = {c: float(v) for c, v in zip(CLASS_NAMES, roi_mean)}
    kept = np.array([res["kept_cells"] for res in results if res.get("kept_cells") is not None])
    return {
        "tool": "roiseg.data.analyze",
        "version": __version__,
        "settings": settings,
        "counts": _counts(results, rois, per_image),
        "pixel_counts": {c: int(v) for c, v in zip(CLASS_NAMES, counts)},
        "pixel_ratios": {c: float(v) for c, v in zip(CLASS_NAMES, counts / max(counts.sum(), 1))},
        "roi_mean_ratios": roi_mean_ratios,
        "class_weights": class_weights(roi_mean_ratios),
        "roi_stats": _roi_stats(rois, settings),
        # `cache --sparse` (default margin): share of each image's stride-8 feature cells it stores
        "sparse_cells": {"margin": DEFAULT_MARGIN, **_quantiles(kept)},
    }


def _counts(results: list[dict], rois: np.ndarray, per_image: list[int]) -> dict:
    skips = Counter()
    for res in results:
        skips.update(res["skips"])
    n_hist = Counter(per_image)
    return {"images": len(per_image), "instances": int(sum(per_image)), "rois": int(len(rois)),
            "images_with_several_persons": int(sum(1 for n in per_image if n > 1)),
            "instances_per_image_histogram": {str(k): n_hist[k] for k in sorted(n_hist)},
            "skipped_instances": dict(sorted(skips.items()))}


def _roi_stats(rois: np.ndarray, settings: dict) -> dict:
    """Padded ROI sizes in the input frame (pixels and stride-8 cells), persons per ROI, overlap."""
    w_in, h_in = rois[:, 4], rois[:, 5]
    side = np.sqrt(np.maximum(w_in * h_in, 0))
    hist, _ = np.histogram(side, bins=SIZE_BINS_PX)
    cells_w, cells_h = w_in / 8.0, h_in / 8.0
    return {
        "frame": f"input {settings['input_size'][1]}x{settings['input_size'][0]} ({settings['resize_policy']}), "
                 f"padded ROIs",
        "side_px_histogram": {f"{SIZE_BINS_PX[i]}-{SIZE_BINS_PX[i + 1]}": int(hist[i]) for i in range(len(hist))},
        "width_px": _quantiles(w_in),
        "height_px": _quantiles(h_in),
        "feature_cells_stride8": {"width": _quantiles(cells_w), "height": _quantiles(cells_h),
                                  "share_smaller_than_2x2_cells": _share((cells_w < 2) | (cells_h < 2))},
        "persons_per_roi": {"mean": _mean(rois[:, 3]),
                            "histogram": {str(int(k)): int(v) for k, v in zip(*np.unique(rois[:, 3], return_counts=True))}},
        "overlap_share": _share(rois[:, 2] > 0),
    }


def _mean(x) -> float:
    return float(np.mean(x)) if len(x) else 0.0


def _share(mask) -> float:
    return float(np.mean(mask)) if len(mask) else 0.0


def _quantiles(x) -> dict:
    if not len(x):
        return {}
    q = np.percentile(x, [5, 25, 50, 75, 95])
    return {"mean": round(float(np.mean(x)), 3), **{f"p{p}": round(float(v), 3)
                                                     for p, v in zip((5, 25, 50, 75, 95), q)}}


def run_analyze(ann_path: str | Path, roi_padding: float = 0.1, workers: int | None = None,
                policy: ResizePolicy = ResizePolicy(), progress: bool = True) -> dict:
    global _COCO
    t0 = time.perf_counter()
    _COCO = load_coco(ann_path)
    ids = sorted(_COCO.imgs)
    workers = max(1, workers or os.cpu_count() or 1)
    chunk = max(1, min(256, math.ceil(len(ids) / (workers * 8))))
    jobs = [(ids[i:i + chunk], roi_padding, policy) for i in range(0, len(ids), chunk)]
    results: list[dict] = []
    bar = tqdm(total=len(ids), desc="analyze", unit="img", disable=not progress)
    if workers == 1:
        for job in jobs:
            results.extend(_work(job))
            bar.update(len(job[0]))
    else:
        # workers ignore Ctrl-C: the parent alone stops the run (a worker dying of it would be replaced and the
        # interrupted run go on)
        with mp.get_context("fork").Pool(workers, initializer=signal.signal,
                                         initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
            for job, res in zip(jobs, pool.imap(_work, jobs)):
                results.extend(res)
                bar.update(len(job[0]))
    bar.close()
    settings = {"annotation_file": str(ann_path), "annotation_sha256": file_sha256(ann_path),
                "roi_padding": roi_padding, "pixel_count_resolution": "original",
                "input_size": [policy.input_h, policy.input_w], "resize_policy": policy.mode}
    out = summarize(results, settings)
    if not out["counts"]["instances"]:
        raise AnnotationError(f"no usable person instances in {ann_path}: nothing to analyze "
                              f"(category 'person', non-crowd, with a segmentation)")
    out["image_ids"] = encode_ids(ids)  # lets `train` check the cache's images are among these
    out["elapsed_s"] = round(time.perf_counter() - t0, 3)
    _COCO = None
    return out


def encode_ids(ids) -> str:
    """Sorted image ids as base64 of zlib-compressed uint32 deltas (~1.5 bytes per COCO image)."""
    import base64
    import zlib
    a = np.sort(np.asarray(list(ids), np.int64))
    return base64.b64encode(zlib.compress(np.diff(a, prepend=0).astype(np.uint32).tobytes(), 9)).decode()


def decode_ids(text: str) -> np.ndarray:
    import base64
    import zlib
    return np.cumsum(np.frombuffer(zlib.decompress(base64.b64decode(text)), np.uint32).astype(np.int64))

