"""An exported ONNX graph (decoder alone, or extractor + decoder end to end) as the pipeline's
decoder, run by ONNX Runtime without torch; and the schema of its ``featcache`` metadata.

A decoder takes one image's input (features, or the preprocessed image for an end-to-end graph),
the person boxes and their padded ROIs in the input frame, and returns each person's class-1
probability pasted into its window of the original image (``roiseg.inference.torch_decoder`` is
the same for a checkpoint's PyTorch module).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from roiseg.common.certainty import mask_certainty_np
from roiseg.common.errors import RoisegError
from roiseg.data.store_meta import FeatureSource, UntrustedStoreError
from roiseg.runtime.decoding import DecoderInput, RoiGrids
from roiseg.runtime.paste import softmax


def export_contract(props: dict, path: Path) -> FeatureSource:
    """The ``featcache`` metadata of an exported graph (its ``FeatureSource``: extractor tensor and
    sha256, preprocessing, ROI padding, shapes, fine map), checked before anything uses it; the ROI
    padding must be the one the graph itself applies (the top-level ``roi_padding``)."""
    def bad(what: str):
        raise RoisegError(f"{path}: its featcache metadata {what}; re-export it with `cli.py export`")
    if "featcache" not in props:
        raise RoisegError(f"{path} is not a decoder exported by `cli.py export` (no featcache metadata); "
                          f"re-export it from the checkpoint")
    try:
        raw = json.loads(props["featcache"])
    except ValueError:
        bad("is not JSON")
    if not isinstance(raw, dict):
        bad(f"is not a JSON object (a {type(raw).__name__})")
    try:
        source = FeatureSource.from_dict(raw, f"{path}: its featcache metadata")
    except UntrustedStoreError as exc:
        raise RoisegError(f"{exc}; re-export it with `cli.py export`") from None
    try:
        graph_padding = float(json.loads(props.get("roi_padding", "nan")))
    except (TypeError, ValueError):
        graph_padding = float("nan")
    if not abs(graph_padding - source.roi_padding) < 1e-9:
        bad(f"says roi_padding {source.roi_padding}, but the graph pads by {props.get('roi_padding')}")
    return source


class OnnxDecoder:
    """An exported graph (``cli.py export``) in ONNX Runtime: the graph pads the person boxes itself
    (clipped to ``image_rects`` when letterboxed) and its ``logits`` are pasted here with the same
    weights as the PyTorch path.  ``end_to_end``: the graph takes the preprocessed image."""

    def __init__(self, path, provider: str = "auto", device_id: int | None = None):
        from roiseg.common.providers import make_session
        from roiseg.data.extractor import read_onnx
        path = Path(path)
        model = read_onnx(path, "exported ONNX")
        self.source = export_contract({p.key: p.value for p in model.metadata_props}, path)
        self.inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        if "logits" not in [o.name for o in model.graph.output]:
            raise RoisegError(f"{path} has no logits output")
        # each mask's quality score; graphs exported before it existed have it only with a score head;
        # graphs exported before "mask_score" was written do not say which of the two theirs is (the
        # first call tells: a certainty equals the certainty of the graph's own logits)
        self.has_scores = "scores" in [o.name for o in model.graph.output]
        self.mask_score = {p.key: p.value for p in model.metadata_props}.get("mask_score")
        self.end_to_end = self.inputs[0] != "features"
        self.fine = "fine" in self.inputs       # a decoder that fuses the fine map (cache --fine-feature)
        if self.fine and self.source.fine is None:
            raise RoisegError(f"{path} takes a fine map but its featcache metadata names none; re-export it")
        self.letterbox = "image_rects" in self.inputs
        # fp32 engines: the graph's geometry and paste must stay fp32 (export --half puts fp16 in the graph)
        self.session = make_session(model, provider=provider, label=path.name, fp16=False, device_id=device_id)
        self.provider = self.session.get_providers()[0]

    def __call__(self, inp: DecoderInput) -> RoiGrids:
        """The graph takes the person boxes (it pads them itself) and the content rect."""
        feed = {self.inputs[0]: inp.image.astype(np.float32, copy=False),
                "rois": np.concatenate([np.zeros((len(inp), 1)), inp.boxes], 1).astype(np.float32)}
        if self.fine:
            if inp.fine is None:
                raise RoisegError("this decoder fuses a fine map: the pipeline must pass it")
            feed["fine"] = inp.fine.astype(np.float32)
        if self.letterbox:
            feed["image_rects"] = np.asarray(inp.content_rect, np.float32).reshape(1, 4)
        out = self.session.run(["logits"] + (["scores"] if self.has_scores else []), feed)
        fg = softmax(out[0])[:, 1]
        if self.mask_score is None and self.has_scores and len(fg):      # a graph older than the metadata
            self.mask_score = "certainty" if np.allclose(out[1], mask_certainty_np(fg), atol=1e-4) else "score head"
        if self.mask_score == "certainty":      # the graph's scores are the certainty of its logits
            return RoiGrids(fg, None, True)
        return RoiGrids(fg, out[1] if self.has_scores else None, False)
