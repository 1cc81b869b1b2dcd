"""Reading the feature store for training: streamed through DataLoader workers, or resident.

Both paths produce the same batches (same ROIs, same jitter, same targets) for the same
(seed, epoch, image): ROI choice comes from ``sampling.image_rng`` and targets from
``roi_targets.sample_roi_targets``.  A batch is a dict:
    features [B, C, Hf, Wf] fp16, rois [N, 5] (batch index + normalized input-frame xyxy),
    targets [N, M, M] uint8, roi_ids [N] (rows of the store's ROI table), images [B],
    and with ``fine`` (a store with ``cache --fine-feature``) fine [B, Cf, Hs, Ws] fp16.
Mirrored images (``RoiSampling.hflip``) come with the features of the mirrored input (stored by
``cache --flip``, or the mirrored map with ``hflip_map``), mirrored ROIs and mirrored targets.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from roiseg.common.errors import RoisegError
from roiseg.common.geometry import mirror_boxes
from roiseg.data.store import FeatureStore, StoreError
from roiseg.loader.sampling import (
    ImageSample,
    RoiSampling,
    image_rng,
    rois_with_others,
    train_rois,
)
from roiseg.loader.targets import (
    CropsBuilder,
    PackedCrops,
    sample_roi_targets,
    union_packed,
)

log = logging.getLogger(__name__)


class BatchSource(Protocol):
    """Where training and validation batches come from: streamed by DataLoader workers, resident in
    GPU or host memory, or decoded into pinned buffers.  Every source gives the same batches for
    the same (seed, epoch, images) (module docstring: the batch's keys)."""
    kind: str                       # its name in the log: stream, resident, stream-pinned, resident-cpu

    def iterate(self, batches: list[list[int]], epoch: int, train: bool) -> Iterator[dict]:
        """One batch dict per list of image indices, on the source's device."""
        ...


class CacheIndex:
    """Tables of one store, small enough to copy into every worker.

    ``file_names``: use only these images of the store (k-fold splits of one store); others are
    ignored as if not cached."""

    def __init__(self, path: str | Path, file_names: list[str] | None = None, allow_partial: bool = False,
                 partial_option: str | None = "--allow-partial"):
        """``allow_partial``: use the complete images of an incomplete store (else refused);
        ``partial_option``: the option a refusal names (None: the command has none)."""
        self.path = Path(path)
        store = FeatureStore(self.path)
        self.meta = store.meta
        t = store.tables
        listed = np.arange(self.meta.n_images)
        if file_names is not None:
            names = np.asarray(t["file_name"], dtype=object)
            wanted = set(file_names)
            unknown = wanted - set(names)
            if unknown:
                raise StoreError(f"{len(unknown)} image(s) asked for are not in {self.path}: "
                                 f"{', '.join(sorted(unknown)[:5])}")
            listed = np.array([i for i in listed if names[i] in wanted], np.int64)
        check_complete(store, listed, allow_partial, partial_option)
        valid = set(store.valid_images().tolist())
        self.images = np.array([i for i in listed if i in valid], np.int64)
        self.has_flip = store.has_flip
        self.roi_start = t["image_roi_start"]
        self.padded_input = t["roi_padded_input"].astype(np.float64)
        self.box_input = t["roi_box_input"].astype(np.float64)
        self.box = t["roi_box"].astype(np.float64)
        self.has_other = rois_with_others(self.box, t["roi_padded"].astype(np.float64), self.roi_start)
        src = self.meta.source
        self.input_hw = tuple(src.input_hw)
        self.policy = src.policy
        self.roi_padding = src.roi_padding
        self.feature_shape = tuple(src.feature_shape)
        self.fine_shape = tuple(src.fine.shape) if store.has_fine else None
        self.tables = t

    def map_shapes(self, fine: bool) -> dict[str, tuple]:
        """The maps a batch carries: the features, and the fine map when asked for."""
        if fine and self.fine_shape is None:
            raise StoreError(f"{self.path} has no fine map (cache --fine-feature)")
        return {"features": self.feature_shape} | ({"fine": self.fine_shape} if fine else {})

    def rois_of(self, i: int) -> tuple[int, int]:
        return int(self.roi_start[i]), int(self.roi_start[i + 1])


def check_complete(store: FeatureStore, images, allow_partial: bool, option: str | None = "--allow-partial") -> None:
    """Every image of ``images`` (but skipped ones) has all its chunks, or an error that says how
    many do not and how to repair the store; ``allow_partial``: a warning, and they are left out."""
    missing = store.incomplete(images)
    if not missing:
        return
    names = store.tables["file_name"]
    some = "; ".join(f"{names[i]} ({', '.join(a)})" for i, a in list(missing.items())[:3])
    what = (f"{store.path}: {len(missing)} of {len(images)} images are not completely cached (missing chunks: "
            f"{some}{' ...' if len(missing) > 3 else ''})")
    if allow_partial:
        log.warning("%s; %s: using the other %d", what, option, len(images) - len(missing))
        return
    partial = f", or pass {option} to use the {len(images) - len(missing)} complete images" if option else ""
    raise StoreError(f"{what}. The cache was interrupted or damaged: re-run the `cli.py cache` command that wrote "
                     f"it (add --verify to also re-check the finished images){partial}")


def image_samples(index: CacheIndex, i: int, epoch: int, train: bool, sampling: RoiSampling,
                  seed: int) -> ImageSample:
    """Image i's ROIs for this epoch (validation: every padded ROI as stored, mirrored only with
    ``hflip`` 1: the mirrored pass of flip test-time augmentation)."""
    a, b = index.rois_of(i)
    if not train:
        return ImageSample(np.arange(b - a), index.padded_input[a:b].copy(), sampling.hflip >= 1.0)
    h, w = (int(v) for v in index.tables["orig_hw"][i])
    return train_rois(index.box[a:b], index.padded_input[a:b], index.has_other[a:b], (w, h),
                      index.policy, index.roi_padding, sampling, image_rng(seed, epoch, i))


def _targets(packed: torch.Tensor, union: torch.Tensor, local: np.ndarray, boxes: np.ndarray,
             union_row: torch.Tensor | int, input_hw, mask_size: int) -> torch.Tensor:
    h, w = input_hw
    px = torch.as_tensor(boxes * np.array([w, h, w, h]), device=packed.device)
    tgt_idx = torch.as_tensor(local, device=packed.device, dtype=torch.long)
    img_idx = union_row if torch.is_tensor(union_row) else torch.full_like(tgt_idx, union_row)
    return sample_roi_targets(packed, union, tgt_idx, img_idx, px, mask_size, mask_size, w)


def read_map(store: FeatureStore, name: str, i: int, flipped: bool = False, out=None) -> np.ndarray:
    """Image ``i``'s ``name`` map ("features" or "fine"), the stored mirrored one with ``flipped``."""
    return (store.features if name == "features" else store.fine)(i, flipped, out)


class StoreDataset(Dataset):
    """Items are (image, epoch, train) -> one image's features, ROIs and targets (CPU)."""

    def __init__(self, index: CacheIndex, sampling: RoiSampling, mask_size: int, seed: int, fine: bool = False):
        self.index, self.sampling, self.mask_size, self.seed = index, sampling, mask_size, seed
        self.maps = list(index.map_shapes(fine))
        self._store = None

    def __len__(self):
        return len(self.index.images)

    def __getitem__(self, item):
        try:
            return self._item(*item)
        except RoisegError as exc:  # a damaged chunk: its message reaches the user whole, not a
            return {"error": str(exc)}  # worker traceback re-raised by the DataLoader

    def _item(self, i, epoch, train):
        if self._store is None:  # opened lazily: once per worker process
            self._store = FeatureStore(self.index.path)
        smp = image_samples(self.index, i, epoch, train, self.sampling, self.seed)
        maps = {}
        for name in self.maps:
            m = torch.from_numpy(read_map(self._store, name, i, smp.flip and uses_stored_flip(self.sampling)))
            maps[name] = m.flip(-1) if smp.flip and self.sampling.hflip_map else m
        packed = torch.from_numpy(self._store.packed_masks(i).copy())
        targets = _targets(packed, union_packed(packed)[None], smp.local, smp.boxes, 0, self.index.input_hw,
                           self.mask_size)
        boxes = smp.boxes
        if smp.flip:
            targets, boxes = targets.flip(-1), mirror_boxes(boxes)
        a, _ = self.index.rois_of(i)
        return {**maps, "boxes": torch.as_tensor(boxes, dtype=torch.float32),
                "targets": targets, "roi_ids": torch.as_tensor(a + smp.local), "image": i}


def collate(items: list[dict]) -> dict:
    errors = [it["error"] for it in items if "error" in it]
    if errors:
        return {"error": errors[0]}
    rois = [torch.cat([torch.full((len(it["boxes"]), 1), float(b)), it["boxes"]], 1)
            for b, it in enumerate(items)]
    maps = {k: torch.stack([it[k] for it in items]) for k in ("features", "fine") if k in items[0]}
    return {**maps, "rois": torch.cat(rois), "targets": torch.cat([it["targets"] for it in items]),
            "roi_ids": torch.cat([it["roi_ids"] for it in items]),
            "images": torch.as_tensor([it["image"] for it in items])}


def rank_images(images: np.ndarray, rank: int = 0, world: int = 1) -> np.ndarray:
    """The fixed share of the images a rank owns under torchrun (all of them when alone): a
    resident cache then needs only 1/world of the memory per GPU."""
    return np.asarray(images)[rank::world]


def epoch_batches(images: np.ndarray, epoch: int, seed: int, batch_size: int, rank: int = 0,
                  world: int = 1, shuffle: bool = True, pad: bool = True) -> list[list[int]]:
    """This rank's batches: its own shard (``rank_images``), reshuffled every epoch.

    With ``pad`` every rank gets the same number of batches (short shards repeat a few images),
    as DDP needs matching collective calls."""
    mine = rank_images(images, rank, world)
    if shuffle:
        mine = np.random.default_rng([seed, epoch, 7, rank] if world > 1 else [seed, epoch, 7]).permutation(mine)
    longest = -(-len(images) // world)
    if pad and world > 1 and len(mine) < longest:
        mine = np.concatenate([mine, mine[: longest - len(mine)]])
    return [mine[k:k + batch_size].tolist() for k in range(0, len(mine), batch_size)]


class StreamingSource:
    """Batches read from the store by DataLoader workers (pinned memory, prefetch)."""

    kind = "stream"

    def __init__(self, index, sampling, mask_size, seed, workers, device, prefetch=4, fine: bool = False):
        self.ds = StoreDataset(index, sampling, mask_size, seed, fine)
        self.workers, self.device, self.prefetch = workers, device, prefetch

    def iterate(self, batches: list[list[int]], epoch: int, train: bool):
        items = [[(i, epoch, train) for i in b] for b in batches]
        loader = DataLoader(self.ds, batch_sampler=items, collate_fn=collate, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda",
                            prefetch_factor=self.prefetch if self.workers else None,
                            persistent_workers=False)
        for batch in loader:
            if "error" in batch:
                raise StoreError(batch["error"])
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


class HostParts(Dataset):
    """The CPU half of resident batches (ROI choice, jitter, row indices); numpy only, so it can run in
    DataLoader worker processes while the GPU trains (threads would fight the main thread for the GIL).
    Items are (images, epoch, train) -> dict of CPU tensors."""

    def __init__(self, index: CacheIndex, sampling: RoiSampling, seed: int, row: np.ndarray,
                 inst_offset: np.ndarray):
        self.index, self.sampling, self.seed, self.row, self.inst_offset = index, sampling, seed, row, inst_offset

    def __len__(self):
        return len(self.index.images)

    def __getitem__(self, item) -> dict:
        images, epoch, train = item
        rows = self.row[np.asarray(images)]
        rois, boxes_px, tgt_rows, img_rows, roi_ids, flips, roi_flips = [], [], [], [], [], [], []
        h, w = self.index.input_hw
        for b, (i, r) in enumerate(zip(images, rows)):
            smp = image_samples(self.index, i, epoch, train, self.sampling, self.seed)
            model_boxes = mirror_boxes(smp.boxes) if smp.flip else smp.boxes
            rois.append(np.concatenate([np.full((len(smp.boxes), 1), b), model_boxes], 1))
            boxes_px.append(smp.boxes * np.array([w, h, w, h]))  # targets: the unmirrored frame
            tgt_rows.append(self.inst_offset[r] + smp.local)
            img_rows.append(np.full(len(smp.local), r))
            roi_ids.append(self.index.rois_of(i)[0] + smp.local)
            flips.append(smp.flip)
            roi_flips.append(np.full(len(smp.local), smp.flip))
        return {"rows": torch.as_tensor(rows), "rois": torch.as_tensor(np.concatenate(rois), dtype=torch.float32),
                "boxes_px": torch.as_tensor(np.concatenate(boxes_px)),
                "tgt_rows": torch.as_tensor(np.concatenate(tgt_rows)),
                "img_rows": torch.as_tensor(np.concatenate(img_rows)),
                "roi_ids": torch.as_tensor(np.concatenate(roi_ids)), "images": torch.as_tensor(images),
                "flip": torch.as_tensor(np.asarray(flips, bool)),
                "roi_flip": torch.as_tensor(np.concatenate(roi_flips).astype(bool))}


class ResidentSource:
    """The whole store loaded once into (GPU or CPU) memory; batches are gathered in place."""

    kind = "resident"

    def __init__(self, index: CacheIndex, sampling, mask_size, seed, device, threads: int = 4,
                 host_workers: int = min(4, os.cpu_count() or 1), images: np.ndarray | None = None,
                 keep_features: bool = True, fine: bool = False):
        """``keep_features``: load the maps too (False: masks only, the maps are streamed);
        ``fine``: the fine map too."""
        self.index, self.sampling, self.mask_size, self.seed, self.device = \
            index, sampling, mask_size, seed, device
        self.keep_features = keep_features
        self.map_shapes = index.map_shapes(fine)
        store = FeatureStore(index.path)
        imgs = index.images if images is None else np.asarray(images)
        self.row = np.full(index.meta.n_images, -1, np.int64)
        self.row[imgs] = np.arange(len(imgs))
        mirrored = uses_stored_flip(sampling)
        # name -> [images, C, H, W] fp16, and the stored mirrored maps (name -> ... or absent)
        self.maps = ({k: torch.empty((len(imgs), *shape), dtype=torch.float16, device=device)
                      for k, shape in self.map_shapes.items()} if keep_features else {})
        self.maps_flip = {k: torch.empty_like(v) for k, v in self.maps.items()} if mirrored else {}
        masks, unions, offsets = CropsBuilder(), CropsBuilder(), [0]

        def load(k):
            i = int(imgs[k])
            got = {name: torch.from_numpy(read_map(store, name, i)) for name in self.maps}
            got_flip = {name: torch.from_numpy(read_map(store, name, i, True)) for name in self.maps_flip}
            p = store.packed_masks(i)  # cropped here, in the thread: full frames never pile up
            return k, got, got_flip, PackedCrops.crop(p), PackedCrops.crop(union_packed(p)[None])

        with ThreadPoolExecutor(threads) as pool:  # blosc/zstd decode releases the GIL
            for k, got, got_flip, m_crops, u_crops in pool.map(load, range(len(imgs))):
                for name, m in got.items():
                    self.maps[name][k] = m.to(device)
                for name, m in got_flip.items():
                    self.maps_flip[name][k] = m.to(device)
                masks.append(m_crops)
                unions.append(u_crops)
                offsets.append(offsets[-1] + len(m_crops))
        self.masks = masks.build().to(device)
        self.unions = unions.build().to(device)
        self.inst_offset = np.asarray(offsets[:-1])
        self.host_parts = HostParts(index, sampling, seed, self.row, self.inst_offset)
        self.host_workers = host_workers
        size = sum(m.numel() * 2 for m in (*self.maps.values(), *self.maps_flip.values()))
        log.info("resident cache: %d images, %.2f GB %s%s + %.2f GB masks on %s", len(imgs), size / 1e9,
                 " + ".join(self.maps) or "no maps", " (with mirrored)" if self.maps_flip else "",
                 (self.masks.nbytes + self.unions.nbytes) / 1e9, device)

    @property
    def features(self) -> torch.Tensor | None:
        return self.maps.get("features")

    def device_part(self, host: dict, maps: dict | None = None) -> dict:
        """Gathers on the device; copies are asynchronous (pinned), so the GPU never waits.
        ``maps``: the batch's maps when streamed (stored mirrored ones already read)."""
        flipped = np.flatnonzero(host["flip"].numpy())  # host side: no device sync
        d = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
        h, w = self.index.input_hw
        n = d["rois"].shape[0]
        if n:
            targets = sample_roi_targets(self.masks, self.unions, d["tgt_rows"], d["img_rows"], d["boxes_px"],
                                         self.mask_size, self.mask_size, w)
            if len(flipped):
                targets = torch.where(d["roi_flip"][:, None, None], targets.flip(-1), targets)
        else:
            targets = torch.zeros((0, self.mask_size, self.mask_size), dtype=torch.uint8, device=self.device)
        sel = torch.as_tensor(flipped, device=self.device) if len(flipped) else None
        if maps is None:
            maps = {}
            for name, m in self.maps.items():
                maps[name] = m[d["rows"]]
                if sel is not None and name in self.maps_flip:
                    maps[name][sel] = self.maps_flip[name][d["rows"][sel]]
        if sel is not None and self.sampling.hflip_map:
            for m in maps.values():
                m[sel] = m[sel].flip(-1)
        return {**maps, "rois": d["rois"], "targets": targets, "roi_ids": d["roi_ids"], "images": d["images"]}

    def batch(self, images: list[int], epoch: int, train: bool) -> dict:
        return self.device_part(self.host_parts[(list(images), epoch, train)])

    def iterate(self, batches, epoch, train):
        items = [(list(b), epoch, train) for b in batches]
        if self.device.type != "cuda" or self.host_workers == 0:
            for it in items:  # on a CPU the cores are busy training anyway
                yield self.device_part(self.host_parts[it])
            return
        loader = DataLoader(self.host_parts, batch_size=None, sampler=items, num_workers=self.host_workers,
                            pin_memory=True, prefetch_factor=8, persistent_workers=False)
        for host in loader:
            yield self.device_part(host)


class PinnedRing:
    """``depth`` pinned host buffers of one batch of maps each (name -> [B, C, H, W] fp16), reused in
    turn.  A slot is filled again only after the batch using it was consumed (``release``) and its
    copies to the device finished (the event recorded on the copying stream)."""

    def __init__(self, depth: int, shapes: dict[str, tuple], pinned: bool):
        self.bufs = [{k: torch.empty(shape, dtype=torch.float16, pin_memory=pinned) for k, shape in shapes.items()}
                     for _ in range(depth)]
        self.events = [None] * depth
        self.free = threading.Semaphore(depth)

    def acquire(self, k: int):
        """Slot ``k % depth`` to fill: (slot, its numpy views by map name)."""
        self.free.acquire()
        slot = k % len(self.bufs)
        if self.events[slot] is not None:
            self.events[slot].synchronize()  # the last copy out of this buffer is done
        return slot, {name: b.numpy() for name, b in self.bufs[slot].items()}

    def release(self) -> None:
        self.free.release()


class PinnedStreamSource(ResidentSource):
    """Streaming for GPUs: masks resident on the device, features decoded by a thread pool straight
    into pinned ring buffers (zarr ``out=``; blosc releases the GIL), then copied asynchronously.

    One memcpy-free decode per image instead of decode -> shared memory -> pin-thread copy; batches
    equal the resident ones (same host parts, same device part)."""

    kind = "stream-pinned"

    def __init__(self, index, sampling, mask_size, seed, device, images=None, threads: int = 8, depth: int = 3,
                 fine: bool = False):
        super().__init__(index, sampling, mask_size, seed, device, images=images, keep_features=False, fine=fine)
        self.store = FeatureStore(index.path)
        self.threads, self.depth = threads, depth

    def _produce(self, batches, epoch, train, ring: PinnedRing, ready: queue.Queue, stop: threading.Event):
        """Producer thread: decode each batch's maps into a free slot, then hand (slot, n, host
        parts) to the consumer; an error is handed over too."""
        pinned = self.device.type == "cuda"
        try:
            with ThreadPoolExecutor(self.threads) as pool:
                for k, b in enumerate(batches):
                    slot, arrs = ring.acquire(k)
                    if stop.is_set():
                        return
                    host = self.host_parts[(list(b), epoch, train)]
                    stored = host["flip"].numpy() & uses_stored_flip(self.sampling)
                    jobs = [pool.submit(read_map, self.store, name, int(i), bool(fl), arr[j])
                            for name, arr in arrs.items() for j, (i, fl) in enumerate(zip(b, stored))]
                    if pinned:
                        host = {key: v.pin_memory() for key, v in host.items()}
                    for j in jobs:
                        j.result()
                    ready.put((slot, len(b), host))
        except BaseException as exc:  # noqa: BLE001 - surfaced in the consumer
            ready.put(exc)
        ready.put(None)

    def iterate(self, batches, epoch, train):
        if not batches:
            return
        cuda = self.device.type == "cuda"
        most = max(len(b) for b in batches)
        ring = PinnedRing(self.depth, {k: (most, *shape) for k, shape in self.map_shapes.items()}, cuda)
        ready: queue.Queue = queue.Queue()
        stop = threading.Event()
        threading.Thread(target=self._produce, args=(batches, epoch, train, ring, ready, stop), daemon=True).start()
        held = False
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                slot, n, host = item
                maps = {k: b[:n].to(self.device, non_blocking=True) for k, b in ring.bufs[slot].items()}
                if cuda:
                    ring.events[slot] = copy_done_event(self.device)
                if held:  # the previous batch's step is over: its buffer may be refilled
                    ring.release()
                held = True
                yield self.device_part(host, maps if cuda else {k: m.clone() for k, m in maps.items()})
        finally:
            stop.set()
            ring.release()   # a producer waiting for a slot wakes, sees stop and ends
            ring.release()


def copy_done_event(device: torch.device):
    """A CUDA event recorded on the stream that queued the host-to-``device`` copy: the current
    stream of ``device`` (a copy to cuda:1 is queued there even when cuda:0 is the current device;
    an event on the current device's stream would let the pinned buffer be refilled mid-copy)."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def uses_stored_flip(sampling: RoiSampling) -> bool:
    return sampling.hflip > 0 and not sampling.hflip_map


def resident_bytes(index: CacheIndex, n_images: int, copies: int = 1, fine: bool = False) -> tuple[int, int]:
    """(feature bytes, mask bytes) of ``n_images`` resident: fp16 maps (``copies``: 2 with the
    stored mirrored maps; ``fine``: the fine maps too) and, on the same device, the bit-packed
    instance masks and per-image unions cropped to their boxes (``ResidentSource``), estimated from
    the ROI table's boxes (their mean, scaled to ``n_images``)."""
    return n_images * _map_bytes_per_image(index, fine) * copies, int(n_images * _mask_bytes_per_image(index))


def _map_bytes_per_image(index: CacheIndex, fine: bool) -> int:
    return 2 * sum(int(np.prod(shape)) for shape in index.map_shapes(fine).values())


def _mask_bytes_per_image(index: CacheIndex) -> float:
    """Mean bytes of one image's cropped masks + union: each crop is its box's rows x byte columns
    (plus one of each for the rounding), with 40 bytes of geometry."""
    h, w = index.input_hw
    n_img = len(index.roi_start) - 1
    if n_img <= 0 or len(index.box_input) == 0:
        return 0.0

    def crop(b):
        return ((b[:, 3] - b[:, 1]) * h + 1) * ((b[:, 2] - b[:, 0]) * w / 8 + 2) + 40

    b = index.box_input.clip(0, 1)
    starts = index.roi_start[:-1][index.roi_start[:-1] < index.roi_start[1:]]
    union = np.stack([np.minimum.reduceat(b[:, 0], starts), np.minimum.reduceat(b[:, 1], starts),
                      np.maximum.reduceat(b[:, 2], starts), np.maximum.reduceat(b[:, 3], starts)], 1)
    return float(crop(b).sum() + crop(union).sum()) / n_img


def resident_choice(mode: str, need: int, device_type: str, gpu_free: int, ram_available: int,
                    local_ranks: int = 1) -> str:
    """auto: GPU if ``need`` (features and masks, with 10% headroom) fits in 60% of free GPU memory,
    else CPU RAM if it fits in 50% of this rank's share of the available RAM (``local_ranks``
    processes of one node share it), else off (streaming)."""
    if mode != "auto":
        return mode
    need = need * 1.1
    if device_type == "cuda" and need < 0.6 * gpu_free:
        return "gpu"
    return "cpu" if need < 0.5 * ram_available / max(1, local_ranks) else "off"


def available_ram(meminfo: str = "/proc/meminfo") -> int:
    """Bytes of RAM a new allocation can get: the kernel's MemAvailable, which counts the page cache
    it would drop (MemFree does not: once the store has been read, its pages would make residency
    look unaffordable and the run would silently stream).  Without /proc: sysconf's free pages."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def choose_resident(mode: str, index: CacheIndex, device: torch.device, n_images: int | None = None,
                    copies: int = 1, fine: bool = False) -> str:
    """``resident_choice`` with this machine's free GPU memory and RAM; ``copies``: 2 when the
    mirrored maps are kept too."""
    if mode != "auto":
        return mode
    feats, masks = resident_bytes(index, len(index.images) if n_images is None else n_images, copies, fine)
    gpu_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    return resident_choice(mode, feats + masks, device.type, gpu_free, available_ram(),
                           int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def make_source(mode: str, index, sampling, mask_size, seed, workers, device, images=None,
                fine: bool = False) -> BatchSource:
    """``images``: the ones this rank will read (its shard under torchrun); ``fine``: batches carry
    the fine map too."""
    chosen = choose_resident(mode, index, device, None if images is None else len(images),
                             2 if uses_stored_flip(sampling) else 1, fine)
    if chosen == "gpu":
        if device.type != "cuda":
            raise RoisegError(f"--resident gpu keeps the store in GPU memory, and the device is {device}: use "
                              f"--resident cpu, auto or off")
        return ResidentSource(index, sampling, mask_size, seed, device, images=images, fine=fine)
    if chosen == "cpu":
        src = ResidentSource(index, sampling, mask_size, seed, torch.device("cpu"), images=images, fine=fine)
        return _MovedSource(src, device) if device.type != "cpu" else src
    if device.type == "cuda":
        return PinnedStreamSource(index, sampling, mask_size, seed, device, images=images, fine=fine)
    return StreamingSource(index, sampling, mask_size, seed, workers, device, fine=fine)


class _MovedSource:
    """A CPU-resident cache feeding a GPU: batches are copied over per step."""

    kind = "resident-cpu"

    def __init__(self, src, device):
        self.src, self.device = src, device

    def iterate(self, batches, epoch, train):
        for b in self.src.iterate(batches, epoch, train):
            yield {k: v.to(self.device, non_blocking=True) for k, v in b.items()}
