"""Batched 0/1/2 ROI targets from bit-packed masks, on any device (CPU workers or the GPU).

The same cell-centre nearest sampling as ``featcache.targets.roi_target`` (tests check equality),
but vectorized over ROIs and reading packed bits directly, so resident masks stay 8x smaller.
Only two gathers per ROI: the target's mask and its image's union of all persons (target wins,
the rest of the union is class 2).

Masks are ``PackedCrops``: each one the rows and byte columns of its frame that hold set bits, in
one flat buffer.  A resident cache keeps them cropped: a full 640x640 frame is 51 KB per person
however small the person, which at COCO scale (260k persons) is 13 GB of mostly zero bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PackedCrops:
    """K bit-packed masks, each cropped to a window of its packed frame [H, ceil(W/8)].

    bits: flat uint8 (cropped ones end with a zero byte, so an empty window still indexes something);
    geom: [K, 5] int64 rows of (offset into bits, first row, first byte column, rows, byte columns).
    """
    bits: torch.Tensor
    geom: torch.Tensor

    def __len__(self) -> int:
        return int(self.geom.shape[0])

    @property
    def nbytes(self) -> int:
        return self.bits.numel() + self.geom.numel() * 8

    def to(self, device) -> PackedCrops:
        return PackedCrops(self.bits.to(device), self.geom.to(device))

    @staticmethod
    def full(packed: torch.Tensor) -> PackedCrops:
        """Uncropped: a view of ``packed`` [K, H, Wb] (no copy when it is contiguous; every window is
        the whole frame, never empty, so no trailing byte is needed)."""
        k, h, wb = packed.shape
        flat = packed.reshape(-1)
        geom = torch.zeros((k, 5), dtype=torch.long, device=packed.device)
        geom[:, 0] = torch.arange(k, device=packed.device) * (h * wb)
        geom[:, 3], geom[:, 4] = h, wb
        return PackedCrops(flat, geom)

    @staticmethod
    def crop(packed: np.ndarray | torch.Tensor) -> PackedCrops:
        """Each of ``packed`` [K, H, Wb] cut to the rows and byte columns that hold set bits (CPU)."""
        p = packed.cpu().numpy() if torch.is_tensor(packed) else np.asarray(packed)
        rows, cols = p.any(axis=2), p.any(axis=1)
        parts, geom, offset = [], np.zeros((len(p), 5), np.int64), 0
        for k in range(len(p)):
            ys, cs = np.flatnonzero(rows[k]), np.flatnonzero(cols[k])
            if len(ys) == 0:
                continue  # an empty mask: 0 rows, never read
            y0, y1, c0, c1 = ys[0], ys[-1] + 1, cs[0], cs[-1] + 1
            parts.append(p[k, y0:y1, c0:c1].reshape(-1))
            geom[k] = (offset, y0, c0, y1 - y0, c1 - c0)
            offset += parts[-1].size
        parts.append(np.zeros(1, np.uint8))
        return PackedCrops(torch.from_numpy(np.concatenate(parts)), torch.from_numpy(geom))


class CropsBuilder:
    """Appends ``PackedCrops`` into one growing buffer (a bytearray: CPython grows large ones with
    realloc, which Linux does by remapping pages, not copying), so building 64k images' masks peaks
    at about one copy of them, where collecting the parts and concatenating held two."""

    def __init__(self):
        self.bits = bytearray()
        self.geoms: list[torch.Tensor] = []

    def append(self, part: PackedCrops) -> None:
        g = part.geom.clone()
        g[:, 0] += len(self.bits)
        self.geoms.append(g)
        self.bits += part.bits.numpy().tobytes()

    def build(self) -> PackedCrops:
        if not self.bits:
            self.bits += b"\0"
        geom = torch.cat(self.geoms) if self.geoms else torch.zeros((0, 5), dtype=torch.long)
        return PackedCrops(torch.frombuffer(self.bits, dtype=torch.uint8), geom)


def _as_crops(masks: torch.Tensor | PackedCrops) -> PackedCrops:
    return masks if isinstance(masks, PackedCrops) else PackedCrops.full(masks)


def _grid(boxes_px: torch.Tensor, out_h: int, out_w: int):
    """Integer pixel coords of cell centres: ys [R, out_h], xs [R, out_w] (float64 for exactness)."""
    b = boxes_px.to(torch.float64)
    ty = (torch.arange(out_h, device=b.device, dtype=torch.float64) + 0.5)
    tx = (torch.arange(out_w, device=b.device, dtype=torch.float64) + 0.5)
    ys = torch.floor(b[:, 1:2] + ty[None] * ((b[:, 3:4] - b[:, 1:2]) / out_h)).long()
    xs = torch.floor(b[:, 0:1] + tx[None] * ((b[:, 2:3] - b[:, 0:1]) / out_w)).long()
    return ys, xs


def gather_bits(masks: torch.Tensor | PackedCrops, index: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
                width: int) -> torch.Tensor:
    """masks: packed [K, H, ceil(W/8)] uint8 or their ``PackedCrops``; index [R] -> bool
    [R, len(ys[0]), len(xs[0])].  Pixels outside a mask's window (or the frame) are 0."""
    m = _as_crops(masks)
    off, y0, c0, rows, cols = m.geom[index].unbind(1)
    ry = ys - y0[:, None]
    cx = (xs >> 3) - c0[:, None]  # arithmetic shift: x < 0 gives a negative column
    vy = (ry >= 0) & (ry < rows[:, None])
    vx = (cx >= 0) & (cx < cols[:, None]) & (xs >= 0) & (xs < width)
    ry = torch.minimum(ry.clamp(min=0), (rows[:, None] - 1).clamp(min=0))
    cx = torch.minimum(cx.clamp(min=0), (cols[:, None] - 1).clamp(min=0))
    flat = off[:, None, None] + ry[:, :, None] * cols[:, None, None] + cx[:, None, :]
    byte = m.bits[flat]
    bit = (byte >> (7 - (xs & 7))[:, None, :].to(torch.uint8)) & 1
    return bit.bool() & vy[:, :, None] & vx[:, None, :]


def sample_roi_targets(masks: torch.Tensor | PackedCrops, union: torch.Tensor | PackedCrops,
                       target_index: torch.Tensor, image_index: torch.Tensor, boxes_px: torch.Tensor,
                       out_h: int, out_w: int, width: int) -> torch.Tensor:
    """Labels [R, out_h, out_w] (uint8) for R ROIs.

    masks: instance masks (packed [K, H, Wb] or ``PackedCrops``); union: per-image union of its
    instances (the same, [I, ...]); target_index: [R] rows of ``masks``; image_index: [R] rows of
    ``union``; boxes in mask pixels.
    """
    if boxes_px.shape[0] == 0:
        return torch.zeros((0, out_h, out_w), dtype=torch.uint8, device=boxes_px.device)
    ys, xs = _grid(boxes_px, out_h, out_w)
    tgt = gather_bits(masks, target_index, ys, xs, width)
    other = gather_bits(union, image_index, ys, xs, width)
    return torch.where(tgt, 1, torch.where(other, 2, 0)).to(torch.uint8)


def union_packed(packed: torch.Tensor | np.ndarray):
    """OR of packed masks [K, H, Wb] -> [H, Wb]."""
    out = packed[0].copy() if isinstance(packed, np.ndarray) else packed[0].clone()
    for k in range(1, packed.shape[0]):
        out |= packed[k]
    return out
