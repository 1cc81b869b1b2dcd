"""The feature store: one Zarr v2 group per split/subset.

    features   float16 [N, C, Hf, Wf]   one image per chunk (blosc lz4 + byte shuffle)
    masks      bytes [N]                 bit-packed instance masks [K, H, W] in the input frame
    gt_rle     str [N]                   JSON list of original-resolution COCO RLEs (for instance IoU)
    skipped    str [N]                   reason, only for images that could not be decoded
    image_id / file_name / orig_hw        image table
    roi_*                                 ROI table (one ROI per person), image_roi_start offsets
An image is *done* once its ``features`` chunk file exists: it is written last, and zarr's
directory store writes each chunk to a temp file and renames it, so a kill never leaves half a chunk.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numcodecs
import numpy as np
import zarr

from . import __version__
from .errors import FeatCacheError

FORMAT = "featcache-store-v1"
FEATURE_CODEC = numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE)  # see bench/bench_codecs.py
MASK_CODEC = numcodecs.Zstd(3)
# What must agree between a store and what is asked of it (cache re-runs, train/val pairs, resume).
FINGERPRINT_KEYS = ("onnx_sha256", "feature_name", "feature_shape", "input_hw", "preprocess",
                    "roi_padding")


class StoreError(FeatCacheError):
    pass


def diff_metadata(have: dict, want: dict, keys=None) -> list[str]:
    keys = keys or sorted(set(have) | set(want))
    return [f"{k}: store has {have.get(k)!r}, asked for {want.get(k)!r}"
            for k in keys if _norm(have.get(k)) != _norm(want.get(k))]


def _norm(v):
    return json.loads(json.dumps(v))


def check_compatible(have: dict, want: dict, what: str, keys=FINGERPRINT_KEYS) -> None:
    diffs = diff_metadata(have, want, keys)
    if diffs:
        raise StoreError(f"{what} does not match:\n  " + "\n  ".join(diffs))


class FeatureStore:
    def __init__(self, path: str | Path, mode: str = "r"):
        self.path = Path(path)
        if mode == "r" and not (self.path / ".zattrs").is_file():
            raise StoreError(f"no feature cache at {self.path} (run `cli.py cache` first)")
        self.root = zarr.open_group(str(self.path), mode=mode)
        self.meta = dict(self.root.attrs.get("metadata", {}))
        if mode == "r" and self.meta.get("format") != FORMAT:
            raise StoreError(f"{self.path} is not a complete feature cache (format "
                             f"{self.meta.get('format')!r}); re-run `cli.py cache`")
        self._tables = None

    # --- creation -------------------------------------------------------------------------
    @classmethod
    def create(cls, path, meta: dict, tables: dict, feature_shape, mask_hw) -> "FeatureStore":
        path = Path(path)
        root = zarr.open_group(str(path), mode="a")
        n = len(tables["image_id"])
        for k, v in tables.items():
            if k == "file_name":
                root.create_dataset(k, data=np.array(v, dtype=object), object_codec=numcodecs.VLenUTF8(),
                                    overwrite=True)
            else:
                root.create_dataset(k, data=np.asarray(v), overwrite=True)
        c, hf, wf = feature_shape
        root.create_dataset("features", shape=(n, c, hf, wf), chunks=(1, c, hf, wf), dtype="f2",
                            compressor=FEATURE_CODEC, fill_value=0, write_empty_chunks=True,
                            overwrite=True)
        for name, codec in (("masks", numcodecs.VLenBytes()), ("gt_rle", numcodecs.VLenUTF8()),
                            ("skipped", numcodecs.VLenUTF8())):
            root.create_dataset(name, shape=(n,), chunks=(1,), dtype=object, object_codec=codec,
                                compressor=MASK_CODEC if name == "masks" else None,
                                write_empty_chunks=True, overwrite=True)
        meta = {**meta, "format": FORMAT, "n_images": n, "n_rois": int(len(tables["roi_image"])),
                "mask_hw": list(mask_hw), "version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        root.attrs["metadata"] = meta  # written last: marks the store as complete
        return cls(path, "r+")

    # --- progress -------------------------------------------------------------------------
    def done_mask(self) -> np.ndarray:
        """Images already finished (features written) or recorded as skipped."""
        done = np.zeros(self.meta["n_images"], bool)
        for sub in ("features", "skipped"):
            d = self.path / sub
            if d.is_dir():
                for name in os.listdir(d):
                    if name[0].isdigit() and not name.endswith(".partial"):
                        done[int(name.split(".")[0])] = True
        return done

    def skipped(self) -> dict[int, str]:
        d = self.path / "skipped"
        idx = [int(n) for n in os.listdir(d) if n.isdigit()] if d.is_dir() else []
        return {i: self.root["skipped"][i] for i in sorted(idx)}

    # --- writes (one image) ----------------------------------------------------------------
    def write_image(self, i: int, features: np.ndarray, packed_masks: bytes, gt_rle: list) -> None:
        self.root["masks"][i] = packed_masks
        self.root["gt_rle"][i] = json.dumps(gt_rle)
        self.root["features"][i] = features  # last: marks the image done

    def write_skipped(self, i: int, reason: str) -> None:
        self.root["skipped"][i] = reason

    # --- reads ----------------------------------------------------------------------------
    @property
    def tables(self) -> dict:
        if self._tables is None:
            self._tables = {k: self.root[k][:] for k in (
                "image_id", "file_name", "orig_hw", "image_roi_start", "roi_image", "roi_inst",
                "roi_ann_id", "roi_box", "roi_padded", "roi_box_input", "roi_padded_input")}
        return self._tables

    def features(self, i: int) -> np.ndarray:
        return self.root["features"][i]

    def masks(self, i: int) -> np.ndarray:
        """Instance masks ``[K, H, W]`` bool in the input frame."""
        w = self.meta["mask_hw"][1]
        return np.unpackbits(self.packed_masks(i), axis=-1, count=w).astype(bool)

    def packed_masks(self, i: int) -> np.ndarray:
        """Row-wise bit-packed masks ``[K, H, ceil(W/8)]`` uint8 (cheap to keep resident)."""
        h, w = self.meta["mask_hw"]
        return np.frombuffer(self.root["masks"][i], np.uint8).reshape(-1, h, (w + 7) // 8)

    def gt_rles(self, i: int) -> list[dict]:
        return json.loads(self.root["gt_rle"][i])

    def valid_images(self) -> np.ndarray:
        """Indices of images with features (skipped ones excluded)."""
        done = self.done_mask()
        for i in self.skipped():
            done[i] = False
        return np.flatnonzero(done)
