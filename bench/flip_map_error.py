"""How far is the mirrored feature map from the features of the mirrored image?

    uv run python bench/flip_map_error.py            # needs bench/out/cv/store.zarr (bench/realdata_cv.py)
Compares flip(F(x)) with F(flip(x)) on every image of a store cached with --flip, after the
per-channel normalization the decoder applies: relative L2 error and the per-cell cosine similarity
(what a 1x1 conv sees).  Convolution stacks are not mirror-equivariant (asymmetric kernels, stride
phase), so the two differ; whether the difference matters is measured by bench/ablate.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from roiseg.data.store import FeatureStore  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, default=ROOT / "bench/out/cv/store.zarr")
    a = ap.parse_args()
    fs = FeatureStore(a.store)
    if not fs.has_flip:
        sys.exit(f"{a.store} has no mirrored features (cache it with --flip)")
    imgs = fs.valid_images()
    mean, std = fs.feature_stats(imgs)
    rel, cos, rel_plain = [], [], []
    for i in imgs:
        f = (fs.features(int(i)).astype(np.float32) - mean[:, None, None]) / std[:, None, None]
        ff = (fs.features(int(i), flipped=True).astype(np.float32) - mean[:, None, None]) / std[:, None, None]
        m = f[..., ::-1]
        rel.append(np.linalg.norm(m - ff) / np.linalg.norm(ff))
        rel_plain.append(np.linalg.norm(f - ff) / np.linalg.norm(ff))
        num = (m * ff).sum(0)
        den = np.linalg.norm(m, axis=0) * np.linalg.norm(ff, axis=0) + 1e-9
        cos.append(float((num / den).mean()))
    print(f"{len(imgs)} images, {fs.meta.source.feature_name} {list(fs.meta.source.feature_shape)}, normalized per channel:")
    print(f"  ||flip(F(x)) - F(flip(x))|| / ||F(flip(x))||: mean {np.mean(rel):.3f} (min {np.min(rel):.3f}, max {np.max(rel):.3f})")
    print(f"  per-cell cosine similarity: mean {np.mean(cos):.3f}")
    print(f"  for scale: the unmirrored map vs F(flip(x)): {np.mean(rel_plain):.3f}")


if __name__ == "__main__":
    main()
