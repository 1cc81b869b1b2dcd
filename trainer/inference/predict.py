"""`cli.py predict`: images, folders, videos or a camera -> person masks.

image -> extractor (features + its own detection output, one ORT run) -> person boxes (or boxes from
a file / the annotations) -> decoder over all persons at once -> each mask pasted in its window.
Writes an overlay per input (a video for video/camera input), ``predictions.json`` (COCO results:
RLE + bbox + score, what pycocotools' ``loadRes`` reads), optionally one PNG per person
(``--save-masks``) and COCO polygons (``--polygons``: OpenCV ``findContours``, outer contours).
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from tqdm import tqdm

from featcache.errors import FeatCacheError
from featcache.geometry import coco_xywh_to_xyxy
from featcache.images import ImageDecodeError, load_rgb

from ..metrics import instance_iou
from .detection import DetectionSettings
from .predictor import THRESHOLD, Prediction, Predictor
from .visualize import ALPHA, BOX_RED, _font, person_colour

log = logging.getLogger(__name__)
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_EXT = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}


@dataclass
class PredictOptions:
    source: str | Path
    out: Path
    checkpoint: Path | None = None
    exported: Path | None = None         # an exported decoder / end-to-end ONNX instead (ORT only)
    onnx: Path | None = None
    provider: str = "auto"
    device: str = "cpu"
    boxes: str = "auto"                  # auto | gt | a JSON file
    box_format: str = "xyxy"             # for normalized boxes in a JSON mapping
    ann: Path | None = None
    detection: DetectionSettings = field(default_factory=DetectionSettings)
    threshold: float = THRESHOLD
    save_masks: bool = False
    polygons: bool = False
    overlays: bool = True
    show_boxes: bool = True
    show_scores: bool = True
    max_frames: int | None = None
    only: list | None = None             # restrict a folder to these file names
    progress: bool = True


# ---- inputs -----------------------------------------------------------------------------------
def is_camera(source) -> bool:
    return isinstance(source, int) or (isinstance(source, str) and source.isdigit())


def list_images(source: Path, only=None) -> list[Path]:
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FeatCacheError(f"--source not found: {source}")
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_EXT)
    if only is not None:
        files = [p for p in files if p.name in set(only)]
    if not files:
        raise FeatCacheError(f"no images ({', '.join(sorted(IMAGE_EXT))}) in {source}")
    return files


def video_frames(source, max_frames=None):
    """(frame index, PIL RGB frame) of a video file or camera index; and the stream's fps."""
    import os
    os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")  # our message says what failed; no C++ warnings
    import cv2
    cap = cv2.VideoCapture(int(source) if is_camera(source) else str(source))
    if not cap.isOpened():
        raise FeatCacheError(f"cannot open {'camera' if is_camera(source) else 'video'} {source}")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0

    def frames():
        k = 0
        try:
            while max_frames is None or k < max_frames:
                ok, bgr = cap.read()
                if not ok:
                    break
                yield k, Image.fromarray(bgr[..., ::-1].copy())
                k += 1
        finally:
            cap.release()
    return frames(), fps, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)


# ---- boxes ------------------------------------------------------------------------------------
class BoxSource:
    """Person boxes per image: ``auto`` (None: the extractor detects), ``gt`` (persons of ``--ann``),
    or a JSON file: COCO detection results (``image_id``, ``bbox`` [x, y, w, h] pixels, ``score``;
    images matched by id), COCO annotations (matched by file name), or ``{file_name: [[4 normalized
    numbers], ...]}`` in ``box_format`` (``xyxy`` or ``cxcywh``)."""

    def __init__(self, spec: str, ann: Path | None, box_format: str = "xyxy"):
        self.spec, self.fmt = spec, box_format
        self.ids: dict[str, int] = {}          # file name -> image id (from --ann)
        self.person_cat = 1
        self.by_name: dict[str, tuple] = {}    # normalized boxes, scores, annotation ids
        self.by_id: dict[int, list] = {}       # pixel boxes + scores (COCO results)
        self.gt_rles: dict[str, list] = {}
        if spec == "gt" and ann is None:
            raise FeatCacheError("--boxes gt needs --ann (the annotation file with the person boxes)")
        if ann is not None:
            self._load_ann(Path(ann))
        if spec not in ("auto", "gt"):
            self._load_file(Path(spec))

    def _load_ann(self, ann: Path) -> None:
        from featcache.coco import load_person_records
        if not ann.is_file():
            raise FeatCacheError(f"--ann not found: {ann}")
        records, _ = load_person_records(ann, keep_empty_images=True)
        for r in records:
            self.ids[r.file_name] = r.image_id
            if self.spec == "gt":
                self.by_name[r.file_name] = (np.array([i.box_norm for i in r.instances]).reshape(-1, 4),
                                             np.ones(len(r.instances)), [i.ann_id for i in r.instances])
                self.gt_rles[r.file_name] = [i.rle for i in r.instances]
        cats = [c["id"] for c in json.loads(ann.read_text()).get("categories", []) if c.get("name") == "person"]
        self.person_cat = cats[0] if cats else 1

    def _load_file(self, path: Path) -> None:
        if not path.is_file():
            raise FeatCacheError(f"--boxes: not an existing file, 'auto' or 'gt': {path}")
        try:
            d = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise FeatCacheError(f"--boxes {path} is not JSON: {exc}") from exc
        try:
            if isinstance(d, dict) and "annotations" in d:            # COCO annotations
                ims = {im["id"]: im for im in d.get("images", [])}
                for a in d["annotations"]:
                    if a.get("iscrowd"):
                        continue
                    im = ims[a["image_id"]]
                    w, h = im["width"], im["height"]
                    b, s, _ = self.by_name.setdefault(im["file_name"], ([], [], None))
                    b.append(coco_xywh_to_xyxy(a["bbox"]) / [w, h, w, h])
                    s.append(float(a.get("score", 1.0)))
                self.by_name = {k: (np.array(b).reshape(-1, 4), np.array(s), None) for k, (b, s, _) in self.by_name.items()}
            elif isinstance(d, list):                                   # COCO detection results
                for a in d:
                    self.by_id.setdefault(int(a["image_id"]), []).append((a["bbox"], float(a.get("score", 1.0))))
            elif isinstance(d, dict):                                   # {file_name: normalized boxes}
                from featcache.geometry import as_xyxy
                for name, boxes in d.items():
                    b = as_xyxy(np.asarray(boxes, np.float64).reshape(-1, 4), self.fmt)
                    self.by_name[name] = (b, np.ones(len(b)), None)
            else:
                raise TypeError(type(d).__name__)
        except (KeyError, TypeError, ValueError) as exc:
            raise FeatCacheError(f"--boxes {path}: expected COCO detection results, COCO annotations or "
                                 f"{{file_name: [[4 normalized numbers], ...]}} ({exc!r})") from exc

    def boxes_for(self, name: str, image_id: int, size) -> tuple | None:
        """(normalized xyxy [N,4], scores [N], annotation ids or None); None for ``auto``."""
        if self.spec == "auto":
            return None
        if self.by_id:
            h, w = size
            rows = self.by_id.get(image_id, [])
            boxes = np.array([coco_xywh_to_xyxy(b) / [w, h, w, h] for b, _ in rows]).reshape(-1, 4)
            return boxes, np.array([s for _, s in rows], np.float64), None
        return self.by_name.get(name, (np.zeros((0, 4)), np.zeros(0), None))


def image_id_of(name: str, ids: dict, fallback: int) -> int:
    """The annotation's id (by file name), else the number in the file name, else ``fallback``."""
    if name in ids:
        return int(ids[name])
    digits = re.findall(r"\d+", Path(name).stem)
    return int(digits[-1]) if digits else fallback


# ---- outputs ----------------------------------------------------------------------------------
def overlay(im: Image.Image, pred: Prediction, threshold: float, boxes: bool = True, scores: bool = True) -> Image.Image:
    """Masks in per-person colours (blended inside each window only), boxes and scores optional."""
    arr = np.asarray(im).astype(np.float32)
    for k, (m, (x0, y0, x1, y1)) in enumerate(zip(pred.window_masks(threshold), pred.windows)):
        win = arr[y0:y1, x0:x1]
        win[m] = win[m] * (1 - ALPHA) + np.array(person_colour(k), np.float32) * ALPHA
    out = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if boxes and len(pred):
        draw = ImageDraw.Draw(out)
        font = _font(max(11, out.height // 45), True)
        h, w = pred.size
        for k, b in enumerate(pred.boxes * [w, h, w, h]):
            draw.rectangle(list(b), outline=person_colour(k) if not scores else BOX_RED, width=2)
            if scores:
                draw.text((b[0] + 3, b[1] + 2), f"{k} {pred.scores[k]:.2f}", fill=BOX_RED, font=font)
    return out


def polygons_of(mask: np.ndarray, offset=(0, 0), min_area: float = 4.0) -> list[list[float]]:
    """COCO polygons (outer contours, OpenCV ``findContours``) of a window mask, in image pixels."""
    import cv2
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        if len(c) >= 3 and cv2.contourArea(c) >= min_area:
            polys.append([float(v) for v in (c.reshape(-1, 2) + np.asarray(offset)).reshape(-1)])
    return polys


def coco_results(pred: Prediction, image_id: int, category_id: int, threshold: float,
                 ann_ids=None) -> list[dict]:
    """One COCO result per person: full-image RLE, person bbox [x, y, w, h] and score.  The score
    is the detector's for detected boxes, else the mask's mean probability."""
    h, w = pred.size
    out = []
    mask_scores = pred.mask_scores(threshold)
    for k, (m, (x0, y0, x1, y1)) in enumerate(zip(pred.window_masks(threshold), pred.windows)):
        full = np.zeros((h, w), np.uint8, order="F")
        full[y0:y1, x0:x1] = m
        rle = mask_utils.encode(full)
        rle["counts"] = rle["counts"].decode()
        bx = pred.boxes[k] * [w, h, w, h]
        score = float(pred.scores[k]) if pred.scores[k] != 1.0 else float(mask_scores[k])
        r = {"image_id": image_id, "category_id": category_id, "segmentation": rle,
             "bbox": [round(float(v), 2) for v in (bx[0], bx[1], bx[2] - bx[0], bx[3] - bx[1])],
             "score": round(score, 5)}
        if ann_ids is not None:
            r["gt_ann_id"] = int(ann_ids[k])
        out.append(r)
    return out


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


# ---- the run ----------------------------------------------------------------------------------
def run_predict(opts: PredictOptions, predictor: Predictor | None = None) -> dict:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    boxes = BoxSource(opts.boxes, opts.ann, opts.box_format)
    if predictor is None:
        detection = opts.detection if opts.boxes == "auto" else None
        predictor = (Predictor.from_onnx(opts.exported, opts.onnx, opts.provider, detection) if opts.exported else
                     Predictor.from_checkpoint(opts.checkpoint, opts.onnx, opts.provider, opts.device, detection))
    log.info("image encoder on %s, decoder on %s", predictor.provider, predictor.decoder.provider)
    results, poly_anns, poly_images, ious = [], [], [], []
    t0, n_done, n_persons = time.perf_counter(), 0, 0
    source = opts.source
    video = is_camera(source) or Path(str(source)).suffix.lower() in VIDEO_EXT
    writer = None
    if video:
        frames, fps, total = video_frames(source, opts.max_frames)
        stem = f"camera{source}" if is_camera(source) else Path(str(source)).stem
        items = ((f"{stem}_{k:06d}", im, k) for k, im in frames)
    else:
        files = list_images(Path(source), opts.only)
        total = len(files)
        items = ((p.name, p, k) for k, p in enumerate(files))
    bar = tqdm(items, total=total or None, unit="img", desc="predict", disable=not opts.progress)
    skipped = []
    try:
        for name, item, k in bar:
            try:
                im = load_rgb(item) if isinstance(item, Path) else item
            except ImageDecodeError as exc:
                skipped.append(f"{name}: {exc}")
                continue
            image_id = k if video else image_id_of(name, boxes.ids, k)
            given = boxes.boxes_for(name, image_id, (im.height, im.width))
            pred = predictor.predict(im) if given is None else predictor.predict(im, given[0], scores=given[1])
            ann_ids = given[2] if given is not None else None
            n_done += 1
            n_persons += len(pred)
            results += coco_results(pred, image_id, boxes.person_cat, opts.threshold, ann_ids)
            if ann_ids is not None and name in boxes.gt_rles:
                ious += [instance_iou(m, win, rle) for m, win, rle in
                         zip(pred.window_masks(opts.threshold), pred.windows, boxes.gt_rles[name])]
            if opts.overlays:
                vis = overlay(im, pred, opts.threshold, opts.show_boxes, opts.show_scores)
                if video:
                    writer = writer or _video_writer(out / f"{stem}.mp4", fps, vis.size)
                    writer.write(np.asarray(vis)[..., ::-1])
                else:
                    tmp = out / f".{Path(name).stem}.tmp.jpg"
                    vis.save(tmp, quality=90)
                    tmp.replace(out / f"{Path(name).stem}.jpg")
            if opts.save_masks:
                (out / "masks").mkdir(exist_ok=True)
                for j, m in enumerate(pred.full_masks(opts.threshold)):
                    dst = out / "masks" / f"{Path(name).stem}_{j:03d}.png"
                    tmp = dst.with_name(f".{dst.name}.tmp.png")
                    Image.fromarray(m.astype(np.uint8) * 255).save(tmp)
                    tmp.replace(dst)
            if opts.polygons:
                h, w = pred.size
                poly_images.append({"id": image_id, "file_name": name, "width": w, "height": h})
                for j, (m, win) in enumerate(zip(pred.window_masks(opts.threshold), pred.windows)):
                    segs = polygons_of(m, win[:2])
                    if segs:
                        poly_anns.append({"id": len(poly_anns) + 1, "image_id": image_id,
                                          "category_id": boxes.person_cat, "segmentation": segs,
                                          "area": float(m.sum()), "bbox": results[-len(pred) + j]["bbox"],
                                          "iscrowd": 0, "score": results[-len(pred) + j]["score"]})
            bar.set_postfix(persons=n_persons)
    finally:
        bar.close()
        if writer is not None:
            writer.release()
    _write_json(out / "predictions.json", results)
    if opts.polygons:
        _write_json(out / "predictions_polygons.json", {"images": poly_images, "annotations": poly_anns,
                                                        "categories": [{"id": boxes.person_cat, "name": "person"}]})
    dt = time.perf_counter() - t0
    summary = {"images": n_done, "persons": n_persons, "seconds": round(dt, 2),
               "images_per_s": round(n_done / dt, 2) if dt else 0.0, "out": str(out), "skipped": skipped,
               "provider": predictor.provider, "decoder": predictor.decoder.provider}
    if ious:
        summary["instance_mIoU"] = float(np.mean(ious))
    return summary


def _video_writer(path: Path, fps: float, size):
    import cv2
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not w.isOpened():
        raise FeatCacheError(f"cannot write video {path}")
    return w
