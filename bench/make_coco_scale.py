"""Write a COCO-scale synthetic person annotation file: ~60k images, ~231k polygons; with
``--images-dir`` also the images themselves (real JPEGs, rendered in parallel).

Image sizes, persons per image (mean ~3.85, long tail to 20+), person sizes (many small) and
overlaps are drawn to resemble COCO train2017 person/no-crowd.  The images are cheap renderings
(a tinted background, a few distractor blocks, the persons' polygons in clothing colours): real JPEG
files of COCO's sizes, so decoding, resizing and rasterization cost what they cost on COCO.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from roiseg.data.synthetic import person_polygons  # noqa: E402

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


def render(job: tuple) -> int:
    """Draw and save one image ``(path, width, height, polygons, seed)``; its JPEG size in bytes."""
    from PIL import Image, ImageDraw
    path, w, h, polys, seed = job
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (w, h), tuple(int(v) for v in rng.uniform(40, 120, 3) * [0.7, 0.9, 1.2]))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):           # grey/blue distractors
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        draw.rectangle([x0, y0, x0 + rng.uniform(20, w / 3), y0 + rng.uniform(20, h / 3)],
                       fill=tuple(int(v) for v in rng.uniform(60, 160) * np.array([0.8, 0.9, 1.1])))
    for person in polys:
        colour = tuple(int(v) for v in rng.uniform([150, 60, 30], [240, 150, 90]))
        for poly in person:
            draw.polygon([(poly[k], poly[k + 1]) for k in range(0, len(poly), 2)], fill=colour)
    im.save(path, quality=85)
    return Path(path).stat().st_size


def render_images(d: dict, folder: Path, workers: int, seed: int = 0) -> int:
    """Every image of the annotation dict ``d`` into ``folder`` (existing files are kept); total bytes."""
    from concurrent.futures import ProcessPoolExecutor
    folder.mkdir(parents=True, exist_ok=True)
    polys: dict[int, list] = {}
    for a in d["annotations"]:
        polys.setdefault(a["image_id"], []).append(a["segmentation"])
    jobs = [(str(folder / im["file_name"]), im["width"], im["height"], polys.get(im["id"], []), seed * 10_000_000 + im["id"])
            for im in d["images"] if not (folder / im["file_name"]).is_file()]
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(render, jobs, chunksize=64))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=60_000)
    ap.add_argument("--mean-persons", type=float, default=3.85)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/out/coco_scale_person.json"))
    ap.add_argument("--images-dir", type=Path, help="also render the images into this folder")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    d = make(a.images, a.mean_persons, a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(d))
    print(f"wrote {a.out}: {len(d['images'])} images, {len(d['annotations'])} instances")
    if a.images_dir:
        size = render_images(d, a.images_dir, a.workers, a.seed)
        print(f"rendered into {a.images_dir}: {size / 1e9:.2f} GB of new JPEGs")


if __name__ == "__main__":
    main()
