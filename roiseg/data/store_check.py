"""A feature store is untrusted input (downloaded, shared, edited): check it before zarr decodes
anything.  Zarr v2 instantiates whatever codec an array's ``.zarray`` names, and numcodecs' ``pickle``
(or a custom object codec) would run arbitrary code on the first read; a wrong dtype or shape would
fail deep inside training.  So every ``.zarray`` and the group's metadata are read as plain JSON and
checked against what `cache` writes; anything else is one clear error and nothing is decoded."""
from __future__ import annotations

import json
from pathlib import Path

from roiseg.data.store_meta import StoreMeta, UntrustedStoreError

COMPRESSORS = {"blosc", "zstd"}                  # what `cache` writes (features: blosc; masks: zstd)
FILTERS = {"vlen-utf8", "vlen-bytes"}           # object arrays: strings and bytes only
OBJECT_ARRAYS = {"file_name", "masks", "gt_rle", "skipped"}
NUMERIC = {"features": "<f2", "features_flip": "<f2", "feature_stats": "<f8", "fine": "<f2", "fine_flip": "<f2",
           "fine_stats": "<f8"}
TABLES = {"image_id", "orig_hw", "image_roi_start", "roi_image", "roi_inst", "roi_ann_id", "roi_box",
          "roi_padded", "roi_box_input", "roi_padded_input"}


def _expected_shape(name: str, meta: StoreMeta):
    n, c, hf, wf = meta.n_images, *meta.source.feature_shape
    r = meta.n_rois
    fine = meta.fine.shape if meta.fine else None
    if fine is not None and name.startswith("fine"):
        return [n, 2, fine[0]] if name == "fine_stats" else [n, *fine]
    return {"features": [n, c, hf, wf], "features_flip": [n, c, hf, wf], "feature_stats": [n, 2, c],
            "masks": [n], "gt_rle": [n], "skipped": [n], "file_name": [n], "image_id": [n], "orig_hw": [n, 2],
            "image_roi_start": [n + 1], "roi_image": [r], "roi_inst": [r], "roi_ann_id": [r],
            "roi_box": [r, 4], "roi_padded": [r, 4], "roi_box_input": [r, 4], "roi_padded_input": [r, 4]}.get(name)


def check_arrays(path: Path, meta: StoreMeta) -> None:
    """Codec, filters, dtype and shape of every array against what `cache` writes."""
    for zarray in sorted(Path(path).glob("*/.zarray")):
        name = zarray.parent.name
        where = f"{path}: array {name!r}"
        try:
            spec = json.loads(zarray.read_text())
        except (OSError, ValueError) as exc:
            raise UntrustedStoreError(f"{where}: unreadable .zarray ({exc})") from exc
        if not isinstance(spec, dict):
            raise UntrustedStoreError(f"{where}: .zarray is not a JSON object")
        comp = spec.get("compressor")
        if comp is not None and (not isinstance(comp, dict) or comp.get("id") not in COMPRESSORS):
            raise UntrustedStoreError(f"{where} uses compressor {comp!r}; only {sorted(COMPRESSORS)} are read "
                                      f"(a store from elsewhere? rebuild it with `cli.py cache`)")
        filters = spec.get("filters") or []
        if not isinstance(filters, list) or any(not isinstance(f, dict) or f.get("id") not in FILTERS for f in filters):
            raise UntrustedStoreError(f"{where} uses filters {filters!r}; only {sorted(FILTERS)} are read: "
                                      f"refusing to decode it (codecs such as 'pickle' run code)")
        dtype = spec.get("dtype")
        if name in OBJECT_ARRAYS:
            ok = dtype == "|O" and len(filters) == 1
        elif name in NUMERIC:
            ok = dtype == NUMERIC[name] and not filters
        elif name in TABLES:
            ok = isinstance(dtype, str) and dtype[1:2] in ("i", "u", "f") and not filters
        else:
            ok = isinstance(dtype, str) and dtype != "|O" and not filters   # unknown arrays are never read
        if not ok:
            raise UntrustedStoreError(f"{where} has dtype {dtype!r} / filters {filters!r}, not what `cache` writes")
        want = _expected_shape(name, meta)
        if want is not None and None not in want and spec.get("shape") != want:
            raise UntrustedStoreError(f"{where} has shape {spec.get('shape')}, the metadata says {want}")


def check_store(path: Path) -> None:
    """Both checks, from the files alone (nothing is decoded)."""
    attrs = Path(path) / ".zattrs"
    try:
        raw = json.loads(attrs.read_text()).get("metadata")
    except (OSError, ValueError, AttributeError) as exc:
        raise UntrustedStoreError(f"{path}: unreadable store attributes ({exc})") from exc
    if raw is None:
        return  # incomplete store (being created): FeatureStore reports it
    check_arrays(Path(path), StoreMeta.from_dict(raw, str(path)))   # the metadata's own checks first
