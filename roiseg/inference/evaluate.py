"""`cli.py evaluate`: score checkpoints on a val store (or straight from annotations + images).

The same ``RoiEvaluator`` and the same batches as `train`'s validation, so evaluating a checkpoint
on the val store it was trained with reproduces the metrics stored in it.  With ``--ann/--images``
the images go through the checkpoint's own extractor and preprocessing into a temporary store first
(the same code path as `cache`), which is then scored and deleted.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import tempfile
from pathlib import Path

import torch

from roiseg.common.errors import RoisegError
from roiseg.data.store import FeatureStore
from roiseg.evaluation.evaluator import RoiEvaluator, run_evaluator, val_batches
from roiseg.loader.sources import CacheIndex
from roiseg.modeling.checkpoint import (
    check_decoder_on_store,
    decoder_from_checkpoint,
    load_checkpoint,
)
from roiseg.modeling.decoders import uses_fine
from roiseg.modeling.devices import default_batch_size, resolve_device
from roiseg.training.config import make_config

log = logging.getLogger(__name__)


def evaluate_checkpoint(path: Path, val_store: Path | None = None, val_images: list | None = None,
                        device: str = "cpu", coco_eval: bool = False, batch_size: int | None = None,
                        details: bool = False, index: CacheIndex | None = None, tta: str = "auto") -> dict:
    """A checkpoint's metrics on a cached val store (its own, ``val_store``, or ``index``): what
    validation computes, with the checkpoint's own stored metrics beside them.  ``tta="flip"``: each
    ROI's probabilities averaged with those of the mirrored image (the store's ``--flip`` features);
    ``"auto"``: flip when the store holds them, else none (the result's ``tta`` says which ran)."""
    ck = load_checkpoint(path)
    model, _ = decoder_from_checkpoint(ck)
    cfg = make_config(base=ck.config)
    if index is None:
        index = _val_index(ck, cfg, val_store, val_images)
    check_decoder_on_store(ck.model_name, ck.cache_fingerprint, index.meta,
                           f"checkpoint {Path(path).name} vs val store {index.path}")
    if len(index.images) == 0:
        raise RoisegError(f"{index.path} holds no cached image to evaluate on")
    tta = resolve_tta(tta, index.meta.flip)
    dev = resolve_device(device)
    model.to(dev)
    ev = RoiEvaluator(index, FeatureStore(index.path), ck.num_classes, dev, coco_eval).keep_records(details)
    bs = batch_size or default_batch_size(dev)
    batches = functools.partial(val_batches, index, dev, bs, ck.mask_size, fine=uses_fine(model))
    mirrored = batches(mirrored=True) if tta == "flip" else None     # checks the store first
    run_evaluator(model, batches(), ev, amp=cfg.amp and (dev.type == "cuda" or cfg.amp_dtype == "bfloat16"),
                  zero_features=cfg.zero_features, amp_dtype=getattr(torch, cfg.amp_dtype), mirrored=mirrored)
    res = ev.result()
    res.update({"checkpoint": str(path), "epoch": ck.epoch, "val_store": str(index.path), "tta": tta,
                "stored_metrics": {m: ck.metrics.get(m) for m in ("mIoU", "instance_mIoU", "boundary_IoU")}})
    return res


def resolve_tta(tta: str, store_has_flips: bool) -> str:
    """``auto`` is flip where the store holds the mirrored image's features (it is then free of
    extra extractor runs and measured better: docs/benchmarks.md), else none."""
    if tta not in ("auto", "none", "flip"):
        raise RoisegError(f"tta must be auto, none or flip, got {tta!r}")
    return ("flip" if store_has_flips else "none") if tta == "auto" else tta


def _val_index(ck, cfg, val_store: Path | None, val_images) -> CacheIndex:
    """The store to score on: ``val_store``, or the checkpoint's own validation store, which must
    hold the annotations the run validated on (its path is relative to where the run started: from
    another folder it may name another store)."""
    store = Path(val_store or cfg.val_store or "")
    if store.is_file():
        raise RoisegError(f"--val-store {store} is a file, not a feature store (a folder `cli.py cache` writes)")
    if not (store / ".zattrs").is_file():
        raise RoisegError(f"val store not found: {store} (pass --val-store, or --ann and --images)")
    index = CacheIndex(store, val_images if val_images is not None else (cfg.val_images if val_store is None else None),
                       partial_option=None)
    if val_store is None and index.meta.annotation_sha256 != ck.val_meta.annotation_sha256:
        raise RoisegError(f"{store} is not the validation store this checkpoint was validated on (its annotation "
                          f"file differs: the run's store paths are relative to where it started); pass --val-store")
    return index


@contextlib.contextmanager
def live_store(ck_path: Path, ann: Path, images: Path, work_dir: Path | None, onnx: Path | None = None,
               provider: str = "auto", limit: int | None = None, device_id: int | None = None, flip: bool = False):
    """A temporary val store of ``ann``/``images`` cached as the checkpoint's training store was
    (``CacheConfig.from_store_meta``: the same code as `cache`); yields its path and deletes it
    afterwards; ``flip``: with the mirrored images' features (for ``tta="flip"``).  TensorRT engines go to the persistent engine cache, not the temporary folder: a
    rebuild takes minutes."""
    from roiseg.common.providers import TRT_CACHE
    from roiseg.data.cache import run_cache
    from roiseg.data.cache_config import CacheConfig
    from roiseg.runtime.pipeline import open_extractor
    ck = load_checkpoint(ck_path)
    open_extractor(ck.source, onnx, "cpu", fine=ck.fuses_fine)  # the same extractor (sha256) before any work
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="evaluate_", dir=work_dir) as tmp:
        projection = None
        if ck.fuses_fine and ck.source.fine_projection:    # the same channel reduction as the training store
            projection = Path(tmp) / "fine_projection.json"
            projection.write_text(json.dumps(ck.source.to_dict()))
        out = Path(tmp) / "val.zarr"
        s = run_cache(CacheConfig.from_store_meta(ck.train_meta, ck.fuses_fine, onnx=onnx, ann=Path(ann),
                                                  images=Path(images), out=out, provider=provider,
                                                  fine_projection_from=projection, limit=limit, trt_cache=TRT_CACHE,
                                                  flip=flip,
                                                  device_id=device_id), progress=True)
        if s["cached"] == 0:
            reasons = "\n  ".join(f"{k}: {v}" for k, v in list(s["skipped"].items())[:5])
            raise RoisegError(f"none of the {s['images']} images of --ann {ann} could be read from --images "
                              f"{images}:\n  {reasons}")
        yield out


ROW = [("epoch", "epoch", "{:>5}"), ("mIoU", "mIoU", "{:.4f}"), ("bg", ("iou", "background"), "{:.3f}"),
       ("target", ("iou", "target"), "{:.3f}"), ("other", ("iou", "non_target"), "{:.3f}"),
       ("inst", "instance_mIoU", "{:.4f}"), ("bIoU", "boundary_IoU", "{:.4f}"), ("S", ("instance_subsets", "small", "instance_mIoU"), "{:.3f}"),
       ("M", ("instance_subsets", "medium", "instance_mIoU"), "{:.3f}"),
       ("L", ("instance_subsets", "large", "instance_mIoU"), "{:.3f}"),
       ("overlap", ("instance_subsets", "overlapped", "instance_mIoU"), "{:.3f}"),
       ("bS", ("instance_subsets", "small", "boundary_IoU"), "{:.3f}"),
       ("bM", ("instance_subsets", "medium", "boundary_IoU"), "{:.3f}"),
       ("bL", ("instance_subsets", "large", "boundary_IoU"), "{:.3f}"),
       ("bOver", ("instance_subsets", "overlapped", "boundary_IoU"), "{:.3f}"),
       ("box", "box_instance_mIoU", "{:.4f}")]


COCO_COLUMNS = [("AP", ("coco_mask_AP", "AP"), "{:.4f}"), ("AP75", ("coco_mask_AP", "AP75"), "{:.4f}"),
                ("bAP", ("coco_boundary_AP", "AP"), "{:.4f}"), ("bAP75", ("coco_boundary_AP", "AP75"), "{:.4f}")]


def _get(d, key):
    for k in (key if isinstance(key, tuple) else (key,)):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def comparison_table(results: list[dict]) -> str:
    """One row per checkpoint: 3-class mIoU and class IoUs, instance mIoU and boundary IoU, instance
    mIoU of S/M/L and overlapped persons, the box-filled baseline on the same persons, and mask and
    boundary AP when computed."""
    cols = list(ROW) + (COCO_COLUMNS if any("coco_mask_AP" in r for r in results) else [])
    names = [Path(r["checkpoint"]).name for r in results]
    wn = max([10] + [len(n) for n in names])
    head = f"{'checkpoint':<{wn}} " + " ".join(f"{c:>7}" for c, _, _ in cols)
    lines = [head, "-" * len(head)]
    for n, r in zip(names, results):
        cells = []
        for _, key, fmt in cols:
            v = _get(r, key)
            cells.append(f"{fmt.format(v) if v is not None else '-':>7}")
        lines.append(f"{n:<{wn}} " + " ".join(cells))
    if results:
        s = results[0]["instance_subsets"]
        lines.append(f"persons: {s['all']['persons']} (S {s['small']['persons']}, M {s['medium']['persons']}, "
                     f"L {s['large']['persons']}, overlapped {s['overlapped']['persons']}); "
                     f"bIoU, bS, bM, bL, bOver = boundary IoU; box = the GT box filled as the mask")
        ttas = sorted({r.get("tta", "none") for r in results})
        lines.append(f"flip TTA: {'/'.join(ttas)} (auto: flip where the store holds mirrored features, cache --flip)")
    return "\n".join(lines)
