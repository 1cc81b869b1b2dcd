"""The Python API: person masks for your own boxes (or the extractor's own) in a few lines, with
ONNX Runtime alone (no torch), on the graphs ``cli.py export`` writes.

    >>> from roiseg import Segmenter
    >>> seg = Segmenter("checkpoints/best.decoder.onnx", provider="cpu")   # + the extractor it names
    >>> result = seg("photo.jpg", boxes=[[40, 30, 200, 380]])               # pixel xyxy boxes
    >>> result.masks.shape == (1, result.image.height, result.image.width)  # uint8, the photo's size
    True

It is the code path of ``cli.py predict`` (``Predictor`` and ``person_records``), so a ``Result``
holds the same masks and scores predict writes.  One ``Segmenter`` holds one session per graph,
loaded once; calls from several threads at once are safe (ONNX Runtime's ``run`` is, and nothing
else is shared between calls).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from roiseg.common.errors import RoisegError
from roiseg.common.files import atomic_write, write_json_atomic
from roiseg.data.images import load_rgb, to_rgb8
from roiseg.runtime.detection import DetectionSettings
from roiseg.runtime.onnx_decoder import OnnxDecoder
from roiseg.runtime.pipeline import (
    THRESHOLD,
    TTA_MODES,
    Prediction,
    Predictor,
    open_extractor,
)
from roiseg.runtime.predict import overlay, person_records

BOX_FORMATS = ("xyxy", "cxcywh", "xywh")


class InputError(RoisegError, ValueError):
    """An argument of a ``Segmenter`` call that cannot be used, named in the message."""


@dataclass
class Result:
    """One image's persons: ``boxes`` [N, 4] (pixel xyxy, as given or detected), ``scores`` [N]
    (the detector's score x the mask's quality score; given boxes: the quality score), ``masks``
    [N, H, W] uint8 0/1 at the image's size.

    >>> from roiseg import Segmenter
    >>> result = Segmenter("checkpoints/best.decoder.onnx", provider="cpu")("photo.jpg", [[40, 30, 200, 380]])
    >>> coco = result.to_coco(image_id=7)
    >>> coco[0]["image_id"], coco[0]["segmentation"]["size"] == [result.image.height, result.image.width]
    (7, True)
    """
    image: Image.Image
    boxes: np.ndarray
    scores: np.ndarray
    masks: np.ndarray
    prediction: Prediction = field(repr=False)
    threshold: float = THRESHOLD

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def instance_map(self) -> np.ndarray:
        """[H, W] int32: 0 background, k + 1 where person k's probability is the highest above the
        threshold (as the exported graphs' ``instance_map``; ties go to the earlier person)."""
        h, w = self.prediction.size
        best = np.full((h, w), self.threshold, np.float32)
        out = np.zeros((h, w), np.int32)
        for k, (p, (x0, y0, x1, y1)) in enumerate(zip(self.prediction.probs, self.prediction.windows)):
            win = best[y0:y1, x0:x1]
            higher = p > win
            win[higher] = p[higher]
            out[y0:y1, x0:x1][higher] = k + 1
        return out

    def records(self, image_id: int = 0, file_name: str | None = None, category_id: int = 1) -> list:
        """The persons as ``predict`` writes them (``runtime.predict.PersonRecord``)."""
        return person_records(self.prediction, image_id, category_id, self.threshold, file_name=file_name)

    def to_coco(self, image_id: int = 0, category_id: int = 1, file_name: str | None = None) -> list[dict]:
        """COCO results (full-image RLE, bbox, score), what ``predictions.json`` holds and
        pycocotools' ``loadRes`` reads."""
        return [r.coco_result() for r in self.records(image_id, file_name, category_id)]

    def polygons(self) -> list[list[list[float]]]:
        """Each person's outline as COCO polygons in image pixels (OpenCV contours; [] for an empty
        mask)."""
        from roiseg.runtime.predict import polygons_of
        return [polygons_of(m, win[:2]) for m, win in zip(self.prediction.window_masks(self.threshold),
                                                          self.prediction.windows)]

    def draw(self, boxes: bool = True, scores: bool = True) -> Image.Image:
        """The image with each person's mask in its colour (and boxes and scores), as predict draws it."""
        return overlay(self.image, self.prediction, self.threshold, boxes, scores)

    def save(self, folder: str | Path, stem: str = "image", image_id: int = 0) -> Path:
        """``folder/<stem>.jpg`` (the overlay), ``folder/<stem>.json`` (COCO results) and
        ``folder/masks/<stem>_NNN.png`` (one per person); each file written atomically."""
        folder = Path(folder)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        with atomic_write(folder / f"{stem}.jpg", ".jpg") as tmp:
            self.draw().save(tmp, quality=90)
        write_json_atomic(folder / f"{stem}.json", self.to_coco(image_id), indent=None)
        for k, m in enumerate(self.masks):
            with atomic_write(folder / "masks" / f"{stem}_{k:03d}.png", ".png") as tmp:
                Image.fromarray(m * 255).save(tmp)
        return folder


class Segmenter:
    """Person masks with an exported decoder graph and its extractor (``Segmenter(decoder_onnx)``),
    or an end-to-end graph (``Segmenter.from_end_to_end(path)``).

    ``extractor_onnx``: the extractor the decoder was trained on (default: the path its metadata
    names; checked by sha256).  ``provider``: ONNX Runtime's (auto: TensorRT, CUDA, then CPU).
    ``detection``: how the extractor's own person boxes are read when a call gives none.
    ``tta="flip"`` (the default): each person's probabilities averaged with those of the mirrored
    image (the graphs run twice per call); ``tta="none"``: one pass, half the time.

    >>> seg = Segmenter("checkpoints/best.decoder.onnx", provider="cpu")
    >>> [len(r) for r in seg(["photo.jpg", "photo.jpg"], boxes=[[[0, 0, 50, 90]], [[10, 10, 60, 80], [5, 5, 99, 99]]])]
    [1, 2]
    """

    def __init__(self, decoder_onnx: str | Path, extractor_onnx: str | Path | None = None, provider: str = "auto",
                 detection: DetectionSettings | None = None, threshold: float = THRESHOLD, tta: str = "flip"):
        self._open(decoder_onnx, extractor_onnx, provider, detection, threshold, tta, end_to_end=None)

    @classmethod
    def from_end_to_end(cls, path: str | Path, provider: str = "auto", threshold: float = THRESHOLD,
                        tta: str = "flip") -> Segmenter:
        """An end-to-end graph (``cli.py export --end-to-end``): the image in, masks out; boxes must
        be given."""
        seg = cls.__new__(cls)
        seg._open(path, None, provider, None, threshold, tta, end_to_end=True)
        return seg

    def _open(self, path, extractor_onnx, provider, detection, threshold, tta, end_to_end: bool | None) -> None:
        """Load the graphs once; every problem is one ``InputError`` (a ``ValueError``)."""
        _refuse_checkpoint(Path(path))
        if not 0 < threshold < 1:
            raise InputError(f"threshold must be in (0, 1), got {threshold}")
        if tta not in TTA_MODES:
            raise InputError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
        self.threshold, self.tta = threshold, tta
        try:
            decoder = OnnxDecoder(path, provider)
            if end_to_end and not decoder.end_to_end:
                raise InputError(f"{path} is a decoder graph, not an end-to-end one: use Segmenter({str(path)!r})")
            extractor = None if decoder.end_to_end else open_extractor(decoder.source, extractor_onnx, provider,
                                                                       detections=True, fine=decoder.fine)
        except InputError:
            raise
        except RoisegError as exc:
            raise InputError(str(exc)) from None
        self._given = Predictor(decoder, decoder.source, extractor)
        self._auto, self._why_no_auto = None, None
        try:
            self._auto = Predictor(decoder, decoder.source, extractor, detection or DetectionSettings())
        except RoisegError as exc:        # boxes must then be given: said when a call gives none
            self._why_no_auto = str(exc)

    @property
    def provider(self) -> str:
        """Where the image is encoded (ONNX Runtime's provider)."""
        return self._given.provider

    def __call__(self, image, boxes=None, box_format: str = "xyxy", normalized: bool = False,
                 channels: str = "rgb", scores=None, exif: bool | None = None) -> Result | list[Result]:
        """Person masks of ``image`` (a path, a PIL image, or an HxWx3 uint8 array whose channel order
        ``channels`` gives), one per box of ``boxes`` ([N, 4] array or nested list, ``box_format``
        xyxy / cxcywh / xywh, in pixels unless ``normalized``); ``boxes=None``: the extractor's own
        person detections.  ``scores``: your detector's scores of the boxes (multiplied into the
        masks' quality scores).  ``exif``: turn a photo read from a path by its EXIF orientation
        (default: only for ``boxes=None``, as ``predict``; given boxes and COCO annotations refer to
        the pixels as stored); PIL images and arrays are used as given.  A list of images (with a
        list of box arrays, or None) gives a list of results, one image at a time (the extractor
        graph takes one image)."""
        if isinstance(image, (list, tuple)):
            return self._each(image, boxes, box_format, normalized, channels, scores, exif)
        if box_format not in BOX_FORMATS:
            raise InputError(f"box_format must be one of {', '.join(BOX_FORMATS)}, got {box_format!r}")
        im = _as_image(image, channels, exif=boxes is None if exif is None else exif)
        w, h = im.size
        if boxes is None:
            if scores is not None:
                raise InputError("scores are your detector's scores of your boxes: give boxes with them")
            if self._auto is None:
                raise InputError(f"boxes=None asks for the extractor's own person boxes, but {self._why_no_auto}")
            pred = self._auto.predict(im, tta=self.tta)
        else:
            norm = _as_boxes(boxes, w, h, box_format, normalized)
            pred = self._given.predict(im, norm, scores=_as_scores(scores, len(norm)), tta=self.tta)
        recs = person_records(pred, 0, 1, self.threshold)
        return Result(im, np.array([r.box for r in recs], np.float64).reshape(-1, 4),
                      np.array([r.score for r in recs], np.float64), pred.full_masks(self.threshold, np.uint8),
                      pred, self.threshold)

    def _each(self, images, boxes, box_format, normalized, channels, scores, exif) -> list[Result]:
        if boxes is not None and (not isinstance(boxes, (list, tuple)) or len(boxes) != len(images)):
            raise InputError(f"a list of {len(images)} images needs a list of {len(images)} box arrays (or "
                             f"boxes=None), got {type(boxes).__name__}"
                             + (f" of {len(boxes)}" if isinstance(boxes, (list, tuple)) else ""))
        if scores is not None and (not isinstance(scores, (list, tuple)) or len(scores) != len(images)):
            raise InputError(f"a list of {len(images)} images needs a list of {len(images)} score arrays (or None)")
        return [self(im, None if boxes is None else boxes[k], box_format, normalized, channels,
                     None if scores is None else scores[k], exif) for k, im in enumerate(images)]


def _refuse_checkpoint(path: Path) -> None:
    """A training checkpoint is exported first (the API runs ONNX graphs, without torch)."""
    if not path.is_file():
        raise InputError(f"decoder_onnx not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if path.suffix == ".pth" or head[:2] == b"PK":
        raise InputError(f"{path} is a training checkpoint: export it first, `uv run cli.py export --checkpoint {path} "
                         f"--end-to-end`, then Segmenter('{path.with_suffix('.decoder.onnx')}') or "
                         f"Segmenter.from_end_to_end('{path.with_suffix('.e2e.onnx')}')")


def _as_image(image, channels: str, exif: bool) -> Image.Image:
    """``image`` as an RGB PIL image; a path is read as predict reads it (``exif``: turned by its
    EXIF orientation)."""
    if channels not in ("rgb", "bgr"):
        raise InputError(f"channels must be 'rgb' or 'bgr', got {channels!r}")
    if channels != "rgb" and not isinstance(image, np.ndarray):
        raise InputError(f"channels={channels!r} is the channel order of an array; a path or a PIL image says its own")
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise InputError(f"image not found: {image}")
        try:
            return load_rgb(image, exif=exif)
        except RoisegError as exc:
            raise InputError(str(exc)) from None
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise InputError(f"image is empty ({image.width}x{image.height})")
        return to_rgb8(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"image must be an HxWx3 uint8 array, got {image.dtype} {list(image.shape)}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise InputError(f"image is empty ({list(image.shape)})")
        return Image.fromarray(np.ascontiguousarray(image[..., ::-1] if channels == "bgr" else image))
    raise InputError(f"image must be a path, a PIL image or an HxWx3 uint8 array, got {type(image).__name__}")


def _as_boxes(boxes, w: int, h: int, box_format: str, normalized: bool) -> np.ndarray:
    """``boxes`` as [N, 4] normalized xyxy; malformed ones are one error naming the box."""
    try:
        b = np.asarray(boxes, np.float64)
    except (TypeError, ValueError):
        raise InputError(f"boxes must be numbers, an [N, 4] array or list, got {type(boxes).__name__}") from None
    if b.ndim == 1 and b.size in (0, 4):
        b = b.reshape(-1, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise InputError(f"boxes must be [N, 4], got shape {list(b.shape)}")
    if len(b) == 0:
        return np.zeros((0, 4))
    bad = np.flatnonzero(~np.isfinite(b).all(1))
    if len(bad):
        raise InputError(f"box {bad[0]} is not finite: {b[bad[0]].tolist()}")
    if box_format == "xywh":
        b = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)
    elif box_format == "cxcywh":
        b = np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)
    if not normalized:
        if (np.abs(b) <= 1).all() and max(w, h) > 2:
            raise InputError("every box lies within the image's first pixel: 0-1 coordinates? pass normalized=True")
        b = b / [w, h, w, h]
    flat = np.flatnonzero((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]))
    if len(flat):
        given = np.asarray(boxes, np.float64).reshape(-1, 4)[flat[0]].tolist()
        raise InputError(f"box {flat[0]} has no area (x2 <= x1 or y2 <= y1): {given}")
    outside = np.flatnonzero((b[:, 2] <= 0) | (b[:, 3] <= 0) | (b[:, 0] >= 1) | (b[:, 1] >= 1))
    if len(outside):
        raise InputError(f"box {outside[0]} lies outside the {w}x{h} image"
                         + ("" if normalized else " (pixel coordinates; pass normalized=True for 0-1 ones)"))
    return b


def _as_scores(scores, n: int) -> np.ndarray | None:
    if scores is None:
        return None
    try:
        s = np.asarray(scores, np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"scores must be numbers, one per box, got {type(scores).__name__}") from None
    if len(s) != n:
        raise InputError(f"scores has {len(s)} values for {n} boxes")
    if not (np.isfinite(s) & (s >= 0)).all():
        raise InputError(f"scores must be finite and >= 0, got {s[~(np.isfinite(s) & (s >= 0))][:3].tolist()}")
    return s
