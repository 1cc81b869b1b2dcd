"""Paste-back methods for ROI masks at full frame (a lead for the compact export, issue 12).

    uv run python bench/paste_methods.py [--rois 20] [--size 640] [--mask 56]

Today's ``paste_masks`` runs ``grid_sample`` over [N, K, H, W].  Bilinear paste with zero padding is
separable: out[n] = Ay[n] @ P[n] @ Ax[n]^T, where Ay [H, M] / Ax [W, M] hold relu(1 - |src - j|)
weights, so it is exact (same values) and runs as two batched matmuls.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from roiseg.modeling.decoders import paste_masks  # noqa: E402


def interp_weights(lo, hi, n_out: int, m: int) -> torch.Tensor:
    """[N, n_out, m] bilinear weights of output pixel centres inside [lo, hi) over an m-cell grid;
    rows outside the box are 0 (grid_sample, align_corners=False, zero padding)."""
    c = torch.arange(n_out, dtype=torch.float32) + 0.5
    src = (c[None] - lo[:, None]) / (hi - lo).clamp_min(1e-6)[:, None] * m - 0.5
    return (1 - (src[:, :, None] - torch.arange(m, dtype=torch.float32)).abs()).clamp_min(0)


def separable_paste(p: torch.Tensor, boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    m = p.shape[-1]
    return interp_weights(boxes[:, 1], boxes[:, 3], h, m) @ p @ \
        interp_weights(boxes[:, 0], boxes[:, 2], w, m).transpose(1, 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rois", type=int, default=20)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--mask", type=int, default=56)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    n, s, m = a.rois, a.size, a.mask
    p3 = torch.rand(n, 3, m, m, generator=g).softmax(1)
    xy = torch.rand(n, 2, generator=g) * s * 0.6
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * s * 0.3 + 20], 1)
    ref = paste_masks(p3[:, 1:2], boxes, s, s, fill_background=False)[:, 0]
    print(f"separable vs grid_sample, class-1 map: max |diff| {(separable_paste(p3[:, 1], boxes, s, s) - ref).abs().max():.1e}")
    for name, f in (("grid_sample, 3 classes (today)", lambda: paste_masks(p3, boxes, s, s)),
                    ("grid_sample, class 1 only", lambda: paste_masks(p3[:, 1:2], boxes, s, s, fill_background=False)),
                    ("separable matmuls, class 1", lambda: separable_paste(p3[:, 1], boxes, s, s))):
        f()
        t = time.perf_counter()
        for _ in range(5):
            f()
        print(f"{name:34s} {(time.perf_counter() - t) / 5 * 1000 / n:6.2f} ms per ROI ({n} ROIs, {s}x{s}, torch CPU)")


if __name__ == "__main__":
    main()
