"""`cli.py predict`: images, folders, videos or a camera -> person masks.

image -> extractor (features + its own detection output, one ORT run) -> person boxes (or boxes from
a file / the annotations: ``boxes.py``) -> decoder over all persons at once -> each mask pasted in
its window.  Writes an overlay per input (a video for video/camera input), ``predictions.json``
(COCO results: RLE + bbox + score + file name, what pycocotools' ``loadRes`` reads), optionally one
PNG per person (``--save-masks``) and COCO polygons (``--polygons``: OpenCV ``findContours``).

Before anything runs, the source, the boxes and the output folder are checked: an output never
replaces an input, a used ``--out`` gives ``out2``, ``out3`` ... (two runs never mix), and a bad
image is skipped with its reason while the others go on.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from tqdm import tqdm

from roiseg.common.errors import RoisegError
from roiseg.common.files import (
    FolderClaim,
    atomic_write,
    claim_fresh_folder,
    folder_entries,
    refuse_overlap,
    write_json_atomic,
)
from roiseg.data.coco import window_rle
from roiseg.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, load_rgb
from roiseg.evaluation.metrics import instance_boundary_iou, instance_iou
from roiseg.runtime.boxes import BoxSource
from roiseg.runtime.detection import DetectionSettings
from roiseg.runtime.drawing import ALPHA, BOX_RED, font, person_colour
from roiseg.runtime.pipeline import THRESHOLD, Prediction, Predictor

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
    tta: str = "flip"                    # averaged with the mirrored image; none: one pass (pipeline.TTA_MODES)
    save_masks: bool = False
    polygons: bool = False
    overlays: bool = True
    show_boxes: bool = True
    show_scores: bool = True
    max_frames: int | None = None
    only: list | None = None             # restrict a folder to these file names
    progress: bool = True
    exif: bool | None = None             # apply EXIF orientation; None: only with boxes from the extractor
    max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def apply_exif(self) -> bool:
        """Boxes from files and annotations refer to the pixels as stored (COCO's convention), so
        rotating the image would misplace them; the extractor's own boxes follow the image."""
        return self.exif if self.exif is not None else self.boxes == "auto"


# ---- inputs -----------------------------------------------------------------------------------
def is_camera(source) -> bool:
    return isinstance(source, int) or (isinstance(source, str) and source.isdigit())


@dataclass
class Source:
    """What ``--source`` names: image files (``files``), a video file or a camera."""
    kind: str                      # images | video | camera
    spec: str | Path
    files: list = field(default_factory=list)

    @property
    def path(self) -> Path | None:
        return None if self.kind == "camera" else Path(self.spec)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.files]


def open_source(source, only=None) -> Source:
    """Check ``--source`` before any model loads."""
    if source is None or str(source).strip() == "":
        raise RoisegError("--source is empty: give an image, a folder, a video file or a camera index")
    if is_camera(source):
        return Source("camera", source)
    path = Path(str(source))
    if path.suffix.lower() in VIDEO_EXT:
        if not path.is_file():
            raise RoisegError(f"--source not found: {path}")
        return Source("video", path)
    return Source("images", path, list_images(path, only))


def list_images(source: Path, only=None) -> list[Path]:
    if source.is_file():
        if source.suffix.lower() not in IMAGE_EXT:
            raise RoisegError(f"--source {source} is not an image file ({', '.join(sorted(IMAGE_EXT))}), a video "
                              f"({', '.join(sorted(VIDEO_EXT))}) or a folder of images")
        return [source]
    if not source.is_dir():
        raise RoisegError(f"--source not found: {source}")
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_EXT and p.is_file())
    if only is not None:
        files = [p for p in files if p.name in set(only)]
    if not files:
        raise RoisegError(f"no images ({', '.join(sorted(IMAGE_EXT))}) in {source}")
    return files


def output_stems(names: list[str]) -> dict[str, str]:
    """File name -> the stem of its outputs: the stem, or the whole name when two files share a
    stem (``a.png``, ``a.webp`` -> ``a.png``, ``a.webp``), so no output replaces another's."""
    clash = Counter(Path(n).stem for n in names)
    return {n: Path(n).stem if clash[Path(n).stem] == 1 else n for n in names}


def output_candidates(out: Path):
    """``out``, then ``out2``, ``out3`` ... (endless)."""
    yield out
    k = 2
    while True:
        yield out.with_name(f"{out.name}{k}")
        k += 1


def claim_output_folder(out: Path) -> FolderClaim:
    """``out`` when it is new or empty, else the first free ``out2``, ``out3`` ..., claimed for this
    run: two runs, even started at the same moment, never mix their files."""
    return claim_fresh_folder(output_candidates(out), lambda d: bool(folder_entries(d)))


def video_frames(source, max_frames=None):
    """(frame index, PIL RGB frame) of a video file or camera index; and the stream's fps."""
    import os
    os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")  # our message says what failed; no C++ warnings
    import cv2
    cap = cv2.VideoCapture(int(source) if is_camera(source) else str(source))
    if not cap.isOpened():
        raise RoisegError(f"cannot open {'camera' if is_camera(source) else 'video'} {source}")
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
        label_font = font(max(11, out.height // 45), True)
        h, w = pred.size
        for k, b in enumerate(pred.boxes * [w, h, w, h]):
            draw.rectangle(list(b), outline=person_colour(k) if not scores else BOX_RED, width=2)
            if scores:
                draw.text((b[0] + 3, b[1] + 2), f"{k} {pred.scores[k]:.2f}", fill=BOX_RED, font=label_font)
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


@dataclass
class PersonRecord:
    """One predicted person, everything each output needs: the image, the person box, its score,
    the mask on its window (original pixels) and, for ``--boxes gt``, the annotation it came from."""
    image_id: int
    file_name: str | None        # None for video frames (the record's image_id is the frame index)
    category_id: int
    box: np.ndarray              # x1, y1, x2, y2 original pixels
    score: float                 # the detector's x the mask's quality score (given boxes: the mask's)
    window: tuple                # x0, y0, x1, y1: where ``mask`` lies
    mask: np.ndarray             # bool, the window's size
    image_hw: tuple
    ann_id: int | None = None

    @property
    def bbox(self) -> list[float]:
        x1, y1, x2, y2 = (float(v) for v in self.box)
        return [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)]

    def coco_result(self) -> dict:
        """The COCO result (full-image RLE, bbox, score) pycocotools' ``loadRes`` reads."""
        r = {"image_id": self.image_id, "category_id": self.category_id,
             "segmentation": window_rle(self.mask, self.window, self.image_hw), "bbox": self.bbox,
             "score": round(self.score, 6)}
        if self.file_name is not None:
            r["file_name"] = self.file_name
        if self.ann_id is not None:
            r["gt_ann_id"] = int(self.ann_id)
        return r

    def polygon_annotation(self, ann_id: int) -> dict | None:
        """A COCO annotation with polygon outlines (OpenCV contours), or None for an empty mask."""
        segs = polygons_of(self.mask, self.window[:2])
        if not segs:
            return None
        return {"id": ann_id, "image_id": self.image_id, "category_id": self.category_id, "segmentation": segs,
                "area": float(self.mask.sum()), "bbox": self.bbox, "iscrowd": 0, "score": round(self.score, 6)}


def person_records(pred: Prediction, image_id: int, category_id: int, threshold: float, ann_ids=None,
                   file_name: str | None = None) -> list[PersonRecord]:
    h, w = pred.size
    mask_scores = pred.mask_scores(threshold)
    # detector score x the mask's quality score (given boxes: the quality score); a graph exported
    # without scores: the detector's score, or the mask's mean probability for given boxes
    score = (pred.scores * mask_scores if pred.quality is not None else
             np.where(pred.scores != 1.0, pred.scores, mask_scores))
    return [PersonRecord(image_id, file_name, category_id, pred.boxes[k] * [w, h, w, h], float(score[k]),
                         tuple(int(v) for v in pred.windows[k]), m, (h, w),
                         None if ann_ids is None else int(ann_ids[k]))
            for k, m in enumerate(pred.window_masks(threshold))]


class Outputs:
    """Everything one predict run writes into its folder, one image at a time; ``close`` writes the
    JSON files (also after an error, for the images done before it)."""

    def __init__(self, out: Path, opts: PredictOptions, category_id: int, stems: dict[str, str]):
        self.out, self.opts, self.cat, self.stems = out, opts, category_id, stems
        self.results: list[dict] = []
        self.poly_images: list[dict] = []
        self.poly_anns: list[dict] = []
        self.video = None
        out.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, im: Image.Image, pred: Prediction, image_id: int, ann_ids=None,
            video: tuple | None = None) -> None:
        o = self.opts
        persons = person_records(pred, image_id, self.cat, o.threshold, ann_ids, None if video else name)
        self.results += [p.coco_result() for p in persons]
        stem = self.stems.get(name, Path(name).stem)
        if o.overlays:
            vis = overlay(im, pred, o.threshold, o.show_boxes, o.show_scores)
            if video:
                self.video = self.video or _video_writer(self.out / video[0], video[1], vis.size)
                self.video.write(np.asarray(vis)[..., ::-1])
            else:
                with atomic_write(self.out / f"{stem}.jpg", ".jpg") as tmp:
                    vis.save(tmp, quality=90)
        if o.save_masks:
            (self.out / "masks").mkdir(exist_ok=True)
            for j, m in enumerate(pred.full_masks(o.threshold)):
                with atomic_write(self.out / "masks" / f"{stem}_{j:03d}.png", ".png") as tmp:
                    Image.fromarray(m.astype(np.uint8) * 255).save(tmp)
        if o.polygons:
            h, w = pred.size
            self.poly_images.append({"id": image_id, "file_name": name, "width": w, "height": h})
            for p in persons:
                ann = p.polygon_annotation(len(self.poly_anns) + 1)
                if ann is not None:
                    self.poly_anns.append(ann)

    def close(self, write: bool) -> None:
        if self.video is not None:
            self.video.release()
        if not write:
            return
        write_json_atomic(self.out / "predictions.json", self.results, indent=None)
        if self.opts.polygons:
            write_json_atomic(self.out / "predictions_polygons.json",
                              {"images": self.poly_images, "annotations": self.poly_anns,
                               "categories": [{"id": self.cat, "name": "person"}]}, indent=None)


def _video_writer(path: Path, fps: float, size):
    import cv2
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not w.isOpened():
        raise RoisegError(f"cannot write video {path}")
    return w


# ---- the run ----------------------------------------------------------------------------------
def _items(source: Source, opts: PredictOptions, boxes: BoxSource):
    """((name, image loader, image id) ..., count, (video file name, fps) or None).  Image ids are
    the annotation's (by file name), else a running index (video: the frame index); never guessed
    from digits in file names, which collide (``cam1_0001``, ``cam2_0001``)."""
    if source.kind == "images":
        files = source.files
        ids = [boxes.ids.get(p.name, k) for k, p in enumerate(files)]
        return ((((p.name, lambda p=p: load_rgb(p, opts.max_pixels, opts.apply_exif), i)
                  for p, i in zip(files, ids))), len(files), None)
    frames, fps, total = video_frames(source.spec, opts.max_frames)
    stem = f"camera{source.spec}" if source.kind == "camera" else Path(str(source.spec)).stem
    return (((f"{stem}_{k:06d}", lambda im=im: im, k) for k, im in frames), total or None, (f"{stem}.mp4", fps))


def _inputs(opts: PredictOptions, source: Source) -> dict:
    return {"--source": source.path, "--checkpoint": opts.checkpoint, "--exported": opts.exported,
            "--onnx": opts.onnx, "--ann": opts.ann,
            "--boxes": opts.boxes if opts.boxes not in ("auto", "gt") else None}


def _ready_predictor(opts: PredictOptions, predictor) -> Predictor:
    detection = opts.detection if opts.boxes == "auto" else None
    if predictor is None:
        if opts.exported is None:
            raise RoisegError("run_predict: a checkpoint needs a predictor (roiseg.inference.torch_decoder)")
        return Predictor.from_onnx(opts.exported, opts.onnx, opts.provider, detection)
    return predictor if isinstance(predictor, Predictor) else predictor(detection)


def _gt_ious(pred: Prediction, given: tuple, name: str, boxes: BoxSource, threshold: float) -> list[tuple]:
    """``--boxes gt``: each person's mask IoU and boundary IoU with its own annotation."""
    if given[2] is None or name not in boxes.gt_rles:
        return []
    rles = dict(zip(boxes.by_name[name][2], boxes.gt_rles[name]))
    out = []
    for m, win, a in zip(pred.window_masks(threshold), pred.windows, given[2]):
        gt = mask_utils.decode(rles[a])     # decoded once for both IoUs
        out.append((instance_iou(m, win, gt), instance_boundary_iou(m, win, gt)))
    return out


def _close_after_error(sink: Outputs, images: int) -> bool:
    """Write the JSON files of the images done before an error; False when that fails too."""
    try:
        sink.close(write=images > 0)
        return images > 0
    except OSError:
        return False


def _disk_full(out: Path, images: int, json_saved: bool) -> RoisegError:
    """The message of a full disk: where this run's part is, and that a re-run starts a new folder."""
    if not images:
        return RoisegError(f"disk full while writing into {out}: no image was finished (nothing is kept there). "
                           f"Free space and re-run the same command")
    done = (f"the {images} image(s) done before it are there"
            + (" with their predictions.json" if json_saved else " (overlays only: predictions.json could not be "
               "written)"))
    return RoisegError(f"disk full while writing into {out}: {done}. Free space and re-run: the re-run writes to "
                       f"a new folder next to it (delete {out} first to reuse its name)")


@dataclass
class _Tally:
    images: int = 0
    persons: int = 0
    skipped: list = field(default_factory=list)
    ious: list = field(default_factory=list)


def run_predict(opts: PredictOptions, predictor=None) -> dict:
    """Check the inputs, then predict every image into a fresh output folder.

    ``predictor``: a ``Predictor``, or a function ``(detection settings or None) -> Predictor``
    called once the inputs are checked (``roiseg.inference.torch_decoder.checkpoint_predictor``
    for a checkpoint); None: ``opts.exported`` through ONNX Runtime alone."""
    source = open_source(opts.source, opts.only)
    boxes = BoxSource(opts.boxes, opts.ann, opts.box_format)
    if source.kind == "images":
        boxes.check_matches(source.names)
    refuse_overlap({"--out": opts.out}, _inputs(opts, source))
    if Path(opts.out).is_file():
        raise RoisegError(f"--out {opts.out} is a file: give a folder (predict writes overlays, predictions.json and "
                          f"masks/ into it)")
    claim = claim_output_folder(Path(opts.out))
    try:
        return _predict_into(claim.folder, opts, source, boxes, predictor)
    finally:
        claim.release(remove_if_empty=True)    # a run that wrote nothing leaves no folder


def _predict_into(out: Path, opts: PredictOptions, source: Source, boxes: BoxSource, predictor) -> dict:
    if out != Path(opts.out):
        log.warning("%s holds an earlier run: writing to %s", opts.out, out)
    predictor = _ready_predictor(opts, predictor)
    log.info("image encoder on %s, decoder on %s; flip TTA %s", predictor.provider, predictor.decoder.provider,
             "on (each image also mirrored: --tta none for one pass)" if opts.tta == "flip" else "off")
    sink = Outputs(out, opts, boxes.person_cat, output_stems(source.names))
    t0, tally = time.perf_counter(), _Tally()
    try:
        _predict_items(opts, source, boxes, predictor, sink, tally)
    except BaseException as exc:
        json_saved = _close_after_error(sink, tally.images)
        if isinstance(exc, OSError) and exc.errno == 28:
            raise _disk_full(out, tally.images, json_saved) from exc
        if tally.images:
            log.warning("stopped by an error: predictions of the %d image(s) done before it are in %s",
                        tally.images, out)
        raise
    try:
        sink.close(write=tally.images > 0)
    except OSError as exc:
        if exc.errno == 28:
            raise _disk_full(out, tally.images, False) from exc
        raise
    if tally.images == 0:
        raise RoisegError("no image could be read from --source:\n  " + "\n  ".join(tally.skipped[:20]))
    dt = time.perf_counter() - t0
    summary = {"images": tally.images, "persons": tally.persons, "seconds": round(dt, 2),
               "images_per_s": round(tally.images / dt, 2) if dt else 0.0, "out": str(out),
               "skipped": tally.skipped, "boxes_skipped": boxes.skipped_summary(),
               "provider": predictor.provider, "decoder": predictor.decoder.provider}
    if tally.ious:
        summary["instance_mIoU"], summary["boundary_IoU"] = (float(v) for v in np.mean(tally.ious, 0))
    return summary


def _predict_items(opts: PredictOptions, source: Source, boxes: BoxSource, predictor, sink: Outputs,
                   tally: _Tally) -> None:
    """Every image (or frame) of ``source``: decoded, its persons predicted, written; a bad image is
    skipped with its reason."""
    items, total, video = _items(source, opts, boxes)
    bar = tqdm(items, total=total, unit="img", desc="predict", disable=not opts.progress)

    def moving(done, n):       # thousands of boxes: the bar shows persons as they are decoded
        bar.set_postfix(persons=f"{tally.persons + done}" + (f" ({done}/{n} of this image)" if n > done else ""))
    try:
        for name, load, image_id in bar:
            try:
                im = load()
            except ImageDecodeError as exc:
                tally.skipped.append(f"{name}: {exc}")
                continue
            given = boxes.boxes_for(name, (im.height, im.width))
            pred = (predictor.predict(im, progress=moving, tta=opts.tta) if given is None else
                    predictor.predict(im, given[0], scores=given[1], progress=moving, tta=opts.tta))
            sink.add(name, im, pred, image_id, given[2] if given is not None else None, video)
            tally.images += 1
            tally.persons += len(pred)
            if given is not None:
                tally.ious += _gt_ious(pred, given, name, boxes, opts.threshold)
            bar.set_postfix(persons=tally.persons)
    finally:
        bar.close()
