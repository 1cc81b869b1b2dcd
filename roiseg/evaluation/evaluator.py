"""Validation metrics of ROI logits against a store's ground truth, vectorized over ROIs.

``RoiEvaluator`` follows detectron2's evaluator protocol: ``reset()``, ``process(roi_ids, probs)``
per batch, ``result()``.  ``train`` and ``evaluate`` use the same one.  Metrics (see
``roiseg/evaluation/metrics.py`` for the definitions):

* 3-class ``mIoU`` at model-input resolution over each padded ROI's pixels;
* ``instance_mIoU`` at original resolution (class-1 probability > 0.5 vs the full GT mask), also per
  COCO size (S/M/L by GT mask area) and for "overlapped" persons (another person inside the ROI);
* ``boundary_IoU`` per person at original resolution (``roiseg/evaluation/boundary.py``: the IoU of the
  predicted and the GT mask's boundary bands, 2% of the image diagonal wide), with the same subsets;
* the box-filled baseline on the same persons (the GT box filled as the mask);
* ``score_rank_corr``: how well each mask's score (the score head's predicted IoU, else its
  certainty, ``models.mask_certainty``) ranks the masks by their true instance IoU.

ROIs of a batch are pasted together into one padded frame per chunk (windows sorted by size, a pixel
budget per chunk), so there is no host round-trip per ROI: the only host syncs are per chunk.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import numpy as np
import torch
from pycocotools import mask as mask_utils

from roiseg.common.errors import RoisegError
from roiseg.common.geometry import normalized_to_pixel, pixel_center_span
from roiseg.data.rasterize import native_windows
from roiseg.evaluation.boundary import boundary_band, boundary_width
from roiseg.evaluation.coco_eval import coco_result
from roiseg.loader.sampling import RoiSampling
from roiseg.loader.sources import CacheIndex, epoch_batches, make_source
from roiseg.loader.targets import sample_roi_targets, union_packed
from roiseg.modeling.decoders import decode_rois, mask_scores, paste_masks

CLASS_NAMES = ("background", "target", "non_target")
# COCO's size ranges on the GT mask area (original pixels).
SMALL, MEDIUM = 32 ** 2, 96 ** 2
SUBSETS = ("all", "small", "medium", "large", "overlapped")


class _ImageGT(NamedTuple):
    """One val image's ground truth as the evaluator uses it."""
    packed: torch.Tensor        # [n, P] packed bits of the masks at input resolution (device)
    union: torch.Tensor         # packed union of all persons (device)
    full: np.ndarray            # [H, W, n] uint8 masks at original resolution (host)
    area: np.ndarray            # [n] mask areas
    band: np.ndarray            # [H, W, n] bool boundary bands at original resolution (host)
    band_area: np.ndarray       # [n] band areas
    width: int                  # the band width d of this image


def _gt_bands(full: np.ndarray, rles: list) -> tuple[np.ndarray, np.ndarray, int]:
    """Boundary bands of an image's [H, W, n] GT masks, their areas and the band width.  Each band
    is taken on its mask's bounding box: outside it the mask is background, as the band's own
    padding assumes, so the result is exact at a fraction of the full-image cost."""
    d = boundary_width(*full.shape[:2])
    band, area = np.zeros(full.shape, bool), np.zeros(full.shape[2])
    for k, (x, y, bw, bh) in enumerate(mask_utils.toBbox(rles).astype(np.int64) if rles else []):
        crop = boundary_band(torch.from_numpy(full[y:y + bh, x:x + bw, k]).bool()[None], d)[0].numpy()
        band[y:y + bh, x:x + bw, k] = crop
        area[k] = crop.sum()
    return band, area, d


def _chunks(sizes: np.ndarray, budget: int):
    """Index groups (sorted by window area) whose padded frames stay under ``budget`` pixels."""
    order = np.argsort(sizes[:, 0] * sizes[:, 1], kind="stable")
    group, hmax, wmax = [], 0, 0
    for j in order:
        h2, w2 = max(hmax, sizes[j, 0]), max(wmax, sizes[j, 1])
        if group and (len(group) + 1) * h2 * w2 > budget:
            yield np.array(group)
            group, h2, w2 = [], sizes[j, 0], sizes[j, 1]
        group.append(j)
        hmax, wmax = h2, w2
    if group:
        yield np.array(group)


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(1)`` (first index among ties) for a few classes: elementwise passes, several times
    faster on a CPU than a reduction over a strided dim 1."""
    best, lab = x[:, 0], torch.zeros(x.shape[:1] + x.shape[2:], dtype=torch.uint8, device=x.device)
    for c in range(1, x.shape[1]):
        better = x[:, c] > best
        lab[better] = c
        best = torch.maximum(best, x[:, c])
    return lab


def _valid(hw: torch.Tensor, hmax: int, wmax: int) -> torch.Tensor:
    """[n, hmax, wmax] True inside each ROI's own window (top-left aligned)."""
    ys = torch.arange(hmax, device=hw.device)
    xs = torch.arange(wmax, device=hw.device)
    return (ys[None, :, None] < hw[:, 0, None, None]) & (xs[None, None, :] < hw[:, 1, None, None])


@dataclass
class _Chunk:
    """ROIs scored together: their rows, class probabilities, images, instance numbers, padded ROI
    and window in the input frame and at original resolution, and quality scores."""
    roi_ids: np.ndarray
    probs: torch.Tensor
    images: np.ndarray
    local: np.ndarray
    in_box: np.ndarray
    in_win: np.ndarray
    o_box: np.ndarray
    o_win: np.ndarray
    o_hw: np.ndarray
    scores: torch.Tensor


@dataclass
class _GtCrops:
    """A chunk's GT masks and boundary bands cropped to the original-resolution windows."""
    wh: np.ndarray           # [n, 2] window height, width
    mask: np.ndarray         # [n, hmax, wmax] bool
    band: np.ndarray         # [n, hmax, wmax] bool
    area: np.ndarray         # [n] GT mask area (whole image)
    band_area: np.ndarray    # [n] GT band area
    width: np.ndarray        # [n] boundary band width (pixels)
    box_iou: np.ndarray      # [n] the filled box's IoU with the GT mask


class RoiEvaluator:
    def __init__(self, index, store, num_classes: int, device="cpu", coco_eval: bool = False,
                 pixel_budget: int | None = None):
        """``index``: roiseg.loader.sources.CacheIndex of the val store; ``store``: its FeatureStore."""
        self.index, self.store, self.k = index, store, num_classes
        self.device = torch.device(device)
        self.coco_eval = coco_eval
        # Pixels of one chunk's padded frames: ~60 MB of float32 per class on a CPU.
        self.budget = pixel_budget or (1 << 25 if self.device.type == "cuda" else 1 << 22)
        t = index.tables
        self.roi_image, self.roi_inst = t["roi_image"], t["roi_inst"]
        self.orig_hw, self.image_id = t["orig_hw"], t["image_id"]
        self.roi_padded = t["roi_padded"].astype(np.float64)
        self._keep_records = False
        self.reset()

    def reset(self) -> None:
        z = lambda *s: torch.zeros(s, dtype=torch.float64, device=self.device)  # noqa: E731
        self.inter, self.union = z(self.k), z(self.k)
        self.iou_sum, self.box_sum, self.count = z(len(SUBSETS)), z(len(SUBSETS)), z(len(SUBSETS))
        self.biou_sum = z(len(SUBSETS))
        self.records: list[dict] = []
        self.coco_dets: list = []
        self.score_pairs: list = []     # (score, true instance IoU) per ROI
        self._gt_cache: dict = {}

    # ---- ground truth of one image ------------------------------------------------------------
    def _gt(self, i: int):
        if i not in self._gt_cache:
            if len(self._gt_cache) > 64:
                self._gt_cache.clear()
            rles = [{"size": r["size"], "counts": r["counts"].encode()} for r in self.store.gt_rles(i)]
            packed = torch.from_numpy(self.store.packed_masks(i).copy()).to(self.device)
            full = mask_utils.decode(rles) if rles else np.zeros((*self.orig_hw[i], 0), np.uint8)
            self._gt_cache[i] = _ImageGT(packed, union_packed(packed), full,
                                         np.asarray(mask_utils.area(rles), np.float64).reshape(-1),
                                         *_gt_bands(full, rles))
        return self._gt_cache[i]

    # ---- one batch ------------------------------------------------------------------------
    @torch.no_grad()
    def process(self, roi_ids, probs: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        """``roi_ids`` [n] rows of the store's ROI table; ``probs`` [n, K, M, M] softmax outputs;
        ``scores`` [n]: a score head's predicted mask IoUs (None: each mask's certainty,
        ``models.mask_certainty``, as predict scores them)."""
        roi_ids = np.asarray(roi_ids.cpu() if torch.is_tensor(roi_ids) else roi_ids, np.int64)
        if len(roi_ids) == 0:
            return
        probs = probs.float()
        scores = mask_scores(probs[:, 1], scores)
        h, w = self.index.input_hw
        images = self.roi_image[roi_ids]
        local = self.roi_inst[roi_ids]
        in_box = normalized_to_pixel(self.index.padded_input[roi_ids], w, h)
        in_win = native_windows(in_box, (h, w))
        o_hw = self.orig_hw[images].astype(np.int64)
        o_box = self.roi_padded[roi_ids] * o_hw[:, [1, 0, 1, 0]]
        o_win = native_windows(o_box, o_hw)
        gts = {int(i): self._gt(int(i)) for i in np.unique(images)}
        sizes = np.maximum(np.stack([in_win[:, 3] - in_win[:, 1], in_win[:, 2] - in_win[:, 0]], 1),
                           np.stack([o_win[:, 3] - o_win[:, 1], o_win[:, 2] - o_win[:, 0]], 1)).clip(0)
        for sel in _chunks(sizes, self.budget):
            pick = torch.as_tensor(sel, device=probs.device)
            self._process_chunk(_Chunk(roi_ids[sel], probs[pick], images[sel], local[sel], in_box[sel], in_win[sel],
                                       o_box[sel], o_win[sel], o_hw[sel], scores[pick]), gts)

    def _semantic(self, probs, images, local, box, win, gts):
        """[n, 2, K] intersections/unions of the argmax labels inside each input-frame window."""
        h, w = self.index.input_hw
        n = len(images)
        wh = np.stack([win[:, 3] - win[:, 1], win[:, 2] - win[:, 0]], 1).clip(0)
        hmax, wmax = int(wh[:, 0].max()), int(wh[:, 1].max())
        out = torch.zeros((n, 2, self.k), dtype=torch.float64, device=self.device)
        if hmax == 0 or wmax == 0:
            return out
        rel = torch.as_tensor(box - np.tile(win[:, :2], 2), dtype=torch.float32, device=self.device)
        labels = first_argmax(paste_masks(probs, rel, hmax, wmax))
        uniq = sorted(gts)
        packed = torch.cat([gts[i].packed for i in uniq])
        offsets = np.cumsum([0] + [len(gts[i].packed) for i in uniq])
        row = {i: r for r, i in enumerate(uniq)}
        pos = np.array([row[int(i)] for i in images])
        target_rows = torch.as_tensor(offsets[pos] + local, device=self.device)
        union = torch.stack([gts[i].union for i in uniq])
        frame = np.concatenate([win[:, :2], win[:, :2] + [wmax, hmax]], 1)
        gt = sample_roi_targets(packed, union, target_rows, torch.as_tensor(pos, device=self.device),
                                torch.as_tensor(frame, device=self.device), hmax, wmax, w)
        if self.k == 2:
            gt = torch.where(gt == 2, 0, gt)
        valid = _valid(torch.as_tensor(wh, device=self.device), hmax, wmax)
        for c in range(self.k):
            p, g = (labels == c) & valid, (gt == c) & valid
            out[:, 0, c] = (p & g).sum((1, 2)).double()
            out[:, 1, c] = (p | g).sum((1, 2)).double()
        return out

    def _process_chunk(self, c: _Chunk, gts: dict) -> None:
        """One chunk of ROIs: 3-class I/U in the input frame, instance and boundary IoU at original
        resolution, the box baseline, then the running sums (and records / COCO results)."""
        iu = self._semantic(c.probs, c.images, c.local, c.in_box, c.in_win, gts)
        empty_in = (c.in_win[:, 2] <= c.in_win[:, 0]) | (c.in_win[:, 3] <= c.in_win[:, 1])
        keep = torch.as_tensor(~empty_in, device=self.device)
        self.inter += iu[keep, 0].sum(0)
        self.union += iu[keep, 1].sum(0)
        crops = self._gt_crops(c, gts)
        pred, iou, biou = self._instance_ious(c, crops)
        member = torch.as_tensor(self._membership(c.roi_ids, crops.area), device=self.device)
        self.iou_sum += (member * iou[:, None]).sum(0)
        self.biou_sum += (member * biou[:, None]).sum(0)
        self.box_sum += (member * torch.as_tensor(crops.box_iou, device=self.device)[:, None]).sum(0)
        self.count += member.sum(0)
        scores_h = c.scores.cpu().numpy()
        self.score_pairs += list(zip(scores_h.tolist(), iou.cpu().numpy().tolist()))
        if self._keep_records:
            self._records(c, crops, iu.cpu().numpy(), iou.cpu().numpy(), biou.cpu().numpy(), scores_h)
        if self.coco_eval:
            self._coco_results(c, pred.cpu().numpy(), scores_h)

    def _gt_crops(self, c: _Chunk, gts: dict) -> _GtCrops:
        """Each ROI's GT mask and boundary band on its original-resolution window (host side, numpy:
        no device round-trip per ROI), its areas, and the filled-box baseline's IoU."""
        n = len(c.roi_ids)
        wh = np.stack([c.o_win[:, 3] - c.o_win[:, 1], c.o_win[:, 2] - c.o_win[:, 0]], 1).clip(0)
        hmax, wmax = max(int(wh[:, 0].max()), 1), max(int(wh[:, 1].max()), 1)
        crops = _GtCrops(wh, np.zeros((n, hmax, wmax), bool), np.zeros((n, hmax, wmax), bool), np.empty(n),
                         np.empty(n), np.empty(n, np.int64), np.empty(n))
        for j in range(n):
            g, k = gts[int(c.images[j])], c.local[j]
            x0, y0, x1, y1 = c.o_win[j]
            crops.mask[j, : y1 - y0, : x1 - x0] = g.full[y0:y1, x0:x1, k]
            crops.band[j, : y1 - y0, : x1 - x0] = g.band[y0:y1, x0:x1, k]
            crops.area[j], crops.band_area[j], crops.width[j] = g.area[k], g.band_area[k], g.width
            crops.box_iou[j] = self._box_iou(int(c.roi_ids[j]), g.full[:, :, k], crops.area[j], c.o_hw[j])
        return crops

    def _instance_ious(self, c: _Chunk, crops: _GtCrops) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(predicted masks on the windows, instance IoU, boundary IoU) of the chunk's ROIs."""
        n, hmax, wmax = crops.mask.shape
        rel = torch.as_tensor(c.o_box - np.tile(c.o_win[:, :2], 2), dtype=torch.float32, device=self.device)
        fg = paste_masks(c.probs[:, 1:2], rel, hmax, wmax, fill_background=False)[:, 0]
        valid = _valid(torch.as_tensor(crops.wh, device=self.device), hmax, wmax)
        pred = (fg > 0.5) & valid
        gt_t = torch.from_numpy(crops.mask).to(self.device)
        inter = (pred & gt_t).sum((1, 2)).double()
        p_area = pred.sum((1, 2)).double()
        union = p_area + torch.as_tensor(crops.area, device=self.device) - inter
        iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
        empty_o = torch.as_tensor((crops.wh[:, 0] == 0) | (crops.wh[:, 1] == 0), device=self.device)
        iou = torch.where(empty_o, torch.zeros_like(iou), iou)
        biou = torch.where(empty_o, torch.zeros_like(iou), _boundary_iou(
            pred, torch.from_numpy(crops.band).to(self.device), crops.band_area, crops.width))
        return pred, iou, biou

    def _records(self, c: _Chunk, crops: _GtCrops, iu_h, iou_h, biou_h, scores_h) -> None:
        for j in range(len(c.roi_ids)):
            self.records.append({"image": int(c.images[j]), "roi": int(c.roi_ids[j]), "iu": iu_h[j].tolist(),
                                 "area": float(crops.area[j]), "has_other": bool(self.index.has_other[c.roi_ids[j]]),
                                 "iou": float(iou_h[j]), "biou": float(biou_h[j]), "box_iou": float(crops.box_iou[j]),
                                 "score": float(scores_h[j])})

    def _coco_results(self, c: _Chunk, pred_h: np.ndarray, scores_h) -> None:
        for j in range(len(c.roi_ids)):
            x0, y0, x1, y1 = c.o_win[j]
            self.coco_dets.append(coco_result(int(self.image_id[c.images[j]]), (x0, y0, x1, y1),
                                              pred_h[j, : y1 - y0, : x1 - x0], float(scores_h[j]),
                                              tuple(int(v) for v in c.o_hw[j])))

    def keep_records(self, on: bool = True) -> "RoiEvaluator":
        """Also keep one record per ROI (for bootstrap statistics over images)."""
        self._keep_records = on
        return self

    def _box_iou(self, rid: int, gt_full: np.ndarray, gt_area: float, hw) -> float:
        """The GT box filled as the mask (pixels whose centres lie in it) vs the GT mask."""
        oh, ow = (int(v) for v in hw)
        b = normalized_to_pixel(self.index.box[rid], ow, oh)
        x0, x1 = pixel_center_span(b[0], b[2], ow)
        y0, y1 = pixel_center_span(b[1], b[3], oh)
        inter = float(gt_full[y0:y1, x0:x1].sum())
        union = (x1 - x0) * (y1 - y0) + gt_area - inter
        return inter / union if union else 1.0

    def _membership(self, roi_ids, areas) -> np.ndarray:
        other = self.index.has_other[roi_ids]
        return np.stack([np.ones(len(areas), bool), areas < SMALL, (areas >= SMALL) & (areas < MEDIUM),
                         areas >= MEDIUM, other], 1).astype(np.float64)

    # ---- result -----------------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        """What distributed ranks sum before ``result``."""
        return [self.inter, self.union, self.iou_sum, self.box_sum, self.count, self.biou_sum]

    def result(self) -> dict:
        iou = (self.inter / self.union.clamp_min(1)).cpu().numpy()
        cnt = self.count.cpu().numpy()
        inst = (self.iou_sum.cpu().numpy() / np.maximum(cnt, 1))
        box = (self.box_sum.cpu().numpy() / np.maximum(cnt, 1))
        biou = (self.biou_sum.cpu().numpy() / np.maximum(cnt, 1))
        res = {"mIoU": float(iou.mean()), "iou": {n: float(v) for n, v in zip(CLASS_NAMES, iou)},
               "instance_mIoU": float(inst[0]), "boundary_IoU": float(biou[0]), "instances": int(cnt[0]),
               "instance_subsets": {s: {"instance_mIoU": float(inst[j]), "boundary_IoU": float(biou[j]),
                                        "box_mIoU": float(box[j]), "persons": int(cnt[j])}
                                    for j, s in enumerate(SUBSETS)},
               "box_instance_mIoU": float(box[0])}
        if self.coco_eval:
            from roiseg.evaluation.coco_eval import coco_mask_ap
            res.update(coco_mask_ap(self.store, self.coco_dets, self.index.images))
        if self.score_pairs:
            res.update(score_quality(np.asarray(self.score_pairs, np.float64)))
        if self._keep_records:
            res["per_roi"] = list(self.records)
        return res


def score_quality(pairs: np.ndarray) -> dict:
    """How well mask scores ([n, 2]: score, true IoU) rank the masks and, for a score head's
    predicted IoUs, match the true ones."""
    rank = lambda x: np.argsort(np.argsort(x, kind="stable"), kind="stable")  # noqa: E731
    corr = float(np.corrcoef(rank(pairs[:, 0]), rank(pairs[:, 1]))[0, 1]) if len(pairs) > 1 else float("nan")
    return {"score_rank_corr": corr, "score_mae": float(np.abs(pairs[:, 0] - pairs[:, 1]).mean())}


def _boundary_iou(pred: torch.Tensor, gt_band: torch.Tensor, gt_band_area: np.ndarray,
                  width: np.ndarray) -> torch.Tensor:
    """[n] boundary IoU of predicted masks (zero outside their windows) against GT bands cropped to
    the same windows; ``gt_band_area`` counts each whole band, also outside the window."""
    band = torch.zeros_like(pred)
    for d in np.unique(width):  # one band width per image size: a few groups per chunk
        sel = torch.as_tensor(np.flatnonzero(width == d), device=pred.device)
        band[sel] = boundary_band(pred[sel], int(d))
    inter = (band & gt_band).sum((1, 2)).double()
    union = band.sum((1, 2)).double() + torch.as_tensor(gt_band_area, device=pred.device) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


@torch.no_grad()
def run_evaluator(model: torch.nn.Module, batches: Iterable[dict], evaluator: RoiEvaluator, amp: bool = False,
                  zero_features: bool = False, amp_dtype: torch.dtype = torch.float16,
                  mirrored: Iterable[dict] | None = None) -> RoiEvaluator:
    """Feed every validation batch through ``model`` into ``evaluator`` (no per-ROI host sync).
    ``mirrored``: the same batches of the mirrored images (``val_batches(mirrored=True)``): flip
    test-time augmentation, each ROI's class probabilities averaged with its mirror's."""
    was_training = model.training
    model.eval()
    evaluator.reset()
    decode = functools.partial(_probs, model, amp=amp, zero_features=zero_features, amp_dtype=amp_dtype)
    for batch, flipped in zip(batches, mirrored if mirrored is not None else itertools.repeat(None)):
        probs, scores = decode(batch)
        if flipped is not None:
            if not torch.equal(flipped["roi_ids"], batch["roi_ids"]):
                raise RuntimeError("the mirrored batches hold other ROIs than the plain ones")
            probs_m, scores_m = decode(flipped)
            probs = (probs + probs_m.flip(-1)) / 2
            scores = None if scores is None else (scores + scores_m) / 2
        evaluator.process(batch["roi_ids"], probs, scores)
    model.train(was_training)
    return evaluator


def _probs(model, batch: dict, amp: bool, zero_features: bool, amp_dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch's class probabilities [n, K, M, M] and score-head scores (or None)."""
    f, fine = batch["features"], batch.get("fine")
    if zero_features:
        f, fine = torch.zeros_like(f), None if fine is None else torch.zeros_like(fine)
    if not amp:
        f, fine = f.float(), None if fine is None else fine.float()
    with torch.autocast(f.device.type, dtype=amp_dtype, enabled=amp):
        logits, scores = decode_rois(model, f, batch["rois"], fine)
    return logits.float().softmax(1), scores


def val_batches(index: CacheIndex, device, batch_size: int, mask_size: int, resident: str = "auto",
                workers: int = 0, fine: bool = False, mirrored: bool = False):
    """Every stored padded ROI of ``index``'s images, in store order (as `train` validates);
    ``fine``: with the fine map (a decoder that fuses one); ``mirrored``: of the mirrored images
    (their stored features, ``cache --flip``), ROIs mirrored, in the same order."""
    if mirrored and not index.has_flip:
        raise RoisegError(f"flip test-time augmentation reads the features of the mirrored images, and {index.path} "
                          f"holds none: cache it with --flip")
    source = make_source(resident, index, RoiSampling(hflip=1.0 if mirrored else 0.0), mask_size, 0, workers, device,
                         index.images, fine)
    batches = epoch_batches(index.images, 0, 0, batch_size, shuffle=False, pad=False)
    return source.iterate(batches, 0, False)
