"""Decoders: ROI features + box -> 3-class logits at ROI mask size; paste-back to any frame.

``rois`` are ``[N, 5]``: batch index and a normalized xyxy box in the model-input frame.  Both
models return logits ``[N, K, M, M]`` over the ROI (cell (i, j) covers the box's (i, j)-th
M x M sub-cell, the same grid the targets are sampled on).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from roiseg.common.certainty import RAMP, UNSURE


def _gn(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4) if ch >= 8 else 1, ch)


def conv_gn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), _gn(cout), nn.ReLU(inplace=True))


def rois_to_feature_boxes(rois: torch.Tensor, feat_hw) -> torch.Tensor:
    """[N,5] normalized -> [N,5] in feature-map coordinates for ``roi_align(spatial_scale=1)``."""
    h, w = feat_hw
    scale = rois.new_tensor([1.0, w, h, w, h])
    return rois * scale


def roi_align_fp32_boxes(features: torch.Tensor, boxes: torch.Tensor, size: int, sampling_ratio: int = 2):
    """torchvision's ROIAlign with the boxes kept in fp32 whatever the features' dtype: in fp16 a
    box edge near cell 60 is only good to 1/32 cell.  Under autocast torchvision computes in fp32
    (its autocast kernel); outside it, half features are aligned in fp32 and cast back."""
    boxes = boxes.float()
    if features.dtype != torch.float32 and not torch.is_autocast_enabled(features.device.type):
        out = roi_align(features.float(), boxes, size, spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=True)
        return out.to(features.dtype)
    return roi_align(features, boxes, size, spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=True)


def roi_features(features: torch.Tensor, rois: torch.Tensor, size: int, sampling_ratio: int = 2) -> torch.Tensor:
    """ROIAlign of normalized input-frame ROIs: bin (i, j) covers exactly the box's (i, j) sub-cell."""
    boxes = rois_to_feature_boxes(rois.float(), features.shape[-2:])
    return roi_align_fp32_boxes(features, boxes, size, sampling_ratio)


class FeatureNorm(nn.Module):
    """Per-channel standardization with the training cache's statistics, held as buffers so the
    checkpoint, the predictor and the exported ONNX all apply the same one (identity by default)."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def set(self, mean, std) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 whatever the input and autocast: in fp16 a tiny standard deviation turns the
        # quotient inf and tiny deviations subnormal (the next layer casts it as autocast wants)
        with torch.autocast(x.device.type, enabled=False):
            return (x.float() - self.mean[:, None, None]) / self.std[:, None, None]


class MaskIoUHead(nn.Module):
    """Mask Scoring R-CNN's MaskIoU head, small: the decoder's ROI features and its predicted
    target-class probability (max-pooled to the ROI size) -> the predicted mask's IoU with the GT
    person, in [0, 1].  Both inputs are detached, so the head never changes a mask."""

    def __init__(self, channels: int, roi_size: int, mask_size: int, width: int = 64):
        super().__init__()
        self.pool = mask_size // roi_size
        self.convs = nn.Sequential(conv_gn_relu(channels + 1, width), conv_gn_relu(width, width))
        self.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, 1))

    def forward(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        target = logits.detach().float().softmax(1)[:, 1:2]
        target = F.max_pool2d(target, self.pool) if self.pool > 1 else target
        x = self.convs(torch.cat([feats.detach(), target.to(feats.dtype)], 1))
        return torch.sigmoid(self.fc(x.mean((2, 3))).float()[:, 0])


class FineFusion(nn.Module):
    """The fine-detail path (RefineMask / HQ-SAM style): the ROI read from a finer map (stride 4 or
    2, or the input image) at the mask size, normalized and reduced to ``width`` channels, then
    fused with the upsampled coarse decoder features: the coarse path says which person, the fine
    one where its outline runs.  A residual whose last conv starts at zero (zero-init residuals,
    Goyal et al. 2017): at the start the decoder is exactly the coarse one, and the fine map changes
    a mask only as far as training finds it useful (small sets cannot afford a noisy new path)."""

    def __init__(self, fine_channels: int, coarse_channels: int, size: int, width: int = 32, sampling_ratio: int = 2):
        super().__init__()
        self.norm = FeatureNorm(fine_channels)
        self.size, self.sampling_ratio = size, sampling_ratio   # a Python int: the exported RoiAlign's size
        self.reduce = conv_gn_relu(fine_channels, width, 1)
        last = nn.Conv2d(coarse_channels, coarse_channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.fuse = nn.Sequential(conv_gn_relu(coarse_channels + width, coarse_channels), last)

    @property
    def norm_conv(self) -> nn.Conv2d:
        """The 1x1 conv right after ``norm`` (export folds the normalization into it)."""
        return self.reduce[0]

    def set_norm_conv(self, conv: nn.Conv2d) -> None:
        self.reduce[0] = conv

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        x = self.reduce(self.norm(roi_features(fine, rois, self.size, self.sampling_ratio)))
        return coarse + self.fuse(torch.cat([coarse, x.to(coarse.dtype)], 1))


class RoiAlignDecoder(nn.Module):
    """ROIAlign (torchvision, aligned=True) -> normalization -> conv stack (GroupNorm) -> x2
    upsampling -> [fusion with a finer map] -> logits.

    Normalizing the ROIAlign output equals normalizing the map first (every sample of an in-image
    ROI is a convex combination of cells), at a fraction of the cost for large batches."""

    # what `export --half` runs in fp16 (ROIAlign and the ROI geometry stay fp32)
    HALF_STAGES = ("convs", "upsample", "fine.reduce", "fine.fuse", "classifier")

    def __init__(self, in_channels: int, hidden: int = 128, roi_size: int = 14, mask_size: int = 56,
                 num_classes: int = 3, num_convs: int = 4, sampling_ratio: int = 2, score_head: bool = False,
                 fine_channels: int = 0, fine_width: int = 32):
        """``fine_channels``: channels of the fine map (0: no fine path, the decoder of old checkpoints)."""
        super().__init__()
        self.num_classes = num_classes
        self.norm = FeatureNorm(in_channels)
        ups = math.log2(mask_size / roi_size)
        if ups < 0 or ups != int(ups):
            raise ValueError(f"mask size {mask_size} must be roi size {roi_size} x a power of 2")
        self.roi_size, self.mask_size, self.sampling_ratio = roi_size, mask_size, sampling_ratio
        layers = [conv_gn_relu(in_channels, hidden, 1)]
        layers += [conv_gn_relu(hidden, hidden) for _ in range(num_convs)]
        self.convs = nn.Sequential(*layers)
        ch = hidden
        up = []
        for _ in range(int(ups)):
            nxt = max(ch // 2, 16)
            up += [nn.ConvTranspose2d(ch, nxt, 2, stride=2), nn.ReLU(inplace=True), conv_gn_relu(nxt, nxt)]
            ch = nxt
        self.upsample = nn.Sequential(*up)
        self.fine = FineFusion(fine_channels, ch, mask_size, fine_width, sampling_ratio) if fine_channels else None
        self.classifier = nn.Conv2d(ch, num_classes, 1)
        self.score_head = MaskIoUHead(hidden, roi_size, mask_size) if score_head else None

    @property
    def norm_conv(self) -> nn.Conv2d:
        """The 1x1 conv right after ``norm`` (export folds the normalization into it)."""
        return self.convs[0][0]

    def set_norm_conv(self, conv: nn.Conv2d) -> None:
        self.convs[0][0] = conv

    def forward(self, features: torch.Tensor, rois: torch.Tensor, with_scores: bool = False,
                fine: torch.Tensor | None = None):
        """Logits [N, K, M, M]; ``with_scores``: (logits, predicted mask IoU [N] or None without a
        score head); ``fine``: the fine map [B, Cf, Hs, Ws] (needed by a decoder with a fine path).
        One call, so DDP sees every parameter that takes part."""
        x = self.convs(self.norm(roi_features(features, rois, self.roi_size, self.sampling_ratio)))
        up = self.upsample(x)
        if self.fine is not None:
            if fine is None:
                raise ValueError("this decoder was trained with a fine map (cache --fine-feature): pass it")
            up = self.fine(up, fine, rois)
        logits = self.classifier(up)
        if not with_scores:
            return logits
        return logits, (self.score_head(x, logits) if self.score_head is not None else None)


class GlobalContextDecoder(nn.Module):
    """Whole feature map + ROI channels on the grid -> small U-Net -> ROI logits (ablation).

    ROI channels: inside-ROI flag, x and y relative to the ROI (centre 0, edges +-1), and the ROI's
    width and height.  Logits are read back on the ROI grid with ROIAlign.
    """

    HALF_STAGES = ("reduce", "enc1", "enc2", "enc3", "dec2", "dec1", "classifier")

    def __init__(self, in_channels: int, hidden: int = 64, mask_size: int = 56, num_classes: int = 3,
                 **_):
        super().__init__()
        self.mask_size, self.num_classes = mask_size, num_classes
        self.norm = FeatureNorm(in_channels)
        h = hidden
        self.reduce = conv_gn_relu(in_channels, h, 1)
        self.enc1 = nn.Sequential(conv_gn_relu(h + 5, h), conv_gn_relu(h, h))
        self.enc2 = nn.Sequential(conv_gn_relu(h, 2 * h), conv_gn_relu(2 * h, 2 * h))
        self.enc3 = nn.Sequential(conv_gn_relu(2 * h, 2 * h), conv_gn_relu(2 * h, 2 * h))
        self.dec2 = nn.Sequential(conv_gn_relu(4 * h, 2 * h), conv_gn_relu(2 * h, h))
        self.dec1 = nn.Sequential(conv_gn_relu(2 * h, h), conv_gn_relu(h, h))
        self.classifier = nn.Conv2d(h, num_classes, 1)

    @staticmethod
    def roi_channels(rois: torch.Tensor, hw, dtype) -> torch.Tensor:
        h, w = hw
        ys = (torch.arange(h, device=rois.device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=rois.device, dtype=torch.float32) + 0.5) / w
        x1, y1, x2, y2 = (rois[:, k, None, None].float() for k in range(1, 5))
        bw, bh = (x2 - x1).clamp_min(1e-4), (y2 - y1).clamp_min(1e-4)
        rx = (xs[None, None, :] - (x1 + x2) / 2) / (bw / 2)
        ry = (ys[None, :, None] - (y1 + y2) / 2) / (bh / 2)
        rx, ry = rx.expand(-1, h, -1), ry.expand(-1, -1, w)
        inside = ((rx.abs() <= 1) & (ry.abs() <= 1)).float()
        return torch.stack([inside, rx.clamp(-4, 4), ry.clamp(-4, 4),
                            bw.expand(-1, h, w), bh.expand(-1, h, w)], 1).to(dtype)

    @property
    def norm_conv(self) -> nn.Conv2d:
        return self.reduce[0]

    def set_norm_conv(self, conv: nn.Conv2d) -> None:
        self.reduce[0] = conv

    def forward(self, features: torch.Tensor, rois: torch.Tensor, with_scores: bool = False, fine=None):
        hw = features.shape[-2:]
        base = self.reduce(self.norm(features))[rois[:, 0].long()]
        x1 = self.enc1(torch.cat([base, self.roi_channels(rois, hw, base.dtype)], 1))
        x2 = self.enc2(F.max_pool2d(x1, 2))
        x3 = self.enc3(F.max_pool2d(x2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(x3, size=x2.shape[-2:]), x2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=x1.shape[-2:]), x1], 1))
        boxes = rois_to_feature_boxes(rois.float(), hw)
        boxes[:, 0] = torch.arange(len(rois), device=rois.device, dtype=boxes.dtype)
        crop = roi_align_fp32_boxes(d1, boxes, self.mask_size)
        logits = self.classifier(crop)
        return (logits, None) if with_scores else logits   # no score head


class MeanShapePrior(nn.Module):
    """Baseline: one learned K x M x M logit map for every ROI; sees neither features nor box.

    What a decoder can score from the box alone (the average person inside a padded box).  Adam
    moves a parameter by ~lr per step: a per-pixel logit map would need thousands of steps to reach
    its optimum, so the map is ``GAIN`` x the parameter and converges within the decoder's schedule."""

    GAIN = 50.0
    HALF_STAGES = ()

    def __init__(self, in_channels: int, mask_size: int = 56, num_classes: int = 3, **_):
        super().__init__()
        self.mask_size, self.num_classes = mask_size, num_classes
        self.norm = FeatureNorm(in_channels)  # unused; keeps every model's state alike
        self.logits = nn.Parameter(torch.zeros(num_classes, mask_size, mask_size))

    def forward(self, features: torch.Tensor, rois: torch.Tensor, with_scores: bool = False, fine=None):
        logits = (self.GAIN * self.logits)[None].expand(rois.shape[0], -1, -1, -1).to(features.dtype)
        return (logits, None) if with_scores else logits   # no score head


MODELS = {"roialign": RoiAlignDecoder, "global": GlobalContextDecoder, "prior": MeanShapePrior}


def build_model(name: str, in_channels: int, feature_stats=None, fine_stats=None, **kw) -> nn.Module:
    """``feature_stats``: (mean, std) per channel, applied first by the decoder (None: identity);
    ``fine_stats``: the same for the fine map."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    model = MODELS[name](in_channels, **kw)
    if feature_stats is not None:
        model.norm.set(*feature_stats)
    if fine_stats is not None and getattr(model, "fine", None) is not None:
        model.fine.norm.set(*fine_stats)
    return model


def decode_rois(model, features: torch.Tensor, rois: torch.Tensor, fine: torch.Tensor | None = None):
    """``model(features, rois, with_scores=True[, fine=fine])``: (logits, scores or None).  ``fine``
    is passed only when there is one, so decoders of the older interface (no such argument) run too."""
    return model(features, rois, with_scores=True, **({} if fine is None else {"fine": fine}))


def mask_certainty(fg: torch.Tensor) -> torch.Tensor:
    """[N] in [0, 1) from the class-1 probabilities ``fg`` [N, M, M] of each ROI's grid:
    ``S / (S + U + 1)``, ``S`` the summed probability (the soft mask area, in cells), ``U`` the cells
    whose probability lies in the unsure band (0.25, 0.75).  A mask whose outline the decoder is
    unsure of is more often wrong: on held-out real images this ranks masks by their true IoU at
    0.44 where the mean probability inside the mask ranks them at 0.25 (docs/benchmarks.md).  The
    +1 makes an empty mask score 0, not 1."""
    p = fg.float()
    soft_area = p.sum((1, 2))
    unsure = ((UNSURE - (p - 0.5).abs()) / RAMP + 0.5).clamp(0, 1).sum((1, 2))
    return soft_area / (soft_area + unsure + 1)


def mask_scores(fg: torch.Tensor, head_scores: torch.Tensor | None = None) -> torch.Tensor:
    """Each ROI mask's quality score [N] (``fg`` [N, M, M]: its class-1 probabilities): the score
    head's predicted mask IoU when the decoder has one (``decode_rois``), else its certainty."""
    return head_scores.float() if head_scores is not None else mask_certainty(fg)


def uses_fine(model: nn.Module) -> bool:
    """Whether the decoder reads a fine map (``cache --fine-feature``)."""
    return getattr(model, "fine", None) is not None


def load_decoder_state(model: nn.Module, state: dict) -> None:
    """Load weights; checkpoints from before feature normalization get the identity (no-op) one."""
    state = dict(state)
    for k, v in model.state_dict().items():
        if k.startswith("norm.") and k not in state:
            state[k] = v
    model.load_state_dict(state)


def interp_weights(lo: torch.Tensor, hi: torch.Tensor, n_out: int, m: int, dtype) -> torch.Tensor:
    """[N, n_out, m] bilinear weights from m ROI-grid cells to the n_out frame pixels along one
    axis: pixel centre -> grid coordinate ``src``; weight of cell j = relu(1 - |src - j|), which is
    0 outside the ROI (grid_sample, align_corners=False, zero padding)."""
    c = torch.arange(n_out, device=lo.device, dtype=dtype) + 0.5
    src = (c[None] - lo[:, None]) / (hi - lo).clamp_min(1e-6)[:, None] * m - 0.5
    j = torch.arange(m, device=lo.device, dtype=dtype)
    return (1 - (src[:, :, None] - j).abs()).clamp_min(0)


def paste_masks(probs: torch.Tensor, boxes_px: torch.Tensor, height: int, width: int,
                fill_background: bool = True) -> torch.Tensor:
    """Paste ROI-grid maps [N, K, M, M] into a [N, K, height, width] frame (bilinear).

    ``boxes_px`` are xyxy in the target frame's pixels.  Like detectron2's ``_do_paste_mask``:
    each frame pixel centre is mapped into the ROI grid and interpolated bilinearly (the values of
    ``grid_sample``), computed as two batched matmuls, out = Ay @ P @ Ax^T, because bilinear
    interpolation is separable (~4-6x faster than ``grid_sample`` on a CPU when measured, 2026-11-27;
    the export latency rows of docs/benchmarks.md compare the graphs).  Outside the ROI
    the maps are 0; with ``fill_background`` channel 0 gets the missing probability so every pixel's
    classes still sum to 1 (background outside the ROI).
    """
    dt = probs.dtype
    b = boxes_px.to(dt)
    ay = interp_weights(b[:, 1], b[:, 3], height, probs.shape[-2], dt)[:, None]   # [N,1,H,M]
    ax = interp_weights(b[:, 0], b[:, 2], width, probs.shape[-1], dt)[:, None]    # [N,1,W,M]
    out = ay @ probs @ ax.transpose(-1, -2)
    if fill_background:
        missing = 1 - out.sum(1)
        out = torch.cat([out[:, :1] + missing[:, None], out[:, 1:]], 1)
    return out
