"""Cache throughput vs the bare extractor, on the same images and model.

    uv run python bench/bench_cache.py [--repeat 2]
(a) bare ORT session loop on pre-decoded, pre-resized tensors (nothing else running);
(b) the full `cache` pipeline (decode, resize, masks, ORT, fp16, compression, Zarr writes).
Uses the real YOLOX-Nano stand-in and the 61 real COCO images of $ROISEG_REALDATA.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.realdata import realdata  # noqa: E402
from roiseg.data.cache import CacheConfig, run_cache  # noqa: E402
from roiseg.data.coco import load_person_records  # noqa: E402
from roiseg.data.extractor import Extractor  # noqa: E402
from roiseg.data.images import Preprocess, load_rgb, preprocess  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2, help="passes over the 61 images")
    a = ap.parse_args()
    recs, _ = load_person_records(realdata().ann)
    prep = Preprocess("bgr", 1.0)
    xs = [preprocess(load_rgb(realdata().images / r.file_name), prep)[None] for r in recs]
    ex = Extractor(realdata().onnx, realdata().feature, "cpu", streams=1)  # a plain loop: one run at a time, all cores
    ex.run(xs[0])
    bares, rates, loop_rates = [], [], []
    tmp = Path(tempfile.mkdtemp())
    for r in range(a.repeat):  # interleaved, best of each: this machine's speed drifts
        t = time.perf_counter()
        for x in xs:
            ex.run(x)
        bares.append(len(xs) / (time.perf_counter() - t))
        out = tmp / f"s{r}.zarr"
        cfg = CacheConfig(ann=realdata().ann, images=realdata().images, onnx=realdata().onnx, out=out,
                          feature_name=realdata().feature, channel_order="bgr", scale=1.0, provider="cpu")
        t = time.perf_counter()
        s = run_cache(cfg, progress=False)
        rates.append(len(recs) / (time.perf_counter() - t))
        loop_rates.append(len(recs) / s["loop_s"])
        s_loop = s
    stored = sum(f.stat().st_size for f in (tmp / "s0.zarr/features").iterdir())
    shutil.rmtree(tmp)
    best, bare = max(rates), max(bares)
    print(json.dumps({"images": len(recs), "provider": s_loop["provider"],
                      "bare_ort_img_per_s": round(bare, 2),
                      "bare_runs": [round(x, 2) for x in bares], "cache_cmd_img_per_s": round(best, 2),
                      "cache_cmd_runs": [round(x, 2) for x in rates],
                      "ratio": round(best / bare, 3),
                      "cache_loop_img_per_s": round(max(loop_rates), 2),
                      "ratio_steady_state": round(max(loop_rates) / bare, 3),
                      "feature_bytes_per_image_raw": 128 * 80 * 80 * 2,
                      "feature_bytes_per_image_stored": stored // len(recs)}, indent=2))


if __name__ == "__main__":
    main()
