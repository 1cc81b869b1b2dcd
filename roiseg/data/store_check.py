"""A feature store is untrusted input (downloaded, shared, edited): check it before zarr decodes
anything.  Zarr v2 instantiates whatever codec an array's ``.zarray`` names, and numcodecs' ``pickle``
(or a custom object codec) would run arbitrary code on the first read; a wrong dtype or shape would
fail deep inside training.  So every ``.zarray`` and the group's metadata are read as plain JSON and
checked against what `cache` writes; anything else is one clear error and nothing is decoded."""
from __future__ import annotations

import json
from pathlib import Path

from roiseg.common.errors import FeatCacheError

COMPRESSORS = {"blosc", "zstd"}                  # what `cache` writes (features: blosc; masks: zstd)
FILTERS = {"vlen-utf8", "vlen-bytes"}           # object arrays: strings and bytes only
OBJECT_ARRAYS = {"file_name", "masks", "gt_rle", "skipped"}
NUMERIC = {"features": "<f2", "features_flip": "<f2", "feature_stats": "<f8", "fine": "<f2", "fine_flip": "<f2",
           "fine_stats": "<f8"}
TABLES = {"image_id", "orig_hw", "image_roi_start", "roi_image", "roi_inst", "roi_ann_id", "roi_box",
          "roi_padded", "roi_box_input", "roi_padded_input"}


class UntrustedStoreError(FeatCacheError):
    pass


def _is_ints(v, n=None) -> bool:
    return isinstance(v, list) and (n is None or len(v) == n) and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 16


def check_preprocess(pre, where: str) -> None:
    """The recorded preprocessing: channel order, pixel scale, resize policy (what ``Preprocess.from_dict``
    reads), so a damaged or edited record is one message, not a crash or silently other pixels."""
    def bad(key, want, got):
        raise UntrustedStoreError(f"{where}: preprocess {key!r} must be {want}, found {got!r}")
    if not isinstance(pre, dict):
        bad("", "an object", pre)
    if pre.get("channel_order") not in ("rgb", "bgr"):
        bad("channel_order", "rgb or bgr", pre.get("channel_order"))
    scale = pre.get("scale")
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale < 1e6):
        bad("scale", "a positive number", scale)
    pol = pre.get("policy")
    if not isinstance(pol, dict) or pol.get("mode") not in ("stretch", "letterbox") \
            or not (_positive_int(pol.get("input_h")) and _positive_int(pol.get("input_w"))):
        bad("policy", "{input_h, input_w, mode: stretch|letterbox}", pol)


def is_projection(p) -> bool:
    if p is None:
        return True
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if not isinstance(p, dict) or not isinstance(p.get("mean"), list) or not isinstance(p.get("components"), list):
        return False
    c = len(p["mean"])
    return (0 < c < 1 << 16 and all(num(v) for v in p["mean"]) and 0 < len(p["components"]) < c
            and all(isinstance(r, list) and len(r) == c and all(num(v) for v in r) for r in p["components"]))


def check_metadata(meta, where: str) -> None:
    """Types and sizes of the store's metadata (a complete store)."""
    def bad(key, want):
        raise UntrustedStoreError(f"{where}: metadata {key!r} must be {want}, found {meta.get(key)!r}")
    if not isinstance(meta, dict):
        raise UntrustedStoreError(f"{where}: metadata is not a JSON object")
    for key, test, want in (
            ("format", lambda v: isinstance(v, str), "a string"),
            ("n_images", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 10 ** 9, "a count"),
            ("n_rois", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 10 ** 10, "a count"),
            ("feature_shape", lambda v: _is_ints(v, 3) and all(0 < x < 1 << 16 for x in v), "[C, H, W]"),
            ("input_hw", lambda v: _is_ints(v, 2) and all(0 < x < 1 << 16 for x in v), "[H, W]"),
            ("mask_hw", lambda v: _is_ints(v, 2) and all(0 < x < 1 << 16 for x in v), "[H, W]"),
            ("roi_padding", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
             "a number in [0, 1)"),
            ("feature_name", lambda v: isinstance(v, str), "a string"),
            ("onnx_sha256", lambda v: isinstance(v, str), "a string"),
            ("preprocess", lambda v: isinstance(v, dict) and isinstance(v.get("policy"), dict), "an object"),
            ("fine", lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("name"), str)
                                             and _is_ints(v.get("shape"), 3) and all(0 < x < 1 << 16 for x in v["shape"])),
             "null or {name, shape: [C, H, W]}"),
            ("fine_projection", is_projection, "null or {mean: [C numbers], components: [K x C numbers]}")):
        if key in meta and not test(meta[key]):
            bad(key, want)
    for key in ("n_images", "feature_shape", "input_hw", "mask_hw", "roi_padding", "preprocess"):
        if key not in meta:
            raise UntrustedStoreError(f"{where}: metadata has no {key!r} (not a store written by `cache`)")
    check_preprocess(meta["preprocess"], where)


def _expected_shape(name: str, meta: dict):
    n, c, hf, wf = meta["n_images"], *meta["feature_shape"]
    r = meta.get("n_rois")
    fine = (meta.get("fine") or {}).get("shape")
    if fine is not None and name.startswith("fine"):
        return [n, 2, fine[0]] if name == "fine_stats" else [n, *fine]
    return {"features": [n, c, hf, wf], "features_flip": [n, c, hf, wf], "feature_stats": [n, 2, c],
            "masks": [n], "gt_rle": [n], "skipped": [n], "file_name": [n], "image_id": [n], "orig_hw": [n, 2],
            "image_roi_start": [n + 1], "roi_image": [r], "roi_inst": [r], "roi_ann_id": [r],
            "roi_box": [r, 4], "roi_padded": [r, 4], "roi_box_input": [r, 4], "roi_padded_input": [r, 4]}.get(name)


def check_arrays(path: Path, meta: dict) -> None:
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
        meta = json.loads(attrs.read_text()).get("metadata")
    except (OSError, ValueError, AttributeError) as exc:
        raise UntrustedStoreError(f"{path}: unreadable store attributes ({exc})") from exc
    if meta is None:
        return  # incomplete store (being created): FeatureStore reports it
    check_metadata(meta, str(path))
    check_arrays(Path(path), meta)
