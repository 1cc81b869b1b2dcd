"""Class weights for the CE loss, read from data_analyze.json (computed when missing)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from featcache.analyze import class_weights, run_analyze, write_json_atomic
from featcache.errors import FeatCacheError

log = logging.getLogger(__name__)
VARIANTS = ("inverse_frequency", "log_scaled", "inverse_clipped", "none")


def load_class_weights(analysis: str | Path, variant: str, num_classes: int, store_meta: dict) -> list | None:
    if variant == "none":
        return None
    if variant not in VARIANTS:
        raise FeatCacheError(f"unknown class weight variant {variant!r}; choose from {VARIANTS}")
    path = Path(analysis)
    if not path.is_file():
        ann = Path(store_meta.get("annotation_path", ""))
        if not ann.is_file():
            raise FeatCacheError(f"{path} not found and the cache's annotation file {ann} is not "
                                 f"here to compute it: run `uv run cli.py analyze --out {path}` "
                                 f"or pass --class-weights none")
        log.info("%s not found: computing it from %s", path, ann)
        write_json_atomic(run_analyze(ann, roi_padding=store_meta.get("roi_padding", 0.1)), path)
    data = json.loads(path.read_text())
    pad = data.get("settings", {}).get("roi_padding")
    if pad is not None and abs(pad - store_meta.get("roi_padding", pad)) > 1e-9:
        log.warning("%s was computed with roi_padding %s, the cache uses %s", path, pad,
                    store_meta.get("roi_padding"))
    ratios = data["roi_mean_ratios"]
    if num_classes == 2:
        ratios = {"background": ratios["background"] + ratios["non_target"], "target": ratios["target"]}
        w = class_weights(ratios)[variant]
    else:
        w = data["class_weights"][variant]
    weights = [float(w[k]) for k in ratios]
    log.info("class weights (%s from %s): %s", variant, path.name, [round(x, 4) for x in weights])
    return weights
