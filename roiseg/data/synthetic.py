"""Synthetic COCO-format person data for tests and the demo (no downloads).

Images hold person-like silhouettes (head + body polygons) in warm clothing colours over cool
textured backgrounds with grey/blue distractor blocks, so features can tell persons from the rest
and the ROI decides which person is the target.  Sizes vary (some tiny) and persons overlap.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from roiseg.data.coco import VALIDATION_PNG_IMAGES

ANN_NAME = "instances_{split}2017_person_only_no_crowd{suffix}.json"

_BODY = np.array([(0.42, 0.22), (0.58, 0.22), (0.85, 0.28), (0.95, 0.58), (0.84, 0.61),
                  (0.75, 0.38), (0.73, 0.62), (0.72, 1.0), (0.56, 1.0), (0.5, 0.66),
                  (0.44, 1.0), (0.28, 1.0), (0.27, 0.62), (0.25, 0.38), (0.16, 0.61),
                  (0.05, 0.58), (0.15, 0.28)])


def person_polygons(box, rng: np.random.Generator) -> list[list[float]]:
    """Head ellipse + body outline filling box (x, y, w, h); COCO polygon lists."""
    x, y, w, h = box
    body = _BODY + rng.normal(0, 0.015, _BODY.shape)
    body = np.clip(body, 0, 1) * [w, h] + [x, y]
    t = np.linspace(0, 2 * np.pi, 14, endpoint=False)
    head = np.stack([0.5 + 0.14 * np.cos(t), 0.115 + 0.105 * np.sin(t)], 1) * [w, h] + [x, y]
    return [head.round(2).ravel().tolist(), body.round(2).ravel().tolist()]


def _background(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(40, 110, 3) * [0.7, 0.9, 1.2]
    img = base + 30 * np.sin(xx[..., None] / rng.uniform(8, 30) + rng.uniform(0, 6, 3)) \
        + rng.normal(0, 10, (h, w, 3))
    im = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(rng.integers(1, 4)):  # distractor blocks: not persons
        x0, y0 = rng.uniform(0, w * 0.8), rng.uniform(0, h * 0.8)
        g = int(rng.uniform(90, 200))
        draw.rectangle([x0, y0, x0 + rng.uniform(20, w / 3), y0 + rng.uniform(20, h / 3)],
                       fill=(g // 2, g // 2 + 10, g))
    return im


def _place_boxes(n: int, w: int, h: int, rng: np.random.Generator) -> list[tuple]:
    boxes = []
    for i in range(n):
        tiny = rng.random() < 0.12
        bh = rng.uniform(0.05, 0.09) * h if tiny else rng.uniform(0.3, 0.85) * h
        bw = bh * rng.uniform(0.35, 0.6)
        if boxes and rng.random() < 0.5:  # overlap a previous person
            px, py, pw, ph = boxes[rng.integers(len(boxes))]
            bx = px + rng.uniform(-0.6, 0.6) * pw
            by = py + rng.uniform(-0.2, 0.2) * ph
        else:
            bx, by = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        bx, by = float(np.clip(bx, 0, w - bw)), float(np.clip(by, 0, h - bh))
        boxes.append((bx, by, float(bw), float(bh)))
    return boxes


def render_image(n_persons: int, rng: np.random.Generator, size=None):
    """One synthetic image and its person annotations (polygons in pixel coordinates)."""
    w, h = size or (int(rng.choice([640, 500, 480, 427, 360])), int(rng.choice([480, 375, 640, 333])))
    im = _background(w, h, rng)
    draw = ImageDraw.Draw(im)
    anns = []
    for box in _place_boxes(n_persons, w, h, rng):
        polys = person_polygons(box, rng)
        colour = tuple(int(c) for c in rng.uniform([170, 60, 20], [255, 150, 90]))
        for p in polys:
            draw.polygon(p, fill=colour)
        anns.append({"polygons": polys, "box": box})
    # Earlier persons are partly hidden by later ones, as in photos; keep the visible polygons.
    return im, anns


def _coco_dict(images: list[dict], anns: list[dict]) -> dict:
    return {"info": {"description": "synthetic persons (roiseg.data.synthetic)"}, "licenses": [],
            "images": images, "annotations": anns,
            "categories": [{"supercategory": "person", "id": 1, "name": "person"}]}


def make_synthetic_dataset(root: str | Path, n_train: int = 40, n_val: int = 12, seed: int = 0,
                           subsets=(100, 500), max_persons: int = 6) -> dict:
    """Write ``root/images/{train,val}2017`` and ``root/annotations``; return the paths."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    out = {}
    ann_id = 1
    for split, n in (("train", n_train), ("val", n_val)):
        img_dir = root / "images" / f"{split}2017"
        img_dir.mkdir(parents=True, exist_ok=True)
        names = []
        if split == "val":
            names += [(f, c) for f, c in VALIDATION_PNG_IMAGES.items()]
        base_id = 1_000_000 if split == "train" else 2_000_000
        while len(names) < n:
            names.append((f"{base_id + len(names):012d}.jpg", int(rng.integers(1, max_persons + 1))))
        images, anns = [], []
        for file_name, count in names[:max(n, len(names) if split == 'val' else n)]:
            im, persons = render_image(count, rng)
            im.save(img_dir / file_name, quality=92)
            image_id = int(Path(file_name).stem)
            images.append({"id": image_id, "file_name": file_name, "width": im.width, "height": im.height})
            for p in persons:
                x, y, w, h = p["box"]
                anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                             "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                             "area": round(w * h * 0.6, 2), "segmentation": p["polygons"]})
                ann_id += 1
        ann_dir = root / "annotations"
        ann_dir.mkdir(parents=True, exist_ok=True)
        full = ann_dir / ANN_NAME.format(split=split, suffix="")
        full.write_text(json.dumps(_coco_dict(images, anns)))
        out[split] = full
        for k in subsets:  # _100 / _500 style subsets: the first k images
            keep = {im["id"] for im in images[:k]}
            sub = _coco_dict([im for im in images if im["id"] in keep],
                             [a for a in anns if a["image_id"] in keep])
            (ann_dir / ANN_NAME.format(split=split, suffix=f"_{k}")).write_text(json.dumps(sub))
    out["root"] = root
    return out
