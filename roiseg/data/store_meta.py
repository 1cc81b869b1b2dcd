"""What a feature store says about itself, as typed records, built and read in this one place.

``FeatureSource`` is where the features come from, one object end to end (store -> checkpoint ->
exported graph -> predictor): the extractor ONNX and its sha256, the tensor and its shape, the model
input size, the preprocessing, the ROI padding, and the fine map with its channel reduction.
``StoreMeta`` adds the store's own facts (annotations, images, flip, sparse margin, codec, counts).

On disk (the store's ``.zattrs`` ``metadata``, a checkpoint's ``cache_metadata``, an exported graph's
``featcache`` entry) they keep the flat v1 JSON layout; ``from_dict`` checks that untrusted JSON
(types, sizes, the preprocessing) before anything is built from it, so a damaged or edited record is
one message, never a crash or silently other pixels.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from roiseg.common.errors import RoisegError
from roiseg.common.geometry import ResizePolicy
from roiseg.data.images import Preprocess

STORE_FORMAT = "featcache-store-v1"
# What must agree between a store and what is asked of it (cache re-runs, train/val pairs, resume).
FINGERPRINT_KEYS = ("onnx_sha256", "feature_name", "feature_shape", "input_hw", "preprocess", "roi_padding")


class UntrustedStoreError(RoisegError):
    """Store (or graph) metadata that `cache` (or `export`) did not write."""


# ---- checks of untrusted JSON ---------------------------------------------------------------------
def _is_ints(v, n=None) -> bool:
    return isinstance(v, list) and (n is None or len(v) == n) and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 16


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_preprocess(pre, where: str) -> None:
    """The recorded preprocessing: channel order, pixel scale, resize policy."""
    def bad(key, want, got):
        raise UntrustedStoreError(f"{where}: preprocess {key!r} must be {want}, found {got!r}")
    if not isinstance(pre, dict):
        bad("", "an object", pre)
    if pre.get("channel_order") not in ("rgb", "bgr"):
        bad("channel_order", "rgb or bgr", pre.get("channel_order"))
    scale = pre.get("scale")
    if not (_number(scale) and 0 < scale < 1e6):
        bad("scale", "a positive number", scale)
    pol = pre.get("policy")
    if not isinstance(pol, dict) or pol.get("mode") not in ("stretch", "letterbox") \
            or not (_positive_int(pol.get("input_h")) and _positive_int(pol.get("input_w"))):
        bad("policy", "{input_h, input_w, mode: stretch|letterbox}", pol)


def is_projection(p) -> bool:
    """A fine-map channel reduction as `cache --fine-channels` records it (or none)."""
    if p is None:
        return True
    if not isinstance(p, dict) or not isinstance(p.get("mean"), list) or not isinstance(p.get("components"), list):
        return False
    c = len(p["mean"])
    return (0 < c < 1 << 16 and all(_number(v) for v in p["mean"]) and 0 < len(p["components"]) < c
            and all(isinstance(r, list) and len(r) == c and all(_number(v) for v in r) for r in p["components"]))


_SHAPE3 = (lambda v: _is_ints(v, 3) and all(0 < x < 1 << 16 for x in v), "[C, H, W]")
_SHAPE2 = (lambda v: _is_ints(v, 2) and all(0 < x < 1 << 16 for x in v), "[H, W]")
_COUNT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 10 ** 10, "a count")
_TEXT = (lambda v: isinstance(v, str), "a string")
RULES = {
    "format": _TEXT, "n_images": _COUNT, "n_rois": _COUNT, "feature_shape": _SHAPE3, "input_hw": _SHAPE2,
    "mask_hw": _SHAPE2, "roi_padding": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "feature_name": (lambda v: isinstance(v, str) and v != "", "a tensor name"),
    "onnx_sha256": (lambda v: isinstance(v, str) and len(v) == 64, "a sha256 (64 hex digits)"),
    "preprocess": (lambda v: isinstance(v, dict) and isinstance(v.get("policy"), dict), "an object"),
    "fine": (lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("name"), str) and _SHAPE3[0](v.get("shape"))),
             "null or {name, shape: [C, H, W]}"),
    "fine_projection": (is_projection, "null or {mean: [C numbers], components: [K x C numbers]}"),
}


def check_fields(d, where: str, required: tuple[str, ...]) -> None:
    """Types and sizes of the known keys of ``d``, and the ``required`` ones present."""
    if not isinstance(d, dict):
        raise UntrustedStoreError(f"{where}: metadata is not a JSON object")
    for key, (test, want) in RULES.items():
        if key in d and not test(d[key]):
            raise UntrustedStoreError(f"{where}: metadata {key!r} must be {want}, found {d[key]!r}")
    for key in required:
        if key not in d:
            raise UntrustedStoreError(f"{where}: metadata has no {key!r} (not written by this project)")
    if "preprocess" in d:
        check_preprocess(d["preprocess"], where)


# ---- the records ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FineMap:
    """The finer map a store holds (`cache --fine-feature`), as stored, with where a channel
    reduction came from."""
    name: str
    shape: tuple[int, int, int]
    source_channels: int | None = None        # before a --fine-channels PCA
    projection_sha256: str | None = None

    def to_dict(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape)}
        if self.source_channels is not None:
            d |= {"source_channels": self.source_channels, "projection_sha256": self.projection_sha256}
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> FineMap | None:
        if not d:
            return None
        return cls(d["name"], tuple(d["shape"]), d.get("source_channels"), d.get("projection_sha256"))


@dataclass(frozen=True)
class FeatureSource:
    """Where the features come from, and everything a decoder must see the same way."""
    onnx_path: str
    onnx_sha256: str
    feature_name: str
    feature_shape: tuple[int, int, int]
    input_hw: tuple[int, int]
    preprocess: Preprocess
    roi_padding: float
    fine: FineMap | None = None
    fine_projection: dict | None = None       # the fine map's channel reduction (mean, components)

    REQUIRED = ("onnx_sha256", "feature_name", "feature_shape", "input_hw", "preprocess", "roi_padding")

    @property
    def policy(self) -> ResizePolicy:
        return self.preprocess.policy

    def fingerprint(self, fine: bool = False) -> dict:
        """What a decoder needs of a store (``fine``: the fine map too, for a decoder that fuses one)."""
        d = self.to_dict()
        return {k: d.get(k) for k in FINGERPRINT_KEYS} | ({"fine": d["fine"]} if fine else {})

    def with_fine(self, fine: bool) -> FeatureSource:
        """This source without its fine map when ``fine`` is off (a decoder that does not fuse it)."""
        return self if fine else dataclasses.replace(self, fine=None, fine_projection=None)

    def to_dict(self) -> dict:
        return {"onnx_path": self.onnx_path, "onnx_sha256": self.onnx_sha256, "feature_name": self.feature_name,
                "feature_shape": list(self.feature_shape), "input_hw": list(self.input_hw),
                "preprocess": self.preprocess.to_dict(), "resize_policy": self.policy.mode,
                "roi_padding": self.roi_padding, "fine": self.fine.to_dict() if self.fine else None,
                "fine_projection": self.fine_projection}

    @classmethod
    def from_dict(cls, d, where: str = "metadata") -> FeatureSource:
        check_fields(d, where, cls.REQUIRED)
        return cls(str(d.get("onnx_path") or ""), d["onnx_sha256"], d["feature_name"], tuple(d["feature_shape"]),
                   tuple(d["input_hw"]), Preprocess.from_dict(d["preprocess"]), float(d["roi_padding"]),
                   FineMap.from_dict(d.get("fine")), d.get("fine_projection"))


@dataclass(frozen=True)
class StoreMeta:
    """A feature store's metadata: its feature source and its own facts."""
    source: FeatureSource
    annotation_path: str
    annotation_sha256: str
    images_dir: str
    limit: int | None = None
    flip: bool = False
    sparse_margin: float | None = None       # a ROI-sparse store (cache --sparse): the jitter it supports
    codec: str = "lz4"
    extractor_provider: str | None = None    # how the features were computed (not part of the fingerprint)
    extractor_precision: str | None = None
    n_images: int = 0                        # set when the store is created
    n_rois: int = 0
    mask_hw: tuple[int, int] = (0, 0)
    version: str = ""
    created: str = ""
    format: str = STORE_FORMAT

    REQUIRED = ("n_images", "feature_shape", "input_hw", "mask_hw", "roi_padding", "preprocess")

    @property
    def sparse(self) -> bool:
        return self.sparse_margin is not None

    @property
    def fine(self) -> FineMap | None:
        return self.source.fine

    def fingerprint(self, fine: bool = False) -> dict:
        return self.source.fingerprint(fine)

    def created_as(self, n_images: int, n_rois: int, mask_hw, version: str, created: str) -> StoreMeta:
        return dataclasses.replace(self, n_images=n_images, n_rois=n_rois, mask_hw=tuple(mask_hw), version=version,
                                   created=created, format=STORE_FORMAT)

    def to_dict(self) -> dict:
        return {**self.source.to_dict(), "annotation_path": self.annotation_path,
                "annotation_sha256": self.annotation_sha256, "images_dir": self.images_dir, "limit": self.limit,
                "flip": self.flip, "sparse": {"margin": self.sparse_margin} if self.sparse else None,
                "codec": self.codec, "extractor_provider": self.extractor_provider,
                "extractor_precision": self.extractor_precision, "format": self.format, "n_images": self.n_images,
                "n_rois": self.n_rois, "mask_hw": list(self.mask_hw), "version": self.version, "created": self.created}

    @classmethod
    def from_dict(cls, d, where: str = "store metadata") -> StoreMeta:
        check_fields(d, where, cls.REQUIRED)
        sparse = d.get("sparse")
        if sparse is not None and not (isinstance(sparse, dict) and _number(sparse.get("margin"))):
            raise UntrustedStoreError(f"{where}: metadata 'sparse' must be null or {{margin}}, found {sparse!r}")
        return cls(FeatureSource.from_dict(d, where), str(d.get("annotation_path") or ""),
                   str(d.get("annotation_sha256") or ""), str(d.get("images_dir") or ""), d.get("limit"),
                   bool(d.get("flip")), float(sparse["margin"]) if sparse else None, d.get("codec") or "lz4",
                   d.get("extractor_provider"), d.get("extractor_precision"), int(d["n_images"]),
                   int(d.get("n_rois") or 0), tuple(d["mask_hw"]), str(d.get("version") or ""),
                   str(d.get("created") or ""), str(d.get("format") or ""))

    def differences(self, other: StoreMeta, keys, labels=("store has", "asked for")) -> list[str]:
        """One line per setting of ``keys`` (on-disk names) that differs: "key: <labels[0]> X, <labels[1]> Y"."""
        have, want = self.to_dict(), other.to_dict()
        return [f"{k}: {labels[0]} {have.get(k)!r}, {labels[1]} {want.get(k)!r}" for k in keys
                if _norm(have.get(k)) != _norm(want.get(k))]


def _norm(v):
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


def is_complete(raw) -> bool:
    """Raw ``.zattrs`` metadata of a store whose creation finished."""
    return isinstance(raw, dict) and raw.get("format") == STORE_FORMAT
