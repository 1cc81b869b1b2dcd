"""Full-resolution inference: original image + person boxes -> live extractor -> decoder -> masks.

Uses the preprocessing recorded in the checkpoint's cache metadata, pads each box by the training
ROI padding (``roiseg.common.geometry.pad_box``), runs the decoder once for all persons of an image, and
pastes each person's probability only inside its own window of the *original* image (detectron2's
paste-back): memory and time grow with the persons' area, not N x the frame.

Boxes come from the caller (normalized ``xyxy`` or ``cxcywh``) or, when none are given, from the
extractor's own detection output in the same ONNX run (``detection.py``).

The decoder is any callable of that contract: an exported ONNX graph run by ONNX Runtime alone
(``Predictor.from_onnx``, ``onnx_decoder.py``: this package imports no torch, an import-linter
contract guards it), or a checkpoint's PyTorch module (``roiseg.inference.torch_decoder``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from roiseg.common.errors import RoisegError
from roiseg.common.files import file_sha256
from roiseg.common.geometry import (
    ResizePolicy,
    as_xyxy,
    content_rect,
    mirror_boxes,
    pad_box,
)
from roiseg.common.providers import device_id_for
from roiseg.data.extractor import Extractor, UnknownTensorError
from roiseg.data.images import load_rgb, preprocess, to_rgb8
from roiseg.data.rasterize import native_windows
from roiseg.data.store_meta import FeatureSource
from roiseg.runtime.decoding import DecoderInput, RoiDecoder, RoiGrids
from roiseg.runtime.detection import (
    DetectionSettings,
    decode,
    find_detection_output,
)
from roiseg.runtime.onnx_decoder import OnnxDecoder
from roiseg.runtime.paste import paste_windows

log = logging.getLogger(__name__)
THRESHOLD = 0.5
TTA_MODES = ("none", "flip")


@dataclass(frozen=True)
class Encoded:
    """One image as the decoder reads it: the extractor's feature map (an end-to-end graph: the
    preprocessed image), its fine map and all its outputs (the detection head's among them)."""
    maps: np.ndarray
    fine: np.ndarray | None = None
    outputs: dict = field(default_factory=dict)


@dataclass
class Prediction:
    """One image's persons.  ``probs[k]`` is person k's class-1 probability on ``windows[k]``
    (x0, y0, x1, y1 original pixels, the padded ROI's pixels); it is 0 everywhere else."""

    size: tuple                  # (height, width) of the original image
    boxes: np.ndarray            # [N, 4] person boxes, normalized xyxy
    scores: np.ndarray           # [N] detector score (1 for given boxes without one)
    rois: np.ndarray             # [N, 4] padded ROIs, normalized xyxy
    windows: np.ndarray          # [N, 4] int
    probs: list = field(default_factory=list)
    quality: list | None = None  # [N] the decoder's mask quality scores (None: an old graph without them)

    def __len__(self) -> int:
        return len(self.boxes)

    def window_masks(self, threshold: float = THRESHOLD) -> list[np.ndarray]:
        return [p > threshold for p in self.probs]

    def full_masks(self, threshold: float = THRESHOLD, dtype=bool) -> np.ndarray:
        """[N, H, W] at original resolution, 0/1 as ``dtype``."""
        out = np.zeros((len(self), *self.size), dtype)
        for k, (m, (x0, y0, x1, y1)) in enumerate(zip(self.window_masks(threshold), self.windows)):
            out[k, y0:y1, x0:x1] = m
        return out

    def mask_scores(self, threshold: float = THRESHOLD) -> np.ndarray:
        """Each mask's quality score, as the decoder gives it (``roiseg.modeling.decoders.mask_scores``: the
        score head's predicted IoU, else the mask's certainty); for a graph exported before decoders
        gave one, the mean class-1 probability over the mask (0 for an empty one)."""
        if self.quality is not None:
            return np.asarray(self.quality, np.float64)
        return np.array([float(p[p > threshold].mean()) if (p > threshold).any() else 0.0 for p in self.probs])


class Predictor:
    """``decoder``: a ``RoiDecoder`` (``runtime/decoding.py``): an ``OnnxDecoder`` or a
    ``TorchDecoder`` (a checkpoint's module on its device); ``extractor``: None for an end-to-end
    graph, which takes the image itself."""

    # ROIs per decoder run: an image with thousands of boxes is decoded in pieces (memory stays
    # bounded, and the caller's progress callback moves between them)
    max_rois_per_run = 64

    def __init__(self, decoder: RoiDecoder, source: FeatureSource, extractor: Extractor | None,
                 detection: DetectionSettings | None = None):
        self.decoder = decoder
        self.source, self.extractor = source, extractor
        self.prep = source.preprocess
        self.policy: ResizePolicy = self.prep.policy
        self.roi_padding = source.roi_padding
        self.detection = detection
        self.det_output = self.det_format = None
        if detection is not None:
            if extractor is None:
                raise RoisegError("an end-to-end graph takes the person boxes as input: give --boxes gt or a "
                                     "boxes file, or use the decoder ONNX (with the extractor) for --boxes auto")
            shapes = {**extractor.outputs, **extractor.extra_shapes}  # actual shapes over declared ones
            self.det_output, self.det_format = find_detection_output(
                shapes, extractor.feature_name, self.policy_hw, detection)
            log.info("person boxes from %s (%s layout, class %d, conf %.2f, NMS IoU %.2f)", self.det_output,
                     self.det_format, detection.person_class, detection.conf, detection.iou)

    @property
    def policy_hw(self) -> tuple[int, int]:
        return self.policy.input_h, self.policy.input_w

    @property
    def provider(self) -> str:
        """Where the image is encoded: the extractor's provider (the end-to-end graph's)."""
        return self.extractor.provider if self.extractor is not None else self.decoder.provider

    @classmethod
    def from_onnx(cls, exported, onnx_path=None, provider="auto",
                  detection: DetectionSettings | None = None) -> "Predictor":
        """An exported decoder ONNX (with the extractor ONNX it was trained on) or an end-to-end
        ONNX; ONNX Runtime only."""
        dec = OnnxDecoder(exported, provider)
        extractor = None if dec.end_to_end else open_extractor(dec.source, onnx_path, provider, detection is not None,
                                                               fine=dec.fine)
        return cls(dec, dec.source, extractor, detection)

    def predict(self, image, boxes=None, box_format: str = "xyxy", scores=None, progress=None,
                tta: str = "none") -> Prediction:
        """``image``: path or PIL image; ``boxes``: normalized person boxes [N, 4] of that image, or
        None for the extractor's own detections; ``progress(done, total)``: called as persons are
        decoded; ``tta="flip"``: each person's probabilities averaged with those of the mirrored
        image (the extractor and the decoder run twice)."""
        if tta not in TTA_MODES:
            raise RoisegError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
        im = load_rgb(image) if not isinstance(image, Image.Image) else to_rgb8(image)
        w, h = im.size
        if self.extractor is None and boxes is None:     # end-to-end graph: it encodes the image itself
            raise RoisegError("an end-to-end graph needs the person boxes as input")
        if boxes is not None:
            boxes = as_xyxy(np.asarray(boxes, np.float64).reshape(-1, 4), box_format).clip(0, 1)
            if not len(boxes):                          # nothing to decode: no extractor run either
                return self.predict_features(Encoded(np.zeros(0, np.float32)), (h, w), boxes, np.ones(0))
        encoded = self._encode(im)
        if boxes is None:
            boxes, scores = self._detections(encoded.outputs, w, h)
        scores = np.ones(len(boxes)) if scores is None else np.asarray(scores, np.float64).reshape(-1)
        mirrored = self._encode(ImageOps.mirror(im)) if tta == "flip" else None
        return self.predict_features(encoded, (h, w), boxes, scores, progress, mirrored)

    def _encode(self, im: Image.Image) -> Encoded:
        """The decoder's input of one image: the extractor's maps (the preprocessed image for an
        end-to-end graph)."""
        x = preprocess(im, self.prep)[None]
        if self.extractor is None:
            return Encoded(x)
        feats, extra = self.extractor.run_all(x)
        return Encoded(feats, extra.get(self.extractor.fine_name) if self.extractor.fine_name else None, extra)

    def _detections(self, outputs: dict, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        """The extractor's own person boxes (normalized, original frame) and their scores."""
        if self.det_output is None:
            raise RoisegError("no person boxes given and no detection output configured")
        px, scores = decode(outputs[self.det_output], self.det_format, self.policy_hw, self.detection, self.det_output)
        iw, ih = self.policy.input_w, self.policy.input_h
        boxes = self.policy.input_norm_to_norm(px / np.array([iw, ih, iw, ih]), w, h)
        return np.asarray(boxes, np.float64).reshape(-1, 4).clip(0, 1), scores

    def predict_features(self, encoded: Encoded, size, boxes: np.ndarray, scores: np.ndarray,
                         progress=None, mirrored: Encoded | None = None) -> Prediction:
        """Decoder + window paste for one image already encoded (``_encode``), ``max_rois_per_run``
        persons at a time; ``mirrored``: the mirrored image's, for flip test-time augmentation."""
        h, w = size
        rois = pad_box(boxes, self.roi_padding).reshape(-1, 4)
        windows = native_windows(rois * [w, h, w, h], (h, w))
        rel = rois * [w, h, w, h] - np.tile(windows[:, :2], 2)        # each ROI in its window's pixels
        sizes = np.stack([windows[:, 3] - windows[:, 1], windows[:, 2] - windows[:, 0]], 1)
        pred = Prediction((h, w), boxes, scores, rois, windows)
        for a in range(0, len(rois), self.max_rois_per_run):
            part = slice(a, a + self.max_rois_per_run)
            grids = self._grids(encoded, (h, w), boxes[part], rois[part])
            if mirrored is not None:
                grids = grids.with_mirror(self._grids(mirrored, (h, w), mirror_boxes(boxes[part]),
                                                      mirror_boxes(rois[part])))
            pred.probs += paste_windows(grids.fg, rel[part], sizes[part])
            quality = grids.quality()
            if quality is not None:
                pred.quality = (pred.quality or []) + [float(q) for q in quality]
            if progress is not None:
                progress(len(pred.probs), len(rois))
        return pred

    def _grids(self, encoded: Encoded, size, boxes, rois) -> RoiGrids:
        h, w = size
        return self.decoder(DecoderInput(encoded.maps, self.policy.norm_to_input_norm(boxes, w, h),
                                         self.policy.norm_to_input_norm(rois, w, h), content_rect(self.policy, w, h),
                                         encoded.fine))


def open_extractor(source: FeatureSource, onnx_path=None, provider="auto", detections: bool = False,
                   device=None, fine: bool = False) -> Extractor:
    """The decoder's extractor (checked by sha256); ``detections``: also keep the model's own
    outputs (its detection head) for automatic person boxes; ``device``: the torch device the
    decoder runs on (the extractor uses the same GPU); ``fine``: the decoder fuses ``source``'s fine
    map (it is computed in the same run)."""
    path = Path(onnx_path or source.onnx_path)
    if not path.is_file():
        raise RoisegError(f"extractor ONNX not found: {path} (pass --onnx)")
    if file_sha256(path) != source.onnx_sha256:
        raise RoisegError(f"{path} is not the extractor this decoder was trained on "
                          f"(sha256 differs from the cache's {source.onnx_sha256[:12]}...)")
    fine_map = source.fine if fine else None
    try:
        ex = Extractor(path, source.feature_name, provider, streams=1, extra_outputs="all" if detections else (),
                       batch_max=1, device_id=None if device is None else device_id_for(device),
                       fine_name=fine_map.name if fine_map else None)
    except UnknownTensorError:
        raise RoisegError(f"the decoder was trained on the tensor {source.feature_name!r}"
                          f"{' and the fine map ' + repr(fine_map.name) if fine_map else ''}, which {path} does "
                          f"not have: its metadata does not belong to this extractor") from None
    if tuple(ex.feature_shape) != tuple(source.feature_shape):     # channels and map size the decoder expects
        raise RoisegError(f"{path} gives {source.feature_name} as {list(ex.feature_shape)}, but the decoder was "
                          f"trained on {list(source.feature_shape)}")
    if fine_map:
        ex.set_fine_projection(source.fine_projection)   # the channel reduction the store applied
        if tuple(ex.fine_shape) != tuple(fine_map.shape):
            raise RoisegError(f"{path} gives the fine map {fine_map.name} as {list(ex.fine_shape)}, but the "
                              f"decoder was trained on {list(fine_map.shape)}")
    return ex
