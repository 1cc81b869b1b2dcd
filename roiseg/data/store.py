"""The feature store: one Zarr v2 group per split/subset.

    features   float16 [N, C, Hf, Wf]   one image per chunk (blosc lz4 + byte shuffle, or zstd: ``codec``);
                                         a ROI-sparse store (``sparse``) holds zeros outside the cells
                                         its ROIs can read (``roiseg/data/sparse.py``)
    features_flip (only with ``cache --flip``) the same for the horizontally mirrored model input
    fine, fine_flip, fine_stats          (only with ``cache --fine-feature``) the same for a finer tensor of
                                         the same run (stride 4 or 2, or the input itself), metadata "fine"
    feature_stats float64 [N, 2, C]      per image: per-channel sum and sum of squares over Hf x Wf
                                         (exact mean/std over any image subset: k-fold, shards)
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
import logging
import os
import time
from pathlib import Path

import numcodecs
import numpy as np
import zarr

from roiseg.common.errors import RoisegError
from roiseg.common.version import __version__
from roiseg.data.sparse import readable_cells, zero_unreadable
from roiseg.data.store_check import check_store
from roiseg.data.store_meta import FINGERPRINT_KEYS, StoreMeta, is_complete

log = logging.getLogger(__name__)
# Feature codecs (bench/bench_codecs.py, bench/bench_store.py): lz4 decodes fastest, zstd is smallest.
CODECS = {"lz4": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE),
          "zstd": numcodecs.Blosc("zstd", 3, numcodecs.Blosc.SHUFFLE)}
MASK_CODEC = numcodecs.Zstd(3)
# arrays every complete store holds (a store without per-image statistics predates them: rebuild it)
REQUIRED_ARRAYS = ("features", "feature_stats", "masks", "gt_rle", "skipped", "file_name", "image_roi_start")


# Everything `cache` writes into a store folder: ``--overwrite`` deletes only folders made of these.
ARRAYS = ("features", "features_flip", "feature_stats", "fine", "fine_flip", "fine_stats", "masks", "gt_rle",
          "skipped", "image_id", "file_name",
          "orig_hw", "image_roi_start", "roi_image", "roi_inst", "roi_ann_id", "roi_box", "roi_padded",
          "roi_box_input", "roi_padded_input")
STORE_ENTRIES = frozenset(ARRAYS) | {".zgroup", ".zattrs", ".create.lock"}
PER_IMAGE = ("masks", "gt_rle", "feature_stats", "fine_stats", "fine_flip", "fine", "features_flip",
             "features")   # features last: "done"


class StoreError(RoisegError):
    pass


class DamagedChunkError(StoreError):
    """A chunk of one image cannot be decoded (a damaged file or copy)."""

    def __init__(self, message: str, array: str = "", image: int = -1):
        super().__init__(message)
        self.array, self.image = array, image


def store_folder_kind(path: Path) -> str | None:
    """What ``path`` is: "missing", "empty", "store" (complete, metadata written), "partial" (a store
    whose creation was interrupted: only entries `cache` writes), or None: something else."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return None
    names = set(os.listdir(path))
    if not names:
        return "empty"
    if not names <= STORE_ENTRIES:
        return None
    try:
        raw = json.loads((path / ".zattrs").read_text()).get("metadata")
    except (OSError, ValueError, AttributeError):
        raw = None
    return "store" if is_complete(raw) else "partial"


def channel_sums(features: np.ndarray) -> np.ndarray:
    """[C, H, W] -> [2, C] float64: per-channel sum and sum of squares (float32 pairwise sums)."""
    x = np.asarray(features, np.float32).reshape(features.shape[0], -1)
    return np.stack([x.sum(1, dtype=np.float64), np.einsum("ij,ij->i", x, x, dtype=np.float64)])


def _mean_std(sums: np.ndarray, cells: int) -> tuple[np.ndarray, np.ndarray]:
    n = cells * len(sums)
    total = sums.sum(0)
    mean = total[0] / n
    var = np.maximum(total[1] / n - mean ** 2, 0.0)
    # dead channels (constant) keep std 1 so normalization never divides by ~0
    std = np.where(var > 1e-12, np.sqrt(var), 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def create_stats_array(root, n: int, c: int, name: str = "feature_stats") -> None:
    root.create_dataset(name, shape=(n, 2, c), chunks=(1, 2, c), dtype="f8",
                        compressor=None, fill_value=0, write_empty_chunks=True, overwrite=True)


def diff_metadata(have: dict, want: dict, keys=None, labels=("store has", "asked for")) -> list[str]:
    """One line per key whose values differ: "key: <labels[0]> X, <labels[1]> Y"."""
    keys = keys or sorted(set(have) | set(want))
    return [f"{k}: {labels[0]} {have.get(k)!r}, {labels[1]} {want.get(k)!r}"
            for k in keys if _norm(have.get(k)) != _norm(want.get(k))]


def _norm(v):
    return json.loads(json.dumps(v))


def check_compatible(have: dict, want: dict, what: str, keys=FINGERPRINT_KEYS,
                     labels=("store has", "asked for")) -> None:
    """``keys=None``: every key either side has (two fingerprints)."""
    diffs = diff_metadata(have, want, keys, labels)
    if diffs:
        raise StoreError(f"{what} does not match:\n  " + "\n  ".join(diffs))


class FeatureStore:
    def __init__(self, path: str | Path, mode: str = "r"):
        self.path = Path(path)
        if self.path.is_file():
            raise StoreError(f"{self.path} is a file, not a feature store (a folder `cli.py cache` writes)")
        if mode == "r" and not (self.path / ".zattrs").is_file():
            raise StoreError(f"no feature cache at {self.path} (run `cli.py cache` first)")
        if (self.path / ".zattrs").is_file() and not (self.path / ".zgroup").is_file():
            raise StoreError(f"{self.path} has no .zgroup: a damaged store; rebuild it with `cli.py cache ... "
                             f"--overwrite`")
        if (self.path / ".zattrs").is_file():
            check_store(self.path)   # untrusted input: codecs, dtypes, shapes before zarr decodes anything
        self.root = zarr.open_group(str(self.path), mode=mode)
        raw = self.root.attrs.get("metadata")
        if not is_complete(raw):
            raise StoreError(f"{self.path} is not a complete feature cache (its creation did not finish); re-run "
                             f"`cli.py cache`")
        self.meta = StoreMeta.from_dict(raw, str(self.path))
        missing = [a for a in REQUIRED_ARRAYS if a not in self.root]
        if missing:
            raise StoreError(f"{self.path} has no {', '.join(missing)} array(s): written by an older `cache` or "
                             f"damaged; rebuild it with `cli.py cache ... --overwrite`")
        self._tables = None

    # --- creation -------------------------------------------------------------------------
    @classmethod
    def create(cls, path, meta: StoreMeta, tables: dict, feature_shape, mask_hw) -> "FeatureStore":
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
        codec = meta.codec
        if codec not in CODECS:
            raise StoreError(f"unknown feature codec {codec!r} (choose from {', '.join(CODECS)})")
        maps = [("features", (c, hf, wf))]
        if meta.fine:
            maps.append(("fine", tuple(meta.fine.shape)))
            create_stats_array(root, n, meta.fine.shape[0], "fine_stats")
        for name, shape in maps:
            for array in (name, f"{name}_flip") if meta.flip else (name,):
                root.create_dataset(array, shape=(n, *shape), chunks=(1, *shape), dtype="f2",
                                    compressor=CODECS[codec], fill_value=0, write_empty_chunks=True,
                                    overwrite=True)
        create_stats_array(root, n, c)
        for name, codec in (("masks", numcodecs.VLenBytes()), ("gt_rle", numcodecs.VLenUTF8()),
                            ("skipped", numcodecs.VLenUTF8())):
            root.create_dataset(name, shape=(n,), chunks=(1,), dtype=object, object_codec=codec,
                                compressor=MASK_CODEC if name == "masks" else None,
                                write_empty_chunks=True, overwrite=True)
        meta = meta.created_as(n, int(len(tables["roi_image"])), mask_hw, __version__,
                               time.strftime("%Y-%m-%dT%H:%M:%S"))
        root.attrs["metadata"] = meta.to_dict()  # written last: marks the store as complete
        return cls(path, "r+")

    # --- progress -------------------------------------------------------------------------
    def done_mask(self) -> np.ndarray:
        """Images already finished (features written) or recorded as skipped."""
        done = np.zeros(self.meta.n_images, bool)
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
        return {i: self._read("skipped", i) for i in sorted(idx)}

    def _read(self, array: str, i: int, out=None):
        """Image ``i``'s chunk of ``array``; a chunk that cannot be decoded is one clear error naming
        the image, the array and the fix (``cache --verify`` redoes damaged images)."""
        try:
            if out is not None:
                return self.root[array].get_basic_selection((i,), out=out)
            return self.root[array][i]
        except Exception as exc:  # blosc/zstd RuntimeError, UnicodeDecodeError, ValueError ...
            raise self.damaged(array, i, exc) from exc

    def _read_many(self, array: str, images: list[int]) -> np.ndarray:
        """The chunks of ``images`` of a small per-image array, stacked, in one zarr read (one
        metadata load, not one per image: start-up at 64k images).  A damaged chunk is still named:
        the images are then read one by one to find it."""
        if not images:
            return np.zeros((0,), np.float64)
        try:
            return self.root[array].get_orthogonal_selection((np.asarray(images, np.int64),))
        except Exception:  # noqa: BLE001 - find the damaged chunk and raise its own message
            for i in images:
                self._read(array, i)
            raise

    def damaged(self, array: str, i: int, exc: Exception) -> DamagedChunkError:
        try:
            name = f" ({self.tables['file_name'][i]})"
        except Exception:  # noqa: BLE001 - the message must not fail too
            name = ""
        return DamagedChunkError(f"{self.path}: the {array!r} chunk of image {i}{name} cannot be decoded "
                                 f"({type(exc).__name__}: {exc}); the store is damaged. Re-run the `cli.py cache` "
                                 f"command that wrote it with --verify: it finds and redoes damaged images.", array, i)

    def forget(self, i: int) -> None:
        """Remove image ``i``'s chunks (features first: it is no longer done), so `cache` redoes it."""
        for array in reversed(PER_IMAGE + ("skipped",)):
            d = self.path / array
            if d.is_dir():
                for name in os.listdir(d):
                    if name.split(".")[0] == str(i):
                        (d / name).unlink(missing_ok=True)

    def verify(self, i: int) -> str | None:
        """Decode every chunk of image ``i`` (``cache --verify``): None when sound, else which array
        is damaged."""
        try:
            self.packed_masks(i)
            self.gt_rles(i)
            f = self.features(i)
            if self.has_flip:
                self.features(i, flipped=True)
            if self.has_fine:
                self.fine(i)
                if self.has_flip:
                    self.fine(i, flipped=True)
        except DamagedChunkError as exc:
            return exc.array
        # feature_stats are stored uncompressed, so damage there fails no decode; in a dense store
        # they must be the sums of the stored map (a sparse one keeps those of the whole map)
        if "feature_stats" in self.root and not self.sparse:
            try:
                ok = np.array_equal(self._read("feature_stats", i), channel_sums(f))
            except DamagedChunkError:
                ok = False
            if not ok:
                return "feature_stats"
        return None

    # --- writes (one image) ----------------------------------------------------------------
    def write_image(self, i: int, features: np.ndarray, packed_masks: bytes, gt_rle: list,
                    features_flip: np.ndarray | None = None, fine: np.ndarray | None = None,
                    fine_flip: np.ndarray | None = None) -> None:
        self.root["masks"][i] = packed_masks
        self.root["gt_rle"][i] = json.dumps(gt_rle)
        if self.has_fine:
            self._write_map("fine", i, fine, fine_flip)
        # statistics of the whole map: a sparse store normalizes exactly like a dense one
        self._write_map("features", i, features, features_flip)   # last: marks the image done

    def _write_map(self, name: str, i: int, x: np.ndarray | None, x_flip: np.ndarray | None) -> None:
        """One map of image ``i``: statistics of the whole map (a sparse store normalizes exactly
        like a dense one), the mirrored map, then the map (sparse: zero outside readable cells)."""
        if x is None:
            raise StoreError(f"{self.path} holds {name!r} maps: pass them for image {i}")
        self.root["feature_stats" if name == "features" else f"{name}_stats"][i] = channel_sums(x)
        hw = x.shape[-2:]
        if self.has_flip:
            if x_flip is None:
                raise StoreError(f"{self.path} holds flipped {name}: pass them for image {i}")
            if self.sparse:
                x_flip = zero_unreadable(x_flip, self.readable(i, mirrored=True, feat_hw=hw))
            self.root[f"{name}_flip"][i] = x_flip
        if self.sparse:
            x = zero_unreadable(x, self.readable(i, feat_hw=hw))
        self.root[name][i] = x

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

    @property
    def sparse(self) -> bool:
        """A ROI-sparse store (``cache --sparse``): zeros outside the cells its ROIs can read."""
        return self.meta.sparse

    def readable(self, i: int, mirrored: bool = False, feat_hw=None) -> np.ndarray:
        """[Hf, Wf] bool: the cells of image ``i`` that its ROIs can read (``roiseg.data.sparse``);
        ``feat_hw``: of a map of that size (the fine one) instead of the feature map."""
        t = self.tables
        a, b = t["image_roi_start"][i], t["image_roi_start"][i + 1]
        h, w = (int(v) for v in t["orig_hw"][i])
        src = self.meta.source
        return readable_cells(t["roi_box"][a:b], (w, h), src.policy, self.meta.sparse_margin or 0.0, src.roi_padding,
                              feat_hw or src.feature_shape[1:], mirrored)

    def features(self, i: int, flipped: bool = False, out: np.ndarray | None = None) -> np.ndarray:
        """Image ``i``'s map ``[C, Hf, Wf]`` fp16 (decoded into ``out`` when given)."""
        return self._read("features_flip" if flipped else "features", i, out)

    def fine(self, i: int, flipped: bool = False, out: np.ndarray | None = None) -> np.ndarray:
        """Image ``i``'s fine map ``[Cf, Hs, Ws]`` fp16 (``cache --fine-feature``)."""
        return self._read("fine_flip" if flipped else "fine", i, out)

    @property
    def has_fine(self) -> bool:
        return self.meta.fine is not None and "fine" in self.root

    def fine_stats(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (mean, std) of the fine maps of ``images`` (always recorded)."""
        images = [int(i) for i in np.asarray(images, np.int64)]
        if not images:
            raise StoreError(f"{self.path}: no images to compute fine-map statistics from")
        _, hs, ws = self.meta.fine.shape
        return _mean_std(self._read_many("fine_stats", images), hs * ws)

    @property
    def has_flip(self) -> bool:
        return self.meta.flip and "features_flip" in self.root

    def feature_stats(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (mean, std) float32 of the features of ``images`` (every cell of every map),
        exact over any subset, from the per-image sums `cache` records."""
        images = [int(i) for i in np.asarray(images, np.int64)]
        if not images:
            raise StoreError(f"{self.path}: no images to compute feature statistics from")
        unsummed = [i for i, arrays in self.incomplete(images).items() if "feature_stats" in arrays]
        if unsummed:
            raise StoreError(f"{self.path}: the feature statistics of {len(unsummed)} image(s) are missing (image "
                             f"{unsummed[0]} ...): re-run the `cli.py cache` command that wrote it with --verify")
        _, hf, wf = self.meta.source.feature_shape
        return _mean_std(self._read_many("feature_stats", images), hf * wf)

    def masks(self, i: int) -> np.ndarray:
        """Instance masks ``[K, H, W]`` bool in the input frame."""
        w = self.meta.mask_hw[1]
        return np.unpackbits(self.packed_masks(i), axis=-1, count=w).astype(bool)

    def packed_masks(self, i: int) -> np.ndarray:
        """Row-wise bit-packed masks ``[K, H, ceil(W/8)]`` uint8 (cheap to keep resident)."""
        h, w = self.meta.mask_hw
        raw = self._read("masks", i)
        try:
            return np.frombuffer(raw, np.uint8).reshape(-1, h, (w + 7) // 8)
        except (TypeError, ValueError) as exc:
            raise self.damaged("masks", i, exc) from exc

    def gt_rles(self, i: int) -> list[dict]:
        try:
            return json.loads(self._read("gt_rle", i))
        except ValueError as exc:
            raise self.damaged("gt_rle", i, exc) from exc

    def incomplete(self, images) -> dict[int, list[str]]:
        """Of ``images``: those whose chunk files are not all there (a deleted or never written
        chunk), image -> the arrays it lacks; skipped images need none."""
        wanted = {int(i) for i in images} - set(self.skipped())
        missing: dict[int, list[str]] = {}
        for array in PER_IMAGE:
            if array not in self.root:
                continue
            d = self.path / array
            present = {int(n.split(".")[0]) for n in (os.listdir(d) if d.is_dir() else [])
                       if n[0].isdigit() and not n.endswith(".partial")}
            for i in sorted(wanted - present):
                missing.setdefault(i, []).append(array)
        return missing

    def valid_images(self) -> np.ndarray:
        """Indices of images with features (skipped ones excluded)."""
        done = self.done_mask()
        for i in self.skipped():
            done[i] = False
        return np.flatnonzero(done)
