"""Measure compressors on real fp16 features ($ROISEG_REALDATA + YOLOX-Nano stand-in).

    uv run python bench/bench_codecs.py [--images 30]
Reports ratio, encode and decode speed (one thread) per codec: the basis of the store's choice.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numcodecs
import numpy as np
from numcodecs import LZ4, Blosc, Zstd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.realdata import realdata  # noqa: E402
from roiseg.data.extractor import Extractor  # noqa: E402
from roiseg.data.images import Preprocess, load_rgb, preprocess  # noqa: E402

CODECS = {
    "blosc-lz4-bitshuffle": Blosc("lz4", 5, Blosc.BITSHUFFLE),
    "blosc-lz4-byteshuffle": Blosc("lz4", 5, Blosc.SHUFFLE),
    "blosc-zstd1-bitshuffle": Blosc("zstd", 1, Blosc.BITSHUFFLE),
    "blosc-zstd3-bitshuffle": Blosc("zstd", 3, Blosc.BITSHUFFLE),
    "zstd1": Zstd(1),
    "lz4": LZ4(),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--feature-name", default="/backbone/Concat_1_output_0")
    a = ap.parse_args()
    numcodecs.blosc.set_nthreads(1)
    ex = Extractor(realdata().onnx, a.feature_name, "cpu")
    prep = Preprocess("bgr", 1.0)
    files = sorted(realdata().images.glob("*.jpg"))[: a.images]
    feats = [ex.run(preprocess(load_rgb(f), prep)[None])[0].astype(np.float16) for f in files]
    raw = sum(f.nbytes for f in feats)
    res = {}
    for name, codec in CODECS.items():
        t = time.perf_counter()
        enc = [codec.encode(f) for f in feats]
        t_enc = time.perf_counter() - t
        t = time.perf_counter()
        for e in enc:
            codec.decode(e)
        t_dec = time.perf_counter() - t
        stored = sum(len(e) for e in enc)
        res[name] = {"ratio": round(raw / stored, 3), "bytes_per_image": stored // len(feats),
                     "encode_GBps": round(raw / t_enc / 1e9, 2), "decode_GBps": round(raw / t_dec / 1e9, 2)}
    print(json.dumps({"raw_bytes_per_image": raw // len(feats), "tensor": a.feature_name,
                      "shape": list(feats[0].shape), "codecs": res}, indent=2))


if __name__ == "__main__":
    main()
