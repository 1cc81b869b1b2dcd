"""Person boxes from the extractor's own detection output (the same ONNX run as the features).

Formats (``--det-format``; ``auto`` picks by the output's shape and name):

* ``yolov8``  ``[1, 4+nc, A]``: cx, cy, w, h in input pixels, then nc class scores (YOLOv8/v9 heads).
* ``yolox``   ``[1, A, 5+nc]`` raw YOLOX head (``decode_in_inference=False``): grid offsets and log
  sizes per stride 8/16/32 anchor point, objectness, class scores; score = objectness x class.
* ``yolox-decoded`` the same layout with boxes already decoded to input pixels.
* ``nms``     ``[N, 7]`` post-NMS rows as PINTO's post-processed models emit.  Assumed order:
  ``batch, class, score, x1, y1, x2, y2`` (``batchno_classid_score_x1y1x2y2``); an output name with
  ``x1y1x2y2_score`` means the score comes last.  Boxes in input pixels (normalized 0-1 when no value
  exceeds 1.5).

Every format ends in input-frame pixel boxes + scores of ``person_class``, filtered by ``conf`` and
NMS (``torchvision.ops.batched_nms``; ``nms`` rows are not NMS'd again).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from roiseg.common.errors import RoisegError

FORMATS = ("auto", "yolov8", "yolox", "yolox-decoded", "nms")
YOLOX_STRIDES = (8, 16, 32)


class DetectionError(RoisegError):
    pass


@dataclass(frozen=True)
class DetectionSettings:
    output: str | None = None      # graph output name (None: the first one of a known layout)
    format: str = "auto"
    person_class: int = 0
    conf: float = 0.25
    iou: float = 0.65
    max_det: int = 100


def guess_format(name: str, shape: list, input_hw) -> str | None:
    """The layout of an output from its (declared or actual) shape and name; None if unknown."""
    dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
    if len(dims) == 2 and dims[1] == 7:
        return "nms"
    if len(dims) == 3 and dims[0] in (1, None):
        a, b = dims[1], dims[2]
        h, w = input_hw
        anchors = sum((h // s) * (w // s) for s in YOLOX_STRIDES)
        if a == anchors and b is not None and b >= 6:
            return "yolox"
        if b == anchors and a is not None and a >= 5:
            return "yolov8"
        if a and b and b > a >= 5:
            return "yolov8"
        if a and b and a > b >= 6:
            return "yolox"
    return None


def find_detection_output(outputs: dict, feature_name: str, input_hw, settings: DetectionSettings) -> tuple[str, str]:
    """(output name, format) to decode; a clear error when the model has no detection output."""
    if settings.output:
        if settings.output not in outputs:
            raise DetectionError(f"the extractor has no output {settings.output!r} (outputs: {', '.join(outputs)})")
        fmt = settings.format if settings.format != "auto" else guess_format(
            settings.output, outputs[settings.output], input_hw)
        if fmt is None:
            raise DetectionError(f"cannot tell the layout of {settings.output} {outputs[settings.output]}: "
                                 f"pass --det-format ({', '.join(FORMATS[1:])})")
        return settings.output, fmt
    for name, shape in outputs.items():
        if name == feature_name:
            continue
        fmt = guess_format(name, shape, input_hw)
        if fmt:
            return name, (fmt if settings.format == "auto" else settings.format)
    listing = ", ".join(f"{k} {v}" for k, v in outputs.items()) or "none"
    raise DetectionError(f"the extractor ONNX has no detection output of a known layout (outputs: {listing}); "
                         f"pass --boxes FILE or --boxes gt --ann FILE, or --det-output NAME --det-format FMT")


def _yolox_grid(n: int, input_hw) -> tuple[np.ndarray, np.ndarray]:
    h, w = input_hw
    grids, strides = [], []
    for s in YOLOX_STRIDES:
        ys, xs = np.meshgrid(np.arange(h // s), np.arange(w // s), indexing="ij")
        grids.append(np.stack([xs, ys], -1).reshape(-1, 2))
        strides.append(np.full((grids[-1].shape[0], 1), s))
    grid, stride = np.concatenate(grids).astype(np.float32), np.concatenate(strides).astype(np.float32)
    if len(grid) != n:
        raise DetectionError(f"raw YOLOX output has {n} anchors, but strides {YOLOX_STRIDES} on a "
                             f"{h}x{w} input give {len(grid)}: pass --det-format yolox-decoded or yolov8")
    return grid, stride


def decode(output: np.ndarray, fmt: str, input_hw, settings: DetectionSettings, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """One image's detection output -> (person boxes [n, 4] xyxy in input pixels, scores [n])."""
    out = np.asarray(output, np.float32)
    pc = settings.person_class
    if fmt == "nms":
        rows = out.reshape(-1, 7)
        score_last = "x1y1x2y2_score" in name
        score = rows[:, 6] if score_last else rows[:, 2]
        box = rows[:, 2:6] if score_last else rows[:, 3:7]
        keep = (rows[:, 0] == 0) & (rows[:, 1] == pc) & (score >= settings.conf)
        box, score = box[keep], score[keep]
        if len(box) and np.abs(box).max() <= 1.5:
            box = box * np.array([input_hw[1], input_hw[0]] * 2, np.float32)
        order = np.argsort(-score, kind="stable")[: settings.max_det]
        return box[order].astype(np.float64), score[order].astype(np.float64)
    if fmt == "yolov8":
        p = out.reshape(out.shape[-2], out.shape[-1]).T          # [A, 4+nc]
        nc = p.shape[1] - 4
        if not 0 <= pc < nc:
            raise DetectionError(f"--person-class {pc} is not one of the {nc} classes of this head")
        cxcywh, score = p[:, :4], p[:, 4 + pc]
    elif fmt in ("yolox", "yolox-decoded"):
        p = out.reshape(out.shape[-2], out.shape[-1])             # [A, 5+nc]
        nc = p.shape[1] - 5
        if not 0 <= pc < nc:
            raise DetectionError(f"--person-class {pc} is not one of the {nc} classes of this head")
        cxcywh = p[:, :4].copy()
        if fmt == "yolox":
            grid, stride = _yolox_grid(len(p), input_hw)
            cxcywh[:, :2] = (cxcywh[:, :2] + grid) * stride
            cxcywh[:, 2:] = np.exp(np.clip(cxcywh[:, 2:], -20, 20)) * stride
        score = p[:, 4] * p[:, 5 + pc]
    else:
        raise DetectionError(f"unknown detection format {fmt!r} ({', '.join(FORMATS)})")
    keep = score >= settings.conf
    cxcywh, score = cxcywh[keep], score[keep]
    box = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1)
    if len(box) == 0:
        return np.zeros((0, 4)), np.zeros(0)
    kept = nms(box, score, settings.iou)[: settings.max_det]
    return box[kept].astype(np.float64), score[kept].astype(np.float64)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression (torchvision.ops.nms's rule, in numpy: this package runs
    without torch): indices by falling score, dropping boxes whose IoU with a kept one exceeds
    ``iou``.  The person boxes of one image are a few hundred after --conf."""
    order = np.argsort(-scores, kind="stable")
    b = boxes.astype(np.float64)
    area = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    keep = []
    while len(order):
        i, rest = order[0], order[1:]
        keep.append(i)
        w = (np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0])).clip(0)
        h = (np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1])).clip(0)
        inter = w * h
        overlap = inter / np.maximum(area[i] + area[rest] - inter, 1e-12)
        order = rest[overlap <= iou]
    return np.asarray(keep, np.int64)
