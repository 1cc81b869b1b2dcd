"""Write a COCO-scale synthetic person annotation file (no images): ~60k images, ~231k polygons.

Image sizes, persons per image (mean ~3.85, long tail to 20+), person sizes (many small) and
overlaps are drawn to resemble COCO train2017 person/no-crowd.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from roiseg.featcache.synthetic import person_polygons  # noqa: E402

SIZES = [(640, 480), (640, 427), (480, 640), (640, 426), (500, 375), (427, 640), (640, 640), (612, 612)]


def make(n_images: int, mean_persons: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    images, anns = [], []
    aid = 1
    for i in range(n_images):
        w, h = SIZES[rng.integers(len(SIZES))]
        n = 1 + min(int(rng.geometric(1 / mean_persons)) - 1, 24)
        images.append({"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": w, "height": h})
        boxes = []
        for _ in range(n):
            bh = h * float(np.clip(rng.lognormal(-1.6, 0.9), 0.02, 1.0))
            bw = bh * rng.uniform(0.3, 0.7)
            if boxes and rng.random() < 0.5:
                px, py, pw, ph = boxes[rng.integers(len(boxes))]
                bx, by = px + rng.uniform(-0.7, 0.7) * pw, py + rng.uniform(-0.3, 0.3) * ph
            else:
                bx, by = rng.uniform(0, max(w - bw, 1)), rng.uniform(0, max(h - bh, 1))
            bx, by = float(np.clip(bx, 0, w - bw)), float(np.clip(by, 0, h - bh))
            boxes.append((bx, by, bw, min(bh, h)))
            anns.append({"id": aid, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                         "bbox": [round(bx, 2), round(by, 2), round(bw, 2), round(bh, 2)],
                         "area": round(bw * bh * 0.55, 2), "segmentation": person_polygons(boxes[-1], rng)})
            aid += 1
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "person", "supercategory": "person"}]}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=60_000)
    ap.add_argument("--mean-persons", type=float, default=3.85)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/out/coco_scale_person.json"))
    a = ap.parse_args()
    d = make(a.images, a.mean_persons, a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(d))
    print(f"wrote {a.out}: {len(d['images'])} images, {len(d['annotations'])} instances")


if __name__ == "__main__":
    main()
