"""ONNX export of the trained decoder (and optionally extractor + decoder as one graph).

Decoder graph inputs: ``features [B,C,Hf,Wf]``, ``rois [N,5]`` (batch index + normalized *person*
box, xyxy, model-input frame) and, for letterboxed decoders, ``image_rects [B,4]``.  The graph pads
each box by the training ROI padding (``featcache.geometry.pad_box``), decodes it and pastes it back at
model-input resolution inside the graph (like segment-anything's ``utils/onnx.py``).  Outputs
(``OUTPUT_DOC``, also written into the ONNX metadata):

* ``masks [N,H,W]``: the target person at input resolution: uint8 0/1 (class-1 probability >
  ``mask_threshold``), or with ``masks="prob"`` the class-1 probability as fp16;
* ``instance_map [B,H,W]`` int16: 0 background, k = the k-th ROI (``rois[k-1]``) where its mask is
  set; overlaps go to the higher class-1 probability;
* ``logits [N,K,M,M]``: the ROI grid, for users who paste themselves; ``roi_boxes [N,4]``: where the
  grid lies (the padded ROI in input pixels);
* ``probs [N,K,H,W]`` (only with ``full_probs``): all classes pasted, 3 x 4 bytes per pixel and ROI.

Only the class-1 channel is pasted (separable bilinear matmuls, ``trainer.models.paste_masks``):
compact outputs cost ~1 byte per pixel and ROI instead of 12.  Ops: RoiAlign (opset 16+,
half_pixel = aligned=True), MatMul, Conv/ConvTranspose, InstanceNormalization (GroupNorm),
Softmax, ArgMax: all built natively by ONNX Runtime and TensorRT >= 8.6.
"""
from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from roiseg.featcache.errors import FeatCacheError
from roiseg.featcache.files import atomic_write
from roiseg.featcache.geometry import pad_box
from roiseg.trainer.models import FeatureNorm, interp_weights, paste_masks

log = logging.getLogger(__name__)
PARITY_TOL = 1e-3
HALF_TOL = 1e-2      # fp16 conv stack: max abs difference allowed (probabilities, relative logits)

OUTPUT_DOC = {
    "masks": "[N,H,W] target person at input resolution: uint8 0/1 (class-1 probability > mask_threshold) "
             "or fp16 class-1 probability (mask_format=prob)",
    "instance_map": "[B,H,W] int16: 0 background, k = rois[k-1]'s person; overlaps go to the higher probability",
    "logits": "[N,K,M,M] decoder logits on the padded ROI's grid (0 background, 1 target, 2 other persons)",
    "roi_boxes": "[N,4] the padded ROI in input pixels (xyxy): where the logits grid lies",
    "probs": "[N,K,H,W] all class probabilities pasted at input resolution (export --full-probs)",
}


class ExportError(FeatCacheError):
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

    def __post_init__(self):
        if self.masks not in ("binary", "prob"):
            raise ValueError(f"masks must be binary or prob, not {self.masks!r}")

    @classmethod
    def from_meta(cls, meta: dict, **kw) -> "ExportSpec":
        """From a checkpoint's cache metadata (``decoder_from_checkpoint``)."""
        c, hf, wf = meta["feature_shape"]
        return cls(c, tuple(meta["input_hw"]), (hf, wf), float(meta["roi_padding"]),
                   meta["preprocess"]["policy"]["mode"] == "letterbox", **kw)

    @property
    def inputs(self) -> list[str]:
        return ["features", "rois"] + (["image_rects"] if self.letterbox else [])

    @property
    def outputs(self) -> list[str]:
        return ["masks", "instance_map", "logits", "roi_boxes"] + (["probs"] if self.full_probs else [])


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
    for name in stages:
        setattr(model, name, _Half(getattr(model, name)))
    return model


class DecoderExport(nn.Module):
    """The exported graph as a module: pad the person boxes, decode, paste the class-1 channel.

    ``letterbox``: ROIs are clipped to ``image_rects`` (each image's content rectangle in the input
    frame, normalized xyxy; ``featcache.geometry.content_rect``) exactly as training clipped them
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

    def decode(self, features, rois, image_rects=None) -> dict:
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
        logits = self.model(features, torch.cat([rois[:, :1], padded], 1))
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
        return out

    def forward(self, features, rois, image_rects=None):
        out = self.decode(features, rois, image_rects)
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
    return inputs


def export_metadata(spec: ExportSpec, meta: dict | None = None) -> dict:
    """Key -> string for the ONNX metadata: the graph's contract and what predict needs."""
    out = {"roi_padding": spec.roi_padding, "input_hw": list(spec.input_hw), "mask_format": spec.masks,
           "mask_threshold": spec.threshold, "half": spec.half, "outputs": {k: OUTPUT_DOC[k] for k in spec.outputs},
           **(meta or {})}
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in out.items()}


def predictor_metadata(meta: dict, checkpoint: str) -> dict:
    """What an ONNX-only predictor needs from the checkpoint: the extractor tensor and its sha256,
    the preprocessing, the ROI padding, the feature shape."""
    keep = ("feature_name", "feature_shape", "preprocess", "roi_padding", "input_hw", "onnx_sha256", "onnx_path")
    return {"checkpoint": checkpoint, "featcache": {k: meta[k] for k in keep if k in meta}}


MIN_OPSET = 16     # RoiAlign with coordinate_transformation_mode=half_pixel (aligned=True)


def supported_opsets() -> range:
    """Opsets this installation can both write (torch's TorchScript exporter) and run (ONNX Runtime)."""
    from functools import lru_cache

    @lru_cache(maxsize=1)
    def ort_max() -> int:
        import onnxruntime as ort
        from onnx import TensorProto, helper
        best = MIN_OPSET
        for v in range(MIN_OPSET, 40):
            g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
            m = helper.make_model(g, opset_imports=[helper.make_opsetid("", v)], ir_version=8)
            try:
                ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            except Exception:  # noqa: BLE001 - the first opset it refuses ends the range
                break
            best = v
        return best
    try:
        from torch.onnx._constants import (
            ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as torch_max,
        )
    except ImportError:
        torch_max = 20
    return range(MIN_OPSET, min(torch_max, ort_max()) + 1)


def check_opset(opset: int) -> None:
    ok = supported_opsets()
    if opset not in ok:
        raise ExportError(f"--opset {opset} is not supported here: torch writes and ONNX Runtime runs opsets "
                          f"{ok.start}-{ok.stop - 1} (RoiAlign needs 16+)")


def export_decoder(model, spec: ExportSpec, out: Path, opset: int = 17, meta: dict | None = None) -> Path:
    """Write the decoder graph to ``out`` (temp file + rename; ``export_checked`` also validates
    before the rename)."""
    wrapper = DecoderExport(model.cpu().float(), spec)
    inputs = sample_inputs(spec, 6)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dyn = {"features": {0: "B"}, "rois": {0: "N"}, "image_rects": {0: "B"}, "instance_map": {0: "B"},
           **{k: {0: "N"} for k in ("masks", "logits", "roi_boxes", "probs")}}
    dyn = {k: v for k, v in dyn.items() if k in spec.inputs + spec.outputs}
    with atomic_write(out) as tmp:
        # the tracer's notes (constant folding, Python values in the graph) are about its internals
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, inputs, str(tmp), input_names=spec.inputs, output_names=spec.outputs,
                              opset_version=opset, dynamo=False, dynamic_axes=dyn)
        m = onnx.load(str(tmp))
        for k, v in export_metadata(spec, meta).items():
            m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
        onnx.save(m, str(tmp))
    return out


def export_checked(model, spec: ExportSpec, out: Path, opset: int, meta: dict | None = None,
                   end_to_end: tuple | None = None) -> dict:
    """Write the decoder graph (and, with ``end_to_end`` = (extractor ONNX, feature name, path), the
    joined graph), check parity with PyTorch and that ONNX Runtime loads each, all on temp files;
    rename them into place only when everything passed, so a failure keeps the previous files."""
    check_opset(opset)
    out = Path(out)
    with atomic_write(out) as tmp_dec:
        export_decoder(model, spec, tmp_dec, opset, meta)
        report = check_parity(model, tmp_dec, spec)
        if end_to_end is not None:
            ext, feature_name, e2e = end_to_end
            with atomic_write(e2e) as tmp_e2e:
                export_end_to_end(ext, feature_name, tmp_dec, tmp_e2e)
                _session(tmp_e2e)
    return report


def _session(path: Path):
    """A CPU session of an exported graph; one that ONNX Runtime cannot load is an ``ExportError``."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
        raise ExportError(f"ONNX Runtime cannot load the exported graph: {str(exc).splitlines()[0][:300]}") from exc


def _ambiguous_pixels(fg: np.ndarray, idx: np.ndarray, batch: int, t: float, tol: float) -> np.ndarray:
    """[B,H,W]: pixels whose mask or instance decision is within ``tol`` of flipping: some ROI's
    probability within tol of the threshold, or two ROIs of the image within tol of each other."""
    amb = np.zeros((batch,) + fg.shape[1:], bool)
    for b in range(batch):
        f = fg[idx == b]
        if not len(f):
            continue
        amb[b] = (np.abs(f - t) <= tol).any(0)
        if len(f) > 1:
            top2 = -np.sort(-np.where(f > t, f, 0), 0)[:2]
            amb[b] |= (top2[0] > 0) & (top2[0] - top2[1] <= tol)
    return amb


def check_parity(model, onnx_path: Path, spec: ExportSpec, tol: float | None = None) -> dict:
    """ORT vs PyTorch (the unfolded fp32 model) for N = 1, 5 (ROIs of two images) and N = 0.

    Max abs difference of the float outputs (logits relative to their scale, at least 1); for
    ``masks`` (binary) and ``instance_map`` the number of differing pixels, each of which must be a
    pixel whose reference probability is within ``tol`` of its decision (the threshold or a
    competing ROI).  Raises over ``tol`` (``HALF_TOL`` for ``half`` graphs)."""
    tol = tol if tol is not None else (HALF_TOL if spec.half else PARITY_TOL)
    sess = _session(onnx_path)
    names = [o.name for o in sess.get_outputs()]
    if names != spec.outputs:
        raise ExportError(f"{onnx_path} has outputs {names}, expected {spec.outputs}")
    ref_wrapper = DecoderExport(model.cpu().float(), spec, as_exported=False)
    report = {"tolerance": tol}
    for n, batch in ((1, 1), (5, 2), (0, 2)):
        inputs = sample_inputs(spec, n, batch, seed=n + 1)
        with torch.no_grad():
            ref = {k: v.numpy() for k, v in ref_wrapper.decode(*inputs).items()}
        got = dict(zip(names, sess.run(None, {k: v.numpy() for k, v in zip(spec.inputs, inputs)})))
        idx = inputs[1][:, 0].numpy().astype(int)
        diff, flips = 0.0, 0
        for k in names:
            g, r = got[k], ref[k]
            if g.shape != r.shape or g.dtype != r.dtype:
                raise ExportError(f"ONNX output {k} {g.dtype}{list(g.shape)} != PyTorch {r.dtype}{list(r.shape)} (N={n})")
            if not g.size:
                continue
            if g.dtype in (np.uint8, np.int16):
                amb = _ambiguous_pixels(ref["fg"], idx, batch, spec.threshold, tol)
                bad = g != r
                wrong = bad & ~(amb if k == "instance_map" else amb[idx])
                if wrong.any():
                    raise ExportError(f"ONNX/PyTorch parity failed for N={n}: {int(wrong.sum())} pixels of {k} "
                                      f"differ away from a decision boundary")
                flips += int(bad.sum())
            else:
                d = np.abs(g.astype(np.float64) - r).max()
                diff = max(diff, float(d / max(1.0, np.abs(r).max()) if k == "logits" else d))
        report[f"N={n}"] = {"max_abs_diff": diff, "flipped_pixels": flips}
        if diff > tol:
            raise ExportError(f"ONNX/PyTorch parity failed for N={n}: max abs difference {diff:.3g} > {tol}")
    return report


def format_parity(report: dict) -> str:
    parts = [f"{k} {v['max_abs_diff']:.1e}" + (f" ({v['flipped_pixels']} px within tolerance of a decision)"
                                               if v["flipped_pixels"] else "")
             for k, v in report.items() if k.startswith("N=")]
    return ", ".join(parts) + f" (tolerance {report['tolerance']:g})"


def decoder_latency(onnx_path: Path, spec: ExportSpec, counts=(1, 5, 20, 50), repeat: int = 5) -> dict:
    """Best-of-``repeat`` ms per run on the CPU provider, one image with N ROIs."""
    sess = _session(onnx_path)
    out = {}
    for n in counts:
        inputs = {k: v.numpy() for k, v in zip(spec.inputs, sample_inputs(spec, n, 1))}
        sess.run(None, inputs)
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            sess.run(None, inputs)
            best = min(best, time.perf_counter() - t)
        out[n] = round(best * 1000, 2)
    return out


def export_end_to_end(extractor_onnx: Path, feature_name: str, decoder_onnx: Path, out: Path) -> Path:
    """Join extractor and decoder into one graph: images [1,3,H,W] + rois (+ image_rects) -> the
    decoder's outputs.  The decoder's metadata comes along."""
    from roiseg.featcache.extractor import expose_tensor
    ext = expose_tensor(onnx.load(str(extractor_onnx)), feature_name)
    dec = onnx.load(str(decoder_onnx))
    outputs = [o.name for o in dec.graph.output]
    ver = lambda m: max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))  # noqa: E731
    target = max(ver(ext), ver(dec))
    if ver(ext) != target:
        ext = onnx.version_converter.convert_version(ext, target)
    if ver(dec) != target:
        dec = onnx.version_converter.convert_version(dec, target)
    ext.ir_version = dec.ir_version = max(ext.ir_version, dec.ir_version)
    del ext.metadata_props[:]   # the joined graph's contract is the decoder's
    merged = onnx.compose.merge_models(ext, dec, io_map=[(feature_name, "features")], prefix2="decoder/",
                                       outputs=[f"decoder/{o}" for o in outputs])
    _rename(merged.graph, {f"decoder/{k}": k for k in ["rois", "image_rects"] + outputs})
    onnx.checker.check_model(merged)
    with atomic_write(out) as tmp:
        onnx.save(merged, str(tmp))
    return Path(out)


def _rename(graph, names: dict) -> None:
    for v in list(graph.input) + list(graph.output):
        v.name = names.get(v.name, v.name)
    for node in graph.node:
        node.input[:] = [names.get(x, x) for x in node.input]
        node.output[:] = [names.get(x, x) for x in node.output]

