"""`cli.py cache`: run the ONNX extractor once per image into the feature store.

Decoding/resizing/mask rasterization run in worker threads (Pillow, numpy and pycocotools release
the GIL), ONNX Runtime runs in this thread, and compression + writes run in a writer thread, so the
model never waits for I/O.  Resumable (finished chunks are skipped), shardable (``shard=(i, n)``
takes images i, i+n, ...), and it checks free disk space before writing.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numcodecs
import numpy as np
from tqdm import tqdm

from roiseg.common.errors import RoisegError
from roiseg.common.files import file_sha256, human_bytes, refuse_overlap
from roiseg.common.geometry import ResizePolicy, pad_box
from roiseg.data import fine_projection
from roiseg.data.cache_config import DEFAULT_BATCH, CacheConfig
from roiseg.data.coco import ImageRecord, load_person_records
from roiseg.data.extractor import Extractor
from roiseg.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    Preprocess,
    load_rgb,
    preprocess,
)
from roiseg.data.rasterize import rles_to_input_frame_packed
from roiseg.data.store import FeatureStore, StoreError, store_folder_kind
from roiseg.data.store_meta import (
    FINGERPRINT_KEYS,
    FeatureSource,
    FineMap,
    StoreMeta,
    UntrustedStoreError,
)

log = logging.getLogger(__name__)
# Stored / raw size of the fp16 cells a store keeps, per codec, rounded up from bench/bench_store.py
# (61 real images; dense lz4 1.40x as in bench/bench_codecs.py).
STORED_FRACTION = {"lz4": 0.80, "zstd": 0.66}


def build_tables(records: list[ImageRecord], policy: ResizePolicy, roi_padding: float) -> dict:
    t = {k: [] for k in ("roi_image", "roi_inst", "roi_ann_id", "roi_box", "roi_padded",
                         "roi_box_input", "roi_padded_input")}
    starts = [0]
    for i, r in enumerate(records):
        for k, inst in enumerate(r.instances):
            padded = pad_box(inst.box_norm, roi_padding)
            t["roi_image"].append(i)
            t["roi_inst"].append(k)
            t["roi_ann_id"].append(inst.ann_id)
            t["roi_box"].append(inst.box_norm)
            t["roi_padded"].append(padded)
            t["roi_box_input"].append(policy.norm_to_input_norm(inst.box_norm, r.width, r.height))
            t["roi_padded_input"].append(policy.norm_to_input_norm(padded, r.width, r.height))
        starts.append(starts[-1] + len(r.instances))
    out = {k: np.asarray(v, np.float32 if "box" in k or "padded" in k else np.int64).reshape(
        (-1, 4) if ("box" in k or "padded" in k) else (-1,)) for k, v in t.items()}
    out["image_id"] = np.array([r.image_id for r in records], np.int64)
    out["file_name"] = [r.file_name for r in records]
    out["orig_hw"] = np.array([[r.height, r.width] for r in records], np.int32).reshape(-1, 2)
    out["image_roi_start"] = np.array(starts, np.int64)
    return out


def prepare_image(rec: ImageRecord, images_dir: Path, prep: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Worker: decode + preprocess one image and rasterize its masks in the input frame."""
    im = load_rgb(images_dir / rec.file_name, max_pixels)
    if (im.width, im.height) != (rec.width, rec.height):
        raise ImageDecodeError(f"{rec.file_name} is {im.width}x{im.height} but annotated as "
                               f"{rec.width}x{rec.height}")
    x = preprocess(im, prep)
    packed = rles_to_input_frame_packed([i.rle for i in rec.instances], prep.policy).tobytes()
    rles = [{"size": i.rle["size"], "counts": i.rle["counts"].decode() if isinstance(
        i.rle["counts"], bytes) else i.rle["counts"]} for i in rec.instances]
    return x, packed, rles


class _Writer(threading.Thread):
    """Writes finished images in the background; the first error stops the run."""

    def __init__(self, store: FeatureStore, bar):
        super().__init__(daemon=True)
        self.store, self.bar, self.q, self.error = store, bar, queue.Queue(maxsize=16), None

    def run(self):
        while (item := self.q.get()) is not None:
            if self.error:
                continue
            try:
                self.store.write_image(*item)  # features arrive as fp16 (cast in the graph)
                self.bar.update(1)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                self.error = exc


def _metadata(cfg: CacheConfig, ex: Extractor, prep: Preprocess) -> StoreMeta:
    """The store's metadata record for this run (``FeatureStore.create`` adds the counts)."""
    source = FeatureSource(str(cfg.onnx), file_sha256(cfg.onnx), cfg.feature_name, tuple(ex.feature_shape),
                           tuple(ex.input_hw), prep, cfg.roi_padding, _fine_map(cfg, ex), ex.fine_projection)
    return StoreMeta(source, str(cfg.ann), file_sha256(cfg.ann), str(cfg.images), cfg.limit, cfg.flip,
                     cfg.sparse_margin if cfg.sparse else None, cfg.codec,
                     # not part of the fingerprint: the same features up to the provider's rounding
                     ex.provider, ex.precision)


def _fine_map(cfg: CacheConfig, ex: Extractor) -> FineMap | None:
    """The store's fine map: the tensor and its stored shape, with where a channel reduction came
    from and the projection's sha256 (what train/val pairs and checkpoints must share)."""
    if not cfg.fine_feature:
        return None
    p = ex.fine_projection
    return FineMap(cfg.fine_feature, tuple(ex.fine_shape), len(p["mean"]) if p is not None else None,
                   fine_projection.sha256(p) if p is not None else None)


def complete_store_meta(out: Path) -> StoreMeta | None:
    """The metadata of a complete store at ``out`` (None: no store, or one still being created)."""
    try:
        raw = json.loads((Path(out) / ".zattrs").read_text()).get("metadata")
    except (OSError, ValueError, AttributeError):
        return None
    try:
        return StoreMeta.from_dict(raw, str(out)) if isinstance(raw, dict) and raw.get("format") else None
    except UntrustedStoreError:
        return None


def projection_source(path: Path) -> FeatureSource | None:
    """``--fine-projection-from``: a store's feature source, or a JSON file holding one (as
    `evaluate --ann` writes the training store's)."""
    path = Path(path)
    if path.is_file():
        try:
            return FeatureSource.from_dict(json.loads(path.read_text()), str(path))
        except (OSError, ValueError, UntrustedStoreError):
            return None
    meta = complete_store_meta(path)
    return meta.source if meta is not None else None


def choose_fine_projection(cfg: CacheConfig, ex: Extractor, records: list, prep: Preprocess) -> dict | None:
    """The fine map's channel reduction for this run: the one the store at ``--out`` already has, or
    ``--fine-projection-from``'s, or a PCA fitted now on ``fine_projection.SAMPLE_IMAGES`` images spread
    over the annotation file (the same images for every shard); None without a reduction."""
    if not cfg.fine_feature or not (cfg.fine_channels or cfg.fine_projection_from):
        return None
    given = None
    if cfg.fine_projection_from:
        src = projection_source(cfg.fine_projection_from)
        if src is None or not src.fine_projection or src.fine is None:
            raise RoisegError(f"--fine-projection-from {cfg.fine_projection_from} is not a store with a fine-map "
                              f"projection (cache --fine-channels)")
        if src.fine.name != cfg.fine_feature:
            raise RoisegError(f"--fine-projection-from {cfg.fine_projection_from} reduces {src.fine.name!r}, "
                              f"not --fine-feature {cfg.fine_feature!r}")
        given = src.fine_projection
        if cfg.fine_channels and cfg.fine_channels != len(given["components"]):
            raise RoisegError(f"--fine-channels {cfg.fine_channels}, but --fine-projection-from "
                                 f"{cfg.fine_projection_from} keeps {len(given['components'])}")
    # --overwrite: shard 0 (torchrun's rank 0) rebuilds the store and fits the projection before the
    # other shards start; they take it from the new store, as any later shard does
    meta = None if cfg.overwrite and cfg.shard[0] == 0 else complete_store_meta(cfg.out)
    have = meta.source.fine_projection if meta is not None else None
    if have:
        kept = len(have["components"])
        if cfg.fine_channels and cfg.fine_channels != kept:
            raise StoreError(f"the cache at {cfg.out} was built with --fine-channels {kept}, asked for "
                             f"{cfg.fine_channels}: use --out for a new store, or --overwrite to rebuild this one")
        if given is not None and fine_projection.sha256(given) != fine_projection.sha256(have):
            raise StoreError(f"the cache at {cfg.out} holds another fine-map projection than "
                             f"--fine-projection-from {cfg.fine_projection_from}: use --out for a new store, or "
                             f"--overwrite")
        return have       # a re-run, another shard: the store's own
    if given is not None:
        return given
    picks = fine_projection.sample_indices(len(records))
    print(f"fitting a {cfg.fine_channels}-channel PCA of {cfg.fine_feature} on {len(picks)} images ...")
    def maps():
        for i in picks:
            try:
                x = prepare_image(records[i], cfg.images, prep, cfg.max_pixels)[0]
            except ImageDecodeError:   # skipped later anyway; the fit uses the others
                continue
            yield ex.run_fine(x[None])[1][0]
    try:
        p = fine_projection.fit_pca(maps(), cfg.fine_channels)
    except ValueError as exc:
        raise RoisegError(str(exc)) from None
    print(f"the {cfg.fine_channels} components keep {p['explained']:.1%} of the fine map's variance")
    return p


def open_or_create_store(cfg: CacheConfig, meta: StoreMeta, tables: dict, ex: Extractor) -> FeatureStore:
    out = cfg.out
    if cfg.overwrite and out.exists() and cfg.shard[0] == 0:
        shutil.rmtree(out)
    if (out / ".zattrs").is_file() and "metadata" in _store_attributes(out):
        store = FeatureStore(out, "r+")
        diffs = store.meta.differences(meta, FINGERPRINT_KEYS + ("annotation_sha256", "limit", "flip", "sparse",
                                                                 "codec", "fine"))
        if diffs:
            raise StoreError(f"the cache at {out} was built with other settings:\n  "
                             + "\n  ".join(diffs)
                             + "\nUse --out for a new store, or --overwrite to rebuild this one.")
        made, now = ((m.extractor_provider, m.extractor_precision) for m in (store.meta, meta))
        if made[0] and made != now:
            log.warning("%s was started with %s (%s); this run uses %s (%s): its images differ by that rounding",
                        out, *made, *now)
        return store
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".create.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:  # another shard is creating it, or one died doing so
        if stale_lock(lock):
            log.warning("removing %s: the process that held it (%s) is gone", lock, lock.read_text().strip())
            lock.unlink(missing_ok=True)
            return open_or_create_store(cfg, meta, tables, ex)
        for _ in range(600):
            time.sleep(0.2)
            if not lock.exists():
                return open_or_create_store(cfg, meta, tables, ex)
        raise StoreError(f"{lock} exists: another `cache` ({lock.read_text().strip() or 'unknown'}) is creating "
                         f"this store; delete the lock file if none is running")
    try:
        os.write(fd, f"pid {os.getpid()} host {socket.gethostname()}\n".encode())
        return FeatureStore.create(out, meta, tables, ex.feature_shape, ex.input_hw)
    finally:
        os.close(fd)
        lock.unlink()


def _store_attributes(out: Path) -> dict:
    """The store's ``.zattrs``; a damaged one is an error (re-creating the store over it would
    delete its finished images)."""
    try:
        attrs = json.loads((out / ".zattrs").read_text())
        if not isinstance(attrs, dict):
            raise ValueError("not a JSON object")
        return attrs
    except (OSError, ValueError) as exc:
        raise StoreError(f"{out}: its attributes file .zattrs is damaged ({type(exc).__name__}: {exc}), so what the "
                         f"store holds cannot be trusted. Rebuild it with --overwrite, or pick another --out") from exc


def stale_lock(lock: Path) -> bool:
    """True when the lock names a process on this host that no longer runs (a kill -9)."""
    try:
        words = lock.read_text().split()
        pid, host = int(words[1]), words[3]
    except (OSError, ValueError, IndexError):
        # written by an older version, or caught between create and write: judge by age
        try:
            return time.time() - lock.stat().st_mtime > 120
        except OSError:
            return False
    if host != socket.gethostname():
        return False  # another machine's shard: cannot tell, wait for it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def check_disk(out: Path, kept_cells: np.ndarray, map_shapes, input_hw, n_masks: int, enforce: bool,
               flip: bool = False, codec: str = "lz4") -> None:
    """Print the size estimate for the images still to do; stop if the disk cannot hold it.
    ``map_shapes``: the stored maps' [C, H, W] (the feature map, then the fine one);
    ``kept_cells`` [images to do, maps]: the fraction of each map's cells stored (1 for a dense
    store; a mirrored map with ``flip`` counts the same)."""
    kept_cells = np.asarray(kept_cells, np.float64).reshape(len(kept_cells), -1)
    n_todo = len(kept_cells)
    sizes = np.array([int(np.prod(m)) * 2 for m in map_shapes], np.float64)
    share = kept_cells.mean(0) if n_todo else np.ones(len(sizes))
    per_image = float((sizes * share).sum()) * (2 if flip else 1)   # raw fp16
    stored = float(share @ sizes / sizes.sum())   # of all cells, by bytes
    raw = n_todo * per_image + n_masks * input_hw[0] * input_hw[1] // 8 // 20
    need = raw * STORED_FRACTION[codec]
    free = shutil.disk_usage(out if out.exists() else out.parent).free
    sparse = stored < 1 if n_todo else False
    print(f"estimated size: {human_bytes(raw)} raw fp16{f' (sparse: {stored:.0%} of the cells)' if sparse else ''}"
          f", stored ~{human_bytes(need)} with {codec}{', flipped maps included: 2x' if flip else ''}; "
          f"free {human_bytes(free)}")
    if enforce and need > free:
        raise RoisegError(
            f"not enough disk space for {out}: about {human_bytes(need)} needed ({n_todo} images x "
            f"{human_bytes(per_image * STORED_FRACTION[codec])}"
            f"{' incl. flipped' if flip else ''}), {human_bytes(free)} free. Use --sparse, --limit, --subset, "
            f"--shard, another --out, or --no-space-check.")


def check_out_folder(cfg: CacheConfig) -> None:
    """``--out`` is new, empty, or a store `cache` wrote (complete or interrupted): anything else
    is refused, so ``--overwrite`` never deletes, and a store never mixes into, a folder of the user's."""
    refuse_overlap({"--out": cfg.out}, {"--ann": cfg.ann, "--images": cfg.images, "--onnx": cfg.onnx})
    if cfg.overwrite and Path(cfg.out).is_symlink():
        raise StoreError(f"--out {cfg.out} is a symbolic link (to {os.readlink(cfg.out)}): --overwrite deletes only a "
                         f"store folder itself, never through a link. Pass the store's own path "
                         f"({Path(cfg.out).resolve()}) or another --out")
    if store_folder_kind(cfg.out) is None:
        out = Path(cfg.out)
        what = (f"holds {', '.join(sorted(os.listdir(out))[:5])}{' ...' if len(os.listdir(out)) > 5 else ''}"
                if out.is_dir() else "is a file")
        raise StoreError(f"--out {out} is not a feature store and not empty (it {what}): `cache` writes only into a "
                         f"new or empty folder or a store it wrote{'; --overwrite deletes nothing else' if cfg.overwrite else ''}. "
                         f"Pick another --out.")


def _open_extractor(cfg: CacheConfig) -> tuple[Extractor, Preprocess]:
    ex = _extractor(cfg)
    if ex.fixed_batch and cfg.batch != DEFAULT_BATCH:
        raise RoisegError(f"--batch {cfg.batch}: {Path(cfg.onnx).name} takes batches of {ex.fixed_batch} only (a "
                          f"fixed batch size); --batch applies to dynamic-batch models")
    return ex, Preprocess(cfg.channel_order, cfg.scale, ResizePolicy(ex.input_hw[0], ex.input_hw[1], cfg.resize))


def _extractor(cfg: CacheConfig) -> Extractor:
    return Extractor(cfg.onnx, cfg.feature_name, cfg.provider, trt_cache=cfg.trt_cache or cfg.out.parent / "trt_engines",
                   batch_max=max(1, cfg.batch) * (2 if cfg.flip else 1), device_id=cfg.device_id,
                   fine_name=cfg.fine_feature)


def _announce(cfg: CacheConfig, ex: Extractor, images: int, done: int, todo: int) -> None:
    """The line every run starts with: provider, tensors, and what is left to do."""
    fine = f" + fine {cfg.fine_feature} {list(ex.fine_shape)}" if cfg.fine_feature else ""
    si, sn = cfg.shard
    print(f"provider: {ex.provider} | feature {cfg.feature_name} {list(ex.feature_shape)}{fine} | "
          f"{images} images, {done} already cached, {todo} to do" + (f" (shard {si}/{sn})" if sn > 1 else ""))


def _finished_store(cfg: CacheConfig) -> FeatureStore | None:
    """The store at ``--out`` when this run has nothing to do: complete, every image done (or
    skipped), built from this very annotation file (sha256) and ``--limit``; None otherwise (and
    with ``--verify`` or ``--overwrite``, which always work through the images)."""
    if cfg.verify or cfg.overwrite:
        return None
    meta = complete_store_meta(cfg.out) if Path(cfg.out).is_dir() else None
    if meta is None or meta.limit != cfg.limit:
        return None
    store = FeatureStore(cfg.out)
    if not store.done_mask().all() or meta.annotation_sha256 != file_sha256(cfg.ann):
        return None
    return store


def _rerun_finished(cfg: CacheConfig, store: FeatureStore, t0: float, on_store_ready) -> dict:
    """A re-run of a finished store: the settings are compared as always (the extractor is opened
    for its shapes), but the annotation file is not parsed again; its sha256 says it is the one the
    store's tables came from.  At COCO scale parsing and rasterizing the polygons took ~35 s of a
    re-run that has nothing to do (``bench/bench_scale.py``)."""
    ex, prep = _open_extractor(cfg)
    ex.set_fine_projection(choose_fine_projection(cfg, ex, [], prep))
    open_or_create_store(cfg, _metadata(cfg, ex, prep), {}, ex)   # raises on other settings
    if on_store_ready is not None:
        on_store_ready()
    n = store.meta.n_images
    _announce(cfg, ex, n, n, 0)
    names = store.tables["file_name"]
    skipped = store.skipped()
    return {"store": str(cfg.out), "provider": ex.provider, "images": n, "cached": n - len(skipped),
            "skipped": {str(names[i]): r for i, r in skipped.items()}, "processed_now": 0, "newly_skipped": 0,
            "annotation_skips": {}, "elapsed_s": round(time.perf_counter() - t0, 2), "loop_s": 0.0,
            "damaged": {}, "complete": True, "created": False}


def run_cache(cfg: CacheConfig, progress: bool = True, on_store_ready=None) -> dict:
    """Fill this shard of the store; ``on_store_ready()``: called once the store exists (opened or
    created), before any image is processed (torchrun: rank 0 releases the other ranks).  The store
    is held for the run (``store_lock``): any number of shards write it at once, but ``--overwrite``
    never deletes a store another process is writing."""
    t0 = time.perf_counter()
    check_inputs(cfg)
    check_out_folder(cfg)
    with store_lock(cfg.out, exclusive=cfg.overwrite and cfg.shard[0] == 0) as lock:
        finished = _finished_store(cfg)
        if finished is not None:
            lock.share()
            return _rerun_finished(cfg, finished, t0, on_store_ready)
        records, skips = _records(cfg)
        ex, prep = _open_extractor(cfg)
        ex.set_fine_projection(choose_fine_projection(cfg, ex, records, prep))
        created = cfg.overwrite or complete_store_meta(cfg.out) is None
        store = open_or_create_store(cfg, _metadata(cfg, ex, prep), build_tables(records, prep.policy, cfg.roi_padding),
                                     ex)
        lock.share()        # created: the other shards (torchrun ranks) may write it too now
        if on_store_ready is not None:
            on_store_ready()
        damaged = _verify(cfg, store, records, progress) if cfg.verify else {}
        todo = _todo(cfg, store, records, ex, created)
        t_loop = time.perf_counter()
        newly_skipped = _process(cfg, records, todo, ex, prep, store, progress)
        t_loop = time.perf_counter() - t_loop
    return _summary(cfg, store, ex, records, skips, todo, newly_skipped, damaged, created, t0, t_loop)


def check_inputs(cfg: CacheConfig) -> None:
    """The annotation file, the extractor and the image folder exist and are what they should be."""
    for name, p in (("annotation file", cfg.ann), ("ONNX model", cfg.onnx)):
        if Path(p).is_dir():
            raise RoisegError(f"the {name} {p} is a folder: give the file")
        if not Path(p).is_file():
            raise RoisegError(f"{name} not found: {p}")
    if Path(cfg.images).is_file():
        raise RoisegError(f"the image folder {cfg.images} is a file: give the folder that holds the images")
    if not Path(cfg.images).is_dir():
        raise RoisegError(f"image folder not found: {cfg.images}")


def _records(cfg: CacheConfig) -> tuple[list, object]:
    records, skips = load_person_records(cfg.ann)
    if cfg.limit:
        records = records[: cfg.limit]
    if not records:
        raise RoisegError(f"no usable person annotations in {cfg.ann}")
    return records, skips


def _verify(cfg: CacheConfig, store: FeatureStore, records: list, progress: bool) -> dict:
    """``--verify``: decode every finished image of this shard and forget the damaged ones (redone)."""
    si, sn = cfg.shard
    done = store.done_mask()
    mine = [i for i in np.flatnonzero(done) if i % sn == si]
    damaged = verify_images(store, mine, cfg.workers, progress)
    for i, array in damaged.items():
        log.warning("image %d (%s): its %s chunk is damaged; redoing it", i, records[i].file_name, array)
        store.forget(i)
    print(f"verified {len(mine)} finished images: {len(damaged)} damaged" + (" (redone now)" if damaged else ""))
    return damaged


def _todo(cfg: CacheConfig, store: FeatureStore, records: list, ex: Extractor, created: bool) -> list[int]:
    """This shard's images still to do; the disk estimate for them (a refused store this run just
    created is removed: it holds nothing)."""
    si, sn = cfg.shard
    done = store.done_mask()
    todo = [i for i in range(len(records)) if not done[i] and i % sn == si]
    _announce(cfg, ex, len(records), int(done.sum()), len(todo))
    if not todo:
        return todo
    maps = [ex.feature_shape] + ([ex.fine_shape] if ex.fine_shape else [])
    kept = np.ones((len(todo), len(maps)))
    if cfg.sparse:
        kept = np.array([[store.readable(i, feat_hw=m[1:]).mean() for m in maps] for i in todo])
    try:
        check_disk(cfg.out, kept, maps, ex.input_hw, int(sum(len(records[i].instances) for i in todo)),
                   cfg.space_check, cfg.flip, cfg.codec)
    except RoisegError:
        if created and not done.any():
            shutil.rmtree(cfg.out, ignore_errors=True)
        raise
    return todo


def _summary(cfg, store, ex, records, skips, todo, newly_skipped, damaged, created, t0, t_loop) -> dict:
    skipped = store.skipped()
    n_done = int(store.done_mask().sum())
    return {"store": str(cfg.out), "provider": ex.provider, "images": len(records),
            "cached": n_done - len(skipped), "skipped": {str(records[i].file_name): r for i, r in skipped.items()},
            "processed_now": len(todo), "newly_skipped": newly_skipped,
            "annotation_skips": dict(skips.counts), "elapsed_s": round(time.perf_counter() - t0, 2),
            "loop_s": round(t_loop, 3), "damaged": {records[i].file_name: a for i, a in damaged.items()},
            "complete": n_done == len(records), "created": created}


class StoreLock:
    """``flock`` on a file beside the store (``.NAME.lock``): shared by the processes that fill it,
    exclusive for ``--overwrite`` until the new store exists; released when the process ends."""

    def __init__(self, out: Path, exclusive: bool):
        import fcntl
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.path = out.parent / f".{out.name}.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise StoreError(f"{out} is being {'written' if exclusive else 'rebuilt (--overwrite)'} by another "
                             f"`cache`: " + ("--overwrite would delete it under that process; wait for it to finish"
                                             if exclusive else "wait for it to finish")) from None

    def share(self) -> None:
        import fcntl
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def __enter__(self) -> "StoreLock":
        return self

    def __exit__(self, *exc) -> None:
        import fcntl
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def store_lock(out: Path, exclusive: bool) -> StoreLock:
    return StoreLock(out, exclusive)


def check_something_cached(summary: dict) -> None:
    """A finished store without a single cached image (every image skipped: a wrong folder, sizes
    that do not match the annotations, all over --max-pixels) is a failure: its first reasons, and
    a store this run created is removed (it holds nothing; a re-run would take the skips as done)."""
    if not summary["complete"] or summary["cached"] > 0 or not summary["images"]:
        return
    reasons = "\n  ".join(f"{k}: {v}" for k, v in list(summary["skipped"].items())[:10])
    if summary.get("created"):
        shutil.rmtree(summary["store"], ignore_errors=True)
        fate = "the empty store was removed"
    else:
        fate = f"fix them and rebuild {summary['store']} with --overwrite"
    raise RoisegError(f"no image could be cached: all {summary['images']} were skipped ({fate}). First reasons:"
                         f"\n  {reasons}")


def verify_images(store: FeatureStore, images, workers: int, progress: bool = True) -> dict[int, str]:
    """Decode every chunk of ``images`` (skipped images have none): {image: damaged array}."""
    skipped = store.skipped()
    todo = [int(i) for i in images if int(i) not in skipped]
    with ThreadPoolExecutor(max(1, workers)) as pool:   # blosc/zstd decode releases the GIL
        found = list(tqdm(pool.map(store.verify, todo), total=len(todo), desc="verify", unit="img",
                          disable=not progress, leave=False))
    return {i: a for i, a in zip(todo, found) if a}


def mirror_input(x: np.ndarray) -> np.ndarray:
    """The horizontally mirrored model input ``[B, 3, H, W]``.  Boxes and targets mirror exactly in
    the input frame (x -> 1 - x); with the stretch policy it is also the mirrored image resized."""
    return np.ascontiguousarray(x[..., ::-1])


def _in_order(pool, todo, records, images_dir, prep, window, max_pixels=DEFAULT_MAX_PIXELS):
    """(image index, future) in order, with at most ``window`` decodes in flight: memory stays flat
    on 60k-image runs while the workers keep ahead of the model."""
    ahead: deque = deque()
    for i in todo:
        ahead.append((i, pool.submit(prepare_image, records[i], images_dir, prep, max_pixels)))
        if len(ahead) >= window:
            yield ahead.popleft()
    while ahead:
        yield ahead.popleft()


@dataclass
class _Batch:
    """Decoded images waiting for one extractor run: inputs and what each image's write needs."""
    x: list = field(default_factory=list)          # [3, H, W] model inputs
    meta: list = field(default_factory=list)       # (image index, packed masks, RLEs)

    def add(self, i: int, prepared: tuple) -> None:
        x, packed, rles = prepared
        self.x.append(x)
        self.meta.append((i, packed, rles))

    def take(self) -> tuple[np.ndarray, list]:
        x, meta = np.stack(self.x), list(self.meta)
        self.x.clear()
        self.meta.clear()
        return x, meta


class _Extraction:
    """The extractor side of a cache run: batches go to ``streams`` concurrent ORT runs (on a CPU
    several single-threaded runs of one session scale better than one multi-threaded run: no
    intra-op barriers; on a GPU one stream), whose features go to the writer thread."""

    def __init__(self, ex: Extractor, flip: bool, writer: _Writer):
        self.ex, self.flip, self.writer = ex, flip, writer
        self.slots = threading.Semaphore(ex.streams)
        self.runner = ThreadPoolExecutor(ex.streams)
        self.errors: list[BaseException] = []

    @property
    def failed(self) -> bool:
        return bool(self.errors or self.writer.error)

    def submit(self, x: np.ndarray, meta: list) -> None:
        self.slots.acquire()      # at most ``streams`` batches in flight: memory stays flat
        self.runner.submit(self._run, x, meta)

    def _run(self, x: np.ndarray, meta: list) -> None:
        try:
            for (i, packed, rles), (f, ff, fine, fine_ff) in zip(meta, self._features(x)):
                self.writer.q.put((i, f, packed, rles, ff, fine, fine_ff))
        except BaseException as exc:  # noqa: BLE001 - re-raised by ``raise_first``
            self.errors.append(exc)
        finally:
            self.slots.release()

    def _features(self, x: np.ndarray):
        """(features, mirrored features, fine map, mirrored fine map; None where not stored) per
        image: with ``flip`` one run over the batch and its mirror (split again for fixed-batch
        models)."""
        n = len(x)
        feats, fine = self.ex.run_fine(np.concatenate([x, mirror_input(x)]) if self.flip else x)
        fine = [None] * len(feats) if fine is None else fine
        if not self.flip:
            return ((f, None, g, None) for f, g in zip(feats, fine))
        return zip(feats[:n], feats[n:], fine[:n], fine[n:])

    def close(self) -> None:
        self.runner.shutdown(wait=True)

    def raise_first(self) -> None:
        for err in self.errors + [self.writer.error]:
            if err is not None:
                raise err


def _process(cfg, records, todo, ex, prep, store, progress) -> int:
    """Decode (worker threads) -> extract (ORT runs) -> write (writer thread) the images ``todo``;
    the number of images skipped as undecodable."""
    if not todo:
        return 0
    numcodecs.blosc.set_nthreads(1)  # the writer is one of several busy threads already
    batch_size = ex.fixed_batch or max(1, cfg.batch)
    bar = tqdm(total=len(todo), desc="cache", unit="img", disable=not progress, smoothing=0.1)
    writer = _Writer(store, bar)
    writer.start()
    extraction, batch, n_skipped = _Extraction(ex, cfg.flip, writer), _Batch(), 0
    try:
        with ThreadPoolExecutor(cfg.workers) as pool:
            window = max(4 * cfg.workers, 2 * batch_size)
            for i, future in _in_order(pool, todo, records, cfg.images, prep, window, cfg.max_pixels):
                try:
                    batch.add(i, future.result())
                except ImageDecodeError as exc:
                    log.warning("skipping image: %s", exc)
                    store.write_skipped(i, str(exc))
                    n_skipped += 1
                    bar.update(1)
                if len(batch.x) >= batch_size:
                    extraction.submit(*batch.take())
                if extraction.failed:
                    break
            if batch.x and not extraction.failed:
                extraction.submit(*batch.take())
    finally:
        extraction.close()
        writer.q.put(None)
        writer.join()
        bar.close()
    extraction.raise_first()
    return n_skipped
