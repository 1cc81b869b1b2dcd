"""Feature-store layouts side by side: bytes per image, write and read throughput, and the
projected full train2017 size.

    uv run python bench/bench_store.py [--synthetic 32] [--threads 2] [--repeat 3]

Layouts: dense / ROI-sparse (``cache --sparse``, margin 0.2) x lz4 / zstd.
* real: the 61 images of $ROISEG_REALDATA through YOLOX-Nano (C=128, the stand-in for the YOLOv9
  features), cached once with `run_cache` (dense lz4); every layout is then written from those
  features (`FeatureStore.write_image`, timed: encode + zero + write);
* synthetic: N synthetic images through the 1024-channel stand-in extractor (the real map size;
  its values are not real features, so its ratios say little; its speeds are the point).
Reads decode each image's chunk into one reused buffer (the pinned streaming path's call), with 1 and
``--threads`` threads, hot (page cache) and cold (chunk files fsynced, then dropped from the page
cache with posix_fadvise(DONTNEED) before every pass).  Blosc runs single-threaded.
Projection: the share of cells `cache --sparse` keeps (``roiseg.data.sparse.readable_cells``, what
`analyze` reports as ``sparse_cells``) on a COCO-scale annotation file (bench/make_coco_scale.py:
60k images, COCO-like person counts and sizes) and on the real images, times the stored/raw ratios
measured on the real features, for [1024,80,80] fp16 maps (13.1 MB raw).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numcodecs
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.realdata import realdata  # noqa: E402
from roiseg.common.geometry import ResizePolicy  # noqa: E402
from roiseg.data.cache import CacheConfig, run_cache  # noqa: E402
from roiseg.data.sparse import DEFAULT_MARGIN, readable_cells  # noqa: E402
from roiseg.data.store import FeatureStore  # noqa: E402

LAYOUTS = [("dense", "lz4"), ("dense", "zstd"), ("sparse", "lz4"), ("sparse", "zstd")]
RAW_1024 = 1024 * 80 * 80 * 2


def feature_files(store: Path) -> list[Path]:
    return [p for p in (store / "features").iterdir() if p.name[0].isdigit()]


def rewrite(src: FeatureStore, dst: Path, sparse: bool, codec: str) -> tuple[FeatureStore, float]:
    """``src``'s images written into a new store of this layout; seconds spent writing."""
    meta = dataclasses.replace(src.meta, sparse_margin=DEFAULT_MARGIN if sparse else None, codec=codec)
    out = FeatureStore.create(dst, meta, {**src.tables, "file_name": list(src.tables["file_name"])},
                              src.meta.source.feature_shape, src.meta.mask_hw)
    imgs = src.valid_images()
    data = [(int(i), src.features(int(i)), src.root["masks"][int(i)], src.gt_rles(int(i))) for i in imgs]
    t = time.perf_counter()
    for i, f, m, g in data:
        out.write_image(i, f, m, g)
    return out, time.perf_counter() - t


def drop_cache(files: list[Path]) -> None:
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_rate(store: FeatureStore, threads: int, cold: bool, repeat: int) -> float:
    """Images per second decoding every image into a reused buffer (best of ``repeat`` passes)."""
    arr = store.root["features"]
    imgs = [int(i) for i in store.valid_images()]
    bufs = [np.empty(arr.shape[1:], arr.dtype) for _ in range(threads)]
    files = feature_files(store.path)
    best = 0.0
    for _ in range(repeat):
        if cold:
            drop_cache(files)
        t = time.perf_counter()
        if threads == 1:
            for i in imgs:
                arr.get_basic_selection((i,), out=bufs[0])
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda k: arr.get_basic_selection((imgs[k],), out=bufs[k % threads]),
                              range(len(imgs))))
        best = max(best, len(imgs) / (time.perf_counter() - t))
    return best


def kept_share(store: FeatureStore) -> float:
    return float(np.mean([store.readable(int(i)).mean() for i in store.valid_images()]))


def measure(name: str, base: FeatureStore, work: Path, threads: int, repeat: int) -> dict:
    c, hf, wf = base.meta.source.feature_shape
    raw = c * hf * wf * 2
    rows = {}
    for layout, codec in LAYOUTS:
        st, secs = rewrite(base, work / f"{name}_{layout}_{codec}.zarr", layout == "sparse", codec)
        n = len(st.valid_images())
        stored = sum(p.stat().st_size for p in feature_files(st.path)) / n
        row = {"bytes_per_image": stored, "stored_over_raw": stored / raw, "write_img_s": n / secs}
        if layout == "sparse":
            row["kept_cells"] = kept_share(st)
            row["stored_over_kept_raw"] = stored / (raw * row["kept_cells"])
        for th in sorted({1, threads}):
            for cold in (False, True):
                row[f"read_{'cold' if cold else 'hot'}_{th}t_img_s"] = read_rate(st, th, cold, repeat)
        rows[f"{layout} {codec}"] = row
        print(f"  {name} {layout:6s} {codec:4s}: {stored / 1e6:6.2f} MB/img ({stored / raw:.3f} of raw), "
              f"write {row['write_img_s']:6.1f} img/s, read hot {row['read_hot_1t_img_s']:6.1f} / "
              f"{row[f'read_hot_{threads}t_img_s']:6.1f} img/s, cold {row['read_cold_1t_img_s']:6.1f} / "
              f"{row[f'read_cold_{threads}t_img_s']:6.1f} img/s (1 / {threads} threads)", flush=True)
        shutil.rmtree(st.path)
    return rows


def coco_scale_share(path: Path) -> tuple[int, float]:
    """(images, mean share of cells kept) of an annotation file, 640x640 stretch, stride 8."""
    d = json.loads(path.read_text())
    boxes: dict[int, list] = {}
    for a in d["annotations"]:
        if not a.get("iscrowd"):
            boxes.setdefault(a["image_id"], []).append(a["bbox"])
    policy, shares = ResizePolicy(640, 640, "stretch"), []
    for im in d["images"]:
        b = np.array(boxes.get(im["id"], []), np.float64).reshape(-1, 4)
        if not len(b):
            continue
        w, h = im["width"], im["height"]
        norm = np.stack([b[:, 0] / w, b[:, 1] / h, (b[:, 0] + b[:, 2]) / w, (b[:, 1] + b[:, 3]) / h], 1).clip(0, 1)
        shares.append(readable_cells(norm, (w, h), policy, DEFAULT_MARGIN, 0.1, (80, 80)).mean())
    return len(shares), float(np.mean(shares))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", type=int, default=32, help="synthetic images at 1024 channels (0: skip)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--coco-scale", type=Path, default=ROOT / "bench/out/coco_scale_person.json")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/out/bench_store.json")
    a = ap.parse_args()
    numcodecs.blosc.set_nthreads(1)
    if not a.coco_scale.is_file():
        import subprocess
        subprocess.run([sys.executable, str(ROOT / "bench/make_coco_scale.py"), "--out", str(a.coco_scale)], check=True)
    report = {}
    with tempfile.TemporaryDirectory(dir=ROOT / "bench/out") as d:   # on the project's disk, not tmpfs
        work = Path(d)
        run_cache(CacheConfig(ann=realdata().ann, images=realdata().images, onnx=realdata().onnx, out=work / "real.zarr", feature_name=realdata().feature,
                              provider="cpu", channel_order="bgr", scale=1.0), progress=False)
        print("real images (YOLOX-Nano, 128 x 80 x 80):")
        report["real"] = measure("real", FeatureStore(work / "real.zarr"), work, a.threads, a.repeat)
        if a.synthetic:
            from roiseg.data.standin import FEATURE_NAME, build_standin_extractor
            from roiseg.data.synthetic import make_synthetic_dataset
            syn = make_synthetic_dataset(work / "syn", n_train=a.synthetic, n_val=1, seed=0, subsets=())
            onnx = build_standin_extractor(work / "standin1024.onnx", channels=1024)
            run_cache(CacheConfig(ann=syn["train"], images=syn["root"] / "images/train2017", onnx=onnx,
                                  out=work / "syn.zarr", feature_name=FEATURE_NAME, provider="cpu"), progress=False)
            print("synthetic images (stand-in extractor, 1024 x 80 x 80):")
            report["synthetic_1024"] = measure("syn", FeatureStore(work / "syn.zarr"), work, a.threads, a.repeat)
    n_coco, share_coco = coco_scale_share(a.coco_scale)
    real = report["real"]
    share_real = real["sparse lz4"]["kept_cells"]
    proj = {"images": n_coco, "kept_cells_coco_scale": share_coco, "kept_cells_real61": share_real,
            "raw_GB": n_coco * RAW_1024 / 1e9}
    for layout, codec in LAYOUTS:
        r = real[f"{layout} {codec}"]
        frac = r["stored_over_raw"] if layout == "dense" else share_coco * r["stored_over_kept_raw"]
        proj[f"{layout} {codec}"] = {"GB": n_coco * RAW_1024 * frac / 1e9, "of_raw": frac}
    report["projection_train2017"] = proj
    print(f"\nprojected train2017 ({n_coco} images x 13.1 MB raw = {proj['raw_GB']:.0f} GB; sparse keeps "
          f"{share_coco:.1%} of the cells on the COCO-scale file, {share_real:.1%} on the 61 real images):")
    for k in [f"{lay} {c}" for lay, c in LAYOUTS]:
        print(f"  {k:12s} {proj[k]['GB']:6.0f} GB ({proj[k]['of_raw']:.3f} of raw); with --flip x2: {2 * proj[k]['GB']:.0f} GB")
    a.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
