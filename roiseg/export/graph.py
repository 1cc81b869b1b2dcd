"""The exported decoder as a module (``DecoderExport``): pad the person boxes, decode, paste the class-1
channel, the instance map; the feature normalization folded into the first conv; ``--half``.

Decoder graph inputs: ``features [B,C,Hf,Wf]``, ``rois [N,5]`` (batch index + normalized *person*
box, xyxy, model-input frame), for letterboxed decoders ``image_rects [B,4]``, and for decoders with
the fine path (``cache --fine-feature``) ``fine [B,Cf,Hs,Ws]``.  The graph pads
each box by the training ROI padding (``roiseg.common.geometry.pad_box``), decodes it and pastes it back at
model-input resolution inside the graph (like segment-anything's ``utils/onnx.py``).  Outputs
(``OUTPUT_DOC``, also written into the ONNX metadata):

* ``masks [N,H,W]``: the target person at input resolution: uint8 0/1 (class-1 probability >
  ``mask_threshold``), or with ``masks="prob"`` the class-1 probability as fp16;
* ``instance_map [B,H,W]`` int16: 0 background, k = the k-th ROI (``rois[k-1]``) where its mask is
  set; overlaps go to the higher class-1 probability;
* ``logits [N,K,M,M]``: the ROI grid, for users who paste themselves; ``roi_boxes [N,4]``: where the
  grid lies (the padded ROI in input pixels);
* ``probs [N,K,H,W]`` (only with ``full_probs``): all classes pasted, 3 x 4 bytes per pixel and ROI;
* ``scores [N]``: each mask's quality score (``roiseg.modeling.decoders.mask_scores``).

Only the class-1 channel is pasted (separable bilinear matmuls, ``roiseg.modeling.decoders.paste_masks``):
compact outputs cost ~1 byte per pixel and ROI instead of 12.  Ops: RoiAlign (opset 16+,
half_pixel = aligned=True), MatMul, Conv/ConvTranspose, InstanceNormalization (GroupNorm),
Softmax, ArgMax: all built natively by ONNX Runtime and TensorRT >= 8.6.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from roiseg.common.errors import RoisegError
from roiseg.common.geometry import pad_box
from roiseg.data.store_meta import FeatureSource
from roiseg.modeling.decoders import (
    FeatureNorm,
    decode_rois,
    interp_weights,
    mask_scores,
    paste_masks,
)

log = logging.getLogger(__name__)


OUTPUT_DOC = {
    "masks": "[N,H,W] target person at input resolution: uint8 0/1 (class-1 probability > mask_threshold) "
             "or fp16 class-1 probability (mask_format=prob)",
    "instance_map": "[B,H,W] int16: 0 background, k = rois[k-1]'s person; overlaps go to the higher probability",
    "logits": "[N,K,M,M] decoder logits on the padded ROI's grid (0 background, 1 target, 2 other persons)",
    "roi_boxes": "[N,4] the padded ROI in input pixels (xyxy): where the logits grid lies",
    "probs": "[N,K,H,W] all class probabilities pasted at input resolution (export --full-probs)",
    "scores": "[N] each mask's quality score in [0, 1]: the score head's predicted mask IoU (decoders trained "
              "with --score-head), else the mask's certainty (few ROI-grid cells with a class-1 probability "
              "in 0.25-0.75); predict multiplies it by the detector's score",
}


class ExportError(RoisegError):
    pass


@dataclass(frozen=True)
class ExportSpec:
    """Everything that shapes the exported graph."""
    in_channels: int
    input_hw: tuple
    feat_hw: tuple
    roi_padding: float
    letterbox: bool = False     # graph input image_rects [B,4]: ROIs are clipped to each image's content
    masks: str = "binary"       # binary: uint8 0/1 | prob: fp16 class-1 probability
    threshold: float = 0.5
    full_probs: bool = False    # also the old probs [N,K,H,W] output
    half: bool = False          # fp16 weights and activations in the conv stack
    fine_shape: tuple | None = None   # [Cf, Hs, Ws] of the fine map the decoder fuses (graph input fine)

    def __post_init__(self):
        if self.masks not in ("binary", "prob"):
            raise ValueError(f"masks must be binary or prob, not {self.masks!r}")

    @classmethod
    def from_source(cls, source: FeatureSource, **kw) -> "ExportSpec":
        """For a decoder of ``source``'s features (``CheckpointRecord.source``: its fine map only
        when the decoder fuses one)."""
        c, hf, wf = source.feature_shape
        return cls(c, tuple(source.input_hw), (hf, wf), source.roi_padding, source.policy.mode == "letterbox",
                   fine_shape=tuple(source.fine.shape) if source.fine else None, **kw)

    @property
    def inputs(self) -> list[str]:
        return (["features", "rois"] + (["image_rects"] if self.letterbox else [])
                + (["fine"] if self.fine_shape else []))

    @property
    def outputs(self) -> list[str]:
        return ["masks", "instance_map", "logits", "roi_boxes"] + (["probs"] if self.full_probs else []) + ["scores"]


def fold_feature_norm(model: nn.Module) -> nn.Module:
    """A copy with each ``FeatureNorm`` folded into the 1x1 conv right after it (``norm_conv``):
    W (x - m) / s = (W / s) x - W m / s.  Same function, two fewer full passes over the ROI features
    (the broadcast Sub/Div cost ~1 ms per ROI at 1024 channels in ONNX Runtime)."""
    model = copy.deepcopy(model)
    for mod in list(model.modules()):
        conv = getattr(mod, "norm_conv", None)
        if conv is None or not isinstance(getattr(mod, "norm", None), FeatureNorm):
            continue
        mean, std = mod.norm.mean.double(), mod.norm.std.double()
        w = conv.weight.double()                                   # [O, C, 1, 1]
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=True)
        bias = conv.bias.double() if conv.bias is not None else 0
        folded.weight.data = (w / std[None, :, None, None]).float()
        folded.bias.data = (bias - w[:, :, 0, 0] @ (mean / std)).float()
        mod.set_norm_conv(folded)
        mod.norm = nn.Identity()
    return model


def paste_minus(maps: torch.Tensor, boxes_px: torch.Tensor, height: int, width: int,
                shift: torch.Tensor) -> torch.Tensor:
    """``paste_masks(maps) - shift`` for one channel [N,M,M] -> [N,H,W] (``shift`` [N]), with the
    shift inside the matmuls (a row/column of ones and a -shift corner: [Ay 1] [[P 0] [0 -shift]]
    [Ax 1]^T): a full-frame pass fewer than subtracting afterwards (~0.45 ms per ROI on a CPU)."""
    n, m = maps.shape[0], maps.shape[-1]
    b = boxes_px.to(maps.dtype)
    ones_h = torch.ones(n, height, 1, dtype=maps.dtype, device=maps.device)
    ones_w = torch.ones(n, width, 1, dtype=maps.dtype, device=maps.device)
    ay = torch.cat([interp_weights(b[:, 1], b[:, 3], height, m, maps.dtype), ones_h], 2)    # [N,H,M+1]
    ax = torch.cat([interp_weights(b[:, 0], b[:, 2], width, m, maps.dtype), ones_w], 2)     # [N,W,M+1]
    corner = torch.zeros(m + 1, m + 1, dtype=maps.dtype, device=maps.device)
    corner[m, m] = -1.0
    return ay @ (F.pad(maps, (0, 1, 0, 1)) + corner * shift[:, None, None]) @ ax.transpose(1, 2)


class _Half(nn.Module):
    """Run ``inner`` in fp16: cast in, cast out."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner.half()

    def forward(self, x):
        return self.inner(x.half()).float()


def half_conv_stack(model: nn.Module) -> nn.Module:
    """A copy whose conv stages (``model.HALF_STAGES``) hold fp16 weights and compute in fp16.
    ROI geometry, ROIAlign, softmax and the paste stay fp32: in fp16 a 640-pixel coordinate is
    only good to 0.5 px."""
    stages = getattr(model, "HALF_STAGES", None)
    if stages is None:
        raise ExportError(f"--half: {type(model).__name__} does not say which stages run in fp16 (HALF_STAGES)")
    model = copy.deepcopy(model)
    for name in stages:   # "fine.reduce": a stage of a submodule (absent without the fine path)
        *path, last = name.split(".")
        owner = model
        for p in path:
            owner = getattr(owner, p, None)
        if owner is not None:
            setattr(owner, last, _Half(getattr(owner, last)))
    return model


class DecoderExport(nn.Module):
    """The exported graph as a module: pad the person boxes, decode, paste the class-1 channel.

    ``letterbox``: ROIs are clipped to ``image_rects`` (each image's content rectangle in the input
    frame, normalized xyxy; ``roiseg.common.geometry.content_rect``) exactly as training clipped them
    to the original image."""

    def __init__(self, model: nn.Module, spec: ExportSpec, as_exported: bool = True):
        """``as_exported``: the normalization folded and ``spec.half`` applied, as in the written
        graph; False: the model as trained (the parity reference)."""
        super().__init__()
        model = model.eval()
        if as_exported:
            model = fold_feature_norm(model)
            model = half_conv_stack(model) if spec.half else model
        self.model = model
        self.spec = spec

    def decode(self, features, rois, image_rects=None, fine=None) -> dict:
        s = self.spec
        h, w = s.input_hw
        # A whole-image ROI is put first and dropped again: ONNX Runtime cannot reshape the
        # GroupNorm of an empty batch (N = 0 must still run), and as ROI 0 with probability 0
        # it makes the instance map a single ArgMax: pixels no person claims tie at 0 -> index 0.
        whole = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]], dtype=rois.dtype, device=rois.device)
        rois = torch.cat([whole, rois], 0)
        if image_rects is None:
            padded = pad_box(rois[:, 1:5], s.roi_padding, 0.0, 1.0)
        else:
            rect = image_rects[rois[:, 0].long()]
            padded = pad_box(rois[:, 1:5], s.roi_padding, rect[:, [0, 1, 0, 1]], rect[:, [2, 3, 2, 3]])
        logits, quality = decode_rois(self.model, features, torch.cat([rois[:, :1], padded], 1), fine)
        px = padded * torch.tensor([w, h, w, h], dtype=padded.dtype, device=padded.device)
        prob = logits.float().softmax(1)
        real = (torch.arange(rois.shape[0], device=prob.device) > 0).to(prob.dtype)
        # fg - t for the persons, exactly 0 for ROI 0: [N+1,H,W]
        above = paste_minus(prob[:, 1] * real[:, None, None], px, h, w, s.threshold * real)
        # Per pixel the ROI of that image with the highest class-1 probability above the threshold.
        # ROI 0 scores 0 everywhere and ArgMax takes the first of ties: 0 where no person is above.
        own = rois[:, 0].long()[None, :] == torch.arange(features.shape[0], device=above.device)[:, None]
        score = above[None] * own[:, :, None, None].to(above.dtype)     # [B,N+1,H,W]
        instance_map = score.argmax(1).to(torch.int16)
        fg = above[1:] + s.threshold
        out = {"masks": (above > 0).to(torch.uint8)[1:] if s.masks == "binary" else fg.half(),
               "instance_map": instance_map, "logits": logits[1:].float(), "roi_boxes": px[1:], "fg": fg}
        if s.full_probs:
            out["probs"] = paste_masks(prob[1:], px[1:], h, w)
        out["scores"] = mask_scores(prob[1:, 1], None if quality is None else quality[1:])
        return out

    def forward(self, *inputs):
        """The graph's inputs in ``spec.inputs`` order."""
        named = dict(zip(self.spec.inputs, inputs))
        out = self.decode(named["features"], named["rois"], named.get("image_rects"), named.get("fine"))
        return tuple(out[k] for k in self.spec.outputs)


def sample_inputs(spec: ExportSpec, n_rois: int, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, spec.in_channels, *spec.feat_hw, generator=g)
    xy = torch.rand(n_rois, 2, generator=g) * 0.6
    wh = torch.rand(n_rois, 2, generator=g) * 0.35 + 0.05
    idx = (torch.arange(n_rois) % batch).float()[:, None]
    inputs = (feats, torch.cat([idx, xy, xy + wh], 1))
    if spec.letterbox:   # content bands like a 2:1 and a 1:2 image
        rects = torch.tensor([[0.0, 0.25, 1.0, 0.75], [0.25, 0.0, 0.75, 1.0]])[torch.arange(batch) % 2]
        inputs += (rects,)
    if spec.fine_shape:
        inputs += (torch.randn(batch, *spec.fine_shape, generator=g),)
    return inputs


