"""Class weights for the CE loss, read from data_analyze.json (computed when missing)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from roiseg.common.errors import RoisegError
from roiseg.common.files import write_json_atomic
from roiseg.data.analyze import class_weights, decode_ids, run_analyze
from roiseg.data.store_meta import StoreMeta

log = logging.getLogger(__name__)
VARIANTS = ("inverse_frequency", "log_scaled", "inverse_clipped", "none")


def check_provenance(path: Path, data: dict, store_meta: StoreMeta, image_ids=None) -> None:
    """The analysis must describe the training data: the same annotation file, or one that holds
    every training image (full-set weights for a subset).  Another dataset is refused."""
    have = data.get("settings", {}).get("annotation_sha256")
    want = store_meta.annotation_sha256 or None
    if have is None or want is None or have == want:
        return
    src = data.get("settings", {}).get("annotation_file", "?")
    fix = (f"run `uv run cli.py analyze --ann {store_meta.annotation_path or '<the cache annotation file>'} "
           f"--out {path}`, pass --analysis FILE, or --class-weights none")
    if "image_ids" not in data or image_ids is None:
        log.warning("!! %s was computed from %s, not from the training cache's annotations %s: its class "
                    "weights may belong to another dataset (%s)", path, src, store_meta.annotation_path, fix)
        return
    known = decode_ids(data["image_ids"])
    missing = np.setdiff1d(np.asarray(image_ids, np.int64), known)
    if len(missing):
        raise RoisegError(f"{path} was computed from {src}, which lacks {len(missing)} of the training cache's "
                             f"{len(image_ids)} images (another dataset?): {fix}")
    log.info("class weights from %s (%s, which holds all %d training images)", path.name, src, len(image_ids))


def load_class_weights(analysis: str | Path, variant: str, num_classes: int, store_meta: StoreMeta,
                       image_ids=None, run_folder: Path | None = None, write: bool = True) -> tuple[list | None, str]:
    """(CE class weights or None, the analysis file used).  A missing ``analysis`` is computed from
    the training cache's annotation file and saved in ``run_folder`` (never into the working
    directory, where a later run on other data would find it), and the run records that path."""
    if variant == "none":
        return None, str(analysis)
    if variant not in VARIANTS:
        raise RoisegError(f"unknown class weight variant {variant!r}; choose from {VARIANTS}")
    path = Path(analysis)
    if not path.is_file():
        ann = Path(store_meta.annotation_path)
        if not ann.is_file():
            raise RoisegError(f"{path} not found and the cache's annotation file {ann} is not "
                                 f"here to compute it: run `uv run cli.py analyze --out {path}` "
                                 f"or pass --class-weights none")
        data = run_analyze(ann, roi_padding=store_meta.source.roi_padding, progress=False)
        if run_folder is not None:
            path = Path(run_folder) / path.name
            if write:
                write_json_atomic(path, data)
        log.info("%s not found: class weights computed from %s%s", analysis, ann,
                 f" and saved as {path}" if run_folder is not None else "")
    else:
        data = _read_analysis(path)
    check_provenance(path, data, store_meta, image_ids)
    pad = data.get("settings", {}).get("roi_padding")
    if pad is not None and abs(pad - store_meta.source.roi_padding) > 1e-9:
        log.warning("%s was computed with roi_padding %s, the cache uses %s", path, pad,
                    store_meta.source.roi_padding)
    ratios = data["roi_mean_ratios"]
    if num_classes == 2:
        ratios = {"background": ratios["background"] + ratios["non_target"], "target": ratios["target"]}
        w = class_weights(ratios)[variant]
    else:
        w = data["class_weights"][variant]
    weights = [float(w[k]) for k in ratios]
    log.info("class weights (%s from %s): %s", variant, path.name, [round(x, 4) for x in weights])
    return weights, str(path)


def _read_analysis(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        data["roi_mean_ratios"], data["class_weights"]
    except UnicodeDecodeError as exc:
        raise RoisegError(f"{path} is not a data_analyze.json written by `cli.py analyze` (not a text file): "
                          f"re-run analyze or pass --class-weights none") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise RoisegError(f"{path} is not a data_analyze.json written by `cli.py analyze` ({str(exc)[:200]}): "
                          f"re-run analyze or pass --class-weights none") from exc
    return data
