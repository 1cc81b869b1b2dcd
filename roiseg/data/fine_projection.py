"""Channel reduction of a wide fine map, fixed at cache time (``cache --fine-channels K``).

A stride-4 tensor of a large extractor (YOLOv9-E: 128-256 channels at 160x160, 6.5-13 MB per image
in fp16) would double the store.  Its leading principal components, fitted once on a sample of the
store's images, keep most of its variance in K channels: ``y = W x + b`` per cell, with ``W`` the
K x C components and ``b = -W mean``.  The projection is recorded in the store's metadata (and so in
every checkpoint and exported graph), applied by the extractor wherever the map is computed, and a
validation store reuses the training store's (``--fine-projection-from``): its decoder must see the
same channels.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

SAMPLE_IMAGES = 32          # images the PCA is fitted on (evenly spaced over the store)
CELLS_PER_IMAGE = 4096      # cells drawn from each (a 160x160 map has 25,600)


def sample_indices(n_images: int, k: int = SAMPLE_IMAGES) -> list[int]:
    """The images a fit uses: evenly spaced, the same for every shard of a store."""
    return sorted({int(i) for i in np.linspace(0, n_images - 1, min(k, n_images)).round()})


def fit_pca(maps, k: int, seed: int = 0) -> dict:
    """PCA of the cells of ``maps`` (an iterable of [C, H, W] arrays) -> the projection dict:
    ``mean`` [C], ``components`` [k, C] (unit rows, by decreasing variance), ``explained`` (the share
    of the variance they keep) and ``images`` (how many maps it saw)."""
    rng = np.random.default_rng(seed)
    cells, n = [], 0
    for m in maps:
        x = np.asarray(m, np.float32).reshape(m.shape[0], -1)
        pick = rng.choice(x.shape[1], min(CELLS_PER_IMAGE, x.shape[1]), replace=False)
        cells.append(x[:, pick])
        n += 1
    if not cells:
        raise ValueError("no maps to fit the fine-map projection on")
    x = np.concatenate(cells, 1).astype(np.float64)
    c = x.shape[0]
    if not 0 < k < c:
        raise ValueError(f"--fine-channels {k} must be between 1 and the map's {c - 1} (fewer than it has)")
    mean = x.mean(1)
    cov = np.cov(x - mean[:, None])
    vals, vecs = np.linalg.eigh(cov)                 # ascending
    order = np.argsort(vals)[::-1][:k]
    comps = vecs[:, order].T
    comps *= np.where(comps.sum(1, keepdims=True) < 0, -1.0, 1.0)   # a fixed sign per component
    total = float(vals.clip(min=0).sum())
    return {"mean": mean.astype(np.float32).tolist(), "components": comps.astype(np.float32).tolist(),
            "explained": float(vals[order].clip(min=0).sum() / total) if total > 0 else 1.0, "images": n}


def weights(p: dict) -> tuple[np.ndarray, np.ndarray]:
    """(W [k, C], b [k]) float32 of ``y = W x + b``."""
    w = np.asarray(p["components"], np.float32)
    return w, (-w.astype(np.float64) @ np.asarray(p["mean"], np.float64)).astype(np.float32)


def apply(p: dict, x: np.ndarray) -> np.ndarray:
    """[B, C, H, W] -> [B, k, H, W] fp16 (computed in float32, clipped to the fp16 range)."""
    w, b = weights(p)
    b_, c, h, wd = x.shape
    y = np.einsum("kc,bcn->bkn", w, np.asarray(x, np.float32).reshape(b_, c, -1)) + b[None, :, None]
    return np.clip(y, -65504, 65504).astype(np.float16).reshape(b_, len(w), h, wd)


def sha256(p: dict) -> str:
    """Identifies a projection (recorded in the store's ``fine`` entry: train/val and checkpoints
    must share it)."""
    return hashlib.sha256(json.dumps([p["mean"], p["components"]]).encode()).hexdigest()
