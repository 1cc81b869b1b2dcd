"""Batched 0/1/2 ROI targets from bit-packed masks, on any device (CPU workers or the GPU).

The same cell-centre nearest sampling as ``featcache.targets.roi_target`` (tests check equality),
but vectorized over ROIs and reading packed bits directly, so resident masks stay 8x smaller.
Only two gathers per ROI: the target's mask and its image's union of all persons (target wins,
the rest of the union is class 2).
"""
from __future__ import annotations

import torch


def _grid(boxes_px: torch.Tensor, out_h: int, out_w: int):
    """Integer pixel coords of cell centres: ys [R, out_h], xs [R, out_w] (float64 for exactness)."""
    b = boxes_px.to(torch.float64)
    ty = (torch.arange(out_h, device=b.device, dtype=torch.float64) + 0.5)
    tx = (torch.arange(out_w, device=b.device, dtype=torch.float64) + 0.5)
    ys = torch.floor(b[:, 1:2] + ty[None] * ((b[:, 3:4] - b[:, 1:2]) / out_h)).long()
    xs = torch.floor(b[:, 0:1] + tx[None] * ((b[:, 2:3] - b[:, 0:1]) / out_w)).long()
    return ys, xs


def gather_bits(packed: torch.Tensor, index: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
                width: int) -> torch.Tensor:
    """packed [K, H, ceil(W/8)] uint8; index [R] -> bool [R, len(ys[0]), len(xs[0])]."""
    h = packed.shape[1]
    vy = (ys >= 0) & (ys < h)
    vx = (xs >= 0) & (xs < width)
    yc, xc = ys.clamp(0, h - 1), xs.clamp(0, width - 1)
    byte = packed[index[:, None, None], yc[:, :, None], (xc >> 3)[:, None, :]]
    bit = (byte >> (7 - (xc & 7))[:, None, :].to(torch.uint8)) & 1
    return bit.bool() & vy[:, :, None] & vx[:, None, :]


def sample_roi_targets(packed: torch.Tensor, union: torch.Tensor, target_index: torch.Tensor,
                       image_index: torch.Tensor, boxes_px: torch.Tensor, out_h: int, out_w: int,
                       width: int) -> torch.Tensor:
    """Labels [R, out_h, out_w] (uint8) for R ROIs.

    packed: instance masks [K, H, Wb]; union: per-image union of its instances [I, H, Wb];
    target_index: [R] rows of ``packed``; image_index: [R] rows of ``union``; boxes in mask pixels.
    """
    if boxes_px.shape[0] == 0:
        return torch.zeros((0, out_h, out_w), dtype=torch.uint8, device=packed.device)
    ys, xs = _grid(boxes_px, out_h, out_w)
    tgt = gather_bits(packed, target_index, ys, xs, width)
    other = gather_bits(union, image_index, ys, xs, width)
    return torch.where(tgt, 1, torch.where(other, 2, 0)).to(torch.uint8)


def union_packed(packed: torch.Tensor) -> torch.Tensor:
    """OR of packed masks [K, H, Wb] -> [H, Wb]."""
    out = packed[0].clone()
    for k in range(1, packed.shape[0]):
        out |= packed[k]
    return out
