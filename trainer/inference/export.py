"""ONNX export of the trained decoder (and optionally extractor + decoder as one graph).

Decoder graph: ``features [B,C,Hf,Wf]`` + ``rois [N,5]`` (batch index + normalized *person* box,
xyxy, model-input frame; letterboxed decoders also take ``image_rects [B,4]``) -> ``probs [N,K,H,W]``
(padded by the training ROI padding with ``featcache.geometry.pad_box``, decoded and pasted back at
model-input resolution inside the graph, like segment-anything's ``utils/onnx.py``), ``logits
[N,K,M,M]`` (ROI grid) and ``roi_boxes [N,4]`` (the padded ROI in input pixels: where the grid lies).  Ops: RoiAlign (opset 16+, half_pixel = aligned=True),
MatMul (separable bilinear paste-back), Conv/ConvTranspose, InstanceNormalization (GroupNorm at opset 17),
Softmax: all built natively by ONNX Runtime and TensorRT >= 8.6.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from featcache.errors import FeatCacheError
from featcache.geometry import pad_box

from ..models import paste_masks

log = logging.getLogger(__name__)
PARITY_TOL = 1e-3


class ExportError(FeatCacheError):
    pass


class DecoderExport(nn.Module):
    """``letterbox``: the graph takes ``image_rects [B,4]`` too (each image's content rectangle in
    the input frame, normalized xyxy; ``featcache.geometry.content_rect``), and ROIs are clipped to
    it exactly as training clipped them to the original image."""

    def __init__(self, model: nn.Module, input_hw, roi_padding: float, letterbox: bool = False):
        super().__init__()
        self.model, self.input_hw, self.roi_padding = model.eval(), tuple(input_hw), float(roi_padding)
        self.letterbox = letterbox

    def forward(self, features: torch.Tensor, rois: torch.Tensor, image_rects: torch.Tensor | None = None):
        h, w = self.input_hw
        n = rois.shape[0]
        # One whole-image ROI is appended and dropped again: ONNX Runtime cannot reshape the
        # GroupNorm of an empty batch, and N = 0 must still run.
        whole = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]], dtype=rois.dtype, device=rois.device)
        rois = torch.cat([rois, whole], 0)
        if image_rects is None:
            padded = pad_box(rois[:, 1:5], self.roi_padding, 0.0, 1.0)
        else:
            rect = image_rects[rois[:, 0].long()]
            padded = pad_box(rois[:, 1:5], self.roi_padding, rect[:, [0, 1, 0, 1]], rect[:, [2, 3, 2, 3]])
        r = torch.cat([rois[:, :1], padded], 1)
        logits = self.model(features, r)
        px = padded * torch.tensor([w, h, w, h], dtype=padded.dtype, device=padded.device)
        probs = paste_masks(logits.softmax(1), px, h, w)
        return probs[:n], logits[:n], px[:n]


OUTPUTS = ["probs", "logits", "roi_boxes"]


def input_names(letterbox: bool) -> list[str]:
    return ["features", "rois"] + (["image_rects"] if letterbox else [])


def sample_inputs(in_channels: int, feat_hw, n_rois: int, batch: int = 2, seed: int = 0, letterbox: bool = False):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, in_channels, *feat_hw, generator=g)
    xy = torch.rand(n_rois, 2, generator=g) * 0.6
    wh = torch.rand(n_rois, 2, generator=g) * 0.35 + 0.05
    idx = (torch.arange(n_rois) % batch).float()[:, None]
    inputs = (feats, torch.cat([idx, xy, xy + wh], 1))
    if letterbox:   # content bands like a 2:1 and a 1:2 image
        rects = torch.tensor([[0.0, 0.25, 1.0, 0.75], [0.25, 0.0, 0.75, 1.0]])[torch.arange(batch) % 2]
        inputs += (rects,)
    return inputs


def export_decoder(model, in_channels: int, input_hw, feat_hw, roi_padding: float, out: Path,
                   opset: int = 17, meta: dict | None = None, letterbox: bool = False) -> Path:
    wrapper = DecoderExport(model.cpu().float(), input_hw, roi_padding, letterbox)
    inputs = sample_inputs(in_channels, feat_hw, 6, letterbox=letterbox)
    names = input_names(letterbox)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    dyn = {"features": {0: "B"}, "rois": {0: "N"}, "probs": {0: "N"}, "logits": {0: "N"}, "roi_boxes": {0: "N"}}
    if letterbox:
        dyn["image_rects"] = {0: "B"}
    try:
        with torch.no_grad():
            torch.onnx.export(wrapper, inputs, str(tmp), input_names=names, output_names=OUTPUTS,
                              opset_version=opset, dynamo=False, dynamic_axes=dyn)
        m = onnx.load(str(tmp))
        for k, v in {"roi_padding": roi_padding, "input_hw": list(input_hw), **(meta or {})}.items():
            m.metadata_props.append(onnx.StringStringEntryProto(key=str(k), value=str(v)))
        save_onnx_atomic(m, out, tmp)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def save_onnx_atomic(model: onnx.ModelProto, out: Path, tmp: Path | None = None) -> Path:
    """Temp name + rename: a full disk leaves the previous file at ``out``, never a truncated one."""
    tmp = tmp or out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, out)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return out


def check_parity(model, onnx_path: Path, in_channels: int, input_hw, feat_hw, roi_padding: float,
                 tol: float = PARITY_TOL, letterbox: bool = False) -> dict:
    """ORT vs PyTorch for N = 1, 5 (ROIs from two images) and N = 0; raises over ``tol``."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    wrapper = DecoderExport(model.cpu().float(), input_hw, roi_padding, letterbox)
    report = {}
    for n, batch in ((1, 1), (5, 2), (0, 2)):
        inputs = sample_inputs(in_channels, feat_hw, n, batch, seed=n + 1, letterbox=letterbox)
        with torch.no_grad():
            ref = [t.numpy() for t in wrapper(*inputs)]
        got = sess.run(None, {k: v.numpy() for k, v in zip(input_names(letterbox), inputs)})
        if any(g.shape != r.shape for g, r in zip(got, ref)):
            raise ExportError(f"ONNX output shapes {[g.shape for g in got]} != PyTorch {[r.shape for r in ref]} (N={n})")
        diff = max((float(np.abs(g - r).max()) if g.size else 0.0) for g, r in zip(got, ref))
        report[f"N={n}"] = diff
        if diff > tol:
            raise ExportError(f"ONNX/PyTorch parity failed for N={n}: max abs difference {diff:.3g} > {tol}")
    return report


def decoder_latency(onnx_path: Path, in_channels: int, feat_hw, counts=(1, 5, 20, 50), repeat: int = 5) -> dict:
    import onnxruntime as ort
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    letterbox = any(i.name == "image_rects" for i in sess.get_inputs())
    out = {}
    for n in counts:
        arrays = sample_inputs(in_channels, feat_hw, n, 1, letterbox=letterbox)
        inputs = {k: v.numpy() for k, v in zip(input_names(letterbox), arrays)}
        sess.run(None, inputs)
        t = time.perf_counter()
        for _ in range(repeat):
            sess.run(None, inputs)
        out[n] = round((time.perf_counter() - t) / repeat * 1000, 2)
    return out


def export_end_to_end(extractor_onnx: Path, feature_name: str, decoder_onnx: Path, out: Path) -> Path:
    """Join extractor and decoder into one graph: images [1,3,H,W] + rois (+ image_rects) ->
    probs, logits, roi_boxes."""
    from featcache.extractor import expose_tensor
    ext = expose_tensor(onnx.load(str(extractor_onnx)), feature_name)
    dec = onnx.load(str(decoder_onnx))
    ver = lambda m: max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))  # noqa: E731
    target = max(ver(ext), ver(dec))
    if ver(ext) != target:
        ext = onnx.version_converter.convert_version(ext, target)
    if ver(dec) != target:
        dec = onnx.version_converter.convert_version(dec, target)
    ext.ir_version = dec.ir_version = max(ext.ir_version, dec.ir_version)
    merged = onnx.compose.merge_models(ext, dec, io_map=[(feature_name, "features")], prefix2="decoder/",
                                       outputs=[f"decoder/{o}" for o in OUTPUTS])
    _rename(merged.graph, {f"decoder/{k}": k for k in ["rois", "image_rects"] + OUTPUTS})
    onnx.checker.check_model(merged)
    return save_onnx_atomic(merged, Path(out))


def _rename(graph, names: dict) -> None:
    for v in list(graph.input) + list(graph.output):
        v.name = names.get(v.name, v.name)
    for node in graph.node:
        node.input[:] = [names.get(x, x) for x in node.input]
        node.output[:] = [names.get(x, x) for x in node.output]
